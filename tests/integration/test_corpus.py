"""From a folder of PDFs to training: corpus mining on 2 ranks equals 1 rank, training rows that name
pages by id (memory-mapped corpus) train and resume with no row repeated or skipped, evaluation from
query/qrels files, and the published VDR layout (negatives as ids of other rows)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    REPO,
    kill_after_first_checkpoint,
    launch_env,
    log_tail,
    logged_losses,
    python_of,
    run_accelerate,
    run_cli,
    run_launcher,
    tiny_overrides,
)


@pytest.fixture(scope="module")
def pdf_corpus(tmp_path_factory) -> tuple[Path, Path]:
    """(generated folder with documents/ + queries/qrels, its page corpus)."""
    root = tmp_path_factory.mktemp("pdfs")
    made = run_cli(["make-synthetic-pdfs", str(root / "src"), "--num-documents", "60", "--num-scans", "12"])
    assert made.returncode == 0, log_tail(made.stdout + made.stderr)
    built = run_cli(["pages", "build", "--input", str(root / "src" / "documents"), "--out", str(root / "corpus"),
                     "--dpi", "20", "--num-workers", "2", "--quiet"])
    assert built.returncode == 0, log_tail(built.stdout + built.stderr)
    return root / "src", root / "corpus"


def _mine_args(model: Path, src: Path, corpus: Path, out: Path) -> list[str]:
    return ["mine-negatives", "--model", str(model), "--corpus", str(corpus), "--queries",
            str(src / "train_queries.jsonl"), "--qrels", str(src / "train_qrels.trec"), "--out", str(out),
            "--num-negatives", "2", "--num-random-negatives", "1", "--max-rank", "60", "--max-uses-per-page", "1",
            "--exclude-same-document", "--batch-size", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def mined(tiny_model, pdf_corpus, tmp_path_factory) -> Path:
    src, corpus = pdf_corpus
    out = tmp_path_factory.mktemp("mined") / "rows"
    one = run_cli(_mine_args(tiny_model, src, corpus, out))
    assert one.returncode == 0, log_tail(one.stdout + one.stderr)
    return out


def _table(path: Path) -> dict:
    import datasets

    return datasets.load_from_disk(str(path)).to_dict()


def test_corpus_mining_two_ranks_equals_one(tiny_model, pdf_corpus, mined, tmp_path):
    import datasets

    from dist_vdr.data.judgements import read_qrels

    src, corpus = pdf_corpus
    two = run_accelerate(_mine_args(tiny_model, src, corpus, tmp_path / "two"), "--num_processes", "2")
    assert two.returncode == 0, log_tail(two.stdout + two.stderr)
    rows = _table(mined)
    assert _table(tmp_path / "two") == rows
    assert len(rows["query"]) > 50
    # What was asked for: never a relevant page or a page of the positive's document, each mined page once.
    qrels = read_qrels(src / "train_qrels.trec")
    pages = datasets.load_from_disk(str(corpus))
    doc = dict(zip(pages["page_id"], pages["document_id"], strict=True))
    mined_pages = []
    for i, qid in enumerate(rows["query_id"]):
        assert qrels[qid][rows["image"][i]] == 2  # the page the query was written for
        for j in range(3):
            negative = rows[f"negative_{j}"][i]
            assert negative not in qrels[qid] and doc[negative] != doc[rows["image"][i]]
        mined_pages += [rows["negative_0"][i], rows["negative_1"][i]]
        assert rows["negative_ranks"][i][:2] == sorted(rows["negative_ranks"][i][:2])
    assert len(mined_pages) == len(set(mined_pages))


def test_killed_mining_resumes_from_its_embedding_cache(tiny_model, pdf_corpus, mined, tmp_path):
    """SIGKILL while the corpus is being encoded; the rerun with the same --cache keeps the finished
    batches and writes exactly the rows of an uninterrupted run."""
    import time

    from conftest import kill_tree

    src, corpus = pdf_corpus
    out, cache = tmp_path / "rows", tmp_path / "cache"
    args = [*_mine_args(tiny_model, src, corpus, out), "--cache", str(cache)]
    env = launch_env()
    victim = subprocess.Popen([python_of(env), "-m", "dist_vdr.cli", *args], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(cache.glob("*/batch-*.pt")):
        assert victim.poll() is None, "mining ended before it could be interrupted"
        time.sleep(0.005)
    kill_tree(victim)
    kept = len(list(cache.glob("*/batch-*.pt")))
    assert kept >= 1 and not out.exists(), "the kill came too late to interrupt the encoding"
    again = run_cli(args)
    assert again.returncode == 0, log_tail(again.stdout + again.stderr)
    assert _table(out) == _table(mined)


def _train_args(tiny_model: Path, src: Path, corpus: Path, rows: Path, out: Path, *more: str) -> list[str]:
    return ["--config", "configs/tiny.yaml", *tiny_overrides(tiny_model, rows, out), f"data.pages_path={corpus}",
            "data.negative_columns=[negative_0,negative_1]", f"data.eval_path={corpus}",
            f"data.eval_queries_file={src / 'eval_queries.jsonl'}", f"data.eval_qrels_file={src / 'eval_qrels.trec'}",
            "training.max_steps=6", "training.dataloader_num_workers=1", *more]


def _trace(folder: Path) -> dict[tuple[int, int], list[str]]:
    """(rank, step) -> row keys trained on in that step."""
    out = {}
    for rank in (0, 1):
        for line in (folder / f"rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            assert (rank, rec["step"]) not in out, f"rank {rank} trained step {rec['step']} twice"
            out[rank, rec["step"]] = rec["rows"]
    return out


def test_rows_naming_pages_train_and_resume_without_repeats(tiny_model, pdf_corpus, mined, tmp_path):
    """2 ranks; rows name pages by id. Killed after the first checkpoint and resumed, the rows trained
    on per rank and step are exactly the uninterrupted run's: none repeated, none skipped."""
    src, corpus = pdf_corpus
    whole_out, whole_trace = tmp_path / "whole", tmp_path / "trace-whole"
    whole = run_launcher("launch/cpu.yaml", _train_args(tiny_model, src, corpus, mined, whole_out),
                         env=launch_env(DIST_VDR_TRACE_ROWS=str(whole_trace)))
    assert whole.returncode == 0, log_tail(whole.stdout + whole.stderr)
    assert "resolved batch by batch from" in whole.stdout
    assert "ndcg@10" in (whole_out / "metrics_after.json").read_text()  # evaluated from the query/qrels files

    out, first_trace, second_trace = tmp_path / "resumed", tmp_path / "trace-1", tmp_path / "trace-2"
    args = _train_args(tiny_model, src, corpus, mined, out, "evaluation.enabled=false")
    env = launch_env(DIST_VDR_TRACE_ROWS=str(first_trace))
    kill_after_first_checkpoint(["bash", "launch/train.sh", "launch/cpu.yaml", *args], out, env=env)
    again = run_launcher("launch/cpu.yaml", args, env=launch_env(DIST_VDR_TRACE_ROWS=str(second_trace)))
    assert again.returncode == 0, log_tail(again.stdout + again.stderr)
    assert "resuming from" in again.stdout

    expected = _trace(whole_trace)
    assert sorted(expected) == [(r, s) for r in (0, 1) for s in range(1, 7)]
    before, after = _trace(first_trace), _trace(second_trace)
    resumed_at = min(step for _, step in after) - 1
    assert resumed_at >= 2  # the first checkpoint (save_steps=2) or a later one
    for key, rows in after.items():
        assert rows == expected[key], key
    for (rank, step), rows in before.items():
        if step <= resumed_at:
            assert rows == expected[rank, step]
    assert {k for k in before if k[1] <= resumed_at} | set(after) == set(expected)
    a, b = logged_losses(whole_out), logged_losses(out)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5)


def test_rows_naming_pages_mask_pages_of_the_same_document_through_the_corpus(tiny_model, pdf_corpus, mined,
                                                                              tmp_path):
    """Rows mined over the corpus name pages by id and carry no document ids: with
    loss.false_negatives.id_source=pages each page's document_id comes from the corpus, and at step 1
    (same weights, same batch) the loss without the other pages of the query's document is lower.
    The mined rows also list every page the qrels judge relevant (relevant_page_ids)."""
    import datasets

    src, corpus = pdf_corpus
    rows = datasets.load_from_disk(str(mined))
    assert all(row["image"] in row["relevant_page_ids"] for row in rows)
    losses = {}
    for name, more in (("plain", ()), ("masked", ("loss.false_negatives.id_column=document_id",
                                                  "loss.false_negatives.id_source=pages"))):
        out = tmp_path / name
        run = run_launcher("launch/cpu.yaml", _train_args(tiny_model, src, corpus, mined, out, "training.max_steps=2",
                                                          "evaluation.enabled=false", *more))
        assert run.returncode == 0, log_tail(run.stdout + run.stderr)
        losses[name] = logged_losses(out)[1]
    assert losses["masked"] < losses["plain"] - 1e-3, losses


def _vdr_layout(pages: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The training split of ``pages`` twice: as the published VDR layout (id, query, image, negatives
    = ids of other rows) and with those negatives as images (negative_0, negative_1)."""
    import datasets

    ds = datasets.load_from_disk(str(pages))["train"].select_columns(["query", "image"])
    ds = ds.cast_column("image", datasets.Image(decode=False))
    n = len(ds)
    ids = [f"page-{i:04d}" for i in range(n)]
    negatives = [[ids[(i + 1) % n], "not-a-page", ids[(i + 7) % n]] for i in range(n)]
    negatives[5] = ["not-a-page"]  # too few usable ids: the row is dropped
    vdr = ds.add_column("id", ids).add_column("negatives", negatives).cast_column("image", datasets.Image())
    vdr.save_to_disk(str(tmp_path / "vdr"))
    keep = [i for i in range(n) if i != 5]
    raw = ds["image"]
    columns = {"query": [ds["query"][i] for i in keep], "image": [raw[i] for i in keep]}
    for k, shift in enumerate((1, 7)):
        columns[f"negative_{k}"] = [raw[(i + shift) % n] for i in keep]
    images = datasets.Dataset.from_dict(columns, features=datasets.Features(
        {"query": datasets.Value("string"), **{c: datasets.Image() for c in columns if c != "query"}}))
    images.save_to_disk(str(tmp_path / "images"))
    return tmp_path / "vdr", tmp_path / "images"


def test_vdr_layout_negative_ids_train_like_images(tiny_model, pages, tmp_path):
    """Negatives given as ids of other rows, resolved lazily, give the losses of the same negatives
    stored as images."""
    from dist_vdr.config import DataConfig
    from dist_vdr.data.loading import load_train

    vdr, images = _vdr_layout(pages, tmp_path)
    cfg = DataConfig(path=str(vdr), pages_path=str(vdr), pages_id_column="id", negative_ids_column="negatives",
                     negative_columns=["negative_0", "negative_1"])
    with pytest.warns(UserWarning, match="1 of 256 rows dropped"):
        rows = load_train(cfg)
    assert rows.column_names == ["query", "image", "negative_0", "negative_1"]
    assert rows[0]["negative_0"] == "page-0001" and rows[0]["negative_1"] == "page-0007"

    common = ["evaluation.enabled=false", "training.max_steps=3", "data.negative_columns=[negative_0,negative_1]",
              "launch.num_threads_per_process=2"]
    by_id = run_cli(["train", *["--config", "configs/tiny.yaml"], *tiny_overrides(tiny_model, vdr, tmp_path / "a"),
                     *common, f"data.pages_path={vdr}", "data.pages_id_column=id",
                     "data.negative_ids_column=negatives"])
    assert by_id.returncode == 0, log_tail(by_id.stdout + by_id.stderr)
    stored = run_cli(["train", *["--config", "configs/tiny.yaml"],
                      *tiny_overrides(tiny_model, images, tmp_path / "b"), *common])
    assert stored.returncode == 0, log_tail(stored.stdout + stored.stderr)
    a, b = logged_losses(tmp_path / "a"), logged_losses(tmp_path / "b")
    assert sorted(a) == [1, 2, 3] and np.allclose([a[s] for s in a], [b[s] for s in a], rtol=1e-5)


def test_id_rows_without_pages_path_are_refused(mined, tmp_path):
    from dist_vdr.config import DataConfig
    from dist_vdr.data.loading import load_train

    with pytest.raises(ValueError, match="hold page ids.*set data.pages_path"):
        load_train(DataConfig(path=str(mined), negative_columns=["negative_0"]))
    with pytest.raises(ValueError, match="not in data.pages_path"):
        other = tmp_path / "other"
        import datasets

        datasets.Dataset.from_dict({"page_id": ["x#1"], "image": [None]}).save_to_disk(str(other))
        load_train(DataConfig(path=str(mined), pages_path=str(other), negative_columns=["negative_0"]))
