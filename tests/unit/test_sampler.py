"""Global no-duplicates: the W per-rank batches of one step hold no duplicate across ranks."""

from __future__ import annotations

import datasets
import torch

from dist_vdr.data.sampler import GlobalNoDuplicatesBatchSampler


def _dataset(n=96):
    # Every query appears twice (rows i and i + n/2) with different pages: per-rank de-duplication
    # cannot see a copy sitting on the other rank.
    half = n // 2
    return datasets.Dataset.from_dict({"query": [f"q{i % half}" for i in range(n)],
                                       "image": [f"page{i}" for i in range(n)]})


def _batches(ds, batch_size, world_size, seed=3):
    g = torch.Generator()
    g.manual_seed(seed)
    s = GlobalNoDuplicatesBatchSampler(ds, batch_size=batch_size, drop_last=True, generator=g, seed=seed,
                                       world_size=world_size)
    s.set_epoch(0)
    return list(s), len(s)


def test_no_duplicates_across_ranks_of_a_step():
    ds = _dataset()
    batches, n = _batches(ds, batch_size=8, world_size=2)
    assert n == len(batches) and n % 2 == 0
    for step in range(0, len(batches), 2):
        rows = batches[step] + batches[step + 1]  # rank 0 and rank 1 of the same step
        queries = [ds[i]["query"] for i in rows]
        assert len(set(queries)) == len(queries) == 16


def test_world_of_w_equals_one_process_with_w_times_the_batch():
    ds = _dataset()
    two, _ = _batches(ds, batch_size=8, world_size=2)
    one, _ = _batches(ds, batch_size=16, world_size=1)
    assert [two[i] + two[i + 1] for i in range(0, len(two), 2)] == one


def test_world_size_one_is_the_stock_sampler():
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler

    ds = _dataset()
    ours, _ = _batches(ds, batch_size=8, world_size=1)
    g = torch.Generator()
    g.manual_seed(3)
    stock = NoDuplicatesBatchSampler(ds, batch_size=8, drop_last=True, generator=g, seed=3, precompute_hashes=True)
    stock.set_epoch(0)
    assert ours == list(stock)


def test_image_duplicates_are_found_by_content(tmp_path):
    """Two rows with equal page bytes (decoded to different PIL objects) never share a global batch."""
    import io

    from PIL import Image

    def png(c):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), c).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    colours = [(i, 0, 0) for i in range(24)]
    rows = {"query": [f"q{i}" for i in range(48)], "image": [png(colours[i % 24]) for i in range(48)]}
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"query": datasets.Value("string"), "image": datasets.Image()}))
    batches, _ = _batches(ds, batch_size=4, world_size=2)
    for step in range(0, len(batches), 2):
        pages = [bytes(ds[i]["image"].tobytes()) for i in batches[step] + batches[step + 1]]
        assert len(set(pages)) == len(pages)
