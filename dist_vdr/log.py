"""dist-vdr's one logging style: the standard ``logging`` module with a rank-aware format.

Every module logs through ``logging.getLogger(__name__)`` (a child of the ``dist_vdr`` logger).
A record is written once, by rank 0, unless it is marked ``extra=ALL_RANKS`` (a log then proves
every rank got somewhere: "joined", "training finished at step N"). Lines look like
``[dist-vdr rank 0/2] message`` once the process knows its place (:func:`set_rank`, called by
:func:`dist_vdr.distributed.init`), ``[dist-vdr] message`` before. They go to stdout, flushed per
record, next to the Trainer's own progress. ``print`` is kept for command output only (results a
user or a script reads).
"""

from __future__ import annotations

import logging
import sys

ROOT = "dist_vdr"
ALL_RANKS = {"all_ranks": True}
"""``logger.info(msg, extra=ALL_RANKS)``: written by every rank, not only rank 0."""

_place: dict[str, int | None] = {"rank": None, "world_size": None}


class RankFormatter(logging.Formatter):
    """``[dist-vdr rank r/w] message`` (``[dist-vdr] message`` before the rank is known)."""

    def format(self, record: logging.LogRecord) -> str:
        rank, world = _place["rank"], _place["world_size"]
        prefix = "[dist-vdr]" if rank is None else f"[dist-vdr rank {rank}/{world}]"
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"{prefix} {level}{record.getMessage()}"


class RankFilter(logging.Filter):
    """Rank 0 writes every record; the other ranks only those marked ``extra=ALL_RANKS``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return bool(getattr(record, "all_ranks", False)) or not _place["rank"]


def _install() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not any(isinstance(h.formatter, RankFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(RankFormatter())
        handler.addFilter(RankFilter())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        # Not also through the root logger: a library that configures it would print each line twice.
        root.propagate = False
    return root


def set_rank(rank: int, world_size: int) -> None:
    """This process's place in the group: from now on every line carries it."""
    _place["rank"], _place["world_size"] = rank, world_size


def get(name: str) -> logging.Logger:
    """The logger of module ``name`` (``__name__``), writing through dist-vdr's handler."""
    _install()
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")
