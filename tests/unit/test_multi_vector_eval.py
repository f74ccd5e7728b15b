"""The sharded evaluator with the multi-vector kind's MaxSim (one process): its metrics equal a brute-force MaxSim
written out in plain torch over sentence-transformers' own token embeddings, and sentence-transformers'
MultiVectorInformationRetrievalEvaluator; every token dim comes from one encode. The pages are searched from the
on-disk store: in float32 it equals the in-memory figures exactly; in float16 it equals the brute force over the
same float16-rounded token vectors. (2 ranks vs 1: test_eval_command.py,
mining: tests/integration/test_multi_vector_commands.py.)"""

from __future__ import annotations

import pytest
import torch

from dist_vdr.config import DataConfig, ModelConfig
from dist_vdr.data.loading import load_eval
from dist_vdr.kinds.multi_vector.model import build_multi_vector
from dist_vdr.kinds.multi_vector.scoring import MaxSimScoring
from dist_vdr.retrieval.metrics import retrieval_metrics
from dist_vdr.retrieval.sharded import ShardedRetrievalEvaluator, trec_tie_key
from dist_vdr.retrieval.stock import summarise

KS = (1, 3, 5, 10, 100)
NAMES = ("ndcg@10", "mrr@10", "accuracy@1", "recall@10", "recall@100", "map@100", "precision@3")


@pytest.fixture(scope="module")
def loaded(tiny_multi_vector, pages):
    model = build_multi_vector(ModelConfig(name_or_path=str(tiny_multi_vector)), precision="fp32", device="cpu")
    return model, load_eval(DataConfig(path=str(pages)))


def _evaluated(loaded, store_dtype: str):
    model, data = loaded
    ours = ShardedRetrievalEvaluator(data, [32, 16], ks=KS, batch_size=8, num_workers=0, show_progress=False,
                                     scoring=MaxSimScoring(store_dtype=store_dtype))
    return model, data, ours, summarise(ours(model))


@pytest.fixture(scope="module")
def setting(loaded):
    return _evaluated(loaded, "float32")


@pytest.fixture(scope="module")
def setting_float16(loaded):
    return _evaluated(loaded, "float16")


def _brute_force(model, data, dim: int, stored=torch.float32) -> dict[str, float]:
    """Plain torch: sentence-transformers' token embeddings (each query's, each page's: lists of [T_i, D]),
    cut to ``dim`` and re-normalised per token, sum over query tokens of the max over page tokens, every page.
    ``stored``: the pages' token vectors rounded to it first (normalised, as the evaluator stores them)."""
    qids = list(data.queries)
    queries = model.encode_query([data.queries[q] for q in qids], batch_size=8)
    corpus = data.corpus_dict()
    pids = list(corpus)
    pages = model.encode_document([corpus[p] for p in pids], batch_size=8)

    def cut(t):
        return torch.nn.functional.normalize(t[:, :dim].double(), dim=-1)

    def as_stored(t):
        t = torch.nn.functional.normalize(t.float(), dim=-1).to(stored).double()
        return t if dim == t.shape[-1] else cut(t)  # the full dim is searched as stored

    scores = torch.tensor([[float((cut(q) @ as_stored(p).T).max(dim=1).values.sum()) for p in pages]
                           for q in queries])
    key = torch.as_tensor(trec_tie_key(pids))
    ranked = {}
    for i, qid in enumerate(qids):  # score, then the evaluator's tie order (descending id)
        order = sorted(range(len(pids)), key=lambda j: (-scores[i, j].item(), -key[j].item()))[:max(KS)]
        ranked[qid] = [pids[j] for j in order]
    return retrieval_metrics(ranked, data.qrels, KS)


@pytest.mark.parametrize("which", ["setting", "setting_float16"])
def test_metrics_equal_brute_force_maxsim_at_every_token_dim(which, request):
    model, data, ours_ev, ours = request.getfixturevalue(which)
    stored = getattr(torch, ours_ev.scoring.store_dtype)
    for dim in (32, 16):
        expected = _brute_force(model, data, dim, stored)
        for name in NAMES:
            assert ours[dim][name] == pytest.approx(expected[name], abs=1e-6), (dim, name)


def test_metrics_equal_sentence_transformers_multi_vector_evaluator(setting):
    from sentence_transformers.multi_vector_encoder.evaluation import MultiVectorInformationRetrievalEvaluator

    model, data, _, ours = setting  # sentence-transformers scores float32 token vectors: the float32 store
    ks = list(KS)
    theirs = MultiVectorInformationRetrievalEvaluator(
        queries=data.queries, corpus=data.corpus_dict(), relevant_docs=data.relevant_sets(), batch_size=8,
        mrr_at_k=ks, ndcg_at_k=ks, accuracy_at_k=ks, precision_recall_at_k=ks, map_at_k=ks, write_csv=False,
        show_progress_bar=False)(model)
    prefix = next(k for k in theirs if k.endswith("_ndcg@10")).rsplit("_", 1)[0]  # e.g. maxsim
    for name in NAMES:
        assert ours[32][name] == pytest.approx(theirs[f"{prefix}_{name}"], abs=1e-6), name


def test_index_time_token_pooling_equals_sentence_transformers_pooled_encode(setting):
    """multi_vector.pool_factor=2: the stored pages are sentence-transformers' encode_document(token_pooling=
    HierarchicalTokenPooling(2, no protected token)), about half the tokens; queries are not pooled; the cache keys
    on it; the evaluator runs with it."""
    from sentence_transformers.multi_vector_encoder.modules import HierarchicalTokenPooling

    from dist_vdr.kinds.multi_vector.scoring import PAGE, QUERY

    model, data, _, _ = setting
    pooled = MaxSimScoring(pool_factor=2)
    corpus = data.corpus_dict()
    images = [corpus[p] for p in list(corpus)[:6]]
    features = pooled.prepare(model, images, PAGE, None)
    with torch.no_grad():
        ours = pooled.forward(model, features, PAGE)
        full = MaxSimScoring().forward(model, features, PAGE)
    theirs = model.encode_document(images, batch_size=6, token_pooling=HierarchicalTokenPooling(
        2, num_protected_tokens=0, normalize_embeddings=True))
    for row, ref in zip(ours, theirs, strict=True):
        torch.testing.assert_close(row[:len(ref)], ref.float(), rtol=0, atol=1e-5)  # then copies of the first
    assert ours.shape[1] <= (full.shape[1] + 1) // 2 + 1
    queries = pooled.prepare(model, ["red bar chart"], QUERY, None)
    with torch.no_grad():
        assert torch.equal(pooled.forward(model, queries, QUERY), MaxSimScoring().forward(model, queries, QUERY))
    assert pooled.cache_tag() != MaxSimScoring().cache_tag()  # a cache never mixes pooled and full pages
    ev = ShardedRetrievalEvaluator(data, [32], ks=KS, batch_size=8, num_workers=0, show_progress=False,
                                   scoring=pooled)
    assert 0 < summarise(ev(model))[32]["ndcg@10"] <= 1


def test_bench_pooling_prints_the_table(tiny_multi_vector, pages, capsys):
    """`dist-vdr bench pooling`: a row per pool factor, the first the baseline of the ratios."""
    from dist_vdr.cli.commands import build_parser

    args = build_parser().parse_args(["bench", "pooling", "--model", str(tiny_multi_vector), "--data", str(pages),
                                      "--pool-factors", "1,2", "--max-queries", "8", "--batch-size", "8"])
    assert args.fn(args) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 2 and "| 100.0% |" in rows[0], out
    full, pooled = (float(r.split("|")[5]) for r in rows)  # vectors per page
    assert pooled < 0.6 * full, out


def test_an_interrupted_page_store_goes_on_where_it_stopped(loaded, tmp_path, monkeypatch):
    """eval.cache holds the keyed page store: a store cut mid-write (a real truncated file) is continued, only the
    batches it lacks are encoded again, and the metrics are those of the uninterrupted evaluation."""
    from dist_vdr.kinds.multi_vector.scoring import PAGE

    model, data = loaded

    def evaluate():
        return ShardedRetrievalEvaluator(data, [32], ks=KS, batch_size=8, num_workers=0, show_progress=False,
                                         scoring=MaxSimScoring(), cache_dir=str(tmp_path))(model)

    calls = []
    forward = MaxSimScoring.forward
    monkeypatch.setattr(MaxSimScoring, "forward",
                        lambda self, m, f, side: calls.append(side) or forward(self, m, f, side))
    first = evaluate()
    full = calls.count(PAGE)
    (folder,) = tmp_path.glob("tokens-0-of-1-*")
    tokens = folder / "tokens.bin"
    with open(tokens, "r+b") as f:
        f.truncate(tokens.stat().st_size // 2 + 3)
    calls.clear()
    assert evaluate() == first
    assert 0 < calls.count(PAGE) < full
    calls.clear()
    assert evaluate() == first and calls.count(PAGE) == 0  # complete: nothing encoded


def test_the_two_stage_evaluation_with_every_page_a_candidate_is_the_exhaustive_one(loaded, setting_float16):
    """multi_vector.first_stage_candidates: the evaluator's two-stage search (MUVERA candidates, then exact MaxSim);
    with at least as many candidates as pages it gives the exhaustive search's metrics at every token dim, with
    fewer it still gives metrics (approximate)."""
    model, data = loaded
    exhaustive = setting_float16[3]
    pages = len(data.corpus)
    for candidates, exact in ((pages, True), (max(100, pages // 4), False)):
        ev = ShardedRetrievalEvaluator(data, [32, 16], ks=KS, batch_size=8, num_workers=0, show_progress=False,
                                       scoring=MaxSimScoring(first_stage_candidates=candidates))
        got = summarise(ev(model))
        for dim in (32, 16):
            assert 0 < got[dim]["ndcg@10"] <= 1
            if exact:
                assert got[dim] == pytest.approx(exhaustive[dim], abs=1e-9), dim
