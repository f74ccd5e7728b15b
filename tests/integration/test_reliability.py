"""Nothing lost, nothing silently wrong: real runs, real damaged files, real kills, real contention.

Each test reproduces an ordinary mistake that used to lose work or train garbage with exit code 0
(docs/usage.md, "What happens when..."): a damaged checkpoint, a kill between saving and marking, a
changed recipe, a NaN loss, two launches into one folder, a killed launcher, SIGTERM.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, kill_tree, launch_env, log_tail, logged_losses, run_cli, tiny_overrides

RECIPE = "configs/tiny.yaml"
STEPS = 4


def _args(model, pages, out, *more) -> list[str]:
    return ["train", "--config", RECIPE, *tiny_overrides(model, pages, out, f"training.max_steps={STEPS}",
                                                         "evaluation.enabled=false", "training.save_total_limit=null",
                                                         "training.global_batch_size=8", "launch.device=cpu", *more)]


def _train(model, pages, out, *more, expect: int = 0) -> str:
    proc = run_cli(_args(model, pages, out, *more))
    log = proc.stdout + proc.stderr
    assert proc.returncode == expect, log_tail(log)
    return log


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model, pages) -> Path:
    """One uninterrupted 1-process run: checkpoints 2 and 4 and final/."""
    out = tmp_path_factory.mktemp("finished") / "run"
    _train(tiny_model, pages, out)
    return out


def _error_line(log: str) -> str:
    """The one `error:` line of a failed run (exactly one: no repeats, no traceback after it)."""
    errors = [ln for ln in log.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in log, log_tail(log)
    return errors[0]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _final_weights_finite(out: Path) -> bool:
    from safetensors.torch import load_file

    return all(bool(t.isfinite().all()) for t in load_file(str(out / "final" / "model.safetensors")).values())


def test_a_corrupted_checkpoint_is_set_aside_and_the_older_one_resumes(finished, tiny_model, pages, tmp_path):
    out = _copy(finished, tmp_path / "run")
    shutil.rmtree(out / "final")
    model = out / "checkpoint-4" / "model.safetensors"
    header = 8 + int.from_bytes(model.read_bytes()[:8], "little")
    _overwrite(model, header, b"\xff" * 65536)  # the weights after the header: NaNs, same size
    log = _train(tiny_model, pages, out)
    assert "checkpoint-4 fails verification (model.safetensors does not match its xxh3_128 hash" in log
    assert "resuming from" in log and "checkpoint-2" in log.split("resuming from")[1].splitlines()[0]
    aside = [p.name for p in out.iterdir() if p.name.startswith("corrupt-checkpoint-4-")]
    assert len(aside) == 1  # set aside, not deleted
    ref = logged_losses(finished)
    got = logged_losses(out)
    for step in (3, 4):
        assert math.isclose(got[step], ref[step], rel_tol=1e-6), (step, got[step], ref[step])
    assert _final_weights_finite(out)


def test_missing_and_truncated_files_fall_back_to_scratch_without_a_traceback(finished, tiny_model, pages, tmp_path):
    out = _copy(finished, tmp_path / "run")
    shutil.rmtree(out / "final")
    (out / "checkpoint-4" / "optimizer.pt").unlink()  # a fresh optimizer would resume silently
    (out / "checkpoint-4" / "scheduler.pt").unlink()
    state = out / "checkpoint-2" / "model.safetensors"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncate -s 50%
    log = _train(tiny_model, pages, out)
    assert "checkpoint-4 fails verification (optimizer.pt is missing; scheduler.pt is missing)" in log
    assert "checkpoint-2 fails verification (model.safetensors has" in log
    assert "starting a new run" in log and "Traceback" not in log
    assert sorted(p.name.split("-2026")[0].split("-20")[0] for p in out.iterdir() if p.name.startswith("corrupt-")) \
        == ["corrupt-checkpoint-2", "corrupt-checkpoint-4"]
    assert logged_losses(out) == pytest.approx(logged_losses(finished), rel=1e-6)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_model, pages, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    bad = _copy(tiny_model, tmp_path / "nan-model")
    weights = load_file(str(bad / "model.safetensors"))
    name = next(k for k in weights if "embed_tokens" in k)
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "run"
    log = _train(bad, pages, out, "training.save_steps=1", expect=2)
    last = _error_line(log)
    assert last.startswith("error: the loss is not finite at step 1 (loss nan") and "last good one" in last
    assert not list(out.glob("checkpoint-*")) and not (out / "final").exists()


_KILL_BEFORE_MARKER = r"""
import os, signal, sys
import dist_vdr.checkpoints.store as ckpt
original = ckpt.write_marker
def killed_before_marking(path, record):
    if record.get("step") == int(os.environ["KILL_AT_STEP"]) and "checkpoint-" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)   # a real kill: the checkpoint's files are written, no marker yet
    return original(path, record)
ckpt.write_marker = killed_before_marking
from dist_vdr.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_save_total_limit_1_never_leaves_only_an_unmarked_checkpoint(tiny_model, pages, tmp_path):
    out = tmp_path / "run"
    args = _args(tiny_model, pages, out, "training.save_total_limit=1")
    env = launch_env(KILL_AT_STEP="4")
    proc = subprocess.run([sys.executable, "-c", _KILL_BEFORE_MARKER, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, log_tail(proc.stdout + proc.stderr)
    from dist_vdr.checkpoints.store import list_checkpoints

    # checkpoint-4's files are on disk without a marker; checkpoint-2 must still be there, complete.
    assert [(s, ok) for s, _, ok in list_checkpoints(out)] == [(2, True), (4, False)]
    log = _train(tiny_model, pages, out, "training.save_total_limit=1")
    assert "set aside as incomplete-checkpoint-4-" in log and "checkpoint-2" in log.split("resuming from")[1]
    assert [(s, ok) for s, _, ok in list_checkpoints(out)] == [(4, True)]


def test_a_changed_recipe_is_refused(finished, tiny_model, pages, tmp_path):
    """Another model of the same shape (used to be ignored silently), batch, dims, lr and seed: one rerun,
    every difference listed (each key alone: tests/unit/test_resume_guard.py)."""
    out = _copy(finished, tmp_path / "run")
    snapshot = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    other = _copy(tiny_model, tmp_path / "other-model")
    changes = [f"model.name_or_path={other}", "training.global_batch_size=16", "loss.matryoshka_dims=[32,16]",
               "training.learning_rate=1e-4", "training.seed=7"]
    log = _train(tiny_model, pages, out, *changes, expect=2)
    last = _error_line(log)
    assert last.startswith("error: the recipe differs from the one") and "another training.output_dir" in last
    for change in changes:
        assert change.split("=")[0] + ":" in last, (change, last)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == snapshot  # nothing written


def test_a_longer_schedule_needs_the_flag_and_a_finished_run_is_not_retrained(finished, tiny_model, pages, tmp_path):
    out = _copy(finished, tmp_path / "run")
    again = _train(tiny_model, pages, out)  # rerun of the finished run: nothing trained, nothing piled up
    assert "this run finished at step 4" in again and "training:" not in again
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("final")) == ["final"]
    log = _train(tiny_model, pages, out, "training.max_steps=6", expect=2)
    assert "training.max_steps: 4 -> 6" in log and "--allow-config-change" in log
    proc = run_cli([*_args(tiny_model, pages, out, "training.max_steps=6"), "--allow-config-change"])
    assert proc.returncode == 0, log_tail(proc.stdout + proc.stderr)
    assert sorted(logged_losses(out)) == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / "final" / "dist_vdr_complete.json").read_text())["step"] == 6
    assert (out / "final.previous").is_dir()


def test_killed_after_the_last_checkpoint_writes_final_without_an_extra_step(finished, tiny_model, pages, tmp_path):
    """Killed between the last checkpoint and final/: the rerun resumes at the last step and writes the
    model; transformers would train one step past max_steps there (guarded in trainer._run_epoch)."""
    out = _copy(finished, tmp_path / "run")
    shutil.rmtree(out / "final")
    log = _train(tiny_model, pages, out)
    assert "checkpoint-4" in log.split("resuming from")[1].splitlines()[0]
    assert "step 5" not in log and "training finished at step 4" in log
    assert json.loads((out / "final" / "dist_vdr_complete.json").read_text())["step"] == 4
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_sigterm_saves_the_step_and_stops(tiny_model, pages, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "dist_vdr.cli", *_args(tiny_model, pages, out, "training.max_steps=400",
                                                           "training.save_steps=1000")]
    proc = subprocess.Popen(args, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    for line in proc.stdout:  # wait until training runs
        lines.append(line)
        if "step 1/400 done" in line:
            proc.send_signal(signal.SIGTERM)
            break
    lines.extend(proc.stdout)
    assert proc.wait(timeout=120) == 0, log_tail("".join(lines))
    log = "".join(lines)
    assert "received SIGTERM: saving a checkpoint at the next step boundary" in log
    stopped = int(log.split("stopped by SIGTERM at step ")[1].split(":")[0])
    from dist_vdr.checkpoints.store import latest_complete

    assert latest_complete(out).name == f"checkpoint-{stopped}" and 1 <= stopped < 400


def test_ctrl_c_of_a_one_process_run_mid_training_saves_the_step(tiny_model, pages, tmp_path):
    """SIGINT seconds into training (not at its first step): the recipe's imports start threads before the stop
    signals were blocked, and one of them took the signal with the default action -- exit 130, no checkpoint,
    a stale lock (the guard's hostile-input campaign). Blocked from the process's start now."""
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "dist_vdr.cli", *_args(tiny_model, pages, out, "training.max_steps=400",
                                                           "training.save_steps=1000")]
    # As a user starts it: the libraries' default thread pools (one thread each, as the suite sets, starts fewer).
    env = {k: v for k, v in launch_env(preload=False).items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "step 1/400 done" in line:
            break
    time.sleep(4)  # well into the steps
    proc.send_signal(signal.SIGINT)
    lines.extend(proc.stdout)
    log = "".join(lines)
    assert proc.wait(timeout=120) == 0, log_tail(log)
    stopped = int(log.split("stopped by SIGINT at step ")[1].split(":")[0])
    from dist_vdr.checkpoints.store import latest_complete

    assert latest_complete(out).name == f"checkpoint-{stopped}" and 1 < stopped < 400
    assert not (out / ".dist_vdr.lock").exists()


def _launcher_args(model, pages, out, *more) -> list[str]:
    # 400 steps: the first run must still be training when the second launch (tens of seconds to
    # start on a loaded machine) reaches the lock; it is killed long before its end.
    return ["bash", "launch/train.sh", "launch/cpu.yaml", "--config", RECIPE,
            *tiny_overrides(model, pages, out, "training.max_steps=400", "evaluation.enabled=false",
                            "training.global_batch_size=8", *more)]


def test_one_writer_per_folder_and_ranks_die_with_their_launcher(tiny_model, pages, tmp_path):
    import psutil

    out = tmp_path / "run"
    args = _launcher_args(tiny_model, pages, out)
    # Real interpreters (not the tests' preloaded Python): the claim is about the rank processes themselves.
    first = subprocess.Popen(args, cwd=REPO, env=launch_env(preload=False), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list(out.glob("checkpoint-*/dist_vdr_complete.json")):
            assert first.poll() is None and time.time() < deadline, "first run ended before the test could act"
            time.sleep(0.05)
        # (a) A second launch into the same folder (another rendezvous port) is refused, naming the holder.
        second = subprocess.run(args, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, log_tail(second.stdout + second.stderr)
        assert "is in use by another run (host" in second.stderr and "Traceback" not in second.stderr
        # (b) kill -9 of the launcher's process group: torch elastic put the ranks in sessions of their
        # own, so only the parent-death signal stops them.
        ranks = [p for p in psutil.Process(first.pid).children(recursive=True)
                 if "dist_vdr.cli" in " ".join(p.cmdline())]
        assert len(ranks) == 2, ranks
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        gone, alive = psutil.wait_procs(ranks, timeout=20)
        assert not alive, f"ranks outlived their launcher: {alive}"
    finally:
        kill_tree(first) if first.poll() is None else None
    # (c) The dead run's lock is stale (its process ended): the rerun takes it over and resumes (two
    # more steps than its newest checkpoint, so that it ends soon: the schedule change is allowed).
    from dist_vdr.checkpoints.store import checkpoint_step, latest_complete

    last = checkpoint_step(latest_complete(out))
    third = subprocess.run([*args, f"training.max_steps={last + 2}", "--allow-config-change"], cwd=REPO,
                           env=launch_env(), capture_output=True, text=True, timeout=400)
    log = third.stdout + third.stderr
    assert third.returncode == 0, log_tail(log)
    assert "took over the lock of" in log and "has ended" in log
    assert f"checkpoint-{last}" in log.split("resuming from")[1].splitlines()[0]
    assert sorted(logged_losses(out)) == list(range(1, last + 3)) and not (out / ".dist_vdr.lock").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MiB file system (tmpfs; needs root, as `make test` on CI has): a tiny checkpoint is 3.7 MB."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                                          capture_output=True).returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("cannot mount a tmpfs here (root needed) for the full-disk test")
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_one_line_and_the_retry_resumes(tiny_model, pages, small_disk):
    out = small_disk / "run"
    log = _train(tiny_model, pages, out, expect=2)
    line = _error_line(log)
    assert line.startswith(f"error: no space left on the device of {out}") and "GiB free" in line, line
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    log = _train(tiny_model, pages, out)
    assert "set aside as incomplete-checkpoint-2-" in log and "starting a new run" in log
    assert sorted(logged_losses(out)) == [1, 2, 3, 4]
