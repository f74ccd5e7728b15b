"""``python -m dist_vdr.cli``: the `dist-vdr` command."""

from dist_vdr.cli import entry

entry()
