"""Two-stage search: candidates from a single-vector first stage, then the exact score of each candidate.

For a representation too costly to score against every page (token embeddings by MaxSim: ``Tq x Tp`` inner
products per pair), each page also gets ONE vector whose inner product with a query's vector approximates the
exact score (e.g. MUVERA's fixed dimensional encodings, :mod:`dist_vdr.kinds.multi_vector.fde`, or a hybrid
model's pooled vector). A page store's vectors are an index written beside it at its first search
(:class:`FirstStageIndex`). The first stage is an exact inner-product search of those vectors (one matrix product
per chunk) for ``candidates`` pages per query on each rank's shard; the second scores only those pages exactly
(page by page: :func:`~dist_vdr.retrieval.search.store_pair_scores`), rescores the best ``k`` + slack in float64
(:func:`~dist_vdr.retrieval.search.rescore`: the scores the exhaustive search gives them) and keeps the best
``k``. A page the first stage misses is lost: the recall of the exhaustive top-k is what
``dist-vdr bench eval-multi-vector`` states beside the speed. Then, as :func:`~dist_vdr.retrieval.sharded.global_topk`:
one gather of the per-rank lists and the deterministic merge.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

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

PAGE_CHUNK_ROWS = 1 << 16
"""Token vectors per chunk of pages the first stage encodes at once."""


def two_stage_topk(queries: torch.Tensor, shard: torch.Tensor | TokenStore, offset: int, k: int,
                   tie_key: np.ndarray, *, candidates: int, scoring: Scoring, dim: int | None = None,
                   timings: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of all queries over the corpus rows [offset, offset + len(shard)) this rank holds (every rank at once),
    scored exactly on the first stage's ``candidates`` per query and rank (so the result depends on the number of
    ranks: W ranks score W x ``candidates`` pages per query).

    ``queries``: the representations (``scoring``'s); ``shard``: this rank's pages. The pages' first-stage vectors
    (``scoring.first_stage`` of each page cut to ``dim``): of a store, its :class:`FirstStageIndex` (built on the
    first search, then read); of a tensor, computed chunk by chunk. Either way they are scored against the queries'
    a chunk at a time and forgotten: memory holds one chunk and a running top-``candidates``. Returns what
    :func:`~dist_vdr.retrieval.sharded.global_topk` does. ``timings``: filled with the seconds of building the
    store's index (``index_s``; 0 when it had one), the first stage (``first_s``; a tensor's page vectors are
    computed in it) and the exact stage (``exact_s``)."""
    import time

    if candidates < k:
        raise ValueError(f"the first stage must keep at least k={k} candidates, got {candidates}")
    dim = dim or queries.shape[-1]
    q = cut_to(scoring, queries, dim)
    query_vectors = scoring.first_stage([scoring.trim(row, QUERY) for row in q], QUERY).float()
    best = empty_top(q.shape[0])
    t0 = time.perf_counter()
    index = FirstStageIndex.open(shard, scoring, dim) if isinstance(shard, TokenStore) else None
    t1 = time.perf_counter()
    for positions, page_vectors in index.chunks() if index is not None else _tensor_vectors(shard, scoring, dim):
        best = keep_top(best, query_vectors @ page_vectors.T, torch.as_tensor(positions), candidates)
    clock = {"index_s": t1 - t0, "first_s": time.perf_counter() - t1}
    t0 = time.perf_counter()
    scores, idx = _exact_stage(q, shard, best[1], k + RESCORE_SLACK, scoring, dim)
    top = torch.topk(scores, k, dim=1)
    idx = torch.gather(idx, 1, top.indices)
    if timings is not None:
        timings.update(clock, exact_s=time.perf_counter() - t0)
    return merge_over_ranks(top.values, idx, offset, k, tie_key)


class FirstStageIndex:
    """A page store's first-stage vectors at one ``dim``, in files beside its pages (``first-stage-<tag>-<dim>d``,
    the tag: ``scoring.first_stage_tag()``), built once and read by every later search of that store (an
    evaluation's cached store: every evaluation with that dim):

    - ``.f32``: the vectors, float32 ``[pages, width]``, in the store's file order;
    - ``.pos.npy``: each row's shard position;
    - ``.json``: written last (the index is whole): the store's rows when it was built, the pages and the width; an
      index of a store that has grown since (an encoding resumed after it) is built again.

    Read with ``pread`` into a buffer a chunk at a time, as the store is: memory holds one chunk."""

    def __init__(self, base: Path, positions: np.ndarray, width: int) -> None:
        self.base, self.positions, self.width = base, positions, width

    @classmethod
    def open(cls, store: TokenStore, scoring: Scoring, dim: int) -> FirstStageIndex:
        """The index of ``store`` at ``dim``; built now from the store's pages if it has none that is whole."""
        base = store.folder / f"first-stage-{scoring.first_stage_tag()}-{dim}d"
        marker = _beside(base, ".json")
        if marker.exists():
            meta = json.loads(marker.read_text())
            vectors = _beside(base, ".f32")
            if meta["rows"] == store.rows and vectors.exists() and \
                    vectors.stat().st_size == meta["pages"] * meta["width"] * 4:
                return cls(base, np.load(_beside(base, ".pos.npy")), meta["width"])
        return cls._build(store, scoring, dim, base)

    @classmethod
    def _build(cls, store: TokenStore, scoring: Scoring, dim: int, base: Path) -> FirstStageIndex:
        # scratch names of this process: two evaluations sharing a cache each write whole files, and the renames
        # put equal contents in place (the vectors are a function of the store)
        parts, width, mine = [], 0, f".{os.getpid()}.tmp"
        tmp = _beside(base, ".f32" + mine)
        with open(tmp, "wb") as f:
            for positions, rows, counts in store.chunks(PAGE_CHUNK_ROWS):
                items = torch.split(cut_to(scoring, rows, dim), counts.tolist())
                vectors = scoring.first_stage(list(items), PAGE).float().numpy()
                width = vectors.shape[1]
                f.write(np.ascontiguousarray(vectors).tobytes())
                parts.append(positions)
        positions = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        os.replace(tmp, _beside(base, ".f32"))
        with open(_beside(base, ".pos" + mine), "wb") as f:
            np.save(f, positions)
        os.replace(_beside(base, ".pos" + mine), _beside(base, ".pos.npy"))
        marker = _beside(base, ".json" + mine)
        marker.write_text(json.dumps({"rows": store.rows, "pages": len(positions), "width": width}))
        os.replace(marker, _beside(base, ".json"))
        return cls(base, positions, width)

    def chunks(self, max_values: int = 1 << 24) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(shard positions [n], float32 vectors [n, width]), about ``max_values`` values at a time."""
        step = max(1, max_values // max(1, self.width))
        with open(_beside(self.base, ".f32"), "rb") as f:
            for start in range(0, len(self.positions), step):
                n = min(step, len(self.positions) - start)
                buffer = np.empty((n, self.width), dtype=np.float32)
                os.preadv(f.fileno(), [memoryview(buffer.reshape(-1).view(np.uint8))], start * self.width * 4)
                yield self.positions[start:start + n], torch.from_numpy(buffer)


def _beside(base: Path, suffix: str) -> Path:
    return base.parent / (base.name + suffix)


def _tensor_vectors(shard: torch.Tensor, scoring: Scoring, dim: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(positions, first-stage vectors) of an in-memory shard's pages, a chunk at a time."""
    step = max(1, PAGE_CHUNK_ROWS // max(1, shard.shape[1] if shard.dim() > 2 else 1))
    for start in range(0, shard.shape[0], step):
        rows = shard[start:start + step]
        items = [cut_to(scoring, scoring.trim(r, PAGE), dim) for r in rows]
        yield np.arange(start, start + len(rows)), scoring.first_stage(items, PAGE).float()


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

