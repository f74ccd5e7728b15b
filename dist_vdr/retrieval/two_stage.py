"""Two-stage search: candidates from a single-vector first stage, then the exact score of each candidate.

For a representation too costly to score against every page (token embeddings by MaxSim: ``Tq x Tp`` inner
products per pair), each page also gets ONE vector whose inner product with a query's vector approximates the
exact score (e.g. MUVERA's fixed dimensional encodings, :mod:`dist_vdr.kinds.multi_vector.fde`, or a hybrid
model's pooled vector). The first stage is an exact inner-product search of those vectors (faiss when installed)
for ``candidates`` pages per query on each rank's shard; the second scores only those pages exactly
(:func:`~dist_vdr.retrieval.search.rescore`: pair by pair in float64, the scores the exhaustive search gives them)
and keeps the best ``k``. A page the first stage misses is lost: the recall of the exhaustive top-k is what
``dist-vdr bench eval-multi-vector`` states beside the speed. Then, as :func:`~dist_vdr.retrieval.sharded.global_topk`:
one gather of the per-rank lists and the deterministic merge.
"""

from __future__ import annotations

import numpy as np
import torch

from dist_vdr import distributed
from dist_vdr.retrieval.scoring import PAGE, QUERY, Scoring
from dist_vdr.retrieval.search import RESCORE_SLACK, cut_to, empty_top, keep_top, merge_topk
from dist_vdr.retrieval.token_store import TokenStore


def two_stage_topk(queries: torch.Tensor, shard: torch.Tensor | TokenStore, offset: int, k: int,
                   tie_key: np.ndarray, *, candidates: int, scoring: Scoring,
                   dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of all queries over the corpus rows [offset, offset + len(shard)) this rank holds (every rank at once),
    scored exactly on the first stage's ``candidates`` per query and rank (so the result depends on the number of
    ranks: W ranks score W x ``candidates`` pages per query).

    ``queries``: the representations (``scoring``'s); ``shard``: this rank's pages (a tensor or a store), read
    chunk by chunk: each chunk's first-stage vectors (``scoring.first_stage`` of its pages cut to ``dim``) are
    scored against the queries' and forgotten, so memory holds one chunk and a running top-``candidates``.
    Returns what :func:`~dist_vdr.retrieval.sharded.global_topk` does."""
    if candidates < k:
        raise ValueError(f"the first stage must keep at least k={k} candidates, got {candidates}")
    dim = dim or queries.shape[-1]
    q = cut_to(scoring, queries, dim)
    query_vectors = scoring.first_stage([scoring.trim(row, QUERY) for row in q], QUERY).float()
    best = empty_top(q.shape[0])
    for positions, items in _page_chunks(shard, scoring):
        page_vectors = scoring.first_stage([cut_to(scoring, t, dim) for t in items], PAGE).float()
        best = keep_top(best, query_vectors @ page_vectors.T, torch.as_tensor(positions), candidates)
    cand = best[1]
    keep = k + RESCORE_SLACK
    scores, idx = torch.full((q.shape[0], keep), float("-inf")), torch.full((q.shape[0], keep), -1, dtype=torch.long)
    for i in range(q.shape[0]):
        mine = cand[i][cand[i] >= 0]
        if len(mine) == 0:
            continue
        if isinstance(shard, TokenStore):
            rows, counts = shard.read(mine.tolist())
            pages = cut_to(scoring, scoring.stack_rows(rows, counts, PAGE), dim)
        else:
            pages = cut_to(scoring, shard[mine], dim)
        # The exact score of every candidate; the best k + slack again in float64, as the exhaustive search's
        # rescoring gives them (so both searches write the same score for a page they both rank).
        best_here = torch.topk(scoring.scores(q[i:i + 1], pages)[0], min(keep, len(mine)))
        n = len(best_here.indices)
        scores[i, :n] = scoring.scores(q[i:i + 1].double(), pages[best_here.indices].double())[0].float()
        idx[i, :n] = mine[best_here.indices]
    top = torch.topk(scores, k, dim=1)
    idx = torch.gather(idx, 1, top.indices)
    idx = torch.where(idx >= 0, idx + offset, idx)
    all_scores = distributed.all_gather_same(top.values.contiguous())
    all_idx = distributed.all_gather_same(idx.contiguous())
    cat_s = all_scores.permute(1, 0, 2).reshape(q.shape[0], -1)
    cat_i = all_idx.permute(1, 0, 2).reshape(q.shape[0], -1)
    return merge_topk(cat_s, cat_i, k, tie_key)


PAGE_CHUNK_ROWS = 1 << 16
"""Token vectors per chunk of pages the first stage encodes at once."""


def _page_chunks(shard: torch.Tensor | TokenStore, scoring: Scoring):
    """(positions, trimmed pages) of ``shard``, a chunk at a time."""
    if isinstance(shard, TokenStore):
        for positions, rows, counts in shard.chunks(PAGE_CHUNK_ROWS):
            yield positions, torch.split(rows, counts.tolist())
        return
    step = max(1, PAGE_CHUNK_ROWS // max(1, shard.shape[1] if shard.dim() > 2 else 1))
    for start in range(0, shard.shape[0], step):
        rows = shard[start:start + step]
        yield np.arange(start, start + len(rows)), [scoring.trim(r, PAGE) for r in rows]
