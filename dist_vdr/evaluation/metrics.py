"""Retrieval metrics from ranked lists: NDCG@k (graded), MRR@k, Recall@k, MAP@k, Accuracy@k, Precision@k.

Definitions follow sentence-transformers' InformationRetrievalEvaluator so that, for binary
relevance, the numbers are the same (tested); NDCG uses the grade as gain (as trec_eval's
ndcg_cut), so graded judgements are supported. A page counts as relevant when its grade is > 0.
Rankings must already be in their final order (see :func:`order_hits` for the tie-breaking rule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

METRICS = ("accuracy", "precision", "recall", "mrr", "ndcg", "map")


def order_hits(scores: Sequence[float], page_ids: Sequence[str]) -> list[int]:
    """Positions sorted by score descending, ties by page id ascending (sentence-transformers' rule)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], page_ids[i]))


def _dcg(gains: np.ndarray) -> float:
    if gains.size == 0:
        return 0.0
    return float(np.sum(gains / np.log2(np.arange(2, gains.size + 2))))


def retrieval_metrics(ranked: dict[str, Sequence[str]], qrels: dict[str, dict[str, int]],
                      ks: Sequence[int] = (1, 3, 5, 10, 100)) -> dict[str, float]:
    """Mean metrics over the judged queries of ``ranked`` ({query id: page ids, best first}).

    Returns keys like ``ndcg@10``. Queries without any relevant page are skipped (as stock does).
    """
    ks = sorted(set(int(k) for k in ks))
    sums = {f"{m}@{k}": 0.0 for m in METRICS for k in ks}
    n = 0
    for qid, pages in ranked.items():
        grades = qrels.get(qid, {})
        relevant = {p for p, g in grades.items() if g > 0}
        if not relevant:
            continue
        n += 1
        gains = np.array([grades.get(p, 0) if grades.get(p, 0) > 0 else 0 for p in pages], dtype=np.float64)
        hits = gains > 0
        ideal = np.array(sorted((g for g in grades.values() if g > 0), reverse=True), dtype=np.float64)
        first_hit = int(np.argmax(hits)) if hits.any() else math.inf
        cum_hits = np.cumsum(hits)
        for k in ks:
            top_hits = int(cum_hits[min(k, len(pages)) - 1]) if len(pages) else 0
            sums[f"accuracy@{k}"] += 1.0 if first_hit < k else 0.0
            sums[f"precision@{k}"] += top_hits / k
            sums[f"recall@{k}"] += top_hits / len(relevant)
            sums[f"mrr@{k}"] += 1.0 / (first_hit + 1) if first_hit < k else 0.0
            idcg = _dcg(ideal[:k])
            sums[f"ndcg@{k}"] += _dcg(gains[:k]) / idcg if idcg > 0 else 0.0
            ranks = np.nonzero(hits[:k])[0]
            precisions = np.arange(1, ranks.size + 1) / (ranks + 1)
            sums[f"map@{k}"] += float(precisions.sum()) / min(k, len(relevant))
    if n == 0:
        raise ValueError("no query has a relevant page in the qrels: nothing to evaluate")
    return {key: value / n for key, value in sums.items()}
