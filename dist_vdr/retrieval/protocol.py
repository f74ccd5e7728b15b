"""What a training run asks of an evaluator (the sharded, stock and rerank evaluators implement it).

``all_ranks``: True for an evaluator that runs on every rank at once, each with its share of the
corpus or queries (it is called directly, on all ranks, and rank 0 writes ``output_path``);
False for one the Trainer drives (sentence-transformers' own evaluators run on rank 0 while the
other ranks serve its encode calls).

``__call__`` returns the flat metrics sentence-transformers logs (``"64_ndcg@10"``,
``"rerank_ndcg@10"``...); ``summarise`` turns them into rows by name (a dimension or a ranking
stage) -> metric -> value, which :class:`dist_vdr.run.results.Metrics` records.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class RunEvaluator(Protocol):
    all_ranks: bool

    def __call__(self, model, output_path: str | None = None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        ...

    def summarise(self, raw: dict[str, float]) -> dict[int | str, dict[str, float]]:
        ...
