"""Retrieval evaluation with sentence-transformers' own InformationRetrievalEvaluator, one per dim.

This is the stock behaviour (one corpus encode per Matryoshka dim, rank 0 drives encoding under DDP);
it is what the trainer uses until the sharded evaluator replaces it. Metric keys are
``dim{d}_cosine_ndcg@10`` and friends; :func:`summarise` turns them into {dim: {metric: value}}.
"""

from __future__ import annotations

import re

from sentence_transformers.base.evaluation.sequential import SequentialEvaluator
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
from sentence_transformers.util import cos_sim

from dist_vdr.data.loading import EvalData


def build_evaluator(data: EvalData, dims: list[int], *, batch_size: int = 16, ks: list[int] = (1, 3, 5, 10, 100),
                    show_progress_bar: bool = False) -> StockRetrievalEvaluator:
    ks = sorted(set(ks))
    evaluators = [
        InformationRetrievalEvaluator(
            queries=data.queries,
            corpus=data.corpus_dict(),
            relevant_docs=data.relevant_sets(),
            name=f"dim{d}",
            truncate_dim=d,
            batch_size=batch_size,
            mrr_at_k=ks,
            ndcg_at_k=ks,
            accuracy_at_k=ks,
            precision_recall_at_k=ks,
            map_at_k=ks,
            score_functions={"cosine": _cosine},
            show_progress_bar=show_progress_bar,
            write_csv=False,
        )
        for d in dims
    ]
    # The first (largest) dim drives best-model selection.
    return StockRetrievalEvaluator(evaluators, main_score_function=lambda scores: scores[0])


def _cosine(a, b):
    return cos_sim(a, b)


_KEY = re.compile(r"(?:^|_)dim(\d+)_cosine_(.+)$")


def summarise(metrics: dict[str, float]) -> dict[int, dict[str, float]]:
    """{dim: {"ndcg@10": ..., ...}} from the evaluator's flat (possibly ``eval_``-prefixed) keys."""
    out: dict[int, dict[str, float]] = {}
    for key, value in metrics.items():
        m = _KEY.search(key)
        if m:
            out.setdefault(int(m.group(1)), {})[m.group(2)] = float(value)
    return out


class StockRetrievalEvaluator(SequentialEvaluator):
    """sentence-transformers' evaluators, one per dim, as the Trainer drives them (rank 0)
    (:class:`dist_vdr.retrieval.protocol.RunEvaluator`)."""

    all_ranks = False
    summarise = staticmethod(summarise)
