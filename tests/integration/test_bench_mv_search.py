"""`dist-vdr bench eval-multi-vector` (dist_vdr.bench.multi_vector_search), run for real at a tiny size: every method
in its own processes (2 gloo ranks for the sharded one), figures printed; the exact search on 1 and 2 ranks gives
the same rankings, sentence-transformers' evaluator the same metrics, the two-stage search with every page a
candidate the exact one. No timing is checked (docs/benchmarks.md holds the figures)."""

from __future__ import annotations

import json
import subprocess
import sys

from dist_vdr.bench import multi_vector_search as mvs


def test_the_bench_prints_every_method_side_by_side(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dist_vdr.cli", "bench", "eval-multi-vector", "--work-dir", str(tmp_path / "w"),
         "--pages", "300", "--page-tokens", "12", "--queries", "20", "--query-tokens", "6", "--dim", "16",
         "--candidates", "300", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    methods = results["methods"]
    exact = methods["dist-vdr exact, 1 rank"]
    assert methods["dist-vdr exact, 2 ranks"]["same_rankings_as_exact"]
    two = methods["dist-vdr two-stage (300 candidates), 1 rank"]
    assert two["same_rankings_as_exact"] and two["recall_of_exact_top100"] == 1.0  # every page a candidate
    st = methods["sentence-transformers evaluator, 1 process"]
    for name in ("ndcg@10", "recall@100", "mrr@10"):
        assert abs(st[name] - exact[name]) <= 1e-6, name
    assert all(r["peak_rss_gib"] and min(r["peak_rss_gib"]) > 0 for r in methods.values())
    assert "| dist-vdr exact, 2 ranks |" in proc.stdout and "exact vs sentence-transformers" in proc.stdout
    # the generated corpus: ragged pages, queries of their relevant page's tokens, float16 on disk
    corpus = mvs.Corpus(tmp_path / "w" / "corpus")
    counts = corpus.array("doc_offsets")[1:] - corpus.array("doc_offsets")[:-1]
    assert counts.min() >= 9 and counts.max() <= 12 and corpus.array("doc_tokens").dtype.name == "float16"
