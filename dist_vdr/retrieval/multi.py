"""Several eval sets in one evaluation (a mixture's datasets, each with its own): every set evaluated by
its own evaluator (sharded over the ranks as usual), and the macro average over the sets as the main
result.

Flat keys: the macro average under the evaluators' own keys (``dim64_cosine_ndcg@10``: what the
trainer's logs, the headline and ``metrics_*.json``'s dimension rows read), each set's own under
``<set>/<key>``. Summary rows: the macro rows (``"64"``) and ``"<set>/64"`` per set.
"""

from __future__ import annotations

import os

from sentence_transformers.base.evaluation.evaluator import BaseEvaluator


class MultiSetEvaluator(BaseEvaluator):
    """dist_vdr.retrieval.protocol.RunEvaluator over named evaluators (all of them all-rank ones). A
    BaseEvaluator: the trainer would wrap anything else in a SequentialEvaluator."""

    all_ranks = True

    def __init__(self, evaluators: dict[str, object]) -> None:
        super().__init__()
        if not evaluators:
            raise ValueError("no eval set to evaluate")
        if not all(getattr(e, "all_ranks", False) for e in evaluators.values()):
            raise ValueError("several eval sets need evaluation.implementation=sharded (the stock evaluator runs "
                             "one set on rank 0)")
        self.evaluators = dict(evaluators)
        first = next(iter(self.evaluators.values()))
        self.primary_metric = getattr(first, "primary_metric", None)

    def __call__(self, model, output_path: str | None = None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        flat: dict[str, float] = {}
        per_set = []
        for name, evaluator in self.evaluators.items():
            where = os.path.join(output_path, name) if output_path else None
            raw = evaluator(model, output_path=where, epoch=epoch, steps=steps)
            per_set.append(raw)
            flat.update({f"{name}/{key}": value for key, value in raw.items()})
        shared = set.intersection(*(set(raw) for raw in per_set))
        flat.update({key: sum(raw[key] for raw in per_set) / len(per_set) for key in sorted(shared)})
        return flat

    def summarise(self, raw: dict[str, float]) -> dict[str, dict[str, float]]:
        first = next(iter(self.evaluators.values()))
        rows: dict[str, dict[str, float]] = {str(k): v for k, v in first.summarise(
            {key: value for key, value in raw.items() if "/" not in key}).items()}
        for name, evaluator in self.evaluators.items():
            mine = {key[len(name) + 1:]: value for key, value in raw.items() if key.startswith(f"{name}/")}
            rows.update({f"{name}/{row}": values for row, values in evaluator.summarise(mine).items()})
        return rows
