"""LoRA through the real launcher: 2 ranks equal 1 process, only the adapter trains and is saved,
a killed run resumes onto the same losses, the merged model is the base plus the adapter's update."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from conftest import (
    assert_merged_is_base_plus_update,
    assert_same_step,
    kill_after_first_checkpoint,
    logged_losses,
    run_cli,
    run_launcher,
    tiny_overrides,
)
from dist_vdr.models import adapters

RECIPE = "configs/tiny-lora.yaml"
STEPS = 6


def _args(model, pages, out, *more):
    return ["--config", RECIPE, *tiny_overrides(model, pages, out, f"training.max_steps={STEPS}",
                                                "evaluation.enabled=false", "training.learning_rate=5e-3",
                                                *more)]


def _folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_lora_on_two_ranks_trains_like_one_process_and_saves_the_adapter_alone(tiny_model, pages, shared_runs,
                                                                            tmp_path):
    one = run_cli(["train", *_args(tiny_model, pages, tmp_path / "one", "launch.device=cpu")])
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    assert "model.adapter: LoRA r=4" in one.stdout and "the base is frozen" in one.stdout
    two = shared_runs["lora-ddp"]  # these _args on 2 ranks, merged on save (conftest.SHARED_RUNS)
    for key in ("loss", "grad_norm"):
        a, b = logged_losses(tmp_path / "one", key), logged_losses(two, key)
        assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
        for step in a:
            assert_same_step(key, step, b[step], a[step])
    w1 = load_file(str(tmp_path / "one" / "final" / adapters.ADAPTER_WEIGHTS))
    w2 = load_file(str(two / "final" / adapters.ADAPTER_WEIGHTS))
    assert set(w1) == set(w2) and max((w1[k] - w2[k]).abs().max().item() for k in w1) < 2e-5

    # Checkpoints and final/ hold the adapter (and its optimizer state) alone.
    ckpt = tmp_path / "one" / f"checkpoint-{STEPS}"
    assert (ckpt / adapters.ADAPTER_WEIGHTS).is_file() and not (ckpt / "model.safetensors").exists()
    full = shared_runs["tiny-one"]  # the whole model trained in one process, its checkpoint of step 2
    lora_size, full_size = _folder_bytes(tmp_path / "one" / "checkpoint-2"), _folder_bytes(full / "checkpoint-2")
    print(f"tiny checkpoint: LoRA {lora_size} bytes vs full {full_size} bytes ({100 * lora_size / full_size:.1f} %)")
    assert lora_size <= 0.05 * full_size

    # The base stayed bit-identical: merged = the base files + the adapter's update, nothing else moved.
    assert_merged_is_base_plus_update(tiny_model, two / "final", scale=8.0 / 4)


def test_a_killed_lora_run_resumes_onto_the_same_losses(tiny_model, shared_runs, tmp_path):
    out = tmp_path / "killed"
    kill_after_first_checkpoint(shared_runs.command("lora-ddp", out), out)
    resumed = run_launcher("launch/cpu.yaml", shared_runs.args("lora-ddp", out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    a, b = logged_losses(shared_runs["lora-ddp"]), logged_losses(out)
    assert sorted(a) == sorted(b)
    for step in a:
        assert_same_step("loss", step, b[step], a[step])
    record = json.loads((out / "final" / adapters.RECORD).read_text())
    assert record["base_model"] == str(tiny_model) and record["adapter"]["rank"] == 4
