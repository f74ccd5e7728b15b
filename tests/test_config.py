"""Config loading and validation: every user mistake gives a ValueError that names the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_vdr.config import Config, load_config, to_yaml
from dist_vdr.model import check_dims

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, Config)
    cfg.resolve_batch(1)


def test_published_recipe_values():
    cfg = load_config(REPO / "configs/qwen3-vl-embedding-2b-vdr.yaml")
    assert cfg.model.name_or_path == "Qwen/Qwen3-VL-Embedding-2B"
    assert cfg.model.processor_kwargs == {"min_pixels": 28 * 28, "max_pixels": 600 * 600}
    assert cfg.loss.name == "cmnrl" and cfg.loss.mini_batch_size == 1
    assert cfg.loss.matryoshka_dims == [2048, 1536, 1024, 512, 256, 128, 64]
    assert cfg.data.path == "tomaarsen/llamaindex-vdr-en-train-preprocessed"
    assert cfg.data.train_columns == ["query", "image", "negative_0"]
    assert cfg.training.global_batch_size == 64 and cfg.resolve_batch(1) == 64
    assert cfg.training.learning_rate == 2e-5 and cfg.training.warmup_ratio == 0.1
    assert cfg.training.num_epochs == 1 and cfg.training.precision == "bf16" and cfg.training.seed == 42
    assert cfg.training.save_steps == 0.1 and cfg.training.eval_steps == 0.1 and cfg.training.save_total_limit == 2


def test_overrides_apply_and_convert_types():
    cfg = load_config(REPO / "configs/tiny.yaml", ["training.max_steps=7", "loss.matryoshka_dims=[32,16]"])
    assert cfg.training.max_steps == 7
    assert cfg.loss.matryoshka_dims == [32, 16]


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs/tiny.yaml", ["training.max_steps=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss.mini_batchsize=4"], "unknown config key 'loss.mini_batchsize'"),
        (["modle.name_or_path=x"], "unknown config key 'modle'"),
        (["training.global_batch_size=lots"], "training.global_batch_size"),
        (["loss.name=triplet"], "loss.name='triplet' is not one of"),
        (["training.precision=fp8"], "training.precision"),
        (["loss.matryoshka_dims=[64,64]"], "duplicates"),
        (["loss.matryoshka_dims=[64,0]"], "positive"),
        (["loss.matryoshka_dims=[64,32]", "loss.matryoshka_weights=[1]"], "one weight per"),
        (["training.trainer_args={bf16: true}"], "use the training.* keys"),
        (["data.max_train_samples=0"], "data.max_train_samples"),
        (["no_equals_sign"], "section.key=value"),
    ],
)
def test_bad_config_is_a_clear_value_error(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(REPO / "configs/tiny.yaml", overrides)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("training:\n  global_batchsize: 8\n")
    with pytest.raises(ValueError, match=r"unknown config key 'training.global_batchsize' in .*unknown.yaml"):
        load_config(unknown)


def test_global_batch_must_split_over_ranks_and_accumulation():
    cfg = load_config(None, ["training.global_batch_size=64", "training.gradient_accumulation_steps=2"])
    assert cfg.resolve_batch(1) == 32
    assert cfg.resolve_batch(4) == 8
    with pytest.raises(ValueError, match="not divisible by world size 3 x gradient_accumulation_steps 2"):
        cfg.resolve_batch(3)


def test_per_device_batch_must_agree_with_global():
    cfg = load_config(None, ["training.global_batch_size=64", "training.per_device_batch_size=16"])
    assert cfg.resolve_batch(4) == 16
    with pytest.raises(ValueError, match="disagrees with global_batch_size=64"):
        cfg.resolve_batch(2)


def test_matryoshka_dim_larger_than_model():
    check_dims([64, 32], 64, "loss.matryoshka_dims")
    with pytest.raises(ValueError, match=r"loss.matryoshka_dims \[128\] exceed the model's embedding dimension 64"):
        check_dims([128, 64], 64, "loss.matryoshka_dims")


def test_eval_dims_default_to_matryoshka_dims():
    cfg = load_config(None, ["loss.matryoshka_dims=[64,32]"])
    assert cfg.eval_dims(64) == [64, 32]
    assert load_config(None).eval_dims(48) == [48]
    assert load_config(None, ["evaluation.dims=[16]"]).eval_dims(64) == [16]
