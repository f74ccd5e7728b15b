"""Time to first step: the startup data pass sharded over ranks, remembered, never in a timed collective.

Unit tests (no process group) check that the pass hashes exactly as sentence-transformers' sampler
and reports a bad row as the serial check did; real 2-rank launches check that a resumed run
decodes nothing (counted from its log) while changed data is checked again, and that a pass longer
than ``launch.collective_timeout_s`` no longer kills the run.
"""

from __future__ import annotations

import io
import os
import random

import datasets
import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import launch_env, log_tail, run_launcher, tiny_overrides
from dist_vdr.data import startup
from dist_vdr.distributed import DistInfo

COLUMNS = ["query", "image", "negative_0"]


def _train_rows(pages):
    return datasets.load_from_disk(str(pages))["train"].select_columns(COLUMNS)


def test_the_pass_hashes_as_the_stock_sampler(pages):
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler

    ds = _train_rows(pages).select(range(40))
    stock = NoDuplicatesBatchSampler(ds, batch_size=8, drop_last=True, precompute_hashes=True, precompute_num_proc=1)
    stock._build_hashes()
    ours, problem, decoded = startup.scan_rows(ds, ["image", "negative_0"], 0, 40, "rows", hashed=True)
    assert problem is None and decoded == 80
    assert np.array_equal(ours, stock._row_hashes)
    # Sharded over 3 "ranks" and reassembled: the same array.
    parts = [startup.scan_rows(ds, ["image", "negative_0"], *_range(40, r, 3), "rows", True)[0] for r in range(3)]
    assert np.array_equal(np.concatenate(parts), ours)


def _range(n, rank, world):
    from dist_vdr.distributed import shard_range

    return shard_range(n, rank, world)


def test_a_bad_row_is_named_as_before(tmp_path):
    def png(colour):
        buf = io.BytesIO()
        Image.new("RGB", (30, 40), colour).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    broken = {"bytes": png("red")["bytes"][:40], "path": None}
    feats = datasets.Features({"query": datasets.Value("string"), "image": datasets.Image()})
    ds = datasets.Dataset.from_dict({"query": list("abcd"), "image": [png("red"), png("blue"), broken, png("gray")]},
                                    features=feats)
    with pytest.raises(ValueError, match=r"^rows row 2, column 'image': image does not decode"):
        startup.prepare(ds, ["image"], "rows", hashed=True, info=DistInfo(), output_dir=None, workers=2)


def test_records_are_keyed_by_the_data(tmp_path, pages, monkeypatch):
    monkeypatch.setenv("DIST_VDR_CACHE", str(tmp_path / "cache"))
    ds = _train_rows(pages).select(range(16))
    first = startup.prepare(ds, ["image", "negative_0"], "rows", hashed=True, info=DistInfo(), output_dir=tmp_path)
    assert first.reused_from is None and first.decoded_pages == 32
    assert startup.write_record(first, tmp_path) == [tmp_path / "startup" / first.key,
                                                     tmp_path / "cache" / "startup" / first.key]
    again = startup.prepare(ds, ["image", "negative_0"], "rows", hashed=True, info=DistInfo(), output_dir=tmp_path)
    assert again.reused_from == str(tmp_path / "startup" / first.key) and again.decoded_pages == 0
    assert np.array_equal(again.hashes, first.hashes)
    # Another run (another output folder) over the same data finds the user cache's copy.
    other = startup.prepare(ds, ["image", "negative_0"], "rows", hashed=True, info=DistInfo(),
                            output_dir=tmp_path / "other-run")
    assert other.reused_from == str(tmp_path / "cache" / "startup" / first.key)
    # Other rows, other columns, or the same folder rewritten: another key.
    assert startup.record_key(_train_rows(pages).select(range(17)), ["image", "negative_0"], True) != first.key
    assert startup.record_key(ds.select_columns(["query", "image"]), ["image"], True) != first.key
    assert startup.record_key(ds, ["image", "negative_0"], False) != first.key
    copy = tmp_path / "copy"
    datasets.load_from_disk(str(pages)).save_to_disk(str(copy))
    rewritten = datasets.load_from_disk(str(copy))["train"].select_columns(COLUMNS).select(range(16))
    before = startup.record_key(rewritten, ["image", "negative_0"], True)
    arrow = next(copy.glob("train/*.arrow"))
    os.utime(arrow, ns=(arrow.stat().st_atime_ns, arrow.stat().st_mtime_ns + 10**9))
    rewritten = datasets.load_from_disk(str(copy))["train"].select_columns(COLUMNS).select(range(16))
    assert startup.record_key(rewritten, ["image", "negative_0"], True) != before


def _run(args, env=None):
    proc = run_launcher("launch/cpu.yaml", args, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log_tail(log)
    return log


def test_a_resumed_run_decodes_nothing_and_changed_data_is_checked_again(tiny_model, tmp_path):
    from dist_vdr.data.synthetic import SyntheticPagesSpec, generate_pages

    data = generate_pages(tmp_path / "pages", SyntheticPagesSpec(num_train=64, num_eval_queries=8, seed=3),
                          show_progress=False)
    out = tmp_path / "run"
    env = launch_env(DIST_VDR_CACHE=str(tmp_path / "cache"))
    args = ["--config", "configs/tiny.yaml", *tiny_overrides(tiny_model, data, out, "training.max_steps=4",
                                                              "training.global_batch_size=8")]
    log = _run(args, env)
    assert "startup: 64 training rows validated and hashed on 2 rank(s)" in log and "(128 pages decoded)" in log
    assert "startup: 8 eval pages validated on 2 rank(s)" in log
    assert "Hashing dataset values" not in log  # the sampler took the pass's hashes
    assert "time to first step" in log and (out / "startup_times.json").is_file()
    # A resume (final/ removed, so it really resumes and trains): nothing decoded, nothing hashed.
    import shutil

    shutil.rmtree(out / "final")
    (out / "checkpoint-4").rename(out / "set-aside-4")
    log = _run(args, env)
    assert "resuming from" in log and "training rows validated and hashed before (record" in log
    assert "pages decoded" not in log and "Hashing dataset values" not in log
    # The data changes (regenerated in place): its record no longer applies.
    generate_pages(data, SyntheticPagesSpec(num_train=64, num_eval_queries=8, seed=4), overwrite=True,
                   show_progress=False)
    shutil.rmtree(out / "final")
    log = _run(args + ["--allow-config-change"], env)
    assert "startup: 64 training rows validated and hashed on 2 rank(s)" in log and "(128 pages decoded)" in log


def _big_page(i: int) -> dict:
    """A 1416x1648 page (the published data's size), ~80 kB of PNG: ~15 ms to decode here."""
    rng = random.Random(i)
    im = Image.new("RGB", (1416, 1648), "white")
    draw = ImageDraw.Draw(im)
    for _ in range(40):
        x, y = rng.randrange(1300), rng.randrange(1500)
        draw.rectangle([x, y, x + rng.randrange(20, 300), y + rng.randrange(5, 40)],
                       fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return {"bytes": buf.getvalue(), "path": None}


def test_a_pass_longer_than_the_collective_timeout_still_trains(tiny_model, tmp_path):
    """4,800 big pages: ~18 s of serial decoding on an idle 2-core machine (2,400 took 9.2 s there: too short
    to prove anything) against launch.collective_timeout_s=10. Before, rank 0 decoded them alone while rank 1
    waited in a broadcast bounded by that timeout, and died."""
    distinct = [_big_page(i) for i in range(24)]  # rows repeat pages: decoding costs per row, not per page
    rows = 2400
    feats = datasets.Features({"query": datasets.Value("string"), "image": datasets.Image(),
                               "negative_0": datasets.Image()})
    ds = datasets.Dataset.from_dict({"query": [f"query {i}" for i in range(rows)],
                                     "image": [distinct[i % 24] for i in range(rows)],
                                     "negative_0": [distinct[(i + 7) % 24] for i in range(rows)]}, features=feats)
    data = tmp_path / "pages"
    datasets.DatasetDict({"train": ds}).save_to_disk(str(data))
    out = tmp_path / "run"
    args = ["--config", "configs/tiny.yaml", *tiny_overrides(
        tiny_model, data, out, "training.max_steps=2", "training.global_batch_size=4", "loss.mini_batch_size=2",
        "training.batch_sampler=batch_sampler", "evaluation.enabled=false", "launch.collective_timeout_s=10",
        "launch.startup_workers=1")]
    log = _run(args, launch_env(DIST_VDR_CACHE=str(tmp_path / "cache")))
    seconds = float(log.split("training rows validated on 2 rank(s) in ")[1].split(" s")[0])
    assert seconds > 10, f"the pass took {seconds} s: not longer than the timeout, the test proves nothing"
    assert "training finished at step 2" in log


def test_data_check_writes_the_record_training_finds(tiny_model, pages, tmp_path):
    from conftest import run_cli

    env = launch_env(DIST_VDR_CACHE=str(tmp_path / "cache"))
    proc = run_cli(["data", "check", "--config", "configs/tiny.yaml", str(pages), f"model.name_or_path={tiny_model}",
                    "launch.device=cpu", "data.max_train_samples=32"], env=env)
    assert proc.returncode == 0, log_tail(proc.stdout + proc.stderr)
    assert "startup: 32 training rows validated and hashed on 1 rank(s)" in proc.stdout
    records = sorted((tmp_path / "cache" / "startup").glob("*/startup_record.json"))
    assert len(records) == 2  # training rows (with hashes) and eval pages
    # The training start finds it: same data, same key (no page decoded).
    from dist_vdr.config import load_config
    from dist_vdr.data.loading import load_train

    cfg = load_config("configs/tiny.yaml", [f"data.path={pages}", f"model.name_or_path={tiny_model}",
                                            "data.max_train_samples=32", "data.validate_images=false"])
    os.environ["DIST_VDR_CACHE"] = str(tmp_path / "cache")
    try:
        result = startup.prepare(load_train(cfg.data), ["image", "negative_0"], "rows", hashed=True, info=DistInfo())
    finally:
        del os.environ["DIST_VDR_CACHE"]
    assert result.reused_from is not None and result.decoded_pages == 0


def test_bench_startup_report_states_the_ratios():
    from dist_vdr.bench import startup as bench

    def times(total, data):
        return {"total_s": total, "phases_s": {bench.DATA_PHASE: data, "model build": 1.0}}

    report = {"world_size": 2, "results": [
        {"kind": "ids", "rows": 1000, "world_size": 2, "workers": 1, "first": times(20, 2), "resume": times(10, 0.5)},
        {"kind": "ids", "rows": 100000, "world_size": 2, "workers": 1, "first": times(25, 6), "resume": times(11, 1)},
        {"kind": "images", "rows": 1000, "world_size": 1, "workers": 1, "first": times(60, 40), "resume": times(9, 0)},
        {"kind": "images", "rows": 1000, "world_size": 2, "workers": 1, "first": times(40, 21), "resume": times(9, 0)},
    ]}
    summary = bench.summarise(report)
    assert summary["resume_most_vs_fewest_rows"] == pytest.approx(1.1)
    assert summary["pass_w_vs_1_rank"] == pytest.approx(21 / 40)
    assert summary["per_page_s"] == pytest.approx(0.02)
    text = bench.format_report(report)
    assert "resume, most rows vs fewest: 1.10x" in text and "0.53x (goal <= 0.6)" in text
    assert "multilingual recipe (94,225 rows): before 62.8 min on rank 0" in text
