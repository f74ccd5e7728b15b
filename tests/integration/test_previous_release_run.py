"""A run folder written by the previous release resumes under this code.

The modules were regrouped into subpackages after commit 915902f (dist_vdr/training.py ->
dist_vdr/run/training.py, dist_vdr/checkpoint.py -> dist_vdr/checkpoints/store.py, ...), behaviour unchanged.
A user's run folder outlives such a change: a run preempted under the previous release is resumed by the next.
tests/data/previous_release_run.tar.gz is such a folder, written by commit 915902f's code (rebuilt by
tests/data/make_previous_run_fixture.py, which records in previous_release_run.json what it ran, the inputs'
sha256 and what the previous code itself computed when it resumed the same folder): the suite's "tiny-one"
recipe for 6 steps, preempted (SIGUSR2) after step 3 -- checkpoint-3 (weights, optimizer, scheduler, RNG
states, the pickled training arguments, its marker and recorded recipe), the startup records, the evaluation
before training (metrics_before.json, eval_before/), no final/.

This code resumes it in place through the CLI and must: resume from checkpoint-3 (not start again, not
re-evaluate the untrained model: the stored record is reused, byte for byte), train steps 4-6 to the losses the
previous code logged for them and the evaluation after training it measured (a different CPU rounds in the last
bits: 1e-4 relative, as test_demo_numbers), write final/, and recompute the startup records cleanly (their key
holds the data files' paths, which moved with the folder) to the very row hashes the old records hold.
Every pickle of the old checkpoint must also load here: a class pickled under a module path that no longer
exists would fail there (none is: the only dist_vdr class pickled, in training_args.bin, is
dist_vdr.data.sampler.GlobalNoDuplicatesBatchSampler, which did not move).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, launch_env, log_tail, python_of

DATA = Path(__file__).parents[1] / "data"
TARBALL = DATA / "previous_release_run.tar.gz"
RECORD = DATA / "previous_release_run.json"


def _sha256_tree(folder: Path) -> dict[str, str]:
    """As make_previous_run_fixture.py: every file but the makers' output stamp (it holds the time) and the
    cache files `datasets` adds to a folder it loads (the suite's shared pages are loaded by other tests first)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".dist-vdr-output.json"
            and not (p.name.startswith("cache-") and p.suffix == ".arrow")}


def _same(cwd: Path, recorded: str, folder: Path) -> bool:
    """``recorded`` (a path as the command spelt it: relative to the run's cwd) names ``folder``."""
    return (cwd / recorded).resolve() == folder.resolve()


def _startup_records(run: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (run / "startup").glob("*/startup_record.json")}


def _training_rows_record(run: Path, records: dict[str, dict]) -> np.ndarray:
    (key,) = [k for k, r in records.items() if r["hashed"]]
    return np.load(run / "startup" / key / "row_hashes.npy")


def _unpack(tmp_path: Path, record: dict, tiny_model: Path, pages: Path) -> Path:
    """The fixture's run/ in ``tmp_path``, beside the model and pages it names (relative paths); its folder."""
    # The inputs: the session's tiny model and pages are, byte for byte, what the previous release's makers wrote.
    for name, made in (("tiny-model", tiny_model), ("pages", pages)):
        assert _sha256_tree(made) == record["inputs_sha256"][name], (
            f"{name} made by this code differs from the one the fixture was trained on; if intended, rebuild "
            f"the fixture: .venv/bin/python tests/data/make_previous_run_fixture.py")
        (tmp_path / name).symlink_to(made)
    with tarfile.open(TARBALL) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path / "run"


def _resume(tmp_path: Path, record: dict) -> str:
    """The interrupted run's command again, from the folder that holds it, with this code; its log."""
    env = launch_env(PYTHONPATH=str(REPO), DIST_VDR_CACHE=str(tmp_path / "cache"))  # no user cache record reused
    command = ["-m", "dist_vdr.cli", "train", "--config", str(REPO / "configs" / "tiny.yaml"), *record["train_args"]]
    proc = subprocess.run([python_of(env), *command], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log_tail(log)
    return log


def test_a_run_folder_of_the_previous_release_resumes(tmp_path, tiny_model, pages):
    import torch

    record = json.loads(RECORD.read_text())
    stopped, end = record["stopped_at"], record["max_steps"]
    run = _unpack(tmp_path, record, tiny_model, pages)
    old_checkpoint = run / f"checkpoint-{stopped}"
    assert not (run / "final").exists() and (old_checkpoint / "dist_vdr_complete.json").is_file()
    before = {p: p.read_bytes() for p in [run / "metrics_before.json", *(run / "eval_before").rglob("*")]
              if p.is_file()}
    old_records = _startup_records(run)
    old_hashes = _training_rows_record(run, old_records)

    # Every pickle of the old checkpoint loads with this code's modules (a moved class would raise here).
    for name in ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.load(old_checkpoint / name, weights_only=False)

    log = _resume(tmp_path, record)
    resumed = re.findall(r"resuming from (\S+)", log)
    assert len(resumed) == 1 and _same(tmp_path, resumed[0], old_checkpoint), log_tail(log)
    assert "starting a new run" not in log, log_tail(log)
    assert "evaluating the untrained model" not in log, log_tail(log)  # metrics_before.json was understood

    # The step counter went on from the old checkpoint to the end; the steps before it were not trained again.
    state = json.loads((run / f"checkpoint-{end}" / "trainer_state.json").read_text())
    assert state["global_step"] == end
    logged = [h["step"] for h in state["log_history"] if "loss" in h]
    assert logged == list(range(1, end + 1)), logged
    losses = {str(h["step"]): h["loss"] for h in state["log_history"] if "loss" in h and h["step"] > stopped}
    for step, value in record["reference"]["losses"].items():
        assert losses[step] == pytest.approx(value, rel=1e-4), (
            f"step {step}: loss {losses[step]} vs {value} logged by the previous release resuming the same folder "
            f"({record['versions']})")
    assert (run / f"checkpoint-{end}" / "dist_vdr_complete.json").is_file()

    # final/ and the run's closing records, as a run of this code writes them.
    assert (run / "final" / "model.safetensors").is_file() and (run / "final" / "README.md").is_file()
    assert (run / "report.md").is_file()
    after = json.loads((run / "metrics_after.json").read_text())
    reference = record["reference"]["metrics_after"]
    assert after["step"] == reference["step"] == end
    assert sorted(after["metrics"]) == sorted(reference["metrics"])
    for dim, values in reference["metrics"].items():
        assert after["metrics"][dim]["ndcg@10"] == pytest.approx(values["ndcg@10"], rel=1e-4, abs=1e-6), dim
    starts = [json.loads(line) for line in (run / "run_info.jsonl").read_text().splitlines()]
    assert len(starts) == 2 and _same(tmp_path, starts[1]["resumed_from"], old_checkpoint), starts

    # The evaluation before training was reused as stored, not redone.
    assert {p: p.read_bytes() for p in before} == before

    # The startup records: recomputed cleanly (their key holds the data files' paths), to the same row hashes.
    records = _startup_records(run)
    new = {k: r for k, r in records.items() if k not in old_records}
    assert sorted((r["rows"], r["hashed"]) for r in new.values()) == sorted(
        (r["rows"], r["hashed"]) for r in old_records.values()), records
    assert np.array_equal(_training_rows_record(run, new), old_hashes)
