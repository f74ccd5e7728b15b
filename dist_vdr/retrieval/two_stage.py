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

from dist_vdr.retrieval.scoring import PAGE, QUERY, Scoring
from dist_vdr.retrieval.search import (
    RESCORE_SLACK,
    cut_to,
    empty_top,
    keep_top,
    merge_over_ranks,
    pad_top,
    rescore,
    store_pair_scores,
)
from dist_vdr.retrieval.token_store import TokenStore


def two_stage_topk(queries: torch.Tensor, shard: torch.Tensor | TokenStore, offset: int, k: int,
                   tie_key: np.ndarray, *, candidates: int, scoring: Scoring, dim: int | None = None,
                   timings: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of all queries over the corpus rows [offset, offset + len(shard)) this rank holds (every rank at once),
    scored exactly on the first stage's ``candidates`` per query and rank (so the result depends on the number of
    ranks: W ranks score W x ``candidates`` pages per query).

    ``queries``: the representations (``scoring``'s); ``shard``: this rank's pages (a tensor or a store), read
    chunk by chunk: each chunk's first-stage vectors (``scoring.first_stage`` of its pages cut to ``dim``) are
    scored against the queries' and forgotten, so memory holds one chunk and a running top-``candidates``.
    Returns what :func:`~dist_vdr.retrieval.sharded.global_topk` does. ``timings``: filled with the seconds of
    the pages' first-stage vectors (``pages_s``), the first stage's search (``first_s``) and the exact stage
    (``exact_s``)."""
    import time

    clock = {"pages_s": 0.0, "first_s": 0.0}
    if candidates < k:
        raise ValueError(f"the first stage must keep at least k={k} candidates, got {candidates}")
    dim = dim or queries.shape[-1]
    q = cut_to(scoring, queries, dim)
    query_vectors = scoring.first_stage([scoring.trim(row, QUERY) for row in q], QUERY).float()
    best = empty_top(q.shape[0])
    for positions, items in _page_chunks(shard, scoring):
        t0 = time.perf_counter()
        page_vectors = scoring.first_stage([cut_to(scoring, t, dim) for t in items], PAGE).float()
        t1 = time.perf_counter()
        best = keep_top(best, query_vectors @ page_vectors.T, torch.as_tensor(positions), candidates)
        clock["pages_s"] += t1 - t0
        clock["first_s"] += time.perf_counter() - t1
    t0 = time.perf_counter()
    scores, idx = _exact_stage(q, shard, best[1], k + RESCORE_SLACK, scoring, dim)
    top = torch.topk(scores, k, dim=1)
    idx = torch.gather(idx, 1, top.indices)
    if timings is not None:
        timings.update(clock, exact_s=time.perf_counter() - t0)
    return merge_over_ranks(top.values, idx, offset, k, tie_key)


def _exact_stage(q: torch.Tensor, shard: torch.Tensor | TokenStore, cand: torch.Tensor, keep: int, scoring: Scoring,
                 dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, shard positions) ``[Q, keep]`` of each query's best ``keep`` candidates by exact score (-inf / -1
    past its candidates). A store's candidates are scored in float32 first (:func:`store_pair_scores`, page by
    page), and the best ``keep`` again by :func:`rescore` (float64), as the exhaustive search scores its own: both
    searches write the same score for a page they both rank. In memory, every candidate is rescored at once."""
    if isinstance(shard, TokenStore):
        rough = store_pair_scores(q, shard, cand, scoring=scoring, dim=dim, dtype=torch.float32)
        top = torch.topk(rough, min(keep, rough.shape[1]), dim=1)
        cand = torch.where(torch.isfinite(top.values), torch.gather(cand, 1, top.indices), -1)
        scores = rescore(q, shard, cand, scoring=scoring, dim=dim)
    else:
        scores = rescore(q, cut_to(scoring, shard, dim), cand, scoring=scoring)
    top = torch.topk(scores, min(keep, scores.shape[1]), dim=1)
    return pad_top(top.values, torch.where(torch.isfinite(top.values), torch.gather(cand, 1, top.indices), -1), keep)


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
