"""The multi-vector kind's model: the offline tiny MultiVectorEncoder, loading it, its forward and its masks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from dist_vdr import kinds
from dist_vdr.config import ModelConfig
from dist_vdr.kinds.multi_vector.model import build_multi_vector, forward_tokens, preprocess, special_token_skiplist
from dist_vdr.kinds.multi_vector.scoring import from_masked, pad_tokens
from dist_vdr.kinds.tiny import MARKER_FILE, SPECIAL_TOKENS, TinyModelSpec, build_tiny_multi_vector

QUERIES = ["red bar chart", "which page shows a large blue pie chart with five parts"]


@pytest.fixture(scope="module")
def tiny_mv(tmp_path_factory):
    return build_tiny_multi_vector(tmp_path_factory.mktemp("models") / "tiny-mv")


@pytest.fixture(scope="module")
def loaded(tiny_mv):
    return build_multi_vector(ModelConfig(name_or_path=str(tiny_mv)), precision="fp32", device="cpu")


def _pages():
    return [Image.new("RGB", (170, 220), (31, 80, 200)), Image.new("RGB", (96, 64), (200, 40, 40))]


def test_tiny_model_is_a_multi_vector_encoder_and_records_its_kind(tiny_mv, loaded):
    spec = TinyModelSpec()
    assert json.loads((tiny_mv / kinds.KIND_FILE).read_text()) == {"task": "multi_vector"}
    assert json.loads((tiny_mv / MARKER_FILE).read_text())["kind"] == "multi_vector"
    config = json.loads((tiny_mv / "config_sentence_transformers.json").read_text())
    assert config["model_type"] == "MultiVectorEncoder"
    assert [type(m).__name__ for m in loaded] == ["Transformer", "Dense", "MultiVectorMask", "Normalize"]
    assert loaded.get_embedding_dimension() == spec.token_dim
    assert sorted(loaded[2].skiplist_words) == sorted(set(SPECIAL_TOKENS) - {"<|image_pad|>", "<|video_pad|>"})
    assert build_tiny_multi_vector(tiny_mv) == tiny_mv  # complete: kept, not rebuilt


def test_loads_in_sentence_transformers_with_identical_token_embeddings(tiny_mv, loaded):
    from sentence_transformers import MultiVectorEncoder

    theirs = MultiVectorEncoder(str(tiny_mv), device="cpu")
    page = _pages()[0]
    for encode in ("encode_query", "encode_document"):
        inputs = [QUERIES[0]] if encode == "encode_query" else [page]
        a, b = getattr(theirs, encode)(inputs)[0], getattr(loaded, encode)(inputs)[0]
        assert a.shape[-1] == TinyModelSpec().token_dim and len(a) > 0
        assert torch.equal(a, b)
        assert torch.allclose(a.norm(dim=-1), torch.ones(len(a)), atol=1e-5)


@pytest.mark.parametrize("kind", ["query", "page"])
def test_forward_masks_padding_and_special_tokens_and_matches_encode(loaded, kind):
    inputs = QUERIES if kind == "query" else _pages()
    features = preprocess(loaded, inputs, kind)
    attention = features["attention_mask"].clone()
    with torch.no_grad():
        tokens, mask = forward_tokens(loaded, features, kind)
    assert torch.equal(features["attention_mask"], attention)  # the caller's features are left as they were
    assert mask.dtype == torch.bool and mask.shape == tokens.shape[:2] == attention.shape
    assert not (mask & ~attention.bool()).any()  # padding never scored
    assert (attention.sum(dim=1) > attention.sum(dim=1).min()).any()  # the batch was padded
    skip = torch.tensor([loaded.tokenizer.convert_tokens_to_ids(t) for t in special_token_skiplist(loaded[0])])
    special = torch.isin(features["input_ids"], skip)
    assert special[attention.bool()].any()  # the chat template's markers are there...
    assert torch.equal(mask, attention.bool() & ~special)  # ...and are all that is dropped besides padding
    if kind == "page":
        image = features["input_ids"] == loaded.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert not (image & ~mask).any()  # every image patch scored

    encode = loaded.encode_query if kind == "query" else loaded.encode_document
    listed = encode(inputs)
    assert [len(t) for t in listed] == mask.sum(dim=1).tolist()
    torch.testing.assert_close(from_masked(tokens, mask, kind), pad_tokens(listed, kind), atol=1e-5, rtol=1e-4)


def test_plain_backbone_gets_a_seeded_projection(tiny_mv, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(tiny_mv, raw)
    for name in ("modules.json", "config_sentence_transformers.json", kinds.KIND_FILE):
        (raw / name).unlink()
    cfg = ModelConfig(name_or_path=str(raw), dtype="bfloat16", attn_implementation="eager")
    a = build_multi_vector(cfg, device="cpu", token_dim=16, seed=3, image_tokens_only=True)
    b = build_multi_vector(cfg, device="cpu", token_dim=16, seed=3)
    assert [type(m).__name__ for m in a] == ["Transformer", "Dense", "MultiVectorMask", "Normalize"]
    assert a.get_embedding_dimension() == 16
    assert torch.equal(a[1].linear.weight, b[1].linear.weight)
    assert a[0].model.dtype == a[1].linear.weight.dtype == torch.bfloat16  # the projection follows the backbone
    assert a[0].model.config._attn_implementation == "eager"
    image_id = a.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert a[2].keep_only_token_ids == [image_id]
    page = preprocess(a, _pages()[:1], "page")
    query = preprocess(a, QUERIES[:1], "query")
    with torch.no_grad():
        _, page_mask = forward_tokens(a, page, "page")
        _, as_query = forward_tokens(a, query, "query")
        _, as_page = forward_tokens(a, query, "page")
    assert torch.equal(page_mask, page["input_ids"] == image_id)  # a page scores its image patches only...
    assert as_query.sum() > 0 and as_page.sum() == 0  # ...a query all its text: the task reached the mask
    with pytest.raises(ValueError, match="kind must be one of"):
        forward_tokens(a, query, "document")


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="make-tiny-model --multi-vector"):
        build_multi_vector(ModelConfig(name_or_path=str(tmp_path / "missing")))


def test_lora_trains_the_new_projection_beside_the_adapter_and_reloads(tmp_path):
    """A bare backbone (here the tiny embedding model, whose pooling is dropped) with model.adapter: the adapter on
    the backbone and the new projection are trainable, the rest frozen; the saved adapter folder reloads as the
    same model (base, head built again from its record, adapter, trained head); merge-adapter writes a plain
    MultiVectorEncoder with the same token embeddings, which sentence-transformers loads."""
    from sentence_transformers import MultiVectorEncoder

    from dist_vdr.config import AdapterConfig
    from dist_vdr.kinds.tiny import build_tiny_model
    from dist_vdr.models import adapters
    from dist_vdr.models.build import merge_adapter_folder

    backbone = build_tiny_model(tmp_path / "tiny")
    cfg = ModelConfig(name_or_path=str(backbone), adapter=AdapterConfig(type="lora", rank=4))
    model = build_multi_vector(cfg, token_dim=16, seed=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("1.") for n in trainable)
    assert "1.linear.weight" in trainable
    with torch.no_grad():  # as if trained: the adapter's B (zero at start) and the projection move
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    folder = tmp_path / "adapter"
    adapters.save(model, folder)
    assert (folder / adapters.TRAINED_MODULES).is_file()
    assert kinds.of_folder(folder) == "multi_vector"  # recognised by its record (a checkpoint has no kind file)
    again = build_multi_vector(ModelConfig(name_or_path=str(folder)))
    query = preprocess(model, QUERIES, "query")
    page = preprocess(model, _pages(), "page")
    for features, side in ((query, "query"), (page, "page")):
        a, mask_a = forward_tokens(model.eval(), features, side)
        b, mask_b = forward_tokens(again.eval(), features, side)
        assert torch.equal(mask_a, mask_b) and torch.allclose(a, b, atol=1e-6)
    merged = merge_adapter_folder(folder, tmp_path / "merged", load=lambda c: build_multi_vector(c))
    stock = MultiVectorEncoder(str(merged), device="cpu")
    for got, ref in zip(stock.encode_document(_pages()), again.encode_document(_pages()), strict=True):
        assert torch.allclose(got, ref, atol=1e-5)
    # The trained head is checked at load: a folder without it is refused.
    (folder / adapters.TRAINED_MODULES).unlink()
    with pytest.raises(ValueError, match="holds no dist_vdr_trained_modules"):
        build_multi_vector(ModelConfig(name_or_path=str(folder)))


def test_make_tiny_model_multi_vector_command(tmp_path):
    from dist_vdr.cli.commands import build_parser

    parser = build_parser()
    out = tmp_path / "mv"
    args = parser.parse_args(["make-tiny-model", str(out), "--multi-vector", "--token-dim", "8", "--hidden-size", "32"])
    assert args.fn(args) == 0
    assert json.loads((out / kinds.KIND_FILE).read_text()) == {"task": "multi_vector"}
    assert json.loads((out / "1_Dense" / "config.json").read_text())["out_features"] == 8
    for argv, match in ((["--token-dim", "8"], "--token-dim applies to --multi-vector"),
                        (["--multi-vector", "--reranker"], "give one of them")):
        args = parser.parse_args(["make-tiny-model", str(tmp_path / "other"), *argv])
        with pytest.raises(ValueError, match=match):
            args.fn(args)


def test_same_backbone_as_the_tiny_embedding_model(tiny_mv, tiny_model):
    from safetensors.torch import load_file

    ours, theirs = load_file(str(tiny_mv / "model.safetensors")), load_file(str(tiny_model / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    for name in ("tokenizer.json", "chat_template.jinja", "processor_config.json"):
        assert (tiny_mv / name).read_text() == (tiny_model / name).read_text()
