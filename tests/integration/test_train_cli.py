"""End to end through the real launcher: 2 CPU processes (gloo), resume after a kill, bad inputs.

These start real processes with `launch/train.sh launch/cpu.yaml` (accelerate launch -> torchrun
workers), exactly as a user does.
"""

from __future__ import annotations

import math
import re
import subprocess

from conftest import (
    REPO,
    kill_after_first_checkpoint,
    launch_env,
    logged_losses,
    python_of,
    run_cli,
    run_launcher,
    tiny_overrides,
)

RECIPE = "configs/tiny.yaml"


def test_killed_run_resumes_to_the_same_final_loss(shared_runs, tmp_path):
    """The shared 2-rank run, SIGKILLed with all its processes after its first checkpoint and launched again,
    logs the uninterrupted run's loss at every step."""
    steps = 6  # conftest.SHARED_RUNS["tiny-ddp"]
    ref_out = shared_runs["tiny-ddp"]
    out = tmp_path / "interrupted"
    kill_after_first_checkpoint(shared_runs.command("tiny-ddp", out), out)
    from dist_vdr.checkpoints.store import latest_complete

    killed_at = latest_complete(out)
    assert killed_at is not None and int(killed_at.name.split("-")[1]) < steps

    resumed = run_launcher("launch/cpu.yaml", shared_runs.args("tiny-ddp", out))
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-4000:]
    m = re.search(r"resuming from \S*checkpoint-(\d+)", log)
    assert m and int(m.group(1)) < steps, log[-3000:]
    for rank in (0, 1):
        assert f"[dist-vdr rank {rank}/2] training finished at step {steps}" in log

    ref_losses, got = logged_losses(ref_out), logged_losses(out)
    assert sorted(got) == list(range(1, steps + 1)) == sorted(ref_losses)
    for step in got:
        assert math.isclose(got[step], ref_losses[step], rel_tol=1e-5), (step, got[step], ref_losses[step])


def test_accelerate_cpu_flag_trap_is_refused(tiny_model, pages, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process: the world-size guard refuses it."""
    out = tmp_path / "trap"
    env = launch_env()
    cmd = [python_of(env), "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "-m", "dist_vdr.cli",
           "train", "--config", RECIPE, *tiny_overrides(tiny_model, pages, out), "launch.expected_world_size=2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "launch.expected_world_size=2 but 1 process(es) joined" in proc.stderr
    assert not out.exists()


def test_bad_input_exits_nonzero_and_keeps_existing_outputs(tiny_model, pages, tmp_path):
    from dist_vdr.checkpoints.store import write_marker

    out = tmp_path / "existing"
    ckpt = out / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    write_marker(ckpt, {"step": 2})
    (out / "metrics_before.json").write_text("{}")
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    cases = [
        (["training.not_a_key=1"], "unknown config key 'training.not_a_key'"),
        (["training.global_batch_size=15", "training.gradient_accumulation_steps=2"], "not divisible"),
        (["data.negative_columns=[negative_9]"], "no column(s) ['negative_9']"),
        (["loss.matryoshka_dims=[128,64]"], "exceed the model's embedding dimension 64"),
    ]
    for extra, message in cases:
        proc = run_cli(["train", "--config", RECIPE, *tiny_overrides(tiny_model, pages, out), *extra])
        assert proc.returncode == 2, (extra, proc.stderr[-2000:])
        assert proc.stderr.strip().splitlines()[-1].startswith("error: "), proc.stderr[-1500:]
        assert message in proc.stderr, proc.stderr[-1500:]
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot


def test_two_ranks_log_the_losses_of_one_process_with_the_global_batch(shared_runs):
    """End to end: global no-duplicates sampler + global-batch loss + DDP + the trainer's loss logging.

    One process with batch 16 and two processes with 8 each see the same rows in the same order, so
    every logged loss (the mean over ranks) must be the same (the shared runs tiny-one and tiny-ddp).
    """
    assert "loss: MatryoshkaLoss(CachedMultipleNegativesRankingLoss" in shared_runs.log("tiny-one")
    a, b = logged_losses(shared_runs["tiny-one"]), logged_losses(shared_runs["tiny-ddp"])
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=1e-5), (step, a[step], b[step])
