"""training.keep_best / training.final=best: the checkpoint with the best evaluation during training is kept
beside the newest ones, and final/ can hold its weights."""

from __future__ import annotations

import json

import pytest

from conftest import launch_env, log_tail, run_launcher, tiny_overrides
from dist_vdr import checkpoint, distributed


def _checkpoint(out, step: int, metric: float | None):
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w")
    checkpoint.mark_complete(folder, distributed.DistInfo(), {"step": step, **({"metric": metric} if metric else {})})


def test_the_best_checkpoint_survives_rotation(tmp_path):
    for step, metric in ((2, 0.5), (4, 0.7), (6, 0.7), (8, 0.6), (10, None)):
        _checkpoint(tmp_path, step, metric)
    assert checkpoint.best_checkpoint(tmp_path).name == "checkpoint-4"  # the earliest of equals
    deleted = checkpoint.rotate(tmp_path, 1, keep_best=True)
    assert sorted(p.name for p in deleted) == ["checkpoint-2", "checkpoint-6", "checkpoint-8"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-4"]


def test_keep_best_needs_evaluations_at_the_checkpoints():
    from dist_vdr.config import load_config

    with pytest.raises(ValueError, match="eval_steps equal to training.save_steps"):
        load_config(None, ["training.keep_best=true", "training.save_steps=2"], check_paths=False)
    with pytest.raises(ValueError, match="set training.keep_best=true"):
        load_config(None, ["training.final=best"], check_paths=False)


def saved_weights(folder) -> dict:
    """The model weights a checkpoint or model folder holds, read without dist-vdr: model.safetensors, or for
    an FSDP2 checkpoint its DCP shards through torch's own converter (keys as in model.safetensors)."""
    import tempfile

    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(folder / "pytorch_model_fsdp_0"), f"{tmp}/model.pt")
        state = torch.load(f"{tmp}/model.pt", weights_only=True)["model"]
    assert all(k.startswith("0.model.") for k in state), sorted(state)[:3]  # the tiny model has no head weights
    return {k[len("0.model."):]: v for k, v in state.items()}


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["cpu", "cpu_zero3", "cpu_fsdp2"])
def test_final_holds_the_weights_of_the_best_evaluated_checkpoint(launch, tiny_model, pages, tmp_path, extensions_dir):
    out = tmp_path / "run"
    # A constant, too large learning rate: the held-out NDCG peaks early, then falls (measured: 0.1853, 0.1201,
    # 0.1436, 0.1597 at steps 2, 4, 6, 8): the best is not the last step.
    args = ["--config", "configs/tiny.yaml", *tiny_overrides(tiny_model, pages, out), "training.max_steps=8",
            "training.save_steps=2", "training.eval_steps=2", "training.save_total_limit=1",
            "training.keep_best=true", "training.final=best", "data.max_eval_queries=16",
            "training.lr_scheduler_type=constant", "training.learning_rate=2e-2"]
    result = run_launcher(f"launch/{launch}.yaml", args, env=launch_env(TORCH_EXTENSIONS_DIR=str(extensions_dir)),
                          timeout=400)
    assert result.returncode == 0, log_tail(result.stdout + result.stderr)
    newest = checkpoint.latest_complete(out)
    state = json.loads((newest / "trainer_state.json").read_text())
    evals = {h["step"]: h["eval_dim64_cosine_ndcg@10"] for h in state["log_history"]
             if "eval_dim64_cosine_ndcg@10" in h}
    assert sorted(evals) == [2, 4, 6, 8]
    best = max(evals, key=lambda s: (evals[s], -s))
    assert best < 8, evals
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert kept == sorted({f"checkpoint-{best}", "checkpoint-8"}), (kept, evals)
    marker = json.loads((out / "final" / checkpoint.MARKER_FILE).read_text())
    after = json.loads((out / "metrics_after.json").read_text())["metrics"]["64"]["ndcg@10"]
    assert after == pytest.approx(evals[best], abs=1e-6)  # the evaluation after training is of the best weights
    assert marker["weights_of_step"] == best and "final/ takes the weights of" in result.stdout
    import torch

    a, b, last = (saved_weights(f) for f in (out / "final", out / f"checkpoint-{best}", out / "checkpoint-8"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    assert not all(torch.equal(a[k], last[k]) for k in last)  # and not the last step's
    assert checkpoint.verify(out / "final", distributed.DistInfo()) == []


def test_a_nan_evaluation_never_wins_and_keep_best_needs_the_evaluation(tmp_path):
    from dist_vdr.config import load_config

    _checkpoint(tmp_path, 2, float("nan"))
    _checkpoint(tmp_path, 4, 0.5)
    assert checkpoint.best_checkpoint(tmp_path).name == "checkpoint-4"
    with pytest.raises(ValueError, match="evaluation.enabled=true"):
        load_config(None, ["training.keep_best=true", "training.save_steps=2", "training.eval_steps=2",
                           "evaluation.enabled=false"], check_paths=False)


def test_final_best_is_not_loaded_into_a_deepspeed_engine_that_cannot_read_it(tmp_path):
    """DeepSpeed's optimizer partitions load on as many ranks only, and an engine resumed from a universal
    checkpoint reads universal ones only: final/ then stays the last step (the run warns), never a crash at the end."""
    from types import SimpleNamespace

    from dist_vdr.st_trainers import _DistVdrTrainerMixin

    _checkpoint(tmp_path, 2, 0.5)  # marked by one rank
    folder = str(tmp_path / "checkpoint-2")

    def engine(universal: bool):
        return SimpleNamespace(is_deepspeed_enabled=True,
                               model_wrapped=SimpleNamespace(load_universal_checkpoint=lambda: universal))

    check = _DistVdrTrainerMixin.cannot_load_weights_of
    assert check(engine(False), folder, 1) is None
    assert "written by 1 rank(s), this run has 2" in check(engine(False), folder, 2)
    assert "universal" in check(engine(True), folder, 1)
    assert check(SimpleNamespace(is_deepspeed_enabled=False), folder, 2) is None  # DDP / FSDP2 reshard
