"""The multi-vector kind's score rule (dist_vdr.kinds.multi_vector.scoring): MaxSim over token embeddings
``[N, T, D]`` padded without masks (queries with zero vectors, pages with copies of their first token).

Checked against a brute-force MaxSim with masks, sentence-transformers' own ``colbert_scores``, colpali-engine's
length-normalised formula, its own chunking (values and gradients), and through the shared exact search
(``shard_topk``, ``rescore``, ``global_topk``) on 3-d representations.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_vdr.kinds.multi_vector.scoring import MaxSimScoring, from_masked, pad_tokens
from dist_vdr.retrieval import search
from dist_vdr.retrieval.search import rescore, shard_topk
from dist_vdr.retrieval.sharded import global_topk

D = 16


def _ragged(n: int, lo: int, hi: int, seed: int, dtype=torch.float64, dim: int = D) -> list[torch.Tensor]:
    """n items of lo..hi L2-normalised random tokens each."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [F.normalize(torch.randn(c, dim, generator=g, dtype=dtype), dim=-1) for c in counts]


def _masked(items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(zero-padded [N, T, D], mask [N, T]): the items as a masked batch."""
    width = max(len(t) for t in items)
    out = torch.zeros(len(items), width, items[0].shape[-1], dtype=items[0].dtype)
    mask = torch.zeros(len(items), width, dtype=torch.bool)
    for i, t in enumerate(items):
        out[i, :len(t)], mask[i, :len(t)] = t, True
    return out, mask


def brute_maxsim(queries: list[torch.Tensor], pages: list[torch.Tensor]) -> torch.Tensor:
    """[Q, P] MaxSim written out with masks: masked page tokens out of the max, masked query tokens out of the sum."""
    q, q_mask = _masked(queries)
    p, p_mask = _masked(pages)
    sim = torch.einsum("qsd,ptd->qpst", q, p)
    sim = sim.masked_fill(~p_mask[None, :, None, :], float("-inf"))
    best = sim.max(dim=-1).values.masked_fill(~q_mask[:, None, :], 0)
    return best.sum(dim=-1)


def test_output_key_is_sentence_transformers_multi_vector_output():
    from sentence_transformers.multi_vector_encoder import MultiVectorEncoder

    scoring = MaxSimScoring()
    assert scoring.output_key == "token_embeddings" and not scoring.inner_product
    for method in (MultiVectorEncoder.encode_query, MultiVectorEncoder.encode_document):
        assert inspect.signature(method).parameters["output_value"].default == scoring.output_key
    assert "divide_by_query_length=False" in scoring.cache_tag()
    assert MaxSimScoring(divide_by_query_length=True).cache_tag() != scoring.cache_tag()


def test_scores_equal_brute_force_maxsim_with_masks():
    queries = _ragged(7, 1, 9, seed=0) + [torch.zeros(0, D, dtype=torch.float64)]  # an empty query scores 0
    pages = _ragged(11, 1, 23, seed=1)
    scoring = MaxSimScoring()
    got = scoring.scores(pad_tokens(queries, "query"), pad_tokens(pages, "page"))
    want = brute_maxsim(queries, pages)
    assert got.shape == (8, 11)
    assert (got - want).abs().max() <= 1e-6
    assert torch.equal(got[-1], torch.zeros(11, dtype=got.dtype))
    pairs = scoring.pair_scores(pad_tokens(queries[:8], "query"), pad_tokens(pages[:8], "page"))
    assert (pairs - want.diagonal()[:8]).abs().max() <= 1e-6


def test_from_masked_equals_pad_tokens_for_any_mask():
    """sentence-transformers' scoring mask need not be a prefix (left padding, skiplists, image-only tokens)."""
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(5, 12, D, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(5, 12, generator=g) < 0.5
    mask[0] = False  # an item without scored tokens
    mask[1, :7], mask[1, 7:] = False, True  # left padding
    for kind in ("query", "page"):
        got = from_masked(emb, mask, kind)
        want = pad_tokens([emb[i][mask[i]] for i in range(5)], kind)
        assert torch.equal(got, want)
        w = torch.randn(got.shape, generator=g, dtype=torch.float64)
        (g_got,) = torch.autograd.grad((got * w).sum(), emb)
        (g_want,) = torch.autograd.grad((want * w).sum(), emb)
        assert (g_got - g_want).abs().max() <= 1e-12  # copies' gradients summed onto the copied token
    page = from_masked(emb, mask, "page")
    assert page.shape[1] == int(mask.sum(1).max())
    assert torch.equal(page[0], torch.zeros_like(page[0]))  # no token: zeros
    n2 = int(mask[2].sum())
    assert torch.equal(page[2, n2:], emb[2][mask[2]][:1].expand(page.shape[1] - n2, -1))  # copies of the first
    assert torch.equal(from_masked(emb, mask.long(), "query"), from_masked(emb, mask, "query"))


def test_scores_equal_sentence_transformers_colbert_scores():
    """colbert_scores (sentence-transformers 6.2) on the forward pass's (token_embeddings, attention_mask):
    plain MaxSim by default (no division by the query length); masked page tokens are left out of the max
    (sent to the dtype minimum), masked query tokens multiplied by 0; float32 result. ``length_normalize=True``
    divides by the number of real query tokens (MeanMaxSim)."""
    from sentence_transformers.multi_vector_encoder.scoring import colbert_scores

    g = torch.Generator().manual_seed(3)
    # Model-like outputs: every position normalised, padding included (it is not zero there).
    q_emb = F.normalize(torch.randn(6, 9, D, generator=g), dim=-1)
    p_emb = F.normalize(torch.randn(10, 21, D, generator=g), dim=-1)
    q_mask = torch.rand(6, 9, generator=g) < 0.7
    p_mask = torch.rand(10, 21, generator=g) < 0.6
    q_mask[:, 0], p_mask[:, 0] = True, True
    queries, pages = from_masked(q_emb, q_mask, "query"), from_masked(p_emb, p_mask, "page")
    for normalise in (False, True):
        want = colbert_scores(q_emb, p_emb[:, None], q_mask, p_mask[:, None], length_normalize=normalise)
        got = MaxSimScoring(divide_by_query_length=normalise).scores(queries, pages)
        assert got.dtype == torch.float32 and got.shape == want.shape == (6, 10)
        assert (got - want).abs().max() <= 1e-5  # float32 sums of <= 9 terms, different accumulation order


@pytest.mark.parametrize("normalise", [False, True])
def test_chunked_scores_equal_unchunked_with_gradients(normalise):
    queries = [t.requires_grad_() for t in _ragged(5, 1, 8, seed=4)]
    pages = [t.requires_grad_() for t in _ragged(7, 1, 17, seed=5)]
    weights = torch.randn(5, 7, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    leaves = queries + pages

    def run(chunk_elements):
        scoring = MaxSimScoring(divide_by_query_length=normalise, chunk_elements=chunk_elements)
        s = scoring.scores(pad_tokens(queries, "query"), pad_tokens(pages, "page"))
        return s.detach(), torch.autograd.grad((s * weights).sum(), leaves)

    whole, whole_grads = run(1 << 30)
    for chunk in (1, 50, 8 * 17 * 3):  # one pair per block; a few pages; several pages and queries
        part, part_grads = run(chunk)
        assert (part - whole).abs().max() <= 1e-12
        assert all((a - b).abs().max() <= 1e-12 for a, b in zip(part_grads, whole_grads, strict=True))
    # the brute force's gradients (masks instead of padding) are the same
    brute = brute_maxsim(queries, pages)
    if normalise:
        brute = brute / torch.tensor([len(t) for t in queries], dtype=brute.dtype)[:, None]
    brute_grads = torch.autograd.grad((brute * weights).sum(), leaves)
    assert all((a - b).abs().max() <= 1e-12 for a, b in zip(brute_grads, whole_grads, strict=True))


def test_pair_scores_chunked_and_row_independent():
    queries, pages = pad_tokens(_ragged(12, 1, 8, seed=7), "query"), pad_tokens(_ragged(12, 1, 19, seed=8), "page")
    whole = MaxSimScoring().pair_scores(queries, pages)
    assert torch.equal(MaxSimScoring(chunk_elements=1).pair_scores(queries, pages), whole)
    assert torch.equal(MaxSimScoring().pair_scores(queries[5:6], pages[5:6]), whole[5:6])
    assert (whole - MaxSimScoring().scores(queries, pages).diagonal()).abs().max() <= 1e-12


def test_padding_changes_nothing():
    queries, pages = _ragged(5, 1, 6, seed=9), _ragged(8, 1, 10, seed=10)
    scoring = MaxSimScoring()
    plain = scoring.scores(pad_tokens(queries, "query"), pad_tokens(pages, "page"))
    # padded further: a longer item in the same batch, then dropped
    longer_q = pad_tokens(queries + [torch.zeros(40, D, dtype=torch.float64)], "query")[:-1]
    longer_p = pad_tokens(pages + _ragged(1, 60, 60, seed=11), "page")[:-1]
    assert longer_q.shape[1] == 40 and longer_p.shape[1] == 60
    assert (scoring.scores(longer_q, longer_p) - plain).abs().max() <= 1e-12
    assert (scoring.pair_scores(longer_q[:5], longer_p[:5]) - plain.diagonal()).abs().max() <= 1e-12
    # why pages repeat a real token: a zero padding token would win the max over negative similarities
    q, p = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[-1.0, 0.0]]])
    zero_padded = torch.cat([p, torch.zeros(1, 1, 2)], dim=1)
    assert float(scoring.scores(q, pad_tokens([p[0], torch.zeros(2, 2)], "page")[:1])) == -1.0
    assert float(scoring.scores(q, zero_padded)) == 0.0


def test_truncate_cuts_and_renormalises_each_token():
    queries, pages = _ragged(4, 1, 7, seed=12), _ragged(4, 1, 7, seed=13)
    q, p = pad_tokens(queries, "query"), pad_tokens(pages, "page")
    scoring = MaxSimScoring()
    cut_p, cut_q = scoring.truncate(p, 5), scoring.truncate(q, 5)
    assert torch.equal(cut_p, F.normalize(p[..., :5], p=2, dim=-1))
    assert torch.allclose(cut_p.norm(dim=-1), torch.ones(cut_p.shape[:2], dtype=cut_p.dtype))
    assert torch.equal((cut_q == 0).all(-1), (q == 0).all(-1))  # query padding stays zero
    assert torch.equal(cut_p, pad_tokens([F.normalize(t[:, :5], dim=-1) for t in pages], "page"))  # copies stay
    assert torch.allclose(scoring.represent(cut_p), cut_p)  # a representation stays one
    want = brute_maxsim([F.normalize(t[:, :5], dim=-1) for t in queries],
                        [F.normalize(t[:, :5], dim=-1) for t in pages])
    assert (scoring.scores(cut_q, cut_p) - want).abs().max() <= 1e-12


def test_divide_by_query_length_is_colpali_engines_formula():
    """colpali-engine (not installed here) ``ColbertLoss(normalize_scores=True)``, colpali_engine/loss/
    late_interaction_losses.py: ``scores = einsum("bnd,csd->bcns", q, d).max(dim=3)[0].sum(dim=2)``, then
    ``scores / (q[:, :, 0] != 0).sum(dim=1).unsqueeze(-1)`` -- divided by the number of real (non-zero,
    i.e. unpadded) query tokens; the loss then divides by its temperature 0.02."""
    q = pad_tokens(_ragged(6, 1, 9, seed=14), "query")
    p = pad_tokens(_ragged(7, 2, 12, seed=15), "page")
    colpali = torch.einsum("bnd,csd->bcns", q, p).max(dim=3)[0].sum(dim=2)
    colpali = colpali / (q[:, :, 0] != 0).sum(dim=1).unsqueeze(-1)
    got = MaxSimScoring(divide_by_query_length=True).scores(q, p)
    assert (got - colpali).abs().max() <= 1e-12
    assert float(got.abs().max()) <= 1.0
    pairs = MaxSimScoring(divide_by_query_length=True).pair_scores(q[:6], p[:6])
    assert (pairs - colpali.diagonal()).abs().max() <= 1e-12


def test_exact_search_over_token_embedding_shards(monkeypatch):
    """shard_topk, rescore and global_topk (one process) on [N, T, D] shards give the brute-force top-k."""
    queries = _ragged(9, 1, 6, seed=16, dtype=torch.float32)
    pages = _ragged(40, 1, 15, seed=17, dtype=torch.float32)
    q, shard = pad_tokens(queries, "query"), pad_tokens(pages, "page")
    scoring = MaxSimScoring(chunk_elements=500)
    brute = brute_maxsim([t.double() for t in queries], [t.double() for t in pages])
    top = torch.topk(brute, 5, dim=1)

    scores, idx = shard_topk(q, shard, 5, corpus_chunk=7, query_block=4, scoring=scoring)
    assert torch.equal(idx, top.indices)
    assert (scores.double() - top.values).abs().max() <= 1e-5
    padded_s, padded_i = shard_topk(q, shard[:3], 5, scoring=scoring)  # a shard smaller than k
    assert torch.equal(padded_i[:, 3:], torch.full((9, 2), -1)) and torch.isinf(padded_s[:, 3:]).all()
    with pytest.raises(ValueError, match="inner-product"):
        shard_topk(q, shard, 5, backend="faiss", scoring=scoring)

    exact = rescore(q, shard, idx, scoring=scoring)
    assert torch.equal(exact, top.values.float())  # float64 pair by pair, rounded once
    monkeypatch.setattr(search, "RESCORE_ELEMENTS", 1)  # one pair at a time: the same numbers
    assert torch.equal(rescore(q, shard, idx, query_block=2, scoring=scoring), exact)
    monkeypatch.undo()

    tie_key = np.arange(200)
    g_scores, g_idx = global_topk(q, shard, 0, 5, tie_key, scoring=scoring)
    assert np.array_equal(g_idx, top.indices.numpy()) and np.array_equal(g_scores, exact.double().numpy())
    # Matryoshka on the token dimension: both sides cut and re-normalised per token
    cut = brute_maxsim([F.normalize(t.double()[:, :8], dim=-1) for t in queries],
                       [F.normalize(t.double()[:, :8], dim=-1) for t in pages])
    c_scores, c_idx = global_topk(q, shard, 100, 5, tie_key, dim=8, scoring=scoring)
    assert np.array_equal(c_idx, torch.topk(cut, 5, dim=1).indices.numpy() + 100)
    assert np.abs(c_scores - torch.topk(cut, 5, dim=1).values.numpy()).max() <= 1e-6
    # a rank without pages
    e_scores, e_idx = global_topk(q, torch.empty(0, 0), 0, 5, tie_key, scoring=scoring)
    assert (e_idx == -1).all() and np.isneginf(e_scores).all()


@pytest.mark.parametrize("divide", [False, True])
def test_store_kernels_equal_brute_force(monkeypatch, divide):
    """The page store's two kernels on pages given as rows + counts: ``scores_rows`` (the exhaustive search: blocks of
    queries and pages of about one length) and ``pair_scores_rows`` (the two-stage search and the rescoring: pairs
    grouped by page; float32 and float64) equal a brute-force MaxSim, with blocks small enough to split everything."""
    from dist_vdr.kinds.multi_vector import scoring as mv

    queries = _ragged(13, 1, 9, seed=30, dtype=torch.float32) + [torch.zeros(0, D)]  # an empty query scores 0
    pages = _ragged(17, 1, 12, seed=31, dtype=torch.float32)
    q = pad_tokens(queries, "query")
    rows, counts = torch.cat(pages), [len(p) for p in pages]
    brute = brute_maxsim([t.double() for t in queries], [t.double() for t in pages])
    if divide:
        brute = brute / torch.tensor([max(1, len(t)) for t in queries], dtype=torch.float64)[:, None]
    scoring = MaxSimScoring(divide_by_query_length=divide)
    monkeypatch.setattr(mv, "SCORE_BLOCK", (7, 15))
    got = scoring.scores_rows(q, rows, counts)
    assert got.dtype == torch.float32 and (got.double() - brute).abs().max() <= 1e-6
    g = torch.Generator().manual_seed(32)
    query_of = torch.randint(0, len(queries), (60,), generator=g)
    page_of = torch.randint(0, 12, (60,), generator=g)  # pages 12..16 wanted by nobody, some by several
    want = brute[query_of, page_of]
    for pair_block in (1 << 20, 3 * D * q.shape[1]):  # everything in one batch; three pairs a batch
        monkeypatch.setattr(mv, "PAIR_BLOCK", pair_block)
        rough = scoring.pair_scores_rows(q, query_of, rows, counts, page_of)
        assert rough.dtype == torch.float32 and (rough.double() - want).abs().max() <= 1e-6
        exact = scoring.pair_scores_rows(q.double(), query_of, rows, counts, page_of)
        assert exact.dtype == torch.float64 and (exact - want).abs().max() <= 1e-12
    assert scoring.pair_scores_rows(q, query_of[:0], rows, counts, page_of[:0]).shape == (0,)
