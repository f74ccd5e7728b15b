"""Exact top-k search over one corpus shard, and the merge of per-rank top-k lists.

Scores are those of a :class:`~dist_vdr.retrieval.scoring.Scoring` (default: cosine, the inner product
of normalised vectors). Memory stays O(chunk + queries x k): the corpus is scored in chunks and only a
running top-k per query is kept. The backend is faiss (exact ``IndexFlatIP``) when installed and the
scoring is an inner product, else the scoring's scores chunk by chunk in torch (matmuls for cosine);
both are exact. The candidates' scores are then recomputed pair by pair (:func:`rescore`),
so a ranking does not depend on how the corpus was split, and ordering is made deterministic after
the merge (score descending, then a tie key given by the caller: the evaluator's is descending page
id, trec_eval's rule; mining's is ascending content hash).
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import torch

from dist_vdr import distributed
from dist_vdr.retrieval.scoring import Scoring, resolve
from dist_vdr.retrieval.token_store import TokenStore

NEG_INF = float("-inf")


def has_faiss() -> bool:
    return importlib.util.find_spec("faiss") is not None


def shard_topk(queries: torch.Tensor, shard: torch.Tensor, k: int, *, backend: str = "auto",
               corpus_chunk: int = 65536, query_block: int = 4096,
               scoring: Scoring | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``scoring.scores(queries, shard)`` per query: (scores [Q, k], local indices [Q, k]).

    Rows past the shard size are padded with -inf scores and index -1 (shards smaller than k).
    Both inputs are stored representations on CPU (cosine, the default: L2-normalised float32, scores
    = inner products). faiss searches inner-product scorings only: ``auto`` then takes torch.
    """
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"unknown search backend {backend!r}; use auto, faiss or torch")
    scoring = resolve(scoring)
    if backend == "faiss" and not scoring.inner_product:
        raise ValueError(f"search backend faiss needs inner-product scores; {type(scoring).__name__} is not one: "
                         f"use backend auto or torch")
    n = shard.shape[0]
    kk = min(k, n)
    if kk == 0:
        scores, idx = torch.empty(queries.shape[0], 0), torch.empty(queries.shape[0], 0, dtype=torch.long)
    elif backend == "faiss" or (backend == "auto" and scoring.inner_product and has_faiss()):
        scores, idx = _faiss_topk(queries, shard, kk)
    else:
        scores, idx = _torch_topk(queries, shard, kk, corpus_chunk, query_block, scoring)
    return pad_top(scores, idx, k)


def pad_top(scores: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A top list of fewer than ``k`` columns (a shard smaller than k) padded to k: -inf scores, index -1."""
    pad = k - scores.shape[1]
    if pad <= 0:
        return scores, idx
    return (torch.cat([scores, torch.full((scores.shape[0], pad), NEG_INF)], dim=1),
            torch.cat([idx, torch.full((idx.shape[0], pad), -1, dtype=torch.long)], dim=1))


def _faiss_topk(queries: torch.Tensor, shard: torch.Tensor, k: int):
    import faiss

    # Brute-force knn straight on the shard's memory: an IndexFlatIP would copy the whole shard.
    scores, idx = faiss.knn(np.ascontiguousarray(queries.numpy(), dtype=np.float32),
                            np.ascontiguousarray(shard.numpy(), dtype=np.float32), k,
                            metric=faiss.METRIC_INNER_PRODUCT)
    return torch.from_numpy(scores), torch.from_numpy(idx).long()


def _torch_topk(queries: torch.Tensor, shard: torch.Tensor, k: int, corpus_chunk: int, query_block: int,
                scoring: Scoring):
    all_scores, all_idx = [], []
    for qb in range(0, queries.shape[0], query_block):
        q = queries[qb:qb + query_block]
        best = empty_top(q.shape[0])
        for cb in range(0, shard.shape[0], corpus_chunk):
            s = scoring.scores(q, shard[cb:cb + corpus_chunk])  # cosine: q @ shard[...].T
            best = keep_top(best, s, torch.arange(cb, cb + s.shape[1]), k)
        all_scores.append(best[0])
        all_idx.append(best[1])
    return torch.cat(all_scores), torch.cat(all_idx)


def empty_top(num_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A running top-k (scores, ids) holding nothing yet, for :func:`keep_top`."""
    return torch.full((num_queries, 0), NEG_INF), torch.empty((num_queries, 0), dtype=torch.long)


def keep_top(best: tuple[torch.Tensor, torch.Tensor], s: torch.Tensor, ids: torch.Tensor, k: int):
    """The running top-k (scores, ids) of ``best`` and the new scores ``s`` [Q, n] of items ``ids`` [n]."""
    top = torch.topk(s, min(k, s.shape[1]), dim=1)
    cand_s = torch.cat([best[0], top.values], dim=1)
    cand_i = torch.cat([best[1], ids[top.indices]], dim=1)
    keep = torch.topk(cand_s, min(k, cand_s.shape[1]), dim=1)
    return keep.values, torch.gather(cand_i, 1, keep.indices)


def store_topk(queries: torch.Tensor, store: TokenStore, k: int, *, scoring: Scoring, dim: int | None = None,
               progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`shard_topk` of the pages of a :class:`~dist_vdr.retrieval.token_store.TokenStore`, read in chunks of
    about ``scoring.chunk_elements`` values (2**24 if it has none), each cut to ``dim`` (``scoring.truncate``) and
    scored as rows (``scoring.scores_rows``): memory is one chunk, its ``[Q, chunk]`` scores and the running top-k.
    Returns (scores [Q, k], shard positions [Q, k]; -inf / -1 past the stored pages). ``progress``: a bar's
    title (None: no bar)."""
    from tqdm.auto import tqdm

    rows = max(1, getattr(scoring, "chunk_elements", 1 << 24) // max(1, store.dim))
    best = empty_top(queries.shape[0])
    with tqdm(total=store.rows, desc=progress, unit="vectors", unit_scale=True, disable=progress is None) as bar:
        for positions, flat, counts in store.chunks(rows):
            scores = scoring.scores_rows(queries, cut_to(scoring, flat, dim), counts)
            best = keep_top(best, scores, torch.from_numpy(positions), k)
            bar.update(len(flat))
    return pad_top(*best, k)


def cut_to(scoring: Scoring, reps: torch.Tensor, dim: int | None) -> torch.Tensor:
    """``reps`` cut to the Matryoshka ``dim`` (``scoring.truncate``); as they are at their full dim or None."""
    return scoring.truncate(reps, dim) if dim is not None and dim < reps.shape[-1] else reps


RESCORE_SLACK = 8
"""Extra candidates per shard, so that rescoring can reorder near-ties at the k-th place."""


def rescore(queries: torch.Tensor, shard: torch.Tensor | TokenStore, idx: torch.Tensor, query_block: int = 1024,
            scoring: Scoring | None = None, dim: int | None = None) -> torch.Tensor:
    """The candidates' scores recomputed pair by pair in float64 (inner-product scorings such as cosine: dot
    products; others: ``scoring.pair_scores``), rounded to float32 (-inf for padding).

    A matrix product rounds a (query, page) score differently with the shape of the product and
    the tile the pair falls in, i.e. with how the corpus is split over ranks and chunks; near-ties
    then flip with the number of ranks. Recomputed row by row, a pair always gets the same score.

    ``shard``: the stored representations, or a :class:`~dist_vdr.retrieval.token_store.TokenStore` (the candidates
    read page by page and cut to ``dim``: :func:`store_pair_scores`).
    """
    scoring = resolve(scoring)
    out = torch.full(idx.shape, NEG_INF)
    if isinstance(shard, TokenStore):
        return _store_rescore(queries, shard, idx, scoring, dim, out)
    if shard.shape[0] == 0:  # a rank without pages (small corpus): only padding
        return out
    for qb in range(0, idx.shape[0], query_block):
        block = idx[qb:qb + query_block]
        if scoring.inner_product:  # dot products, without repeating the queries
            pages = shard[block.clamp(min=0)].double()  # [b, k, D]
            s = (pages * queries[qb:qb + query_block, None, :].double()).sum(dim=-1).float()
        else:
            s = _pair_rescore(queries[qb:qb + query_block], shard, block, scoring)
        out[qb:qb + query_block] = torch.where(block >= 0, s, torch.full_like(s, NEG_INF))
    return out


def _store_rescore(queries: torch.Tensor, store: TokenStore, idx: torch.Tensor, scoring: Scoring, dim: int | None,
                   out: torch.Tensor) -> torch.Tensor:
    """:func:`rescore` of candidates in a page store: :func:`store_pair_scores` in float64, rounded to float32."""
    out[:] = store_pair_scores(queries, store, idx, scoring=scoring, dim=dim, dtype=torch.float64).float()
    return out


PAIR_CHUNK_ROWS = 1 << 16
"""Page rows :func:`store_pair_scores` reads at once."""


def store_pair_scores(queries: torch.Tensor, store: TokenStore, idx: torch.Tensor, *, scoring: Scoring,
                      dim: int | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``[Q, n]`` the score of query i with the stored page ``idx[i, j]`` (-inf where it is -1), in ``dtype``.

    Page by page, not query by query: the wanted pages are read once each, in file order, a chunk at a time, and
    each is scored against the queries that want it (``scoring.pair_scores_rows`` of the chunk's pairs). Queries
    are small beside a page's tokens and a page is wanted by several queries, so this moves far less memory than
    reading every query's candidates (the two-stage search's exact stage: hundreds per query). A pair's value
    depends only on the pair's tokens (in float64: up to the last bits of a product's summation order)."""
    out = torch.full(idx.shape, NEG_INF, dtype=dtype)
    owner, slot = (idx >= 0).nonzero(as_tuple=True)
    if len(owner) == 0:
        return out
    wanted = idx[owner, slot].numpy()
    local = np.full(store.size, -1, dtype=np.int64)  # a page's index in the chunk being scored
    q = queries.to(dtype)
    for positions, rows, counts in store.chunks(PAIR_CHUNK_ROWS, positions=wanted):
        local[positions] = np.arange(len(positions))
        mine = torch.from_numpy(np.flatnonzero(local[wanted] >= 0))
        out[owner[mine], slot[mine]] = scoring.pair_scores_rows(
            q, owner[mine], cut_to(scoring, rows, dim), counts, torch.from_numpy(local[wanted[mine]])).to(dtype)
        local[positions] = -1
    return out


RESCORE_ELEMENTS = 1 << 24
"""Bound on the float64 copies of the (query, candidate) pairs given to ``pair_scores`` at once: a candidate
may be large (token embeddings ``[T, D]``), and a block holds ``query_block x k`` of them."""


def _pair_rescore(queries: torch.Tensor, shard: torch.Tensor, block: torch.Tensor, scoring: Scoring) -> torch.Tensor:
    """[b, k] float32: ``scoring.pair_scores`` in float64 of query i with each candidate ``block[i, j]``, a bounded
    number of pairs at a time (a pair's score does not depend on the others)."""
    pages = block.clamp(min=0).reshape(-1)
    owners = torch.arange(block.shape[0]).repeat_interleave(block.shape[1])
    step = max(1, RESCORE_ELEMENTS // max(1, math.prod(shard.shape[1:]) + math.prod(queries.shape[1:])))
    parts = [scoring.pair_scores(queries[owners[i:i + step]].double(), shard[pages[i:i + step]].double())
             for i in range(0, len(pages), step)]
    s = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return s.reshape(block.shape).float()


def merge_over_ranks(scores: torch.Tensor, idx: torch.Tensor, offset: int, k: int,
                     tie_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's top lists ([Q, n] scores and SHARD positions, -1 = padding; the same n on every rank) made
    global (+ ``offset``), all-gathered and merged by :func:`merge_topk` (collective: every rank at once)."""
    idx = torch.where(idx >= 0, idx + offset, idx)
    all_scores = distributed.all_gather_same(scores.contiguous())  # [W, Q, n]
    all_idx = distributed.all_gather_same(idx.contiguous())
    cat_s = all_scores.permute(1, 0, 2).reshape(scores.shape[0], -1)
    cat_i = all_idx.permute(1, 0, 2).reshape(scores.shape[0], -1)
    return merge_topk(cat_s, cat_i, k, tie_key)


def merge_topk(scores: torch.Tensor, idx: torch.Tensor, k: int, tie_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge concatenated per-rank lists ([Q, R*k] scores and GLOBAL indices, -1 = padding) into the final
    [Q, k] ranking: score descending, then ``tie_key[index]`` ascending. Padding sorts last and is dropped
    by the caller (index -1)."""
    s = scores.numpy().astype(np.float64)
    i = idx.numpy()
    key = np.where(i >= 0, tie_key[np.clip(i, 0, None)], np.iinfo(np.int64).max)
    # np.lexsort sorts by the last key first: primary -score, secondary tie key.
    order = np.lexsort((key, -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)
