"""training.report_to through the real launcher: TensorBoard event files and the trackio store, written by rank 0
alone, hold the per-step scalars of trainer_state.json, the evaluations before/after training and the resolved
recipe."""

from __future__ import annotations

import json

import pytest


def test_a_resumed_run_continues_its_tracker_run_and_a_fresh_one_opens_another(tmp_path):
    from dist_vdr.run.tracking import run_name

    fresh = run_name(tmp_path, resuming=False)
    assert fresh.startswith(f"{tmp_path.name}-")
    (tmp_path / "run_info.jsonl").write_text(json.dumps({"tracker_run": "first"}) + "\n" +
                                             json.dumps({"tracker_run": "first"}) + "\n" + '{"cut sh')
    assert run_name(tmp_path, resuming=True) == "first"  # the last complete record names it
    assert run_name(tmp_path, resuming=False) != "first"


def test_an_unwritable_trackio_store_is_refused_when_the_recipe_loads(monkeypatch, tmp_path, tiny_model, pages):
    from dist_vdr.config import load_config

    recipe = ["training.report_to=[trackio]", f"model.name_or_path={tiny_model}", f"data.path={pages}"]
    monkeypatch.setenv("TRACKIO_DIR", "/dev/null/trackio")
    with pytest.raises(ValueError, match="set TRACKIO_DIR to a writable folder"):
        load_config(None, recipe)
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "not" / "yet"))
    load_config(None, recipe)
    assert not (tmp_path / "not").exists()  # nothing created when the recipe loads


def test_a_tracker_that_is_not_installed_is_refused_with_the_install_command(monkeypatch):
    import importlib.util

    from dist_vdr.config import load_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match="pip install wandb"):
        load_config(None, ["training.report_to=[wandb]"], check_paths=False)
    with pytest.raises(ValueError, match="report_to"):
        load_config(None, ["training.report_to=[neptune]"], check_paths=False)
    assert load_config(None, ["training.report_to=[none]"], check_paths=False).training.report_to == []
    with pytest.raises(ValueError, match="names a tracker twice"):
        load_config(None, ["training.report_to=[tensorboard,tensorboard]"], check_paths=False)


def test_step_seconds_leave_out_the_evaluations_and_checkpoints_after_a_log(monkeypatch):
    """A clock that advances 1 s per training step and 10 s for the evaluation + checkpoint after step 2's log:
    every logged step_seconds is 1 s (it was 11 s for step 3, so throughput curves dipped at every evaluation)."""
    from types import SimpleNamespace

    from dist_vdr.engines import trainers as st_trainers

    clock = SimpleNamespace(t=0.0)
    monkeypatch.setattr(st_trainers.time, "perf_counter", lambda: clock.t)

    class Stock:
        def log(self, logs, *args, **kwargs):
            self.logged.append(dict(logs, step=self.state.global_step))

        def _maybe_log_save_evaluate(self, busy_s: float):
            self.log({"loss": 1.0})
            clock.t += busy_s  # evaluation, checkpoint, marker hashing

    class Trainer(st_trainers._DistVdrTrainerMixin, Stock):
        def __init__(self):  # no stock trainer: the speed bookkeeping alone
            self.logged, self.state = [], SimpleNamespace(global_step=0)
            self.args = SimpleNamespace(per_device_train_batch_size=4, world_size=2, gradient_accumulation_steps=1)
            self._since_log = (clock.t, 0)

    trainer = Trainer()
    for step in range(1, 5):
        clock.t += 1.0  # data + forward/backward + optimizer
        trainer.state.global_step = step
        trainer._maybe_log_save_evaluate(10.0 if step == 2 else 0.0)
    assert [(e["step"], e["step_seconds"], e["samples_per_second"]) for e in trainer.logged] == [
        (1, 1.0, 8.0), (2, 1.0, 8.0), (3, 1.0, 8.0), (4, 1.0, 8.0)]
