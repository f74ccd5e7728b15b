"""``python -m dist_vdr.cli.launcher ARGS``: ``accelerate launch ARGS``, with user errors reported as such.

Ranks that stop on a user error print one ``error:`` line (rank 0, see ``cli.main``) and exit 2;
``accelerate launch`` then re-raises torch elastic's ChildFailedError: a traceback and exit 1,
which buries the one line that matters and breaks the documented status. Here a launch whose
first failing rank exited 2 ends with status 2 and no traceback; every other failure keeps
torch elastic's full report.
"""

from __future__ import annotations

import logging
import sys

from dist_vdr import compat

USER_ERROR = 2


class _NoUserErrorReport(logging.Filter):
    """Drop torch elastic's "failed (exitcode: 2) ..." line: the rank already said what went wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        return compat.torch_elastic_failure_text(USER_ERROR) not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    logging.getLogger(compat.TORCH_ELASTIC_LOGGER).addFilter(_NoUserErrorReport())
    try:
        launch_command(args)
    except ChildFailedError as exc:
        _, first = exc.get_first_failure()
        if first.exitcode == USER_ERROR:
            return USER_ERROR
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
