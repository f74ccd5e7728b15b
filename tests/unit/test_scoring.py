"""The scoring seam (dist_vdr.retrieval.scoring): cosine gives the plain formula's numbers, and a toy kind's
scoring defined here, outside the package (negative L1 distance: not an inner product), is what the loss,
the evaluator's search, mining, teacher scoring and the guide use -- without editing them.

The toy model embeds tiny generated pages (their pixels) and looks its queries up: no network, so the
evaluator and mining run end to end in a fraction of a second.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_vdr.losses import false_negatives as fn
from dist_vdr.losses.global_batch import GlobalBatchCachedMNRL
from dist_vdr.retrieval.scoring import CosineScoring, Scoring
from dist_vdr.retrieval.search import merge_topk, rescore, shard_topk
from dist_vdr.retrieval.sharded import global_topk


class NegativeL1(Scoring):
    """The toy kind's scoring: minus the L1 distance of single vectors (normalised or not), read from the
    model's ``toy_vector`` output."""

    output_key = "toy_vector"

    def __init__(self, normalized: bool = False) -> None:
        self.normalized = normalized

    def represent(self, embeddings):
        return F.normalize(embeddings, dim=-1) if self.normalized else embeddings

    def truncate(self, reps, dim):
        return self.represent(reps[..., :dim])

    def scores(self, queries, pages):
        return -(queries[:, None, :] - pages[None, :, :]).abs().sum(dim=-1)

    def pair_scores(self, queries, pages):
        return -(queries - pages).abs().sum(dim=-1)


def _cut(scoring: NegativeL1, x, dim=None):
    """The toy's representation at ``dim``, written out (the plain formula the tests compare with)."""
    x = x if dim is None else x[..., :dim]
    return F.normalize(x, dim=-1) if scoring.normalized else x


def _brute_topk(q, p, k):
    """(scores, indices) of the k best pages by -cdist(p=1), float64."""
    s = -torch.cdist(q.double(), p.double(), p=1)
    top = torch.topk(s, k, dim=1)
    return top.values, top.indices


# ---------------------------------------------------------------------------------------------- cosine
def test_cosine_scoring_is_todays_formula_bit_for_bit():
    from dist_vdr.kinds.base import Task

    gen = torch.Generator().manual_seed(0)
    raw_q, raw_p = torch.randn(7, 32, generator=gen), torch.randn(11, 32, generator=gen)
    c = CosineScoring()
    assert c.output_key == "sentence_embedding" and c.inner_product and c.cache_tag() == ""
    q, p = c.represent(raw_q), c.represent(raw_p)
    assert torch.equal(q, F.normalize(raw_q, p=2, dim=-1))
    assert torch.equal(c.truncate(q, 8), F.normalize(q[:, :8], p=2, dim=-1))
    assert torch.equal(c.scores(q, p), q @ p.T)
    assert torch.equal(c.pair_scores(q, p[:7]), (q * p[:7]).sum(-1))
    assert torch.allclose(c.scores(q, p), F.cosine_similarity(raw_q[:, None], raw_p[None], dim=-1), atol=1e-6)
    assert type(Task().scoring(None)) is CosineScoring  # every kind's default
    # The default of search is cosine: the torch path is today's matmul, faiss agrees.
    s_t, i_t = shard_topk(q, p, 5, backend="torch")
    s_f, i_f = shard_topk(q, p, 5, backend="faiss")
    assert torch.equal(i_t, torch.topk(q @ p.T, 5, dim=1).indices) and torch.equal(i_t, i_f)


# ---------------------------------------------------------------------------------------------- search
@pytest.mark.parametrize("normalized", [False, True])
def test_toy_scoring_searches_by_its_own_rule(normalized):
    toy = NegativeL1(normalized)
    gen = torch.Generator().manual_seed(1)
    queries, pages = toy.represent(torch.randn(9, 16, generator=gen)), toy.represent(torch.randn(50, 16, generator=gen))
    tie = np.arange(50)
    for dim in (None, 16, 6):
        scores, idx = global_topk(queries, pages, 0, 7, tie, dim=dim, backend="auto", scoring=toy)  # faiss: not IP
        want_s, want_i = _brute_topk(_cut(toy, queries, dim), _cut(toy, pages, dim), 7)
        assert np.array_equal(idx, want_i.numpy())
        assert np.allclose(scores, want_s.numpy(), atol=1e-5)
    # The corpus split over three "ranks": each searches and rescores its shard, the merge gives the same.
    parts = [(0, 17), (17, 31), (31, 50)]
    lists = []
    for a, b in parts:
        _, i = shard_topk(queries, pages[a:b], 7, backend="torch", corpus_chunk=4, query_block=2, scoring=toy)
        lists.append((rescore(queries, pages[a:b], i, scoring=toy), torch.where(i >= 0, i + a, i)))
    s, i = merge_topk(torch.cat([s for s, _ in lists], 1), torch.cat([i for _, i in lists], 1), 7, tie)
    want_s, want_i = _brute_topk(queries, pages, 7)
    assert np.array_equal(i, want_i.numpy()) and np.allclose(s, want_s.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="needs inner-product scores"):
        shard_topk(queries, pages, 3, backend="faiss", scoring=toy)


def test_toy_scoring_drives_the_guide_mask():
    toy = NegativeL1()
    gen = torch.Generator().manual_seed(2)
    q, c, targets = torch.randn(4, 8, generator=gen), torch.randn(12, 8, generator=gen), torch.tensor([0, 3, 5, 7])
    got = fn.guide_mask(q, c, targets, 0.5, "absolute", scoring=toy)
    sims = -torch.cdist(q, c, p=1)
    want = sims > (sims[torch.arange(4), targets] - 0.5)[:, None]
    want[torch.arange(4), targets] = False
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------- loss
class _VectorModel(torch.nn.Sequential):
    """One linear layer; the toy kind reads ``toy_vector`` (``sentence_embedding`` is zeros: reading it
    would make every score equal)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(torch.nn.Linear(6, 16))

    def forward(self, features):
        h = self[0](features["x"])
        return {"sentence_embedding": torch.zeros_like(h), "toy_vector": h}


def _explicit_loss(toy, q, cand, dims, scale):
    """Sum over dims of the mean cross-entropy over -L1 * scale (query i's positive: candidate i)."""
    total = 0
    for dim in dims:
        logits = -torch.cdist(_cut(toy, q, dim), _cut(toy, cand, dim), p=1) * scale
        total = total + F.cross_entropy(logits, torch.arange(q.shape[0]))
    return total


@pytest.mark.parametrize("normalized", [False, True])
def test_global_batch_loss_trains_with_the_toy_scoring(normalized):
    toy, dims = NegativeL1(normalized), (16, 8)
    scale = 20.0 if normalized else 1.0  # raw L1 distances are large: logits of a few units either way
    gen = torch.Generator().manual_seed(3)
    reps = [[torch.randn(4, 16, generator=gen, requires_grad=True)] for _ in range(3)]  # query, positive, negative
    loss = GlobalBatchCachedMNRL(_VectorModel(), matryoshka_dims=dims, mini_batch_size=3, scoring=toy, scale=scale)
    got = loss.calculate_loss(reps, None, with_backward=True)
    q, *cols = [c[0] for c in reps]
    want = _explicit_loss(toy, q, torch.cat(cols), dims, scale)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    ref = torch.autograd.grad(want, [c[0] for c in reps])
    assert all(torch.allclose(c[0].grad, r, atol=1e-5) for c, r in zip(reps, ref, strict=True))

    # Through the model (gradient caching, the toy's output key): the parameters' gradients are the formula's.
    model = _VectorModel()
    loss = GlobalBatchCachedMNRL(model, matryoshka_dims=dims, mini_batch_size=3, scoring=toy, scale=scale)
    xs = [torch.randn(4, 6, generator=gen) for _ in range(3)]
    value = loss([{"x": x} for x in xs], None)
    value.backward()
    got_grad = model[0].weight.grad.clone()
    model.zero_grad()
    q, *cols = [model({"x": x})["toy_vector"] for x in xs]
    want = _explicit_loss(toy, q, torch.cat(cols), dims, scale)
    want.backward()
    assert value.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(got_grad, model[0].weight.grad, atol=1e-5)


def test_build_loss_takes_the_global_batch_loss_for_another_scoring():
    from dist_vdr.config import LossConfig
    from dist_vdr.kinds.embedding.loss import build_loss

    toy = NegativeL1()
    loss = build_loss(_VectorModel(), LossConfig(name="cmnrl"), scoring=toy)
    assert isinstance(loss, GlobalBatchCachedMNRL) and loss.scoring is toy
    with pytest.raises(ValueError, match="only the global-batch loss trains"):
        build_loss(_VectorModel(), LossConfig(name="cmnrl", implementation="stock"), scoring=toy)


# ---------------------------------------------------------------------------------------------- evaluator, mining
class _PagesModel(torch.nn.Module):
    """A page's ``toy_vector`` is its pixels (a 2x2 page: 12 values); queries are looked up by text."""

    device = torch.device("cpu")
    prompts: dict = {}

    def __init__(self, queries: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.queries = queries

    def preprocess(self, images, prompt=None):
        return {"x": torch.tensor(np.stack([np.asarray(im, dtype=np.float32).reshape(-1) / 255 for im in images]))}

    def forward(self, features):
        return {"sentence_embedding": torch.zeros_like(features["x"]), "toy_vector": features["x"] * 4 - 2}

    def encode_query(self, texts, *, batch_size, convert_to_tensor, show_progress_bar, output_value):
        assert output_value == "toy_vector"
        return torch.stack([self.queries[t] for t in texts])


@pytest.fixture(scope="module")
def toy_corpus():
    """(model, corpus dataset, query texts, page vectors [N, 12], query vectors [Q, 12]); query i's page is i."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 2, 2, 3), dtype=np.uint8)
    corpus = datasets.Dataset.from_dict(
        {"page_id": [f"p{i:02d}" for i in range(24)], "image": [Image.fromarray(p) for p in pixels]},
        features=datasets.Features({"page_id": datasets.Value("string"), "image": datasets.Image()}))
    pages = torch.tensor(pixels.reshape(24, -1), dtype=torch.float32) / 255 * 4 - 2
    texts = [f"query {i}" for i in range(10)]
    vectors = pages[:10] + torch.randn(10, 12, generator=torch.Generator().manual_seed(4))
    return _PagesModel(dict(zip(texts, vectors, strict=True))), corpus, texts, pages, vectors


@pytest.mark.parametrize("normalized", [False, True])
def test_the_sharded_evaluator_ranks_by_the_toy_scoring(toy_corpus, normalized):
    from dist_vdr.data.loading import EvalData
    from dist_vdr.retrieval.sharded import ShardedRetrievalEvaluator

    model, corpus, texts, pages, vectors = toy_corpus
    toy = NegativeL1(normalized)
    data = EvalData(queries={f"q{i}": t for i, t in enumerate(texts)}, corpus=corpus,
                    qrels={f"q{i}": {f"p{i:02d}": 1} for i in range(len(texts))})
    ev = ShardedRetrievalEvaluator(data, [12, 6], ks=(1, 5), batch_size=8, num_workers=0, show_progress=False,
                                   scoring=toy)
    metrics = ev(model)
    assert {"dim12_cosine_ndcg@5", "dim6_cosine_ndcg@5"} <= set(metrics)
    for dim in (12, 6):
        scores, idx = ev.last_rankings[dim]
        want_s, want_i = _brute_topk(_cut(toy, toy.represent(vectors), dim), _cut(toy, toy.represent(pages), dim), 5)
        assert np.array_equal(idx, want_i.numpy()) and np.allclose(scores, want_s.numpy(), atol=1e-5)


def test_mining_and_teacher_scores_use_the_toy_scoring(toy_corpus):
    from dist_vdr.config import MiningConfig
    from dist_vdr.retrieval import mining

    model, corpus, texts, pages, vectors = toy_corpus
    toy = NegativeL1()
    positives = np.arange(len(texts))
    negatives, ranks, ok, scores = mining.mine_pages(
        model, texts, corpus.select_columns(["image"]), corpus["page_id"], positives,
        MiningConfig(num_negatives=2, max_rank=6), batch_size=8, num_workers=0, show_progress=False, scoring=toy)
    distance = torch.cdist(vectors.double(), pages.double(), p=1)
    assert ok.all()
    for i in range(len(texts)):
        order = [int(j) for j in torch.argsort(distance[i]) if j != i]
        assert negatives[i].tolist() == order[:2]
        assert np.allclose(scores[i], [-distance[i, j].item() for j in (i, *order[:2])], atol=1e-5)
    cells = np.concatenate([positives[:, None], negatives], axis=1)
    taught = mining.teacher_scores(model, texts, corpus.select_columns(["image"]), cells, batch_size=8,
                                   num_workers=0, show_progress=False, scoring=toy)
    assert np.allclose(taught, -np.take_along_axis(distance.numpy(), cells, axis=1), atol=1e-5)
