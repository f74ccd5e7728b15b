"""The data a run trains and evaluates on, and what the startup passes established about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import startup
from .loading import EvalData


@dataclass
class PreparedData:
    """Loaded (memory-mapped) training rows and eval data, with the startup passes' results."""

    train: object  # datasets.Dataset with the recipe's training columns
    eval: EvalData | None
    passes: list[startup.StartupResult] = field(default_factory=list)
    """The pass over the training rows (first), then the one over the eval corpus, when run."""

    @property
    def row_hashes(self):
        return self.passes[0].hashes if self.passes else None

    def write_records(self, out: Path | None) -> list[Path]:
        """Records of the passes run now, or found only elsewhere, into ``out`` and the user cache."""
        written = []
        for result in self.passes:
            if result.reused_from is None or out is None or not Path(result.reused_from).is_relative_to(out):
                written += startup.write_record(result, out)
        return written
