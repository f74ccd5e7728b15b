"""`dist-vdr bench eval-multi-vector`: late-interaction search on the same token embeddings, side by side.

One generated corpus of token embeddings (pages of ragged length, queries made from their relevant page's tokens
plus noise, seeded), written once as flat arrays; then, each in fresh processes so that peak RSS is its own:

- dist-vdr's exact sharded MaxSim (the evaluator's search): each rank's pages in a float16 page store on disk
  (:mod:`dist_vdr.retrieval.token_store`), scored chunk by chunk, one gather; on 1 rank and on W gloo ranks;
- sentence-transformers' ``MultiVectorInformationRetrievalEvaluator`` on one process, handed the same (float16-
  rounded) token vectors by a stand-in model whose ``encode_query`` / ``encode_document`` look them up;
- dist-vdr's two-stage search (:mod:`dist_vdr.retrieval.two_stage`, the evaluator's with
  ``multi_vector.first_stage_candidates``): MUVERA encodings of the stored pages
  (:mod:`dist_vdr.kinds.multi_vector.fde`), an index beside the store built once before the search (its build
  timed apart, as fast-plaid's), ``candidates`` per query by their inner products, exact MaxSim on those;
- fast-plaid (index build + search) when ``fast_plaid_python`` names an interpreter with it installed
  (``make bench-fast-plaid-venv``: fast-plaid wheels are built for one torch release each).

Reported: seconds (search; the store write and fast-plaid's index build apart), peak RSS per process, NDCG@10 and
recall@100 against the relevance judgements, and each method's recall of the exact top-100.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_vdr import distributed
from dist_vdr.run.step_stats import own_peak_rss_gib

KS = (1, 3, 5, 10, 100)
CHILD = Path(__file__).with_name("fast_plaid_child.py")


@dataclass
class Corpus:
    """The generated corpus's files in ``folder``: doc_tokens.npy (float16 [rows, dim]), doc_offsets.npy (int64
    [pages + 1]), queries.npy (float32 [Q, Tq, dim], zero rows = padding), relevant.npy (int64 [Q])."""

    folder: Path

    def array(self, name: str, mmap: bool = True) -> np.ndarray:
        return np.load(self.folder / f"{name}.npy", mmap_mode="r" if mmap else None)


def generate(folder: Path, *, pages: int, page_tokens: int, queries: int, query_tokens: int, dim: int,
             seed: int = 0, topics: int = 16, topics_per_page: int = 2, page_noise: float = 0.5,
             query_noise: float = 2.5) -> Corpus:
    """Pages: ``topics_per_page`` of ``topics`` topics (random unit centres: many pages share theirs, so what tells
    them apart is their own noise) of normalised noisy copies, between 3/4 and all of ``page_tokens`` tokens.
    Queries: half to all of ``query_tokens`` tokens, each a noisy copy of a random token of its relevant page
    (distinct pages). Written chunk by chunk (the corpus is never whole in memory)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    centres = _unit(rng.standard_normal((topics, dim), dtype=np.float32))
    counts = rng.integers(max(1, page_tokens * 3 // 4), page_tokens + 1, size=pages)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    tokens = np.lib.format.open_memmap(folder / "doc_tokens.npy", mode="w+", dtype=np.float16,
                                       shape=(int(offsets[-1]), dim))
    relevant = rng.choice(pages, size=queries, replace=False)
    wanted = {int(p): i for i, p in enumerate(relevant)}
    query_rows = np.zeros((queries, query_tokens, dim), dtype=np.float32)
    for start in range(0, pages, 1024):
        end = min(start + 1024, pages)
        block = []
        for p in range(start, end):
            topics = centres[rng.integers(0, len(centres), size=topics_per_page)]
            t = topics[np.arange(counts[p]) % topics_per_page]
            block.append(_unit(t + page_noise / dim ** 0.5 * rng.standard_normal(t.shape, dtype=np.float32)))
            if p in wanted:
                n = int(rng.integers(max(1, query_tokens // 2), query_tokens + 1))
                picked = block[-1][rng.integers(0, counts[p], size=n)]
                query_rows[wanted[p], :n] = _unit(picked + query_noise / dim ** 0.5 *
                                                  rng.standard_normal(picked.shape, dtype=np.float32))
        tokens[offsets[start]:offsets[end]] = np.concatenate(block).astype(np.float16)
    tokens.flush()
    del tokens
    np.save(folder / "doc_offsets.npy", offsets)
    np.save(folder / "queries.npy", query_rows)
    np.save(folder / "relevant.npy", relevant.astype(np.int64))
    return Corpus(folder)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_stores(corpus: Corpus, folder: Path, world_size: int) -> tuple[list[Path], float]:
    """Each rank's contiguous shard of the pages in a float16 page store; (their folders, seconds)."""
    import torch

    from dist_vdr.retrieval.token_store import TokenStore

    tokens, offsets = corpus.array("doc_tokens"), corpus.array("doc_offsets", mmap=False)
    pages = len(offsets) - 1
    t0 = time.perf_counter()
    folders = []
    for rank in range(world_size):
        start, end = distributed.shard_range(pages, rank, world_size)
        store = TokenStore.open(folder / f"store-{world_size}-{rank}", size=end - start, dtype="float16")
        for b in range(start, end, 512):
            batch = range(b, min(b + 512, end))
            store.append([p - start for p in batch],
                         [torch.from_numpy(np.asarray(tokens[offsets[p]:offsets[p + 1]], dtype=np.float32))
                          for p in batch])
        folders.append(store.folder)
    return folders, time.perf_counter() - t0


def _metrics(idx: np.ndarray, relevant: np.ndarray) -> dict[str, float]:
    from dist_vdr.retrieval.metrics import retrieval_metrics

    ranked = {str(q): [str(int(j)) for j in row if j >= 0] for q, row in enumerate(idx)}
    qrels = {str(q): {str(int(r)): 1} for q, r in enumerate(relevant)}
    return retrieval_metrics(ranked, qrels, KS)


# ------------------------------------------------------------------------------------------- workers
def _search_worker(rank: int, mode: str, corpus_dir: str, store_dirs: list[str], options: dict, out: str) -> None:
    """One rank of dist-vdr's exact (``mode`` "exact") or two-stage search over its page store."""
    import torch

    from dist_vdr.kinds.multi_vector.scoring import MaxSimScoring
    from dist_vdr.retrieval.sharded import global_topk
    from dist_vdr.retrieval.token_store import TokenStore

    corpus = Corpus(Path(corpus_dir))
    world = len(store_dirs)
    pages = len(corpus.array("doc_offsets")) - 1
    start, end = distributed.shard_range(pages, rank, world)
    store = TokenStore.open(store_dirs[rank], size=end - start, dtype="float16")
    queries = torch.from_numpy(corpus.array("queries", mmap=False))
    tie_key = np.arange(pages)[::-1].copy()  # equal scores: descending page index (the evaluator's rule)
    scoring = MaxSimScoring(chunk_elements=options["chunk_elements"])
    k = options["k"]
    phases: dict = {}
    if mode != "exact":  # the first stage's index, built once per store before any search (as fast-plaid's)
        from dist_vdr.retrieval.two_stage import FirstStageIndex, two_stage_topk

        scoring = MaxSimScoring(chunk_elements=options["chunk_elements"],
                                first_stage_candidates=options["candidates"])
        t0 = time.perf_counter()
        FirstStageIndex.open(store, scoring, queries.shape[-1])
        phases["build_s"] = time.perf_counter() - t0
    distributed.barrier()
    t0 = time.perf_counter()
    if mode == "exact":
        scores, idx = global_topk(queries, store, start, k, tie_key, scoring=scoring)
    else:
        scores, idx = two_stage_topk(queries, store, start, k, tie_key, candidates=options["candidates"],
                                     scoring=scoring, timings=phases)
    distributed.barrier()
    seconds = time.perf_counter() - t0
    rss = distributed.all_gather_objects(own_peak_rss_gib())
    if rank == 0:
        Path(out).write_text(json.dumps({"s": seconds, "phases": phases, "build_s": phases.get("build_s"),
                                         "peak_rss_gib": rss, "stored_bytes": store.nbytes, "idx": idx.tolist()}))


class _StoredVectors:
    """A stand-in MultiVectorEncoder for sentence-transformers' evaluator: its queries and documents are ids, their
    token vectors are looked up (float16-rounded as the page store holds them, in float32)."""

    similarity_fn_name = "maxsim"
    prompts: dict = {}

    class model_card_data:  # noqa: N801  (the evaluator records its metrics there)
        @staticmethod
        def set_evaluation_metrics(*_):
            pass

    def __init__(self, corpus: Corpus) -> None:
        import torch

        self.tokens, self.offsets = corpus.array("doc_tokens"), corpus.array("doc_offsets", mmap=False)
        self.queries = torch.from_numpy(corpus.array("queries", mmap=False))

    def encode_query(self, ids, **_):
        from dist_vdr.kinds.multi_vector.scoring import QUERY, MaxSimScoring

        return [MaxSimScoring().trim(self.queries[int(q)], QUERY) for q in ids]

    def encode_document(self, ids, **_):
        import torch

        return [torch.from_numpy(np.asarray(self.tokens[self.offsets[int(p)]:self.offsets[int(p) + 1]],
                                            dtype=np.float32)) for p in ids]


def _st_worker(rank: int, corpus_dir: str, out: str) -> None:
    from sentence_transformers.multi_vector_encoder.evaluation import MultiVectorInformationRetrievalEvaluator

    corpus = Corpus(Path(corpus_dir))
    relevant = corpus.array("relevant", mmap=False)
    pages = len(corpus.array("doc_offsets")) - 1
    ks = list(KS)
    evaluator = MultiVectorInformationRetrievalEvaluator(
        queries={str(q): str(q) for q in range(len(relevant))}, corpus={str(p): str(p) for p in range(pages)},
        relevant_docs={str(q): {str(int(r))} for q, r in enumerate(relevant)}, mrr_at_k=ks, ndcg_at_k=ks,
        accuracy_at_k=ks, precision_recall_at_k=ks, map_at_k=ks, write_csv=False, show_progress_bar=False)
    model = _StoredVectors(corpus)
    t0 = time.perf_counter()
    metrics = evaluator(model)
    seconds = time.perf_counter() - t0
    Path(out).write_text(json.dumps({"s": seconds, "peak_rss_gib": [own_peak_rss_gib()],
                                     "ndcg@10": metrics["maxsim_ndcg@10"], "recall@100": metrics["maxsim_recall@100"],
                                     "mrr@10": metrics["maxsim_mrr@10"]}))


# ------------------------------------------------------------------------------------------- the bench
def run(work: str, *, pages: int, page_tokens: int, queries: int, query_tokens: int, dim: int, world_size: int,
        candidates: int, k: int = 100, chunk_elements: int = 1 << 24, sentence_transformers: bool = True,
        fast_plaid_python: str | None = None,
        seed: int = 0, log=print, in_process: bool = False) -> dict:
    """The bench in ``work`` (see the module); ``in_process``: the 1-rank methods run in this process (a test's
    shortcut: no fresh interpreters, so their peak RSS is this process's)."""
    folder = Path(work)
    cores = os.cpu_count() or 1
    t0 = time.perf_counter()
    corpus = generate(folder / "corpus", pages=pages, page_tokens=page_tokens, queries=queries,
                      query_tokens=query_tokens, dim=dim, seed=seed)
    log(f"generated {pages:,} pages x {page_tokens} tokens x {dim}-d, {queries} queries "
        f"({time.perf_counter() - t0:.1f} s)")
    relevant = corpus.array("relevant", mmap=False)
    options = dict(k=k, chunk_elements=chunk_elements, candidates=candidates)
    results: dict = {"pages": pages, "page_tokens": page_tokens, "queries": queries, "query_tokens": query_tokens,
                     "dim": dim, "cores": cores, "world_size": world_size, "methods": {}}
    stores: dict[int, list[Path]] = {}
    for w in sorted({1, world_size}):
        stores[w], seconds = write_stores(corpus, folder, w)
        results[f"store_write_s_{w}"] = seconds

    def spawn(name: str, fn, w: int, args: tuple) -> dict:
        out = str(folder / f"{name}.json")
        log(f"running {name} ...")
        if in_process and w == 1:
            fn(0, *args, out)
        else:
            distributed.spawn_gloo(fn, w, (*args, out), str(folder), threads_per_rank=max(1, cores // w))
        result = json.loads(Path(out).read_text())
        results["methods"][name] = result
        return result

    exact = spawn("dist-vdr exact, 1 rank", _search_worker, 1,
                  ("exact", str(corpus.folder), [str(s) for s in stores[1]], options))
    reference = np.array(exact["idx"])
    if world_size > 1:
        spawn(f"dist-vdr exact, {world_size} ranks", _search_worker, world_size,
              ("exact", str(corpus.folder), [str(s) for s in stores[world_size]], options))
    spawn(f"dist-vdr two-stage ({candidates} candidates), 1 rank", _search_worker, 1,
          ("two-stage", str(corpus.folder), [str(s) for s in stores[1]], options))
    if sentence_transformers:
        spawn("sentence-transformers evaluator, 1 process", _st_worker, 1, (str(corpus.folder),))
    if fast_plaid_python:
        log("running fast-plaid ...")
        _fast_plaid(results, fast_plaid_python, corpus, folder / "fast-plaid-index", k)
    _score(results["methods"], relevant, reference, k)
    return results


def _fast_plaid(results: dict, python: str, corpus: Corpus, index: Path, k: int) -> None:
    """fast-plaid's build + search in its own interpreter (fast_plaid_child.py), into ``results``; a failure is
    reported there, the other figures stand."""
    proc = subprocess.run([python, str(CHILD), str(corpus.folder), str(index), str(k)], capture_output=True, text=True)
    if proc.returncode != 0:
        results["fast_plaid_error"] = proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else \
            f"exit {proc.returncode}"
        return
    fp = json.loads(proc.stdout.strip().splitlines()[-1])
    fp["s"], fp["peak_rss_gib"], fp["idx"] = fp.pop("search_s"), [fp["peak_rss_gib"]], fp.pop("ids")
    fp.pop("scores", None)
    results["methods"]["fast-plaid (index build + search), 1 process"] = fp


def _score(methods: dict, relevant: np.ndarray, reference: np.ndarray, k: int) -> None:
    """Each method's rankings (``idx``) replaced by its metrics and its agreement with the exact top-k."""
    for r in methods.values():
        if "idx" in r:
            idx = np.array([row + [-1] * (k - len(row)) for row in r.pop("idx")])
            m = _metrics(idx, relevant)
            r["ndcg@10"], r["recall@100"], r["mrr@10"] = m["ndcg@10"], m["recall@100"], m["mrr@10"]
            r["recall_of_exact_top100"] = float(np.mean([len(set(a[a >= 0]) & set(b[b >= 0])) / max(1, (b >= 0).sum())
                                                         for a, b in zip(idx, reference, strict=True)]))
            r["same_rankings_as_exact"] = bool((idx == reference).all())


def format_report(results: dict) -> str:
    methods = results["methods"]
    base_name = "dist-vdr exact, 1 rank"
    base = methods[base_name]["s"]
    lines = [f"{results['pages']:,} pages x <= {results['page_tokens']} tokens x {results['dim']}-d (float16), "
             f"{results['queries']} queries x <= {results['query_tokens']} tokens, top-100, {results['cores']} cores",
             f"page stores written: {results['store_write_s_1']:.1f} s (1 rank)", "",
             "| method | search s | vs exact 1 rank | index build s | peak RSS GiB per process | NDCG@10 | "
             "recall@100 | recall of exact top-100 |", "|---|---|---|---|---|---|---|---|"]
    for name, r in methods.items():
        exact_recall = f"{r['recall_of_exact_top100']:.4f}" if "recall_of_exact_top100" in r else "n/a"
        build = f"{r.get('build_s', 0):.1f}" if r.get("build_s") else "-"
        lines.append(f"| {name} | {r['s']:.2f} | {base / r['s']:.2f}x | {build} | "
                     f"{' / '.join(f'{x:.2f}' for x in r['peak_rss_gib'])} | {r['ndcg@10']:.4f} | "
                     f"{r['recall@100']:.4f} | {exact_recall} |")
    if results.get("fast_plaid_error"):
        lines.append(f"fast-plaid failed: {results['fast_plaid_error']}")
    st = methods.get("sentence-transformers evaluator, 1 process")
    if st:
        ours = methods[base_name]
        lines.append("")
        lines.append(f"exact vs sentence-transformers: {st['s'] / base:.1f}x faster; NDCG@10 difference "
                     f"{abs(st['ndcg@10'] - ours['ndcg@10']):.2e}, recall@100 difference "
                     f"{abs(st['recall@100'] - ours['recall@100']):.2e}")
    two = next((r for n, r in methods.items() if n.startswith("dist-vdr two-stage")), None)
    if two:
        ours = methods[base_name]
        p = two["phases"]
        lines.append(f"two-stage vs exact: {base / two['s']:.1f}x faster (first stage {p['first_s']:.2f} s, exact "
                     f"stage {p['exact_s']:.2f} s; its index, built once beforehand: {p['build_s']:.2f} s, "
                     f"{base / (two['s'] + p['build_s']):.1f}x with it); NDCG@10 "
                     f"{two['ndcg@10'] / ours['ndcg@10']:.2%} of exact, recall of the exact top-100 "
                     f"{two['recall_of_exact_top100']:.4f}")
    return "\n".join(lines)
