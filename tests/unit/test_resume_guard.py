"""The resume guard (a changed recipe is refused) and the run-folder lock, without a process group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from dist_vdr.config import load_config, to_yaml
from dist_vdr.run import lock as run_lock
from dist_vdr.run import resume_guard


def _yaml(*overrides: str) -> str:
    return to_yaml(load_config(None, list(overrides), check_paths=False))


@pytest.mark.parametrize("override", [
    "model.name_or_path=other-model", "data.path=other-pages", "training.global_batch_size=64",
    "loss.matryoshka_dims=[64,32]", "training.learning_rate=1e-3", "training.seed=1", "training.precision=bf16",
    "loss.scale=30", "data.max_train_samples=100", "training.trainer_args={max_grad_norm: 0.5}",
])
def test_a_change_of_meaning_is_refused_with_the_key_and_the_fix(override):
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=rf"differs from the one ckpt was trained with \({key}.*another "
                                         rf"training.output_dir"):
        resume_guard.check(_yaml(), _yaml(override), "ckpt", allow_change=True)


def test_the_schedule_needs_the_flag():
    with pytest.raises(ValueError, match=r"training.max_steps: -1 -> 20.*--allow-config-change"):
        resume_guard.check(_yaml(), _yaml("training.max_steps=20"), "ckpt", allow_change=False)
    notes = resume_guard.check(_yaml(), _yaml("training.max_steps=20"), "ckpt", allow_change=True)
    assert notes == ["--allow-config-change: continuing with training.max_steps: -1 -> 20"]
    assert resume_guard.schedule_changed(_yaml(), _yaml("training.num_epochs=2"))


def test_launch_and_reporting_changes_are_accepted():
    same = resume_guard.check(_yaml(), _yaml("launch.expected_world_size=1", "training.output_dir=elsewhere",
                                             "training.per_device_batch_size=8", "launch.log_collectives=true"),
                              "ckpt", allow_change=False)
    assert same == []
    notes = resume_guard.check(_yaml(), _yaml("training.logging_steps=10", "evaluation.enabled=false",
                                              "data.max_eval_queries=8"), "ckpt", allow_change=False)
    assert len(notes) == 1 and "reporting only" in notes[0] and "training.logging_steps: 1.0 -> 10.0" in notes[0]
    # gradient caching's mini-batch (a memory lever: same loss at any size) and the merged copy of an adapter
    notes = resume_guard.check(_yaml(), _yaml("loss.mini_batch_size=4", "model.adapter.merge_on_save=true"),
                               "ckpt", allow_change=False)
    assert len(notes) == 1 and "loss.mini_batch_size: 1 -> 4" in notes[0], notes


def test_one_folder_spelled_two_ways_is_the_same(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    assert resume_guard.check(_yaml("model.name_or_path=model"), _yaml(f"model.name_or_path={tmp_path}/model"),
                              "ckpt", allow_change=False) == []


def test_old_checkpoints_without_a_recipe_are_not_compared():
    assert "records no recipe" in resume_guard.check(None, _yaml(), "ckpt", allow_change=False)[0]


def test_lock_is_exclusive_and_released(tmp_path):
    lock = run_lock.RunLock(tmp_path / "run")
    lock.acquire()
    holder = json.loads(lock.path.read_text())
    assert holder["pid"] == os.getpid() and holder["host"]
    other = run_lock.RunLock(tmp_path / "run")
    other.record = {**other.record, "pid": os.getppid(), "pid_start": "x"}  # another live process here
    with pytest.raises(ValueError, match=r"is in use by another run \(host .*pid"):
        other._take_over()
    lock.release()
    assert not lock.path.exists()


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "run"
    out.mkdir()
    import socket

    (out / run_lock.LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                      "pid_start": "1"}))
    said = []
    with run_lock.RunLock(out, log=said.append) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert "has ended" in said[0]


def test_a_lock_without_heartbeat_is_stale_and_a_fresh_remote_one_is_not(tmp_path):
    me = run_lock.RunLock(tmp_path).record
    remote = {"host": "elsewhere", "pid": 1}
    assert run_lock.stale_reason(remote, 5, me) is None
    assert "no heartbeat" in run_lock.stale_reason(remote, run_lock.STALE_S + 1, me)
    job = {**me, "slurm_job_id": "77"}
    assert "earlier attempt" in run_lock.stale_reason({**remote, "slurm_job_id": "77"}, 5, job)


def test_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    with run_lock.RunLock(tmp_path) as lock:
        os.utime(lock.path, (0, 0))
        time.sleep(0.3)
        assert time.time() - lock.path.stat().st_mtime < 5


def test_keys_added_by_a_newer_version_at_their_default_are_no_change():
    """A checkpoint recorded before model.adapter existed resumes; turning the adapter on is a change."""
    import yaml

    recorded = yaml.safe_load(_yaml())
    del recorded["model"]["adapter"]  # the recipe as an older dist-vdr recorded it
    old = yaml.safe_dump(recorded)
    assert resume_guard.check(old, _yaml(), "ckpt", allow_change=False) == []
    with pytest.raises(ValueError, match=r"model.adapter.type: None -> 'lora'"):
        resume_guard.check(old, _yaml("model.adapter.type=lora"), "ckpt", allow_change=False)
    with pytest.raises(ValueError, match=r"model.adapter.rank: 16 -> 4"):
        resume_guard.check(_yaml("model.adapter.type=lora"), _yaml("model.adapter.type=lora", "model.adapter.rank=4"),
                           "ckpt", allow_change=False)
