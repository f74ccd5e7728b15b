"""`dist-vdr bench pooling`: index-time token pooling of a multi-vector model's pages, side by side with no pooling.

For each pool factor (1 = none), the sharded MaxSim evaluator runs on the eval set with the pages pooled by
sentence-transformers' HierarchicalTokenPooling (queries never are), and the pages' stored vectors are counted
from sentence-transformers' own pooled ``encode_document``: NDCG@10 and Recall@100 at the model's token dim,
vectors and bytes (float16) per page, each as a ratio of the unpooled figure, and the evaluation's seconds.
One process; the figures do not depend on the number of ranks (the evaluator's rankings do not).
"""

from __future__ import annotations

import time


def run(model_path: str, data_path: str, pool_factors: list[float], *, divide_by_query_length: bool = False,
        batch_size: int = 16, max_queries: int | None = None) -> list[dict]:
    from dist_vdr.config import DataConfig, ModelConfig
    from dist_vdr.data.loading import load_eval
    from dist_vdr.kinds.multi_vector.model import build_multi_vector, token_dim
    from dist_vdr.kinds.multi_vector.scoring import MaxSimScoring
    from dist_vdr.retrieval.sharded import ShardedRetrievalEvaluator
    from dist_vdr.retrieval.stock import summarise

    model = build_multi_vector(ModelConfig(name_or_path=model_path), precision="fp32", device="cpu")
    data = load_eval(DataConfig(path=data_path, max_eval_queries=max_queries))
    dim = token_dim(model)
    pages = list(data.corpus_dict().values())
    rows = []
    ShardedRetrievalEvaluator(data, [dim], batch_size=batch_size, num_workers=0, show_progress=False,
                              scoring=MaxSimScoring())(model)  # warm-up: the first encode's one-time costs untimed
    if any(f > 1 for f in pool_factors):  # and the clustering's first import (scipy)
        import torch

        MaxSimScoring(pool_factor=2).token_pooling().pool([torch.nn.functional.normalize(torch.randn(8, dim), dim=-1)])
    for factor in pool_factors:
        scoring = MaxSimScoring(divide_by_query_length=divide_by_query_length, pool_factor=factor)
        evaluator = ShardedRetrievalEvaluator(data, [dim], batch_size=batch_size, num_workers=0, show_progress=False,
                                              scoring=scoring)
        start = time.perf_counter()
        metrics = summarise(evaluator(model))[dim]
        seconds = time.perf_counter() - start
        pooling = scoring.token_pooling() if factor > 1 else None
        stored = model.encode_document(pages, batch_size=batch_size, token_pooling=pooling)
        vectors = sum(len(t) for t in stored) / len(stored)
        rows.append({"pool_factor": factor, "ndcg@10": metrics["ndcg@10"], "recall@100": metrics["recall@100"],
                     "vectors_per_page": vectors, "bytes_per_page": vectors * dim * 2, "seconds": seconds,
                     "dim": dim, "pages": len(pages), "queries": len(evaluator.query_ids)})
    return rows


def format_table(rows: list[dict]) -> str:
    base = rows[0]
    lines = [f"token pooling of the pages, {base['pages']} pages, {base['queries']} queries, {base['dim']}-d token "
             f"vectors (ratios: of pool factor {base['pool_factor']:g})", "",
             "| pool factor | NDCG@10 | kept | Recall@100 | vectors per page | bytes per page (fp16) | of the bytes "
             "| eval s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pool_factor']:g} | {r['ndcg@10']:.4f} | {r['ndcg@10'] / base['ndcg@10']:.1%} "
                     f"| {r['recall@100']:.4f} | {r['vectors_per_page']:.1f} | {r['bytes_per_page']:,.0f} "
                     f"| {r['bytes_per_page'] / base['bytes_per_page']:.1%} | {r['seconds']:.1f} |")
    return "\n".join(lines)
