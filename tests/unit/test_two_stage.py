"""The two-stage search (retrieval/two_stage.py) and MUVERA's encodings (kinds/multi_vector/fde.py), one process:
with every page a candidate it is the exact search; with fewer it keeps the exact scores of the pages it finds; the
encodings follow the paper's construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_vdr.kinds.multi_vector.fde import FixedDimensionalEncoder
from dist_vdr.kinds.multi_vector.scoring import PAGE, QUERY, MaxSimScoring, pad_tokens
from dist_vdr.retrieval.sharded import global_topk, trec_tie_key
from dist_vdr.retrieval.token_store import TokenStore
from dist_vdr.retrieval.two_stage import FirstStageIndex, two_stage_topk


def _tokens(n: int, lo: int, hi: int, dim: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(int(torch.randint(lo, hi + 1, (1,), generator=g)), dim, generator=g), dim=-1)
            for _ in range(n)]


@pytest.fixture()
def corpus(tmp_path):
    pages, queries = _tokens(60, 3, 10, 16, 0), _tokens(7, 1, 5, 16, 1)
    store = TokenStore.open(tmp_path / "s", size=60, dtype="float32")
    store.append(list(range(60)), pages)
    return pages, pad_tokens(queries, QUERY), store


@pytest.mark.parametrize("dim", [16, 8])
def test_every_page_a_candidate_is_the_exact_search(corpus, dim):
    pages, queries, store = corpus
    scoring, key = MaxSimScoring(), trec_tie_key([f"p{i:02d}" for i in range(60)])
    exact = global_topk(queries, store, 0, 10, key, dim=dim, scoring=scoring)
    for shard in (store, pad_tokens(pages, PAGE)):  # on disk or in memory
        got = two_stage_topk(queries, shard, 0, 10, key, candidates=60, scoring=scoring, dim=dim)
        np.testing.assert_array_equal(got[1], exact[1])
        np.testing.assert_array_equal(got[0], exact[0])


def test_fewer_candidates_keep_the_exact_scores_of_what_they_find(corpus):
    pages, queries, store = corpus
    scoring, key = MaxSimScoring(), trec_tie_key([f"p{i:02d}" for i in range(60)])
    scores, idx = two_stage_topk(queries, store, 0, 10, key, candidates=20, scoring=scoring)
    query_vectors = scoring.first_stage([scoring.trim(q, QUERY) for q in queries], QUERY)
    first = torch.topk(query_vectors @ scoring.first_stage(pages, PAGE).T, 20, dim=1).indices
    exact = scoring.scores(queries.double(), pad_tokens(pages, PAGE).double()).float()
    for q in range(len(queries)):
        assert set(idx[q].tolist()) <= set(first[q].tolist())  # only the first stage's candidates
        assert idx[q].tolist() == sorted(first[q].tolist(), key=lambda j: -exact[q, j].item())[:10]
        np.testing.assert_allclose(scores[q], exact[q, idx[q]].numpy(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="at least k=10"):
        two_stage_topk(queries, store, 0, 10, key, candidates=5, scoring=scoring)


def test_the_first_stage_index_is_built_once_per_store_and_dim(corpus, monkeypatch, tmp_path):
    """A store's page vectors are written beside it by the first search and read by the next (same results); another
    dim gets its own; a store that grew since, or an index cut before its marker, is indexed again."""
    pages, queries, store = corpus
    scoring, key = MaxSimScoring(), trec_tie_key([f"p{i:02d}" for i in range(60)])
    first = two_stage_topk(queries, store, 0, 10, key, candidates=20, scoring=scoring)
    built = sorted(p.name for p in store.folder.glob("first-stage-*"))
    tag = scoring.first_stage_tag()
    assert built == [f"first-stage-{tag}-16d{s}" for s in (".f32", ".json", ".pos.npy")]
    index = FirstStageIndex.open(store, scoring, 16)
    assert index.width == FixedDimensionalEncoder(16).size and sorted(index.positions.tolist()) == list(range(60))

    def no_build(*_):
        raise AssertionError("built again")

    monkeypatch.setattr(FirstStageIndex, "_build", classmethod(no_build))
    again = two_stage_topk(queries, store, 0, 10, key, candidates=20, scoring=scoring)  # read, not built
    np.testing.assert_array_equal(again[1], first[1])
    np.testing.assert_array_equal(again[0], first[0])
    with pytest.raises(AssertionError, match="built again"):  # another dim: its own index
        FirstStageIndex.open(store, scoring, 8)
    monkeypatch.undo()

    grown = TokenStore.open(tmp_path / "grown", size=61, dtype="float32")
    grown.append(list(range(60)), pages)
    FirstStageIndex.open(grown, scoring, 16)
    grown.append([60], _tokens(1, 3, 4, 16, 9))  # an encoding resumed after the index was built
    assert len(FirstStageIndex.open(grown, scoring, 16).positions) == 61
    (grown.folder / f"first-stage-{tag}-16d.json").unlink()  # cut before its marker
    assert len(FirstStageIndex.open(grown, scoring, 16).positions) == 61
    assert not list(grown.folder.glob("*.tmp"))


def test_encodings_follow_the_construction():
    """One page token fills every bucket (the nearest for all); one query token sits in its bucket alone: their
    inner product is the sum over repetitions of the projected tokens' inner products. A page without tokens is
    zeros; a query's zero padding adds nothing."""
    fde = FixedDimensionalEncoder(16, bits=3, repetitions=5, proj_dim=8, seed=3)
    q, t = _tokens(1, 1, 1, 16, 4)[0], _tokens(1, 1, 1, 16, 5)[0]
    page, query = fde.encode([t], query=False)[0], fde.encode([q], query=True)[0]
    expected = sum(float((q[0] @ fde.projection[r]) @ (t[0] @ fde.projection[r])) for r in range(5))
    assert float(page @ query) == pytest.approx(expected, rel=1e-5)
    assert (page.reshape(5, 8, 8) == (t[0] @ fde.projection)[:, None, :]).all()  # every bucket: the one token
    assert (query.reshape(5, 8, 8) != 0).any(dim=-1).sum(dim=1).tolist() == [1] * 5  # one bucket per repetition
    torch.testing.assert_close(fde.encode([torch.cat([q, torch.zeros(3, 16)])], query=True)[0], query, rtol=0,
                               atol=1e-7)
    assert not fde.encode([torch.zeros(0, 16)], query=False).any()
    assert fde.size == 5 * 8 * 8 and fde.encode([], query=True).shape == (0, fde.size)
