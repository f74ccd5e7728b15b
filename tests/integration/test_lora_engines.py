"""LoRA under DeepSpeed ZeRO-2/3 and FSDP2, through the real launcher on CPU (gloo), against LoRA under DDP.

Per engine, with the recipe, data and global batch of the DDP run (itself equal to one process in
test_lora): every step's loss and gradient norm, the final adapter and the evaluator's metrics equal
DDP's; the base is bit-identical after training (the merged model is base + B @ A); checkpoints hold
no frozen weight; a checkpoint continues on 2 ranks with 4x more mini-batches (same losses, same
gradient reductions per step: one per step whatever the replays) and on 1 rank (same losses).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    ENGINES,
    REDUCTIONS,
    assert_merged_is_base_plus_update,
    assert_same_step,
    logged_losses,
    train_engine,
)
from dist_vdr.models import adapters

RECIPE = "configs/tiny-lora.yaml"
STEPS = 6


def _train(launch: str, out: Path, nproc: int, extensions_dir: Path, tiny_model, pages, *more: str) -> str:
    return train_engine(launch, RECIPE, out, nproc, extensions_dir, tiny_model, pages, "training.learning_rate=5e-3",
                        *more, steps=STEPS)


def _first_run(launch: str, out: Path, extensions_dir, tiny_model, pages) -> str:
    return _train(launch, out, 2, extensions_dir, tiny_model, pages, "data.max_eval_queries=8",
                  "launch.log_collectives=true", "model.adapter.merge_on_save=true")


def _assert_same_curve(got: Path, ref: Path, steps) -> None:
    for key in ("loss", "grad_norm"):
        a, b = logged_losses(got, key), logged_losses(ref, key)
        for step in steps:
            assert_same_step(key, step, a[step], b[step], first_step=min(steps))


def _per_step(out: Path) -> dict[int, dict]:
    lines = (out / "collectives" / "rank0.jsonl").read_text().splitlines()
    return {r["step"]: {k: v for k, v in r["calls"].items() if k in REDUCTIONS} for r in map(json.loads, lines)}


_runs: dict = {}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_model, pages, extensions_dir) -> Path:
    out = tmp_path_factory.mktemp("lora-ddp") / "run"
    _first_run("cpu", out, extensions_dir, tiny_model, pages)
    return out


def _engine_run(engine: str, tmp_path_factory, tiny_model, pages, extensions_dir) -> tuple[Path, str]:
    if engine not in _runs:
        out = tmp_path_factory.mktemp(f"lora-{engine}") / "run"
        _runs[engine] = (out, _first_run(engine, out, extensions_dir, tiny_model, pages))
    return _runs[engine]


@pytest.mark.parametrize("engine", ENGINES)
def test_lora_under_the_engine_trains_like_ddp(engine, ddp_run, tmp_path_factory, tiny_model, pages, extensions_dir):
    out, log = _engine_run(engine, tmp_path_factory, tiny_model, pages, extensions_dir)
    assert ("FSDP2: 5 sharded units" if engine == "cpu_fsdp2" else "DeepSpeed") in log
    assert "model.adapter: LoRA r=4" in log
    _assert_same_curve(out, ddp_run, range(1, STEPS + 1))

    mine = load_file(str(out / "final" / adapters.ADAPTER_WEIGHTS))
    ddp = load_file(str(ddp_run / "final" / adapters.ADAPTER_WEIGHTS))
    assert set(mine) == set(ddp)
    assert max((mine[k] - ddp[k]).abs().max().item() for k in ddp) < 2e-5
    assert not (out / "final" / "model.safetensors").exists()  # the adapter alone, the merged model beside
    assert_merged_is_base_plus_update(tiny_model, out / "final", scale=8.0 / 4)

    # Checkpoints hold no frozen weight: the engine's model file has adapter keys only (DeepSpeed), no
    # model shards at all (FSDP2: the adapter file and the optimizer state of the adapter).
    ckpt = out / "checkpoint-2"
    assert (ckpt / adapters.ADAPTER_WEIGHTS).is_file()
    if engine == "cpu_fsdp2":
        assert not list(ckpt.glob("pytorch_model_fsdp*")) and (ckpt / "optimizer_0").is_dir()
    else:
        for states in (ckpt / "global_step2").glob("*model_states.pt"):
            module = torch.load(states, map_location="cpu", weights_only=False)["module"]
            assert module and all("lora_" in k for k in module), sorted(module)[:3]
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    print(f"{engine} LoRA checkpoint: {size} bytes")

    # The sharded evaluator ran on the adapted model under the engine and agrees with DDP.
    metrics, ref = (json.loads((d / "metrics.json").read_text()) for d in (out, ddp_run))
    assert metrics["before"] == ref["before"]
    for dim, values in ref["after"].items():
        assert metrics["after"][dim]["ndcg@10"] == pytest.approx(values["ndcg@10"], abs=1e-4)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_lora_checkpoint_continues_with_one_reduction_per_step(engine, tmp_path_factory, tiny_model, pages,
                                                                  extensions_dir):
    """Continued from step 2 on 2 ranks with mini-batches of 1 (8 replays per rank and step instead of 2):
    the same losses and, step by step, the same gradient reductions; then on 1 rank: the same losses."""
    ref, _ = _engine_run(engine, tmp_path_factory, tiny_model, pages, extensions_dir)
    base = tmp_path_factory.mktemp(f"lora-{engine}-resume")
    for name, nproc, more in (("mb1", 2, ["loss.mini_batch_size=1", "launch.log_collectives=true"]),
                              ("2to1", 1, [])):
        out = base / name
        out.mkdir()
        shutil.copytree(ref / "checkpoint-2", out / "checkpoint-2")
        log = _train(engine, out, nproc, extensions_dir, tiny_model, pages, "evaluation.enabled=false", *more)
        assert "resuming from" in log
        _assert_same_curve(out, ref, range(3, STEPS + 1))
    continued, first = _per_step(base / "mb1"), _per_step(ref)
    assert sorted(continued) == list(range(3, STEPS + 1))
    for step, reductions in continued.items():
        assert reductions and reductions == first[step], (step, reductions, first[step])
