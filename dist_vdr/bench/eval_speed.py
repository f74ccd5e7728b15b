"""Evaluation benchmarks (commands that print figures):

- ``bench eval``: a Matryoshka sweep on one corpus: seven stock per-dim InformationRetrievalEvaluators
  vs dist-vdr's sharded evaluator on 1 rank and on W gloo ranks (same total cores), with the metrics
  cross-checked and the corpus-encoding speed-up of W ranks over 1;
- ``bench search``: exact top-100 + all metrics over N precomputed embeddings x Q queries vs faiss'
  exact IndexFlatIP add + search alone, each in its own process so peak RSS is its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from dist_vdr import distributed


def _load(model_dir: str, data_path: str):
    from sentence_transformers import SentenceTransformer

    from dist_vdr.config import DataConfig
    from dist_vdr.data.loading import load_eval

    return SentenceTransformer(model_dir, device="cpu"), load_eval(DataConfig(path=data_path, validate_images=False))


def _sharded_worker(rank: int, model_dir: str, data_path: str, dims, batch_size: int, workers: int,
                    out_path: str) -> None:
    import torch.distributed as dist

    from dist_vdr.retrieval.sharded import ShardedRetrievalEvaluator

    model, data = _load(model_dir, data_path)
    ev = ShardedRetrievalEvaluator(data, list(dims), batch_size=batch_size, num_workers=workers, show_progress=False)
    import dist_vdr.retrieval.sharded as sharded_mod

    encode_s = []
    original = sharded_mod.encode_corpus_shard

    def timed(*a, **kw):
        t0 = time.perf_counter()
        result = original(*a, **kw)
        encode_s.append(time.perf_counter() - t0)
        return result

    sharded_mod.encode_corpus_shard = timed
    dist.barrier()
    t0 = time.perf_counter()
    metrics = ev(model)
    dist.barrier()
    total = time.perf_counter() - t0
    slowest_encode = distributed.all_gather_objects(encode_s[0])
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"total_s": total, "encode_s": max(slowest_encode), "metrics": metrics}, f)


def run_eval_bench(model_dir: str, data_path: str, dims, *, batch_size: int = 16, workers: int = -1,
                   world_size: int = 2) -> dict:
    from dist_vdr.retrieval import stock

    cores = os.cpu_count() or 1
    model, data = _load(model_dir, data_path)
    # Both sides start from the dataset on disk: the stock evaluator decodes every page when it is
    # built (its corpus is a dict of PIL images), the sharded one while encoding.
    t0 = time.perf_counter()
    stock_ev = stock.build_evaluator(data, list(dims), batch_size=batch_size)
    built = time.perf_counter()
    stock_metrics = stock_ev(model)
    stock_s = time.perf_counter() - t0
    results = {"pages": len(data.corpus), "queries": len(data.queries), "dims": list(dims), "cores": cores,
               "stock": {"total_s": stock_s, "decode_s": built - t0}}
    with tempfile.TemporaryDirectory() as tmp:
        for key, w, threads in (("ranks1", 1, cores), ("ranks1_1thread", 1, 1),
                                (f"ranks{world_size}", world_size, max(1, cores // world_size))):
            out = os.path.join(tmp, f"{key}.json")
            distributed.spawn_gloo(_sharded_worker, w, (model_dir, data_path, tuple(dims), batch_size, workers, out),
                                   tmp, threads_per_rank=threads)
            with open(out) as f:
                results[key] = json.load(f)
    ours = results["ranks1"]["metrics"]
    results["max_metric_difference_vs_stock"] = max(abs(ours[k] - stock_metrics[k]) for k in stock_metrics if k in ours)
    for key in ("ranks1", "ranks1_1thread", f"ranks{world_size}"):
        results[key].pop("metrics")
    return results


def format_eval(results: dict, world_size: int) -> str:
    s, one, many = results["stock"]["total_s"], results["ranks1"], results[f"ranks{world_size}"]
    thin = results["ranks1_1thread"]
    pages, cores = results["pages"], results["cores"]
    lines = [
        f"{pages} pages, {results['queries']} queries, dims {results['dims']}, {cores} cores",
        f"stock: {len(results['dims'])} InformationRetrievalEvaluators        {s:7.2f} s  "
        f"(of which page decoding {results['stock']['decode_s']:.2f} s)",
        f"dist-vdr sharded, 1 rank x {cores} threads           {one['total_s']:7.2f} s  "
        f"{s / one['total_s']:5.1f}x faster",
        f"dist-vdr sharded, {world_size} ranks x {max(1, cores // world_size)} thread(s)        "
        f"{many['total_s']:7.2f} s  {s / many['total_s']:5.1f}x faster",
        f"corpus encoding: 1 rank x {cores} threads {one['encode_s']:.2f} s ({pages / one['encode_s']:.0f} pages/s); "
        f"1 rank x 1 thread {thin['encode_s']:.2f} s; {world_size} ranks {many['encode_s']:.2f} s "
        f"({pages / many['encode_s']:.0f} pages/s): {one['encode_s'] / many['encode_s']:.2f}x over 1 rank x {cores} "
        f"threads, {thin['encode_s'] / many['encode_s']:.2f}x over 1 rank x 1 thread",
        f"largest metric difference vs stock: {results['max_metric_difference_vs_stock']:.2e}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- search
_SEARCH_CHILD = r"""
import json, resource, sys, time
import numpy as np
import torch
mode = sys.argv[1]
n, q, dim, k, seed = (int(a) for a in sys.argv[2:7])
g = torch.Generator().manual_seed(seed)
corpus = torch.randn(n, dim, generator=g)
corpus /= corpus.norm(dim=1, keepdim=True)
queries = torch.randn(q, dim, generator=g)
queries /= queries.norm(dim=1, keepdim=True)
relevant = torch.randint(0, n, (q,), generator=g).numpy()
t0 = time.perf_counter()
if mode == "baseline":
    import faiss
    index = faiss.IndexFlatIP(dim)
    index.add(corpus.numpy())
    scores, idx = index.search(queries.numpy(), k)
    extra = {}
else:
    from dist_vdr.retrieval.metrics import retrieval_metrics
    from dist_vdr.retrieval.search import merge_topk, shard_topk
    scores, idx = shard_topk(queries, corpus, k, backend=mode)
    del corpus
    s, i = merge_topk(scores, idx, k, np.arange(n))
    ranked = {f"q{r}": [int(j) for j in row] for r, row in enumerate(i)}
    qrels = {f"q{r}": {int(relevant[r]): 1} for r in range(q)}
    m = retrieval_metrics(ranked, qrels, (1, 3, 5, 10, 100))
    extra = {"ndcg@10": m["ndcg@10"], "recall@100": m["recall@100"]}
elapsed = time.perf_counter() - t0
print(json.dumps({"s": elapsed, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, **extra}))
"""


def run_search_bench(num_pages: int, num_queries: int, dim: int, k: int = 100, backend: str = "faiss",
                     seed: int = 0) -> dict:
    out = {}
    for name, mode in (("faiss IndexFlatIP alone", "baseline"), (f"dist-vdr ({backend})", backend)):
        proc = subprocess.run([sys.executable, "-c", _SEARCH_CHILD, mode, str(num_pages), str(num_queries), str(dim),
                               str(k), str(seed)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def format_search(results: dict, num_pages: int, num_queries: int, dim: int) -> str:
    base = results["faiss IndexFlatIP alone"]
    lines = [f"{num_pages:,} pages x {num_queries:,} queries, {dim}-d, exact top-100"]
    for name, r in results.items():
        extra = f"   NDCG@10 {r['ndcg@10']:.4f}" if "ndcg@10" in r else ""
        lines.append(f"{name:26s} {r['s']:7.2f} s ({r['s'] / base['s']:.2f}x)   "
                     f"peak RSS {r['peak_rss_gib']:.2f} GiB{extra}")
    return "\n".join(lines)


