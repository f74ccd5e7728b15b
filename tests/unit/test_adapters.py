"""LoRA adapters on the tiny model: what is trained, what is saved, what loads back (one process)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image
from sentence_transformers import SentenceTransformer

from conftest import run_cli
from dist_vdr.config import AdapterConfig, ModelConfig, load_config
from dist_vdr.models import adapters
from dist_vdr.models.build import build_model

LORA = AdapterConfig(type="lora", rank=4, alpha=8.0)


def _model(path, adapter=LORA):
    return build_model(ModelConfig(name_or_path=str(path), adapter=adapter))


def _perturb(model, seed=0):
    """A trained-looking adapter: LoRA's B starts at zero (the adapter is a no-op until trained)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)


def _embed(model):
    page = Image.new("RGB", (64, 48), (200, 30, 30))
    return model.encode([{"text": "what is on the page"}, {"image": page}], convert_to_tensor=True)


def test_only_the_adapter_trains_and_the_default_targets_skip_the_vision_tower(tiny_model):
    model = _model(tiny_model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all("language_model" in n for n in trainable)  # vision tower off by default
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"}
    with_vision = _model(tiny_model, dataclasses.replace(LORA, vision=True))
    assert any("visual.blocks" in n for n, p in with_vision.named_parameters() if p.requires_grad)
    only_q = _model(tiny_model, dataclasses.replace(LORA, target_modules=["q_proj"]))
    assert {n.split(".")[-4] for n, p in only_q.named_parameters() if p.requires_grad} == {"q_proj"}


def test_a_saved_adapter_loads_back_onto_its_base(tiny_model, tmp_path):
    model = _model(tiny_model)
    _perturb(model)
    adapters.save(model, tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert files == {adapters.ADAPTER_WEIGHTS, adapters.ADAPTER_CONFIG, adapters.RECORD}
    size = (tmp_path / "adapter" / adapters.ADAPTER_WEIGHTS).stat().st_size
    full = (tiny_model / "model.safetensors").stat().st_size
    assert size < 0.1 * full, (size, full)
    loaded = build_model(ModelConfig(name_or_path=str(tmp_path / "adapter")))  # what `dist-vdr eval` does
    assert torch.allclose(_embed(loaded), _embed(model), atol=1e-6)
    assert not torch.allclose(_embed(loaded), _embed(build_model(ModelConfig(name_or_path=str(tiny_model)))),
                              atol=1e-4)
    continued = _model(tiny_model, dataclasses.replace(LORA, init_from=str(tmp_path / "adapter")))
    assert torch.allclose(_embed(continued), _embed(model), atol=1e-6)
    # sentence-transformers' own loader reads the folder (PEFT's format) onto the base: the same model
    stock = SentenceTransformer(str(tiny_model), device="cpu")
    stock.load_adapter(str(tmp_path / "adapter"))
    assert torch.allclose(_embed(stock), _embed(model), atol=1e-6)


def test_merge_adapter_writes_the_merged_model(tiny_model, tmp_path):
    model = _model(tiny_model)
    _perturb(model, seed=2)
    adapters.save(model, tmp_path / "adapter")
    proc = run_cli(["merge-adapter", str(tmp_path / "adapter"), str(tmp_path / "merged")])
    assert proc.returncode == 0 and "merged model in" in proc.stdout, proc.stderr[-2000:]
    plain = SentenceTransformer(str(tmp_path / "merged"), device="cpu")
    assert torch.allclose(_embed(plain), _embed(model), atol=1e-5)
    (tmp_path / "mine").mkdir()  # a user's folder is never replaced (an earlier merge would be: the output guard)
    (tmp_path / "mine" / "notes.txt").write_text("x")
    again = run_cli(["merge-adapter", str(tmp_path / "adapter"), str(tmp_path / "mine")])
    assert again.returncode == 2 and "is a folder that is not an output of `merge-adapter`" in again.stderr
    wrong = run_cli(["merge-adapter", str(tiny_model), str(tmp_path / "m2")])
    assert wrong.returncode == 2 and "is not the folder of a LoRA run" in wrong.stderr


def test_the_merged_model_is_a_plain_model_with_the_same_embeddings(tiny_model, tmp_path):
    model = _model(tiny_model)
    _perturb(model, seed=1)
    merged = adapters.merged_copy(model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert adapters.is_adapted(model) and not adapters.is_adapted(merged)
    merged.save_pretrained(str(tmp_path / "merged"), create_model_card=False)
    plain = build_model(ModelConfig(name_or_path=str(tmp_path / "merged")))
    assert torch.allclose(_embed(plain), _embed(model), atol=1e-5)
    assert set(plain.state_dict()) == set(build_model(ModelConfig(name_or_path=str(tiny_model))).state_dict())


def test_adapter_mistakes_are_one_line_errors(tiny_model, tmp_path):
    model = _model(tiny_model)
    adapters.save(model, tmp_path / "r4")
    with pytest.raises(ValueError, match="does not fit this model's adapter"):
        _model(tiny_model, dataclasses.replace(LORA, rank=8, init_from=str(tmp_path / "r4")))
    with pytest.raises(ValueError, match="holds no adapter_model.safetensors"):
        _model(tiny_model, dataclasses.replace(LORA, init_from=str(tiny_model)))
    with pytest.raises(ValueError, match="is a LoRA adapter: to train it further"):
        _model(tmp_path / "r4")
    with pytest.raises(ValueError, match="target_modules"):
        _model(tiny_model, dataclasses.replace(LORA, target_modules=["no_such_module"]))
    with pytest.raises(ValueError, match="model.adapter.rank must be >= 1"):
        load_config(None, ["model.adapter.type=lora", "model.adapter.rank=0"], check_paths=False)
    with pytest.raises(ValueError, match="model.adapter applies to task=embedding or multi_vector; remove it for "
                                         "task=reranker"):
        load_config(None, ["task=reranker", "model.adapter.type=lora"], check_paths=False)


def test_the_adapter_starts_from_the_seed_alone(tiny_model):
    """Every rank and a 1-process run must start from the same adapter (found: 1 vs 2 ranks differed)."""
    def lora(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    torch.manual_seed(1)
    a = lora(build_model(ModelConfig(name_or_path=str(tiny_model), adapter=LORA), seed=7))
    state = torch.random.get_rng_state()
    torch.manual_seed(2)
    b = lora(build_model(ModelConfig(name_or_path=str(tiny_model), adapter=LORA), seed=7))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = lora(build_model(ModelConfig(name_or_path=str(tiny_model), adapter=LORA), seed=8))
    assert not all(torch.equal(a[k], c[k]) for k in a)
    torch.manual_seed(1)
    build_model(ModelConfig(name_or_path=str(tiny_model), adapter=LORA), seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global stream: as the same build leaves it


def test_an_adapter_of_a_relative_base_loads_from_another_directory(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_model.parent)
    model = _model(tiny_model.name)  # the base named relative to the working directory
    adapters.save(model, tmp_path / "adapter")
    monkeypatch.chdir(tmp_path)
    assert adapters.base_of(tmp_path / "adapter")[0] == str(tiny_model.resolve())
    loaded = build_model(ModelConfig(name_or_path=str(tmp_path / "adapter")))
    assert torch.allclose(_embed(loaded), _embed(model), atol=1e-6)


def test_adapters_average_only_with_the_same_configuration_and_base(tiny_model, tmp_path):
    """alpha 8 averaged with alpha 32 was written as alpha 8 (the second update scaled by 1/4): refused now, by
    the key that differs; the same configuration averages."""
    from dist_vdr.checkpoints.averaging import average

    for name, adapter, seed in (("a", LORA, 1), ("b", dataclasses.replace(LORA, alpha=32.0), 2), ("c", LORA, 3)):
        model = _model(tiny_model, adapter)
        _perturb(model, seed)
        adapters.save(model, tmp_path / name)
    with pytest.raises(ValueError, match=r"another adapter than .*alpha: 8.0 vs 32.0"):
        average([tmp_path / "a", tmp_path / "b"], tmp_path / "ab")
    with pytest.raises(ValueError, match="hold LoRA adapters and .* full models"):
        average([tmp_path / "a", tiny_model], tmp_path / "am")
    out = average([tmp_path / "a", tmp_path / "c"], tmp_path / "ac")
    assert adapters.base_of(out)[1].alpha == 8.0 and not (tmp_path / "ab").exists()


def test_an_adapter_refuses_a_base_replaced_by_another_model_of_the_same_shapes(tiny_model, tmp_path):
    import shutil

    from conftest import perturbed_copy

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    model = _model(base)
    _perturb(model)
    adapters.save(model, tmp_path / "adapter")
    assert adapters.base_of(tmp_path / "adapter")[0] == str(base.resolve())
    loaded = build_model(ModelConfig(name_or_path=str(tmp_path / "adapter")))  # the base it was trained on
    assert torch.allclose(_embed(loaded), _embed(model), atol=1e-5)
    bf16 = build_model(ModelConfig(name_or_path=str(tmp_path / "adapter"), dtype="bfloat16"))  # same base, bf16
    assert adapters.is_adapted(bf16)
    shutil.rmtree(base)
    perturbed_copy(tiny_model, base, 0.01)  # same files, same shapes, other weights
    with pytest.raises(ValueError, match="was trained on another base model than the one now at"):
        build_model(ModelConfig(name_or_path=str(tmp_path / "adapter")))
