"""Sharded retrieval evaluator: every rank encodes and searches its own slice of the corpus.

Per evaluation:
1. queries are encoded sharded across ranks and all-gathered (small);
2. each rank encodes its contiguous corpus shard once, at full dimension (pages decoded and
   preprocessed in DataLoader workers; nothing is sent through rank 0);
3. for every dim (Matryoshka: truncate + re-normalise the same embeddings), each rank keeps the
   exact top-k of every query over its shard (representation, cut and scores: the kind's
   :class:`~dist_vdr.retrieval.scoring.Scoring`, cosine by default); only those (score, page) lists
   are all-gathered and merged, deterministically (score, then descending page id: trec_eval's order
   of equal scores, so the written runs reproduce the metrics);
4. NDCG/MRR/Recall/MAP/Accuracy/Precision@k for every dim; rank 0 writes JSON, CSV, TREC runs and
   qrels, and a plot of NDCG@10 against dimension.

It runs on every rank at once (``all_ranks = True``): the dist-vdr trainer calls it that way under
DDP, DeepSpeed and FSDP alike, instead of sentence-transformers' rank-0-drives-everything scheme.
Metric keys match the stock evaluator's (``dim{d}_cosine_ndcg@10``).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import torch
from sentence_transformers.base.evaluation.evaluator import BaseEvaluator

from dist_vdr import distributed
from dist_vdr.data.arrow import column_values
from dist_vdr.data.judgements import judged_queries
from dist_vdr.data.loading import EvalData
from dist_vdr.retrieval import mteb_format, stock
from dist_vdr.retrieval.encode import encode_corpus_shard, encode_corpus_store, encode_queries, shard_range
from dist_vdr.retrieval.metrics import METRICS, retrieval_metrics
from dist_vdr.retrieval.scoring import QUERY, Scoring, resolve
from dist_vdr.retrieval.search import RESCORE_SLACK, has_faiss, merge_over_ranks, rescore, shard_topk, store_topk
from dist_vdr.retrieval.token_store import TokenStore
from dist_vdr.retrieval.two_stage import two_stage_topk
from dist_vdr.run.folder import NDCG_PLOT
from dist_vdr.storage import atomic_write


class ShardedRetrievalEvaluator(BaseEvaluator):
    """dist_vdr.retrieval.protocol.RunEvaluator: every rank, its corpus shard. ``scoring``: how the model's
    queries and pages are represented and scored (:class:`~dist_vdr.retrieval.scoring.Scoring`; None: cosine)."""

    all_ranks = True
    summarise = staticmethod(stock.summarise)  # the same flat keys as the stock evaluators

    def __init__(self, data: EvalData, dims: list[int], *, ks=(1, 3, 5, 10, 100), batch_size: int = 16,
                 query_batch_size: int = 32, num_workers: int = -1, backend: str = "auto",
                 cache_dir: str | None = None, show_progress: bool = True, run_tag: str = "dist-vdr",
                 main_metric: str = "ndcg@10", scoring: Scoring | None = None,
                 scratch_dir: str | None = None) -> None:
        super().__init__()
        self.scoring = resolve(scoring)
        if not dims:
            raise ValueError("the evaluator needs at least one embedding dim")
        self.data = data
        self.dims = sorted(set(int(d) for d in dims), reverse=True)
        self.ks = sorted(set(int(k) for k in ks))
        self.top_k = max(self.ks)
        self.batch_size, self.query_batch_size, self.num_workers = batch_size, query_batch_size, num_workers
        self.backend, self.cache_dir, self.show_progress, self.run_tag = backend, cache_dir, show_progress, run_tag
        self.scratch_dir = scratch_dir  # where a page store without cache_dir lives during an evaluation
        self.main_metric = main_metric  # the benchmark-format files' main_score
        # Only queries with a relevant page count; they alone go into the metrics and the outputs.
        self.query_ids = judged_queries(list(data.queries), data.qrels, "evaluation data")
        self.page_ids = [str(p) for p in column_values(data.corpus, "page_id")]
        self.tie_key = trec_tie_key(self.page_ids)
        self.primary_metric = f"dim{self.dims[0]}_cosine_ndcg@10" if 10 in self.ks else \
            f"dim{self.dims[0]}_cosine_ndcg@{self.ks[-1]}"
        if backend in ("auto", "faiss") and self.scoring.inner_product and has_faiss():
            import faiss  # noqa: F401  (import once here, not inside the first timed evaluation)
        self.last_rankings: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.last_metrics: dict[int, dict[str, float]] = {}

    @classmethod
    def of(cls, data: EvalData, dims: list[int], evaluation, **options) -> ShardedRetrievalEvaluator:
        """The evaluator an ``evaluation:`` section describes (ks, batch size, main metric, workers, search
        backend); ``options``: the rest (scoring, cache_dir, show_progress)."""
        e = evaluation
        return cls(data, dims, ks=e.ks, batch_size=e.batch_size, main_metric=e.main_metric,
                   num_workers=e.num_workers, backend=e.search_backend, **options)

    # ------------------------------------------------------------------ running
    def __call__(self, model, output_path: str | None = None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        import time

        info = distributed.current()
        start = time.perf_counter()
        queries = self._encode_queries(model, info)
        with self._store_root() as store_root:
            offset, shard = self._encode_pages(model, info, store_root)
            full_dim = queries.shape[-1]
            too_big = [d for d in self.dims if d > full_dim]
            if too_big:
                raise ValueError(f"evaluation dims {too_big} exceed the model's embedding dimension {full_dim}")
            flat: dict[str, float] = {}
            for dim in self.dims:
                scores, idx = self._search(queries, shard, offset, dim, info)
                ranked = {qid: [self.page_ids[j] for j in row if j >= 0]
                          for qid, row in zip(self.query_ids, idx, strict=False)}
                metrics = retrieval_metrics(ranked, self.data.qrels, self.ks)
                self.last_rankings[dim], self.last_metrics[dim] = (scores, idx), metrics
                flat.update({f"dim{dim}_cosine_{name}": value for name, value in metrics.items()})
        self.last_seconds = time.perf_counter() - start
        if output_path and info.is_main:
            self.write_outputs(output_path, steps)
        return flat

    def _encode_queries(self, model, info: distributed.DistInfo) -> torch.Tensor:
        return encode_queries_sharded(model, [self.data.queries[q] for q in self.query_ids], info,
                                      batch_size=self.query_batch_size, scoring=self.scoring)

    def _store_root(self):
        """Where the pages' store lives (scoring.store_dtype): the cache (kept), else a scratch folder removed after
        the evaluation; no store: None."""
        import contextlib
        import tempfile

        if not self.scoring.store_dtype:
            return contextlib.nullcontext(None)
        if self.cache_dir:
            return contextlib.nullcontext(self.cache_dir)
        if self.scratch_dir:
            os.makedirs(self.scratch_dir, exist_ok=True)
        return tempfile.TemporaryDirectory(prefix=".dist-vdr-page-store-", dir=self.scratch_dir)

    def _encode_pages(self, model, info: distributed.DistInfo, store_root: str | None):
        """(offset, this rank's pages): a tensor, or on disk in ``store_root`` (a TokenStore)."""
        options = dict(rank=info.rank, world_size=info.world_size, batch_size=self.batch_size,
                       num_workers=self.num_workers, show_progress=self.show_progress and info.is_main,
                       scoring=self.scoring)
        if store_root is not None:
            return encode_corpus_store(model, self.data.corpus, store_root, **options)
        return encode_corpus_shard(model, self.data.corpus, cache_dir=self.cache_dir, **options)

    def _search(self, queries: torch.Tensor, shard, offset: int, dim: int, info: distributed.DistInfo):
        progress = f"MaxSim search, dim {dim} (rank {info.rank})" if self.show_progress and info.is_main and \
            isinstance(shard, TokenStore) else None
        if self.scoring.first_stage_candidates:
            return two_stage_topk(queries, shard, offset, self.top_k, self.tie_key, dim=dim, scoring=self.scoring,
                                  candidates=max(self.scoring.first_stage_candidates, self.top_k))
        return global_topk(queries, shard, offset, self.top_k, self.tie_key, dim=dim, backend=self.backend,
                           scoring=self.scoring, progress=progress)

    # ------------------------------------------------------------------ outputs
    def write_outputs(self, output_path: str, steps: int = -1) -> None:
        """metrics.json / metrics.csv (one row per dim), run.dim{d}.trec, qrels.trec, ndcg_vs_dim.png."""
        out = Path(output_path)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"steps": steps, "num_queries": len(self.query_ids), "num_pages": len(self.page_ids),
                   "metrics": {str(d): m for d, m in self.last_metrics.items()}}
        atomic_write(out / "retrieval_metrics.json", json.dumps(payload, indent=2))
        write_csv(out / "retrieval_metrics.csv", self.last_metrics, [f"{m}@{k}" for m in METRICS for k in self.ks])
        for dim, (scores, idx) in self.last_rankings.items():
            ranked = {qid: [(self.page_ids[j], sc) for sc, j in zip(s_row, i_row, strict=True) if j >= 0]
                      for qid, s_row, i_row in zip(self.query_ids, scores, idx, strict=False)}
            write_trec_run(out / f"run.dim{dim}.trec", ranked, f"{self.run_tag}-dim{dim}")
        write_trec_qrels(out / "qrels.trec", self.query_ids, self.data.qrels)
        plot_ndcg_vs_dim({"this run": {d: m for d, m in self.last_metrics.items()}}, out / NDCG_PLOT)
        # The same figures in mteb's results format (a model variant per dim; mteb_format.py).
        mteb_format.write_results(out, self.run_tag, getattr(self.data, "name", "eval"), "test", self.last_metrics,
                                  evaluation_time=getattr(self, "last_seconds", None), main_metric=self.main_metric)


def encode_queries_sharded(model, texts: list[str], info: distributed.DistInfo, *,
                           batch_size: int = 32, scoring: Scoring | None = None) -> torch.Tensor:
    """Every rank encodes its share of ``texts``; all ranks get all representations [len(texts), D]
    (``scoring``'s: cosine by default, normalised embeddings).

    Queries are sorted by length (as sentence-transformers does) and cut into batches once, for
    the whole list; ranks take whole batches. A query is thus encoded in the same batch, padded
    the same way, whatever the number of ranks: its embedding does not depend on it.
    """
    n = len(texts)
    order = sorted(range(n), key=lambda i: -len(texts[i]))  # stable: equal lengths keep their order
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    ranges = [shard_range(len(batches), r, info.world_size) for r in range(info.world_size)]
    first, last = ranges[info.rank]
    parts = [encode_queries(model, [texts[j] for j in batch], batch_size=batch_size, scoring=scoring)
             for batch in batches[first:last]]
    # Sharded engines gather parameters in every forward (a collective): the same number on every rank.
    for _ in range(max(e - s for s, e in ranges) - (last - first)):
        encode_queries(model, ["?"], batch_size=batch_size, scoring=scoring)
    scoring = resolve(scoring)
    rows = [row for part in parts for row in part]
    if scoring.ragged and info.world_size > 1:  # e.g. a token axis: every rank's rows padded to one shape first
        shapes = [s for s in distributed.all_gather_objects(tuple(parts[0].shape[1:]) if rows else None) if s]
        mine = scoring.stack(rows, QUERY, [max(dims) for dims in zip(*shapes, strict=True)] if shapes else None)
    else:
        mine = scoring.stack(rows, QUERY)
    sizes = [sum(len(b) for b in batches[s:e]) for s, e in ranges]
    gathered = distributed.all_gather_rows(mine, sizes)  # rows in sorted order
    out = torch.empty_like(gathered)
    if n:
        out[torch.tensor(order)] = gathered
    return out


def global_topk(queries: torch.Tensor, shard: torch.Tensor | TokenStore, offset: int, k: int, tie_key: np.ndarray,
                *, dim: int | None = None, backend: str = "auto", scoring: Scoring | None = None,
                progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of all queries over the corpus whose rows [offset, offset + len(shard)) this rank holds.

    Called on every rank at once: each searches its shard, the per-rank lists are all-gathered and
    merged (score, then ``tie_key``). Returns (scores [Q, k], global page indices [Q, k], -1 = none).
    ``scoring``: the representations' scoring (None: cosine). ``dim``: cut both sides to this Matryoshka
    dimension first (``scoring.truncate``; cosine: truncate and re-normalise). ``shard``: the representations,
    or a :class:`~dist_vdr.retrieval.token_store.TokenStore` searched chunk by chunk (``progress``: its bar).
    """
    scoring = resolve(scoring)
    dim = dim or queries.shape[-1]
    q = scoring.truncate(queries, dim) if dim < queries.shape[-1] else queries
    if isinstance(shard, TokenStore):
        _, idx = store_topk(q, shard, k + RESCORE_SLACK, scoring=scoring, dim=dim, progress=progress)
        scores = rescore(q, shard, idx, scoring=scoring, dim=dim)
    else:
        if shard.numel() == 0:
            shard = torch.empty(0, *queries.shape[1:])
        e = scoring.truncate(shard, dim) if dim < shard.shape[-1] else shard
        e = e.contiguous()
        _, idx = shard_topk(q, e, k + RESCORE_SLACK, backend=backend, scoring=scoring)
        scores = rescore(q, e, idx, scoring=scoring)
    return merge_over_ranks(scores, idx, offset, k, tie_key)


def sorted_position(ids: list[str]) -> np.ndarray:
    """Tie key: the position of each id in sorted order (ties broken by ascending id, as stock does)."""
    key = np.empty(len(ids), dtype=np.int64)
    key[np.argsort(np.array(ids, dtype=object), kind="stable")] = np.arange(len(ids))
    return key


def trec_tie_key(ids: list[str]) -> np.ndarray:
    """Tie key of the evaluator: equal scores in descending id order, as trec_eval sorts a run (score,
    then docno by strcmp, descending; Python compares str by code point, the order of their UTF-8
    bytes). The written runs then give trec_eval the evaluator's rankings even where scores are
    exactly equal. (sentence-transformers breaks such ties by ascending id.)"""
    return len(ids) - 1 - sorted_position(ids)


def plot_ndcg_vs_dim(curves: dict[str, dict[int, dict[str, float]]], path: str | Path, metric: str = "ndcg@10") -> None:
    """One line per curve (e.g. before / after training): ``metric`` against embedding dimension."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for label, per_dim in curves.items():
        dims = sorted(per_dim)
        ax.plot(dims, [per_dim[d].get(metric, float("nan")) for d in dims], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("embedding dimension")
    ax.set_ylabel(metric.upper())
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def write_trec_run(path: str | Path, ranked: dict[str, list[tuple[str, float]]], tag: str) -> None:
    """TREC run file: ``qid Q0 docid rank score tag``, one line per (query, page), best first.

    trec_eval ignores the rank column and re-sorts by score, so scores are written exactly
    (:func:`score_text`): rounded ones would tie and be re-ordered by docno.
    """
    lines = [f"{qid} Q0 {pid} {rank} {score_text(score)} {tag}\n"
             for qid, pages in ranked.items() for rank, (pid, score) in enumerate(pages, start=1)]
    atomic_write(Path(path), "".join(lines))


def score_text(score: float) -> str:
    """The shortest decimal that reads back as the same score: at most 9 significant digits for a
    float32 score (the evaluator's), 17 for other floats (e.g. fused reranker scores). Distinct scores
    stay distinct and in order; equal ones stay equal."""
    single = np.float32(score)
    return str(single) if float(single) == float(score) else repr(float(score))


def write_trec_qrels(path: str | Path, query_ids: list[str], qrels: dict[str, dict[str, int]]) -> None:
    atomic_write(Path(path), "".join(f"{q} 0 {p} {g}\n" for q in query_ids
                                     for p, g in sorted(qrels.get(q, {}).items())))


def write_csv(path: str | Path, per_dim: dict, names: list[str], key_name: str = "dim") -> None:
    """One row per key (dims: largest first), one column per metric; written beside and renamed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([key_name, *names])
        for d in sorted(per_dim, reverse=True):
            w.writerow([d, *(f"{per_dim[d][n]:.6f}" for n in names)])
    os.replace(tmp, path)
