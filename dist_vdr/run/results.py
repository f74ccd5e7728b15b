"""Typed results: one evaluation's metrics, and what a training run returns.

A metrics record keys its rows by name: a Matryoshka dimension (``"64"``) for an embedding model,
a ranking stage (``"retrieval"``, ``"rerank"``, ``"rerankonly"``) for a reranker. The names are
what ``metrics_before.json`` / ``metrics_after.json`` store, so a stored record reads back as it
was written (:meth:`Metrics.from_json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dist_vdr.storage import atomic_write


@dataclass(frozen=True)
class Metrics:
    """One evaluation of one model: ``rows[name][metric]``, e.g. ``rows["64"]["ndcg@10"]``."""

    step: int
    rows: dict[str, dict[str, float]]

    @classmethod
    def of(cls, step: int, rows: dict) -> Metrics:
        """From an evaluator's summary (keys may be int dims or stage names)."""
        return cls(step=step, rows={str(name): dict(values) for name, values in rows.items()})

    def get(self, name: str | int, metric: str) -> float | None:
        return self.rows.get(str(name), {}).get(metric)

    @property
    def dims(self) -> list[int]:
        """The embedding dimensions evaluated, largest first ([] for a reranker's stages)."""
        return sorted((int(n) for n in self.rows if n.isdigit()), reverse=True)

    def to_json(self) -> dict:
        # Dims largest first, then stages in the evaluator's order.
        dims = sorted((n for n in self.rows if n.isdigit()), key=int, reverse=True)
        names = dims + [n for n in self.rows if not n.isdigit()]
        return {"step": self.step, "metrics": {n: self.rows[n] for n in names}}

    @classmethod
    def from_json(cls, payload: dict) -> Metrics:
        return cls(step=int(payload.get("step", 0)), rows=dict(payload["metrics"]))

    def write(self, path: Path) -> None:
        """Atomically: a reader never sees half a file."""
        atomic_write(path, json.dumps(self.to_json(), indent=2))

    @classmethod
    def read(cls, path: Path, step: int | None = None) -> Metrics | None:
        """The record stored at ``path`` (of ``step``, when given), or None."""
        if not path.is_file():
            return None
        record = cls.from_json(json.loads(path.read_text()))
        return record if step is None or record.step == step else None


@dataclass
class RunResult:
    """What ``run_training`` returns: a finished run (metrics before/after when evaluation is on) or a
    run stopped by a signal at a saved step (``preempted``; ``signal`` says which)."""

    task: str
    global_step: int
    final_loss: float | None = None
    before: Metrics | None = None
    after: Metrics | None = None
    preempted: bool = False
    signal: str | None = None
    dims: list[int] = field(default_factory=list)
    """Embedding dims evaluated, largest first ([] for rerankers and when evaluation is off)."""
    weights_of_step: int | None = None
    """training.final=best: the step whose weights final/ holds (None: the last step's)."""

    @property
    def finished(self) -> bool:
        return not self.preempted
