"""Retrieval metrics from ranked lists: NDCG@k (graded), MRR@k, Recall@k, MAP@k, Accuracy@k, Precision@k.

Definitions follow sentence-transformers' InformationRetrievalEvaluator so that, for binary
relevance, the numbers are the same (tested); NDCG uses the grade as gain (as trec_eval's
ndcg_cut), so graded judgements are supported. A page counts as relevant when its grade is > 0.
MAP@k divides by min(k, number of relevant pages), as sentence-transformers does (trec_eval's map_cut
and ranx divide by the number of relevant pages: lower when a query has more than k).
Rankings must already be in their final order (ties: see :func:`dist_vdr.retrieval.search.merge_topk`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRICS = ("accuracy", "precision", "recall", "mrr", "ndcg", "map")


def retrieval_metrics(ranked: dict[str, Sequence[str]], qrels: dict[str, dict[str, int]],
                      ks: Sequence[int] = (1, 3, 5, 10, 100)) -> dict[str, float]:
    """Mean metrics over the judged queries of ``ranked`` ({query id: page ids, best first}).

    Returns keys like ``ndcg@10``. Queries without any relevant page are skipped (as stock does).
    Vectorised over queries: one [queries x depth] gain matrix, so 10,000 queries x top-100 take
    well under a second.
    """
    ks = sorted(set(int(k) for k in ks))
    judged = [q for q in ranked if any(g > 0 for g in qrels.get(q, {}).values())]
    if not judged:
        raise ValueError("no query has a relevant page in the qrels: nothing to evaluate")
    depth = max(max((len(ranked[q]) for q in judged), default=0), max(ks))
    gains = np.zeros((len(judged), depth))
    ideal = np.zeros((len(judged), depth))
    num_relevant = np.zeros(len(judged))
    for row, q in enumerate(judged):
        grades = qrels[q]
        got = [max(grades.get(p, 0), 0) for p in ranked[q]]
        gains[row, : len(got)] = got
        positive = sorted((g for g in grades.values() if g > 0), reverse=True)[:depth]
        ideal[row, : len(positive)] = positive
        num_relevant[row] = sum(1 for g in grades.values() if g > 0)
    hits = gains > 0
    discount = 1.0 / np.log2(np.arange(2, depth + 2))
    cum_hits = np.cumsum(hits, axis=1)
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), depth + 1)
    precision_at_hit = np.where(hits, cum_hits / np.arange(1, depth + 1), 0.0)
    out: dict[str, float] = {}
    for k in ks:
        top = cum_hits[:, k - 1]
        idcg = (ideal[:, :k] * discount[:k]).sum(axis=1)
        dcg = (gains[:, :k] * discount[:k]).sum(axis=1)
        out[f"accuracy@{k}"] = float(np.mean(first_hit < k))
        out[f"precision@{k}"] = float(np.mean(top / k))
        out[f"recall@{k}"] = float(np.mean(top / num_relevant))
        out[f"mrr@{k}"] = float(np.mean(np.where(first_hit < k, 1.0 / (first_hit + 1), 0.0)))
        out[f"ndcg@{k}"] = float(np.mean(np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1), 0.0)))
        out[f"map@{k}"] = float(np.mean(precision_at_hit[:, :k].sum(axis=1) / np.minimum(k, num_relevant)))
    return {f"{m}@{k}": out[f"{m}@{k}"] for m in METRICS for k in ks}


def headline(m: dict) -> str:
    """One evaluation's line in a command's output: NDCG@10, MRR@10 and Recall@10."""
    return (f"NDCG@10 {m.get('ndcg@10', float('nan')):.4f}  MRR@10 {m.get('mrr@10', float('nan')):.4f}  "
            f"Recall@10 {m.get('recall@10', float('nan')):.4f}")
