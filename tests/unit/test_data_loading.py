"""Loading recipes' data: bad rows and missing columns fail early with the row and column named."""

from __future__ import annotations

import io

import datasets
import pytest
from PIL import Image

from dist_vdr.config import DataConfig
from dist_vdr.data.loading import load_eval, load_train


def _png(colour) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (40, 50), colour).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _write(tmp_path, rows: dict, name="ds") -> str:
    feats = datasets.Features({k: (datasets.Value("string") if k == "query" else datasets.Image()) for k in rows})
    path = tmp_path / name
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=feats)}).save_to_disk(str(path))
    return str(path)


def test_train_columns_selected_in_order(pages):
    ds = load_train(DataConfig(path=str(pages), negative_columns=["negative_1"], max_train_samples=10))
    assert ds.column_names == ["query", "image", "negative_1"]
    assert len(ds) == 10


def test_missing_column(pages):
    with pytest.raises(ValueError, match=r"no column\(s\) \['negative_7'\].*Fix data"):
        load_train(DataConfig(path=str(pages), negative_columns=["negative_7"]))


def test_missing_split_and_path(pages, tmp_path):
    with pytest.raises(ValueError, match="no split 'training'"):
        load_train(DataConfig(path=str(pages), train_split="training"))
    with pytest.raises(ValueError, match="make-synthetic-pages"):
        load_train(DataConfig(path=str(tmp_path / "nothing")))


def test_empty_query_names_the_row(tmp_path):
    path = _write(tmp_path, {"query": ["a red page", "  "], "image": [_png("red"), _png("blue")],
                             "negative_0": [_png("green"), _png("gray")]})
    with pytest.raises(ValueError, match=r"row 1: empty query"):
        load_train(DataConfig(path=path))


def test_corrupt_image_names_row_and_column(tmp_path):
    broken = {"bytes": _png("red")["bytes"][:40], "path": None}  # truncated PNG
    path = _write(tmp_path, {"query": ["a", "b", "c"], "image": [_png("red"), _png("blue"), _png("pink")],
                             "negative_0": [_png("green"), broken, _png("gray")]})
    with pytest.raises(ValueError, match=r"row 1, column 'negative_0': image does not decode"):
        load_train(DataConfig(path=path))
    # With the check off, loading succeeds (the error would then surface mid-training).
    assert len(load_train(DataConfig(path=path, validate_images=False))) == 3


def test_a_page_above_the_pixel_limit_is_refused(tmp_path):
    buf = io.BytesIO()
    Image.new("1", (11000, 11000), 1).save(buf, format="PNG")  # 121 MP, a few kB: refused before decoding
    path = _write(tmp_path, {"query": ["a", "b"], "image": [_png("red"), {"bytes": buf.getvalue(), "path": None}],
                             "negative_0": [_png("green"), _png("gray")]})
    with pytest.raises(ValueError, match=r"row 1, column 'image': the page is 11000x11000 = 121 MP, above the "
                                         r"89.5 MP page limit"):
        load_train(DataConfig(path=path))


def test_ir_eval(pages):
    data = load_eval(DataConfig(path=str(pages), max_eval_queries=5))
    assert len(data.queries) == 5 and len(data.corpus) == 32
    for qid, rel in data.qrels.items():
        assert qid in data.queries and set(rel) <= set(data.corpus["page_id"])


def test_triplet_eval_builds_deduplicated_corpus(tmp_path):
    red, blue, green = _png("red"), _png("blue"), _png("green")
    path = _write(tmp_path, {"query": ["q red", "q blue"], "image": [red, blue], "negative_0": [blue, green]})
    data = load_eval(DataConfig(path=path, eval_format="triplets", eval_split="train",
                                eval_negative_columns=["negative_0"]))
    assert len(data.corpus) == 3  # blue appears twice: one corpus entry (content hash)
    assert data.qrels["q1"] != data.qrels["q0"]
    (q0_page,) = data.qrels["q0"]
    assert data.corpus_dict()[q0_page].getpixel((0, 0)) == (255, 0, 0)
