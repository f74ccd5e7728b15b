"""The `dist-vdr` command line: ``commands`` (the parser and the commands), ``data`` and ``bench`` (their command
groups), ``options`` (options generated from the config dataclasses), ``settings`` (each command's settings
dataclass), ``launcher`` (``accelerate launch`` with user errors said as such), ``cluster`` (SLURM via submitit).

``dist-vdr`` and ``python -m dist_vdr.cli`` run :func:`entry`; the parser is imported only when called, so that
``import dist_vdr.cli.options`` stays light."""


def main(argv=None):
    from dist_vdr.cli.commands import main as run

    return run(argv)


def entry():
    from dist_vdr.cli.commands import entry as run

    return run()
