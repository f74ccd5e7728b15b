"""The sharded evaluator: metrics vs sentence-transformers and pytrec_eval, 1 rank vs 2 ranks, cache resume."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from dist_vdr.retrieval.metrics import retrieval_metrics
from dist_vdr.retrieval.search import merge_topk, shard_topk


def _random_run(num_q=40, num_docs=60, k=20, graded=False, seed=0):
    rng = random.Random(seed)
    docs = [f"d{i:03d}" for i in range(num_docs)]
    ranked, qrels = {}, {}
    for q in range(num_q):
        qid = f"q{q}"
        ranked[qid] = rng.sample(docs, k)
        rel = rng.sample(docs, rng.randint(1, 4))
        qrels[qid] = {d: (rng.randint(1, 3) if graded else 1) for d in rel}
    return ranked, qrels


@pytest.mark.parametrize("graded", [False, True])
def test_metrics_equal_pytrec_eval(graded):
    import pytrec_eval

    ranked, qrels = _random_run(graded=graded)
    ks = [1, 3, 5, 10]
    ours = retrieval_metrics(ranked, qrels, ks)
    run = {q: {d: float(len(docs) - i) for i, d in enumerate(docs)} for q, docs in ranked.items()}
    measures = {f"ndcg_cut.{','.join(map(str, ks))}", f"recall.{','.join(map(str, ks))}", f"P.{','.join(map(str, ks))}",
                f"success.{','.join(map(str, ks))}"}
    ref = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    for k in ks:
        for ours_name, trec_name in (("ndcg", "ndcg_cut"), ("recall", "recall"), ("precision", "P"),
                                     ("accuracy", "success")):
            expected = np.mean([ref[q][f"{trec_name}_{k}"] for q in ranked])
            assert ours[f"{ours_name}@{k}"] == pytest.approx(expected, abs=1e-9), (ours_name, k)
        # MRR@k: trec_eval's recip_rank on the run cut at k.
        cut = {q: {d: s for d, s in r.items() if s > len(ranked[q]) - k} for q, r in run.items()}
        rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
        assert ours[f"mrr@{k}"] == pytest.approx(np.mean([rr[q]["recip_rank"] for q in ranked]), abs=1e-9)
    # MAP@k: trec_eval's map_cut divides by all relevant pages; with one relevant page per query the
    # stock (sentence-transformers) definition min(k, #relevant) is the same.
    single = {q: dict([next(iter(r.items()))]) for q, r in qrels.items()}
    ref_map = pytrec_eval.RelevanceEvaluator(single, {"map_cut.10"}).evaluate(run)
    assert retrieval_metrics(ranked, single, [10])["map@10"] == pytest.approx(
        np.mean([ref_map[q]["map_cut_10"] for q in ranked]), abs=1e-9)


def test_search_backends_and_sharded_merge_agree():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(1000, 16, generator=g), dim=-1)
    tie_key = np.arange(1000)
    s_f, i_f = shard_topk(q, c, 10, backend="faiss")
    s_t, i_t = shard_topk(q, c, 10, backend="torch", corpus_chunk=128, query_block=7)
    assert torch.equal(i_f, i_t) and torch.allclose(s_f, s_t, atol=1e-5)
    # Three uneven shards, merged, equal the single search; a shard smaller than k pads with -1.
    parts = [(0, 5), (5, 600), (600, 1000)]
    all_s, all_i = [], []
    for a, b in parts:
        s, i = shard_topk(q, c[a:b], 10, backend="torch")
        all_s.append(s)
        all_i.append(torch.where(i >= 0, i + a, i))
    assert (all_i[0] == -1).any()
    ms, mi = merge_topk(torch.cat(all_s, 1), torch.cat(all_i, 1), 10, tie_key)
    assert np.array_equal(mi, i_t.numpy())


def test_ties_break_by_page_id():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.5]])
    idx = torch.tensor([[3, 0, 1, 2]])
    tie_key = np.array([0, 2, 1, 3])  # page order by id: 0 < 2 < 1 < 3
    _, order = merge_topk(scores, idx, 4, tie_key)
    assert order.tolist() == [[0, 2, 1, 3]]


def _data(pages):
    from dist_vdr.config import DataConfig
    from dist_vdr.data.loading import load_eval

    return load_eval(DataConfig(path=str(pages)))


def test_equals_stock_information_retrieval_evaluator(tiny_model, pages, tmp_path):
    from sentence_transformers import SentenceTransformer

    from dist_vdr.retrieval import stock
    from dist_vdr.retrieval.sharded import ShardedRetrievalEvaluator

    model = SentenceTransformer(str(tiny_model), device="cpu")
    data = _data(pages)
    dims = [64, 32, 16]
    ours = ShardedRetrievalEvaluator(data, dims, batch_size=8, num_workers=0, show_progress=False)(model)
    theirs = stock.build_evaluator(data, dims, batch_size=8)(model)
    per_ours, per_theirs = stock.summarise(ours), stock.summarise(theirs)
    assert per_ours.keys() == per_theirs.keys() == {64, 32, 16}
    for d in dims:
        for name in ("ndcg@10", "mrr@10", "accuracy@1", "accuracy@10", "recall@100", "map@100", "precision@3"):
            assert per_ours[d][name] == pytest.approx(per_theirs[d][name], abs=1e-9), (d, name)


def test_outputs_reproduce_with_pytrec_eval(tiny_model, pages, tmp_path):
    import pytrec_eval
    from sentence_transformers import SentenceTransformer

    from dist_vdr.retrieval.sharded import ShardedRetrievalEvaluator

    model = SentenceTransformer(str(tiny_model), device="cpu")
    ev = ShardedRetrievalEvaluator(_data(pages), [64, 16], batch_size=8, num_workers=2, show_progress=False)
    ev(model, output_path=str(tmp_path / "out"))
    out = tmp_path / "out"
    for name in ("retrieval_metrics.json", "retrieval_metrics.csv", "qrels.trec", "run.dim64.trec",
                 "run.dim16.trec", "ndcg_vs_dim.png"):
        assert (out / name).is_file(), name
    qrels, run = {}, {}
    for line in (out / "qrels.trec").read_text().splitlines():
        q, _, p, g = line.split()
        qrels.setdefault(q, {})[p] = int(g)
    for line in (out / "run.dim64.trec").read_text().splitlines():
        q, _, p, rank, score, tag = line.split()
        run.setdefault(q, {})[p] = float(score)
        assert tag == "dist-vdr-dim64"
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    metrics = json.loads((out / "retrieval_metrics.json").read_text())["metrics"]["64"]
    assert metrics["ndcg@10"] == pytest.approx(np.mean([r["ndcg_cut_10"] for r in ref.values()]), abs=1e-12)
    assert metrics["recall@100"] == pytest.approx(np.mean([r["recall_100"] for r in ref.values()]), abs=1e-9)


def test_cache_resumes_an_interrupted_encoding(tiny_model, pages, tmp_path):
    from sentence_transformers import SentenceTransformer

    from dist_vdr.retrieval.encode import encode_corpus_shard

    model = SentenceTransformer(str(tiny_model), device="cpu")
    corpus = _data(pages).corpus
    _, full = encode_corpus_shard(model, corpus, rank=0, world_size=1, batch_size=4, cache_dir=str(tmp_path / "c"),
                                  cache_key="k")
    files = sorted((tmp_path / "c").glob("shard-0-of-1-*/batch-*.pt"))
    assert len(files) == 8
    for f in files[3:]:  # as if killed after 3 batches
        f.unlink()
    calls = []
    original = model.forward
    model.forward = lambda feats: (calls.append(1), original(feats))[1]
    _, resumed = encode_corpus_shard(model, corpus, rank=0, world_size=1, batch_size=4,
                                     cache_dir=str(tmp_path / "c"), cache_key="k")
    assert len(calls) == 5  # only the missing batches were encoded again
    assert torch.allclose(full, resumed, atol=1e-6)
    # Another key: a fresh sub-folder, every batch encoded, nothing of the first entry used.
    calls.clear()
    encode_corpus_shard(model, corpus, rank=0, world_size=1, batch_size=4, cache_dir=str(tmp_path / "c"),
                        cache_key="other")
    model.forward = original
    assert len(calls) == 8 and len(list((tmp_path / "c").glob("shard-0-of-1-*"))) == 2


def _other_images(corpus):
    """The same page ids and number of pages, each id given the next page's image: another corpus that
    only a key over the page contents tells apart."""
    import datasets

    raw = corpus.cast_column("image", datasets.Image(decode=False))["image"]
    return datasets.Dataset.from_dict({"page_id": list(corpus["page_id"]), "image": raw[1:] + raw[:1]},
                                      features=datasets.Features({"page_id": datasets.Value("string"),
                                                                  "image": datasets.Image()}))


def test_cache_is_keyed_by_model_corpus_and_preprocessing(tiny_model, pages, tmp_path):
    """Two corpora of the same size (same page ids) through one cache folder give the metrics of no
    cache; the key changes with the weights and the processor settings."""
    from sentence_transformers import SentenceTransformer

    from dist_vdr.data.loading import EvalData
    from dist_vdr.retrieval.encode import embedding_key
    from dist_vdr.retrieval.sharded import ShardedRetrievalEvaluator

    model = SentenceTransformer(str(tiny_model), device="cpu")
    a = _data(pages)
    b = EvalData(queries=a.queries, corpus=_other_images(a.corpus), qrels=a.qrels)
    cache = str(tmp_path / "cache")

    def evaluate(data, cache_dir):
        return ShardedRetrievalEvaluator(data, [64], batch_size=8, num_workers=0, show_progress=False,
                                         cache_dir=cache_dir)(model)

    cached_a, cached_b = evaluate(a, cache), evaluate(b, cache)
    assert cached_b == evaluate(b, None)
    assert cached_a == evaluate(a, None) != cached_b  # the corpora really differ
    assert evaluate(b, cache) == cached_b  # and an entry is reused when everything matches

    key = embedding_key(model, image_column="image", batch_size=8, block=8)
    assert embedding_key(model, image_column="image", batch_size=8, block=8) == key
    smaller = SentenceTransformer(str(tiny_model), device="cpu", processor_kwargs={"max_pixels": 40000})
    assert embedding_key(smaller, image_column="image", batch_size=8, block=8)["settings"] != key["settings"]
    with torch.no_grad():
        list(model.parameters())[-1].add_(1e-3)  # a finetuned last layer: the first layers are unchanged
    assert embedding_key(model, image_column="image", batch_size=8, block=8)["weights"] != key["weights"]


def _fixed_scores_run(monkeypatch, tmp_path, page_scores: dict[str, float], qrels: dict, ks=(1, 3, 5, 10),
                      unjudged=()):
    """Evaluate fixed float32 scores (every query scores page p as page_scores[p]); returns (the JSON
    metrics, pytrec_eval on the written run and qrels, per query)."""
    import datasets
    import pytrec_eval

    from dist_vdr.data.loading import EvalData
    from dist_vdr.retrieval import sharded

    ids = list(page_scores)
    x = torch.tensor([page_scores[p] for p in ids], dtype=torch.float32)
    pages = torch.stack([x, torch.sqrt(1 - x.double() ** 2).float()], dim=1)  # query [1, 0]: score = x exactly
    queries = {q: "text" for q in [*qrels, *unjudged]}
    data = EvalData(queries=queries, corpus=datasets.Dataset.from_dict({"page_id": ids}),
                    qrels={**qrels, **{q: {ids[0]: 0} for q in unjudged}})
    monkeypatch.setattr(sharded, "encode_corpus_shard", lambda *a, **k: (0, pages))
    ev = sharded.ShardedRetrievalEvaluator(data, [2], ks=ks, show_progress=False)
    monkeypatch.setattr(ev, "_encode_queries", lambda model, info: torch.tensor([[1.0, 0.0]]).repeat(len(queries), 1))
    ev(None, output_path=str(tmp_path))
    run, written_qrels = {}, {}
    for line in (tmp_path / "run.dim2.trec").read_text().splitlines():
        q, _, p, _, score, _ = line.split()
        run.setdefault(q, {})[p] = float(score)
    for line in (tmp_path / "qrels.trec").read_text().splitlines():
        q, _, p, g = line.split()
        written_qrels.setdefault(q, {})[p] = int(g)
    cut = ",".join(map(str, ks))
    measures = {f"ndcg_cut.{cut}", f"P.{cut}", f"recall.{cut}", f"success.{cut}", "recip_rank"}
    ref = pytrec_eval.RelevanceEvaluator(written_qrels, measures).evaluate(run)
    return json.loads((tmp_path / "retrieval_metrics.json").read_text())["metrics"]["2"], ref


def test_written_run_reproduces_the_metrics_under_trec_eval_ties(monkeypatch, tmp_path):
    """Scores equal to 6 decimals (distinct float32) and exactly equal scores: pytrec_eval (trec_eval:
    score, then descending docno) on the written run gives the evaluator's metrics."""
    ours, ref = _fixed_scores_run(monkeypatch, tmp_path / "minimal", {"a": 0.5000004, "b": 0.5000001},
                                  {"q": {"a": 1}}, ks=(1, 10))  # top 10 written: both pages
    assert ours["mrr@1"] == 1.0 and ref["q"]["recip_rank"] == 1.0

    rng = np.random.default_rng(0)
    ulp = float(np.spacing(np.float32(0.5)))
    # 40 pages a few float32 ulps apart (many exact ties, all within 6 decimals), 5 clearly better.
    scores = {f"p{i:02d}": float(np.float32(0.5 + int(rng.integers(0, 6)) * ulp)) for i in range(40)}
    scores.update({f"p{40 + i}": 0.9 - i / 100 for i in range(5)})
    qrels = {f"q{i}": {p: int(rng.integers(1, 3)) for p in rng.choice(list(scores), 3, replace=False)}
             for i in range(30)}
    with pytest.warns(UserWarning, match="1 of 31 queries left out"):
        ours, ref = _fixed_scores_run(monkeypatch, tmp_path / "many", scores, qrels, unjudged=["q-none"])
    assert set(ref) == set(qrels)  # the query without a relevant page is in no output
    for k in (1, 3, 5, 10):
        for name, trec in (("ndcg", "ndcg_cut"), ("precision", "P"), ("recall", "recall"), ("accuracy", "success")):
            assert ours[f"{name}@{k}"] == pytest.approx(np.mean([r[f"{trec}_{k}"] for r in ref.values()]), abs=1e-12)
    assert ours["mrr@10"] == pytest.approx(np.mean([r["recip_rank"] for r in ref.values()]), abs=1e-12)


def test_score_text_keeps_float32_scores_distinct_and_ordered():
    from dist_vdr.retrieval.sharded import score_text

    values = np.sort(np.random.default_rng(1).uniform(-1, 1, 2000).astype(np.float32))
    values = np.concatenate([values, np.nextafter(values, np.float32(2))])
    for v in values:
        assert np.float32(float(score_text(float(v)))) == v and len(score_text(float(v)).lstrip("-0.")) <= 12
    assert score_text(0.1 + 0.2) == repr(0.1 + 0.2)  # a float64 score (fused reranker scores) keeps 17 digits




def test_corpus_batches_do_not_depend_on_the_number_of_ranks():
    """Shards are whole blocks of batches: every page lands in the same batch for any world size."""
    from dist_vdr.retrieval.encode import block_batches, block_size, corpus_shard_range

    rng = np.random.default_rng(0)
    assert block_size(100, 16) == 16 and block_size(100_000, 16) == 128  # balanced small, sorted large
    for n in (0, 5, 16, 127, 128, 129, 1000, 5000):
        areas = rng.integers(1, 50, size=n)  # many ties: the stable sort must keep them in order
        block = block_size(n, 16)
        reference = {tuple(b) for b in block_batches(areas, 16, block)}
        for world_size in (1, 2, 3, 4):
            covered, batches = [], set()
            for rank in range(world_size):
                start, end = corpus_shard_range(n, rank, world_size, block)
                assert (start == n or start % block == 0) and (end == n or end % block == 0)
                covered += range(start, end)
                batches |= {tuple(start + p for p in b) for b in block_batches(areas[start:end], 16, block)}
            assert covered == list(range(n))
            assert batches == reference, (n, world_size)




