"""The data a run trains and evaluates on, and what the startup passes established about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dist_vdr.data import startup
from dist_vdr.data.loading import EvalData
from dist_vdr.data.mixture_rows import MixtureRows


@dataclass
class PreparedData:
    """Loaded (memory-mapped) training rows and eval data, with the startup passes' results."""

    train: object  # datasets.Dataset with the recipe's training columns
    eval: EvalData | None
    passes: list[startup.StartupResult] = field(default_factory=list)
    """The passes over the training rows (first; one per dataset of a mixture), then the one over the
    eval corpus, when run."""
    mixture: MixtureRows | None = None
    """The datasets of ``train`` (data.datasets), None for the rows of one dataset."""
    train_passes: int = 0
    """How many of ``passes`` are over the training rows."""
    eval_sets: dict[str, EvalData] = field(default_factory=dict)
    """A mixture's eval sets by dataset name (data.datasets[] with eval keys; ``eval`` is then None)."""

    @property
    def has_eval(self) -> bool:
        return self.eval is not None or bool(self.eval_sets)

    @property
    def row_hashes(self):
        hashes = [p.hashes for p in self.passes[:self.train_passes]]
        if not hashes or any(h is None for h in hashes):
            return None
        return hashes[0] if len(hashes) == 1 else np.concatenate(hashes)

    def write_records(self, out: Path | None) -> list[Path]:
        """Records of the passes run now, or found only elsewhere, into ``out`` and the user cache."""
        written = []
        for result in self.passes:
            if result.reused_from is None or out is None or not Path(result.reused_from).is_relative_to(out):
                written += startup.write_record(result, out)
        return written
