"""`dist-vdr bench eval-multi-vector` (dist_vdr.bench.multi_vector_search) at a tiny size, its 1-rank methods in this
process: the figures printed side by side; sentence-transformers' evaluator, handed the same vectors by the stand-in
model, gives the exact search's metrics; the two-stage search with every page a candidate gives its rankings. (2
ranks = 1 for the same search: tests/integration/test_eval_command.py.) No timing is checked."""

from __future__ import annotations

from dist_vdr.bench import multi_vector_search as mvs


def test_the_bench_prints_every_method_side_by_side(tmp_path):
    results = mvs.run(str(tmp_path), pages=300, page_tokens=12, queries=20, query_tokens=6, dim=16, world_size=1,
                      candidates=300, in_process=True, log=lambda line: None)
    methods = results["methods"]
    exact = methods["dist-vdr exact, 1 rank"]
    two = methods["dist-vdr two-stage (300 candidates), 1 rank"]
    assert two["same_rankings_as_exact"] and two["recall_of_exact_top100"] == 1.0  # every page a candidate
    assert set(two["phases"]) == {"build_s", "index_s", "first_s", "exact_s"}
    st = methods["sentence-transformers evaluator, 1 process"]
    for name in ("ndcg@10", "recall@100", "mrr@10"):
        assert abs(st[name] - exact[name]) <= 1e-6, name
    assert all(min(r["peak_rss_gib"]) > 0 for r in methods.values())
    report = mvs.format_report(results)
    assert "| dist-vdr exact, 1 rank |" in report and "exact vs sentence-transformers" in report
    # the generated corpus: ragged pages, queries of their relevant page's tokens, float16 on disk
    corpus = mvs.Corpus(tmp_path / "corpus")
    counts = corpus.array("doc_offsets")[1:] - corpus.array("doc_offsets")[:-1]
    assert counts.min() >= 9 and counts.max() <= 12 and corpus.array("doc_tokens").dtype.name == "float16"
