"""Generated pages: deterministic, VDR-shaped, hard negatives one attribute away, sizes that vary."""

from __future__ import annotations

import random

import datasets
import pytest

from dist_vdr.data.synthetic import (
    COLOURS,
    SyntheticPagesSpec,
    _train_row,
    all_attributes,
    describe,
    generate_pages,
    perturb,
)


def describe_matches(query: str, document_id: str) -> bool:
    colour, chart, count = document_id.split("/")
    return colour in query and chart in query


def test_layout_and_columns(pages):
    ds = datasets.load_from_disk(str(pages))
    assert set(ds) == {"train", "eval_queries", "eval_corpus", "eval_qrels"}
    assert ds["train"].column_names == ["query", "image", "negative_0", "negative_1", "document_id",
                                        "negative_0_document_id", "negative_1_document_id"]
    row = ds["train"][0]
    # Each hard negative differs in one attribute: never the positive's document.
    assert row["document_id"].count("/") == 2
    assert row["document_id"] not in (row["negative_0_document_id"], row["negative_1_document_id"])
    assert describe_matches(row["query"], row["document_id"])
    assert isinstance(ds["train"].features["image"], datasets.Image)
    assert len(ds["train"]) == 256 and len(ds["eval_queries"]) == 32
    qrels = ds["eval_qrels"]
    assert set(qrels["query_id"]) == set(ds["eval_queries"]["query_id"])
    assert set(qrels["page_id"]) <= set(ds["eval_corpus"]["page_id"])


def test_sizes_vary_like_real_pages(pages):
    ds = datasets.load_from_disk(str(pages))["train"].select(range(64))
    shapes = {(im.width, im.height) for im in ds["image"]}
    assert len(shapes) > 10
    assert any(w > h for w, h in shapes) and any(h > w for w, h in shapes)  # landscape and portrait


def test_deterministic_for_a_seed_and_different_across_seeds():
    spec = SyntheticPagesSpec(num_train=4, num_negatives=1, seed=3)
    combos = all_attributes()
    a = [_train_row(spec, i, combos) for i in range(4)]
    b = [_train_row(spec, i, combos) for i in range(4)]
    assert a == b
    other = SyntheticPagesSpec(num_train=4, num_negatives=1, seed=4)
    assert [_train_row(other, i, combos) for i in range(4)] != a


def test_hard_negative_differs_in_exactly_one_attribute():
    rng = random.Random(0)
    for attrs in all_attributes():
        neg = perturb(attrs, rng)
        assert sum(x != y for x, y in zip(attrs, neg, strict=True)) == 1


def test_query_names_all_attributes():
    rng = random.Random(0)
    for colour, chart, n in all_attributes()[:40]:
        q = describe((colour, chart, n), rng)
        assert colour in q and chart in q
        assert str(n) in q or {2: "two", 3: "three", 4: "four", 5: "five"}[n] in q


def test_existing_dataset_kept_and_foreign_folder_refused(pages, tmp_path):
    spec = SyntheticPagesSpec(num_train=256, num_negatives=2, num_eval_queries=32, seed=1)
    before = (pages / "dataset_dict.json").stat().st_mtime
    assert generate_pages(pages, spec, show_progress=False) == pages
    assert (pages / "dataset_dict.json").stat().st_mtime == before
    with pytest.raises(ValueError, match="holds something else"):
        generate_pages(pages, SyntheticPagesSpec(num_train=8, seed=9), show_progress=False)


def test_spec_validation():
    with pytest.raises(ValueError, match="num_eval_queries"):
        SyntheticPagesSpec(num_eval_queries=len(all_attributes()) + 1)
    with pytest.raises(ValueError, match="num_negatives"):
        SyntheticPagesSpec(num_negatives=9)
    assert len(COLOURS) == 8
