"""Engine plumbing without processes: refusal of an engine that did not start, DeepSpeed config
adjustments, checkpoint metadata used for resharded resume."""

from __future__ import annotations

import json
import types

import pytest

from dist_vdr.checkpoints import store as checkpoint
from dist_vdr.distributed import DistInfo
from dist_vdr.engines import gradient_cache as engines
from dist_vdr.run.setup import check_engine as _check_engine


def _trainer(deepspeed: bool, fsdp: bool):
    return types.SimpleNamespace(is_deepspeed_enabled=deepspeed, is_fsdp_enabled=fsdp)


def test_requested_engine_that_did_not_start_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="asks for fsdp but the trainer set up DDP"):
        _check_engine(_trainer(False, False), DistInfo(world_size=2))
    _check_engine(_trainer(False, True), DistInfo(world_size=2))  # started: fine
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="asks for deepspeed"):
        _check_engine(_trainer(False, True), DistInfo(world_size=2))


def test_deepspeed_config_gathers_zero3_weights_and_loads_universal():
    args = types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(
        deepspeed_config={"zero_optimization": {"stage": 3}}))
    engines.configure_deepspeed(args, load_universal=True)
    ds = args.deepspeed_plugin.deepspeed_config
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["checkpoint"]["load_universal"] is True
    args2 = types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(
        deepspeed_config={"zero_optimization": {"stage": 2}}))
    engines.configure_deepspeed(args2, load_universal=False)
    assert args2.deepspeed_plugin.deepspeed_config == {"zero_optimization": {"stage": 2}}
    engines.configure_deepspeed(types.SimpleNamespace(deepspeed_plugin=None), load_universal=True)  # DDP: no-op


def test_universal_conversion_refuses_a_non_deepspeed_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="holds no DeepSpeed checkpoint"):
        engines.make_universal(str(tmp_path))


def test_marker_records_the_rank_count(tmp_path):
    checkpoint.write_marker(tmp_path, {"step": 4, "world_size": 2})
    assert checkpoint.saved_world_size(tmp_path) == 2
    (tmp_path / checkpoint.MARKER_FILE).write_text(json.dumps({"step": 4}))
    assert checkpoint.saved_world_size(tmp_path) is None
    assert checkpoint.saved_world_size(tmp_path / "missing") is None
