"""Retrieve-and-rerank evaluation, sharded across ranks.

First stage (once, at construction, collective): the retriever embeds the corpus with the sharded
retrieval evaluator and keeps each query's top-k pages. Second stage (every call, collective): the
queries are split over the ranks; each rank scores its queries' top ``depth`` candidates with the
reranker, the scores are all-gathered, and every query's top ``depth`` is re-ordered by reranker
score (ties: retrieval order); pages below ``depth`` keep their retrieval order. Metrics of the
retrieval alone and after reranking, side by side (``retrieval_ndcg@10``, ``rerank_ndcg@10``...).
With ``retrieval_score_weight`` w > 0 the reranked order is by reranker score + w x retrieval
score (the score the reranker was trained on), and the order by the reranker's score alone is
reported too (``rerankonly_ndcg@10``...).

A query's pairs are scored in batches of that query's pairs only, so a pair's score does not
depend on which rank scores it or with what: 1 and 2 ranks give identical metrics (tested). Under
ZeRO-3/FSDP2 a forward is a collective: ranks with fewer batches run padding forwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from sentence_transformers.base.evaluation.evaluator import BaseEvaluator

from dist_vdr import distributed
from dist_vdr.data.arrow import column_values
from dist_vdr.data.loading import EvalData
from dist_vdr.kinds.reranker.scoring import forward_scores
from dist_vdr.retrieval.encode import inference, shard_range, shard_sizes
from dist_vdr.retrieval.metrics import METRICS, retrieval_metrics
from dist_vdr.retrieval.sharded import (
    write_csv,
    write_trec_qrels,
    write_trec_run,
)
from dist_vdr.storage import atomic_write


def retrieve(retriever, data: EvalData, *, top_k: int, batch_size: int = 16, num_workers: int = -1,
             backend: str = "auto") -> dict[str, list[tuple[str, float]]]:
    """First stage (collective): each query's top-k pages as [(page id, cosine score)], best first."""
    from dist_vdr.retrieval.sharded import ShardedRetrievalEvaluator

    dim = int(retriever.get_embedding_dimension())
    first = ShardedRetrievalEvaluator(data, [dim], ks=[top_k], batch_size=batch_size, num_workers=num_workers,
                                      backend=backend, show_progress=True)
    first(retriever)
    scores, idx = first.last_rankings[dim]
    return {qid: [(first.page_ids[j], float(s)) for s, j in zip(s_row, i_row, strict=True) if j >= 0]
            for qid, s_row, i_row in zip(first.query_ids, scores, idx, strict=True)}


def summarise(raw: dict[str, float]) -> dict[str, dict[str, float]]:
    """Flat evaluator keys (retrieval_ndcg@10, rerank_ndcg@10) -> {"retrieval": {...}, "rerank": {...}}."""
    out: dict[str, dict[str, float]] = {}
    for key, value in raw.items():
        key = key.removeprefix("eval_")
        stage, _, metric = key.partition("_")
        if stage in ("retrieval", "rerank", "rerankonly") and "@" in metric:
            out.setdefault(stage, {})[metric] = value
    return out


class RerankEvaluator(BaseEvaluator):
    all_ranks = True
    summarise = staticmethod(summarise)  # what the run records: metrics per stage

    def __init__(self, data: EvalData, candidates: dict[str, list[tuple[str, float]]], *, depth: int = 20,
                 ks=(1, 3, 5, 10, 100), batch_size: int = 16, prompt: str | None = None,
                 show_progress: bool = True, run_tag: str = "dist-vdr", retrieval_score_weight: float = 0.0) -> None:
        super().__init__()
        self.data, self.candidates, self.depth = data, candidates, depth
        self.retrieval_score_weight = retrieval_score_weight
        self.ks = sorted({int(k) for k in ks})
        self.batch_size, self.prompt, self.show_progress, self.run_tag = batch_size, prompt, show_progress, run_tag
        self.query_ids = [q for q in data.queries if q in candidates]
        self.row_of = {str(p): i for i, p in enumerate(column_values(data.corpus, "page_id"))}
        self.primary_metric = "rerank_ndcg@10" if 10 in self.ks else f"rerank_ndcg@{self.ks[-1]}"
        retrieval = {q: [p for p, _ in candidates[q]] for q in self.query_ids}
        self.retrieval_metrics = retrieval_metrics(retrieval, data.qrels, self.ks)
        self.last_reranked: dict[str, list[tuple[str, float]]] = {}
        self.last_metrics: dict[str, float] = {}
        self.last_alone_metrics: dict[str, float] = {}

    def __call__(self, model, output_path: str | None = None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        info = distributed.current()
        n = len(self.query_ids)
        start, end = shard_range(n, info.rank, info.world_size)
        sizes = shard_sizes(n, info.world_size)
        local = self._score(model, self.query_ids[start:end], info)
        scores = distributed.all_gather_rows(local, sizes).numpy()  # [n, depth], nan past a query's list
        reranked = self._rerank(scores, self.retrieval_score_weight)
        after = self._metrics(reranked)
        self.last_reranked, self.last_metrics = reranked, after
        # A residual reranker: also the order by its own score alone.
        self.last_alone_metrics = self._metrics(self._rerank(scores, 0.0)) if self.retrieval_score_weight else {}
        if output_path and info.is_main:
            self.write_outputs(output_path, steps)
        return {**{f"retrieval_{k}": v for k, v in self.retrieval_metrics.items()},
                **{f"rerank_{k}": v for k, v in after.items()},
                **{f"rerankonly_{k}": v for k, v in self.last_alone_metrics.items()}}

    def _metrics(self, ranking: dict[str, list[tuple[str, float]]]) -> dict[str, float]:
        return retrieval_metrics({q: [p for p, _ in pages] for q, pages in ranking.items()}, self.data.qrels, self.ks)

    def _rerank(self, scores, weight: float) -> dict[str, list[tuple[str, float]]]:
        """Each query's top ``depth`` ordered by reranker score + weight x retrieval score (ties: retrieval order)."""
        out = {}
        for qid, row in zip(self.query_ids, scores, strict=True):
            head = self.candidates[qid][: self.depth]
            final = [float(row[i]) + weight * head[i][1] for i in range(len(head))]
            order = sorted(range(len(head)), key=lambda i: (-final[i], i))
            out[qid] = [(head[i][0], final[i]) for i in order] + self.candidates[qid][self.depth:]
        return out

    def _batches(self, query_ids: list[str]) -> list[tuple[int, list[int], list[tuple[str, str]]]]:
        """(local query position, candidate positions, [(query text, page id)]) per forward."""
        out = []
        for qi, qid in enumerate(query_ids):
            head = self.candidates[qid][: self.depth]
            for b in range(0, len(head), self.batch_size):
                chunk = list(range(b, min(b + self.batch_size, len(head))))
                out.append((qi, chunk, [(self.data.queries[qid], head[i][0]) for i in chunk]))
        return out

    def _score(self, model, query_ids: list[str], info: distributed.DistInfo) -> torch.Tensor:
        from tqdm.auto import tqdm

        scores = torch.full((len(query_ids), self.depth), float("nan"))
        batches = self._batches(query_ids)
        num_batches = max(distributed.all_gather_objects(len(batches))) if info.world_size > 1 else len(batches)
        with inference(model):
            for qi, positions, pairs in tqdm(batches, desc=f"reranking (rank {info.rank})",
                                             disable=not (self.show_progress and info.is_main)):
                images = self.data.corpus[[self.row_of[p] for _, p in pairs]]["image"]
                pages = [(q, im) for (q, _), im in zip(pairs, images, strict=True)]
                scores[qi, positions] = forward_scores(model, pages, self.prompt)
            if num_batches > len(batches):  # lockstep padding under sharded engines: same modules run
                from PIL import Image

                blank = [("?", Image.new("RGB", (64, 64), "white"))]
                for _ in range(num_batches - len(batches)):
                    forward_scores(model, blank, self.prompt)
        return scores

    def write_outputs(self, output_path: str, steps: int = -1) -> None:
        """rerank_metrics.json / .csv (retrieval and rerank rows), run.retrieval.trec, run.rerank.trec, qrels.trec."""
        out = Path(output_path)
        out.mkdir(parents=True, exist_ok=True)
        rows = {"retrieval": self.retrieval_metrics, "rerank": self.last_metrics}
        if self.last_alone_metrics:
            rows["rerankonly"] = self.last_alone_metrics
        payload = {"steps": steps, "num_queries": len(self.query_ids), "rerank_depth": self.depth,
                   "retrieval_score_weight": self.retrieval_score_weight, "metrics": rows}
        atomic_write(out / "rerank_metrics.json", json.dumps(payload, indent=2))
        write_csv(out / "rerank_metrics.csv", rows, [f"{m}@{k}" for m in METRICS for k in self.ks], key_name="stage")
        write_trec_run(out / "run.retrieval.trec", {q: self.candidates[q] for q in self.query_ids},
                       f"{self.run_tag}-retrieval")
        write_trec_run(out / "run.rerank.trec", self.last_reranked, f"{self.run_tag}-rerank")
        write_trec_qrels(out / "qrels.trec", self.query_ids, self.data.qrels)
