"""training.keep_best / training.final=best: the checkpoint with the best evaluation during training is kept
beside the newest ones, and final/ can hold its weights."""

from __future__ import annotations

import pytest

from dist_vdr import distributed
from dist_vdr.checkpoints import store as checkpoint


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

    from dist_vdr.engines.trainers import _DistVdrTrainerMixin

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
