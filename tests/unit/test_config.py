"""Config loading and validation: every user mistake gives a ValueError that names the problem."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dist_vdr.config import Config, to_yaml
from dist_vdr.config import load_config as _load_config
from dist_vdr.models.build import check_dims

REPO = Path(__file__).resolve().parents[2]


def load_config(path=None, overrides=()):
    """Parsing and value checks only: the recipes' demo paths need not exist here (tested below)."""
    return _load_config(path, overrides, check_paths=False)


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
        (["loss.name=triplet"], "loss.name='triplet' is not a loss of task=embedding; use one of ['cmnrl', 'mnrl']"),
        (["training.precision=fp8"], "training.precision"),
        (["loss.matryoshka_dims=[64,64]"], "duplicates"),
        (["loss.matryoshka_dims=[64,0]"], "positive"),
        (["loss.matryoshka_dims=[64,32]", "loss.matryoshka_weights=[1]"], "one weight per"),
        (["training.trainer_args={bf16: true}"], "use the training.* keys"),
        (["data.max_train_samples=0"], "data.max_train_samples"),
        (["no_equals_sign"], "section.key=value"),
        (["training.learning_rate=-1e-3"], "training.learning_rate must be > 0, got -0.001 (from the override"),
        (["training.lr_scheduler_type=cosinus"], "training.lr_scheduler_type='cosinus' is not one of"),
        (["training.logging_steps=0"], "training.logging_steps must be a whole number"),
        (["training.save_steps=2.5"], "training.save_steps must be a whole number"),
        (["training.eval_steps=-1"], "training.eval_steps must be a whole number"),
        (["training.warmup_ratio=1.0"], "training.warmup_ratio must be in [0, 1)"),
        (["training.save_total_limit=-1"], "training.save_total_limit must be >= 1"),
        (["training.save_total_limit=0"], "training.save_total_limit must be >= 1"),
        (["training.weight_decay=-0.1"], "training.weight_decay must be >= 0"),
        (["evaluation.main_metric=ndgc@10"], "evaluation.main_metric='ndgc@10' is not a computed metric"),
        (["evaluation.main_metric=ndcg@7"], "evaluation.main_metric='ndcg@7' is not a computed metric"),
        (["training.trainer_args={save_total_limit: 3}"], "use the training.* keys"),
    ],
)
def test_bad_config_is_a_clear_value_error(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
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


def test_the_override_is_blamed_not_the_recipe():
    with pytest.raises(ValueError) as err:
        load_config(REPO / "configs/tiny.yaml", ["training.global_batch_size=lots"])
    assert "in the override training.global_batch_size=lots" in str(err.value)
    assert "tiny.yaml" not in str(err.value)
    with pytest.raises(ValueError, match=r"training.learning_rate must be > 0, got 0.0 \(from the override"):
        load_config(REPO / "configs/tiny.yaml", ["training.learning_rate=0"])


def test_a_value_set_by_the_recipe_file_is_blamed_on_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("training:\n  learning_rate: -1\n")
    with pytest.raises(ValueError, match=r"learning_rate must be > 0, got -1.0 \(in .*r.yaml\)"):
        load_config(recipe)


def test_a_top_level_list_is_one_clear_error(tmp_path):
    recipe = tmp_path / "list.yaml"
    recipe.write_text("- model: x\n- data: y\n")
    with pytest.raises(ValueError, match=r"must be a mapping of sections \(model:, data:, training: ...\), not a list"):
        load_config(recipe)


def test_local_looking_paths_must_exist_hub_ids_pass(tmp_path, monkeypatch):
    """The rule of dist_vdr.sources: a typo in a local path is refused at load, never taken as a hub id."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "artifacts" / "pages").mkdir(parents=True)
    (tmp_path / "artifacts" / "tiny-model").mkdir()
    ok = _load_config(None, ["model.name_or_path=artifacts/tiny-model", "data.path=artifacts/pages"])
    assert ok.model.name_or_path == "artifacts/tiny-model"
    for override, key in [("data.path=artifacts/pagez", "data.path"),
                          ("model.name_or_path=artifacts/tiny-modl", "model.name_or_path"),
                          ("model.name_or_path=./tiny-model", "model.name_or_path"),
                          ("model.name_or_path=~/no-such-model-here", "model.name_or_path"),
                          ("data.path=a/b/c", "data.path")]:
        others = ["model.name_or_path=artifacts/tiny-model", "data.path=artifacts/pages"]
        with pytest.raises(ValueError, match=rf"{key}='[^']+': no such .*fix the path"):
            _load_config(None, [*others, override])
    # Hub ids: org/name whose org is not a local folder, or explicit hf:// (even when a folder shadows it).
    hub = _load_config(None, ["model.name_or_path=Qwen/Qwen3-VL-Embedding-2B", "data.path=hf://artifacts/pages"])
    assert hub.model.name_or_path == "Qwen/Qwen3-VL-Embedding-2B" and hub.data.path == "artifacts/pages"
    with pytest.raises(ValueError, match="data.eval_qrels_file='missing.trec': no such file"):
        _load_config(None, ["model.name_or_path=artifacts/tiny-model", "data.path=artifacts/pages",
                            "data.eval_qrels_file=missing.trec"])
    # The embedded default recipe before the demo built its inputs: refused, not a hub download.
    monkeypatch.chdir(tmp_path / "artifacts")
    with pytest.raises(ValueError, match=r"model.name_or_path='./artifacts/tiny-model': no such model folder"):
        _load_config(REPO / "configs/tiny.yaml")
