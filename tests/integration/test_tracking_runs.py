"""training.report_to through the real launcher: TensorBoard event files and the trackio store, written by rank 0
alone, hold the per-step scalars of trainer_state.json, the evaluations before/after training and the resolved
recipe."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import launch_env, log_tail, run_launcher, tiny_overrides


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, dict[int, float]] = {}
    texts: set[str] = set()
    for events in sorted(folder.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
        texts |= set(acc.Tags()["tensors"])
    return values, texts


_READ_TRACKIO = """
import json, sys
from trackio.sqlite_storage import SQLiteStorage
runs = SQLiteStorage.get_runs("dist-vdr")
print(json.dumps({"runs": runs, "logs": SQLiteStorage.get_logs("dist-vdr", runs[0]),
                  "config": SQLiteStorage.get_run_config("dist-vdr", runs[0])}, default=str))
"""


def _trackio_store(folder) -> dict:
    """The trackio store in ``folder`` ($TRACKIO_DIR), read by trackio itself in a process of its own (trackio
    takes the folder when imported)."""
    import os

    proc = subprocess.run([sys.executable, "-c", _READ_TRACKIO], capture_output=True, text=True,
                          env={**os.environ, "TRACKIO_DIR": str(folder)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_trackers_hold_the_logged_scalars_of_a_two_rank_run(tiny_model, pages, tmp_path):
    out = tmp_path / "run"
    args = ["--config", "configs/tiny.yaml", *tiny_overrides(tiny_model, pages, out),
            "data.negative_columns=[negative_0,negative_1]", "training.max_steps=4",
            "training.report_to=[tensorboard,trackio]", "data.max_eval_queries=8", "training.eval_steps=2"]
    result = run_launcher("launch/cpu.yaml", args, env=launch_env(TRACKIO_DIR=str(tmp_path / "trackio")))
    assert result.returncode == 0, log_tail(result.stdout + result.stderr)
    folder = out / "tensorboard"
    events = list(folder.glob("events.out.tfevents.*"))
    # events.out.tfevents.<time>.<host>.<pid>.<n>: every file from one process (rank 0)
    assert events and len({e.name.split(".")[-2] for e in events}) == 1
    assert [p for p in out.rglob("events.out.tfevents.*") if p.parent != folder] == []  # one writer, one place
    values, texts = _scalars(folder)
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    for key in ("loss", "grad_norm", "learning_rate"):
        tag = f"train/{key}"
        logged = {h["step"]: h[key] for h in state["log_history"] if key in h}
        assert logged and values[tag] == pytest.approx(logged, rel=1e-6), tag
    assert set(values["train/step_seconds"]) == {1, 2, 3, 4} and min(values["train/samples_per_second"].values()) > 0
    after = json.loads((out / "metrics_after.json").read_text())["metrics"]
    assert values["train/after/dim64_cosine_ndcg@10"][4] == pytest.approx(after["64"]["ndcg@10"], rel=1e-6)
    assert 0 in values["train/before/dim16_cosine_ndcg@10"]
    assert any("resolved_config" in t for t in texts)
    assert set(values["eval/dim64_cosine_ndcg@10"]) == {2, 4}  # the evaluations during training

    # trackio: one run (rank 0's; the evaluation after training continues it), the one run_info.jsonl records
    store = _trackio_store(tmp_path / "trackio")
    recorded = [json.loads(line)["tracker_run"] for line in (out / "run_info.jsonl").read_text().splitlines()]
    assert store["runs"] == recorded and recorded[0].startswith("run-")
    logs = store["logs"]
    for key in ("loss", "grad_norm", "learning_rate"):
        logged = {h["step"]: h[key] for h in state["log_history"] if key in h}
        got = [(e["train/global_step"], e[f"train/{key}"]) for e in logs if f"train/{key}" in e]
        assert len(got) == len(logged) and dict(got) == pytest.approx(logged, rel=1e-6), key  # each step once
    evals = {e["train/global_step"]: e["eval/dim64_cosine_ndcg@10"] for e in logs if "eval/dim64_cosine_ndcg@10" in e}
    assert evals == pytest.approx(values["eval/dim64_cosine_ndcg@10"], rel=1e-6)
    assert [e["train/after/dim64_cosine_ndcg@10"] for e in logs if "train/after/dim64_cosine_ndcg@10" in e] == \
        pytest.approx([after["64"]["ndcg@10"]], rel=1e-6)
    assert any("train/before/dim16_cosine_ndcg@10" in e for e in logs)
    assert "max_steps: 4" in store["config"]["dist_vdr/resolved_config"]
    # `train` ends with the run report: the series of trainer_state, the before/after table
    assert f"report: {out / 'report.md'} (report.png); model card: {out / 'final' / 'README.md'}" in result.stdout
    from PIL import Image

    assert Image.open(out / "report.png").size[0] > 1000
    from dist_vdr.run.report import eval_curves, history

    log, _ = history(out)
    assert eval_curves(log)["64"][0] == [2, 4]
    report = (out / "report.md").read_text()
    assert "finished (final/ complete)" in report
    # the evaluation's figures in mteb's format too, one model variant per dim
    assert sorted(p.parent.parent.name for p in (out / "eval_after" / "mteb").rglob("*.json")) == [
        "dist-vdr_dim16", "dist-vdr_dim32", "dist-vdr_dim64"]
    before = json.loads((out / "metrics_before.json").read_text())["metrics"]
    row = f"| 64 | {before['64']['ndcg@10']:.4f} | {after['64']['ndcg@10']:.4f} |"
    assert row in report


def test_trackio_keeps_the_evaluation_after_training_and_a_fresh_start_opens_a_new_run(tiny_model, pages, tmp_path):
    """Without the evaluation before training, the one after it is logged once trackio's callback has closed the
    run: it must still reach the store. A run started afresh in the folder of a deleted run is a run of its own."""
    import shutil

    out = tmp_path / "run"
    args = ["--config", "configs/tiny.yaml", *tiny_overrides(tiny_model, pages, out), "training.max_steps=2",
            "training.report_to=[trackio]", "data.max_eval_queries=8", "evaluation.before_training=false"]
    env = launch_env(TRACKIO_DIR=str(tmp_path / "trackio"))
    names = []
    for _ in range(2):
        result = run_launcher("launch/cpu.yaml", args, env=env)
        assert result.returncode == 0, log_tail(result.stdout + result.stderr)
        names.append(json.loads((out / "run_info.jsonl").read_text().splitlines()[-1])["tracker_run"])
        after = json.loads((out / "metrics_after.json").read_text())["metrics"]["64"]["ndcg@10"]
        shutil.rmtree(out)
    store = _trackio_store(tmp_path / "trackio")
    assert len(set(names)) == 2 and sorted(store["runs"]) == sorted(names), (names, store["runs"])
    logged = [e["train/after/dim64_cosine_ndcg@10"] for e in store["logs"] if "train/after/dim64_cosine_ndcg@10" in e]
    assert logged == pytest.approx([after], rel=1e-6)  # the store's first run: the same data and seed
