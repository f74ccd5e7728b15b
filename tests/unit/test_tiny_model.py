"""The offline tiny Qwen3-VL: real architecture and processor, loads through sentence-transformers."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from dist_vdr.config import ModelConfig
from dist_vdr.kinds.tiny import build_tiny_model
from dist_vdr.models.build import build_model, resolve_attn_implementation, resolve_dtype


def test_loads_offline_with_last_token_pooling_and_normalize(tiny_model):
    from sentence_transformers import SentenceTransformer
    from transformers import Qwen3VLModel, Qwen3VLProcessor

    model = SentenceTransformer(str(tiny_model), device="cpu")
    names = [type(m).__name__ for m in model]
    assert names == ["Transformer", "Pooling", "Normalize"]
    assert model[1].pooling_mode == "lasttoken"
    assert isinstance(model[0].model, Qwen3VLModel)
    processor = model[0].processor
    assert isinstance(processor, Qwen3VLProcessor)
    assert processor.video_processor is not None and processor.image_processor is not None
    assert model.get_embedding_dimension() == 64

    page = Image.new("RGB", (170, 220), (31, 80, 200))
    emb = model.encode(["a page with a blue header", page], convert_to_tensor=True)
    assert emb.shape == (2, 64)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    feats = model.preprocess([page])
    assert feats["pixel_values"].shape[0] > 0 and "image_grid_thw" in feats


def test_tokenizer_has_qwen_special_tokens_and_chat_template(tiny_model):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(tiny_model))
    for tok in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|video_pad|>"):
        assert proc.tokenizer.convert_tokens_to_ids(tok) != proc.tokenizer.unk_token_id
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                    tokenize=False)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text


def test_build_is_idempotent_and_refuses_foreign_folders(tiny_model, tmp_path):
    assert build_tiny_model(tiny_model) == tiny_model  # complete model kept, not rebuilt
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a tiny embedding model"):
        build_tiny_model(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_raw_vlm_gets_last_token_pooling(tiny_model, tmp_path):
    """A folder without modules.json (a plain transformers checkpoint) gets lasttoken + Normalize."""
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(tiny_model, raw)
    (raw / "modules.json").unlink()
    model = build_model(ModelConfig(name_or_path=str(raw)), device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    assert model[1].pooling_mode == "lasttoken"
    mean = build_model(ModelConfig(name_or_path=str(raw), pooling="mean"), device="cpu")
    assert mean[1].pooling_mode == "mean"


def test_model_config_kwargs_reach_the_model(tiny_model):
    cfg = ModelConfig(name_or_path=str(tiny_model), dtype="bfloat16", attn_implementation="eager",
                      processor_kwargs={"max_pixels": 64 * 64})
    model = build_model(cfg, device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model[0].model.config._attn_implementation == "eager"
    grid = model.preprocess([Image.new("RGB", (170, 220))])["image_grid_thw"]
    assert int(grid.prod()) * 16 * 16 <= 64 * 64  # the page was resized to the pixel budget


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="make-tiny-model"):
        build_model(ModelConfig(name_or_path=str(tmp_path / "missing")), device="cpu")


def test_auto_choices():
    assert resolve_attn_implementation("auto", on_cuda=False) == "sdpa"
    assert resolve_attn_implementation("eager", on_cuda=True) == "eager"
    assert resolve_dtype("auto", "bf16", on_cuda=True) == "bfloat16"
    assert resolve_dtype("auto", "bf16", on_cuda=False) == "float32"


def test_marker_records_spec(tiny_model):
    spec = json.loads((tiny_model / "dist_vdr_tiny_model.json").read_text())
    assert spec["hidden_size"] == 64
