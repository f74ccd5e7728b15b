"""The on-disk page store of the sharded evaluator (retrieval/token_store.py) and the search over it: items read back
as written (float32 exactly, float16 rounded), a file cut mid-batch keeps the whole items and the encoding goes on,
and the chunked search over a store ranks and scores as the in-memory search of the same pages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_vdr.kinds.multi_vector.scoring import PAGE, QUERY, MaxSimScoring, pad_tokens
from dist_vdr.retrieval.search import rescore, shard_topk, store_topk
from dist_vdr.retrieval.token_store import TokenStore


def _items(n: int, dim: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(int(torch.randint(1, 12, (1,), generator=g)), dim, generator=g), dim=-1)
            for _ in range(n)]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_items_read_back_as_written(tmp_path, dtype):
    items = _items(10)
    store = TokenStore.open(tmp_path / "s", size=10, dtype=dtype)
    order = [3, 7, 0, 9, 1, 2, 8, 4, 6, 5]  # batches come in area order, not position order
    store.append(order[:4], [items[p] for p in order[:4]])
    store.append(order[4:], [items[p] for p in order[4:]])
    assert store.complete and store.rows == sum(len(t) for t in items)
    assert store.nbytes == store.rows * 8 * (2 if dtype == "float16" else 4)
    expect = [t.to(getattr(torch, dtype)).float() for t in items]
    for got, want in zip(store.take(range(10)), expect, strict=True):
        assert torch.equal(got, want)
    seen = {}
    for positions, rows, counts in store.chunks(max_rows=7):  # several chunks of whole items
        assert len(rows) == counts.sum() and (len(rows) <= 7 or len(counts) == 1)
        seen.update(zip(positions.tolist(), torch.split(rows, counts.tolist()), strict=True))
    assert sorted(seen) == list(range(10)) and all(torch.equal(seen[p], expect[p]) for p in range(10))
    reopened = TokenStore.open(tmp_path / "s", size=10, dtype=dtype)
    assert reopened.stored == set(range(10)) and torch.equal(reopened.take([4])[0], expect[4])
    # runs of items adjacent in the file (3, 7, 0 / 1, 2 / 8, 4) read in one go, in the order asked, twice over
    wanted = [1, 2, 3, 7, 0, 8, 4, 6, 3, 7, 5, 5]
    assert all(torch.equal(g, expect[p]) for g, p in zip(store.take(wanted), wanted, strict=True))
    assert store.take([]) == [] and store.read([])[0].shape == (0, 8)
    some = [positions for positions, _, _ in store.chunks(max_rows=1000, positions=[5, 9, 5, 0])]
    assert [p.tolist() for p in some] == [[0, 9, 5]]  # the positions asked, each once, in file order


def test_a_file_cut_mid_batch_keeps_the_whole_items_and_goes_on(tmp_path):
    items = _items(9)
    store = TokenStore.open(tmp_path / "s", size=9)
    for batch in ([0, 1, 2], [3, 4, 5], [6, 7, 8]):
        store.append(batch, [items[p] for p in batch])
    # A real cut file (a kill during the third batch's write): its rows half there, a record half written.
    tokens, records = tmp_path / "s" / "tokens.bin", tmp_path / "s" / "records.bin"
    rows_before_third = sum(len(items[p]) for p in range(6))
    with open(tokens, "r+b") as f:
        f.truncate((rows_before_third + 1) * 8 * 2)
    with open(records, "ab") as f:
        f.write(b"\x01\x02\x03")
    store = TokenStore.open(tmp_path / "s", size=9)
    assert store.stored == set(range(6)) and store.rows == rows_before_third
    assert tokens.stat().st_size == rows_before_third * 16 and records.stat().st_size == 6 * 24
    store.append([6, 7, 8], [items[p] for p in (6, 7, 8)])
    again = TokenStore.open(tmp_path / "s", size=9)
    assert again.complete
    for got, want in zip(again.take(range(9)), items, strict=True):
        assert torch.equal(got, want.half().float())
    # Another dtype's store is not read as this one's.
    assert TokenStore.open(tmp_path / "s", size=9, dtype="float32").stored == set()


def test_a_page_trimmed_and_padded_again_scores_the_same():
    scoring = MaxSimScoring()
    pages = pad_tokens(_items(6, seed=1), PAGE)
    queries = pad_tokens(_items(4, seed=2), QUERY)
    rows, counts = torch.cat(_items(6, seed=1)), [len(t) for t in _items(6, seed=1)]
    assert torch.equal(scoring.stack_rows(rows, counts, PAGE), pages)
    torch.testing.assert_close(scoring.scores_rows(queries, rows, counts), scoring.scores(queries, pages), rtol=0,
                               atol=1e-6)  # the unpadded scoring (a max over each page's segment)
    trimmed = [scoring.trim(p, PAGE) for p in pages]
    assert [len(t) for t in trimmed] == [len(t) for t in _items(6, seed=1)]
    assert torch.equal(scoring.scores(queries, scoring.stack(trimmed, PAGE)), scoring.scores(queries, pages))
    assert [len(scoring.trim(q, QUERY)) for q in queries] == [len(t) for t in _items(4, seed=2)]


@pytest.mark.parametrize("dim", [8, 4])
def test_search_over_a_store_equals_the_search_in_memory(tmp_path, dim):
    scoring = MaxSimScoring(chunk_elements=200)  # many chunks of the store, many blocks of a chunk
    items = _items(40, seed=3)
    store = TokenStore.open(tmp_path / "s", size=40, dtype="float32")
    for b in range(0, 40, 7):
        store.append(list(range(b, min(b + 7, 40))), items[b:b + 7])
    pages, queries = pad_tokens(items, PAGE), pad_tokens(_items(5, seed=4), QUERY)
    q = scoring.truncate(queries, dim) if dim < 8 else queries
    p = scoring.truncate(pages, dim) if dim < 8 else pages
    want_s, want_i = shard_topk(q, p, 12, scoring=scoring)
    got_s, got_i = store_topk(q, store, 12, scoring=scoring, dim=dim)
    torch.testing.assert_close(got_s, want_s, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got_i.numpy(), want_i.numpy())
    assert torch.equal(rescore(q, store, got_i, scoring=scoring, dim=dim), rescore(q, p, want_i, scoring=scoring))
    # more than the store holds: padded with -inf and -1
    s, i = store_topk(q, store, 45, scoring=scoring, dim=dim)
    assert (i[:, 40:] == -1).all() and torch.isinf(s[:, 40:]).all()


def test_a_shard_without_pages_searches_to_padding(tmp_path):
    """A small corpus over many ranks leaves a rank no page: its store is empty, its lists only padding."""
    scoring = MaxSimScoring()
    store = TokenStore.open(tmp_path / "s", size=0)
    queries = pad_tokens(_items(3, seed=5), QUERY)
    s, i = store_topk(queries, store, 4, scoring=scoring)
    assert (i == -1).all() and torch.isinf(s).all()
    assert torch.isinf(rescore(queries, store, i, scoring=scoring)).all()
