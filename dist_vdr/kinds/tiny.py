"""Offline tiny Qwen3-VL: the real architecture and processor, random weights, a locally trained tokenizer.

Tests and the demo cannot download weights, so they train this model instead. It keeps every piece
that matters for the training path (the real ``Qwen3VLModel`` with its vision tower and deepstack,
the real ``Qwen3VLProcessor`` with image and video processors, a byte-level BPE tokenizer with the
Qwen special tokens and a chat template), only smaller: hidden size 64 and 2 layers by default.
It is saved as a sentence-transformers model with last-token pooling + Normalize, the module layout
of the real Qwen3-VL-Embedding models; the tiny reranker and the tiny multi-vector model
(:func:`build_tiny_reranker`, :func:`build_tiny_multi_vector`) are built on the same backbone.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# One image placeholder per image; the processor expands <|image_pad|> to the number of merged patches.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The BPE merges are learnt from this text, so words of the generated queries become few tokens.
_TOKENIZER_CORPUS = (
    "a page with a header and a chart pie bar line table with parts bars points rows "
    "red orange yellow green teal blue purple pink gray black white brown "
    "one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 "
    "document report figure revenue quarterly annual summary the of and in to for is on "
    "find show which what where letter symbol glyph large small left right top bottom "
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z"
)

MARKER_FILE = "dist_vdr_tiny_model.json"


@dataclass(kw_only=True)
class TinyModelSpec:
    """Sizes of the tiny model. Defaults train a visual matching task on CPU in minutes."""

    hidden_size: int = 64
    """Text hidden size = embedding dimension."""
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    vision_depth: int = 2
    vision_hidden_size: int = 32
    vision_num_heads: int = 2
    vision_intermediate_size: int = 64
    vocab_size: int = 512
    min_pixels: int = 32 * 32
    max_pixels: int = 256 * 320
    seed: int = 0
    embedding_rows: int | None = None
    """Rows of the token embedding (null: the tokenizer's size). The real vocabulary's 151,936 rows
    matter for memory (weights and optimizer states), not for the tokens used."""
    tie_word_embeddings: bool = False
    rope_theta: float | None = None
    """Null: transformers' default for Qwen3-VL text."""
    mrope_section: tuple[int, int, int] | None = None
    """Rotary frequencies per (time, height, width); null: head_dim/2 split in three."""
    vision_out_hidden_size: int | None = None
    """Null: hidden_size."""
    deepstack_visual_indexes: tuple[int, ...] = (0,)
    token_dim: int = 32
    """The multi-vector model's token vectors (:func:`build_tiny_multi_vector`); the other kinds ignore it."""

    @classmethod
    def qwen3_vl_2b(cls, **overrides) -> TinyModelSpec:
        """The shapes of Qwen3-VL-2B (2.13 B parameters) for benchmarks: random weights, offline."""
        shapes = {"hidden_size": 2048, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
                  "head_dim": 128, "intermediate_size": 6144, "vision_depth": 24, "vision_hidden_size": 1024,
                  "vision_num_heads": 16, "vision_intermediate_size": 4096, "embedding_rows": 151936,
                  "tie_word_embeddings": True, "rope_theta": 5_000_000.0, "mrope_section": (24, 20, 20),
                  "deepstack_visual_indexes": (5, 11, 17), "min_pixels": 28 * 28, "max_pixels": 600 * 600}
        return cls(**{**shapes, **overrides})

    def __post_init__(self) -> None:
        if self.head_dim % 2 or self.head_dim < 8:
            raise ValueError(f"head_dim must be even and >= 8, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")


def _mrope_section(head_dim: int) -> list[int]:
    # Multimodal RoPE splits head_dim/2 rotary frequencies over (time, height, width).
    half = head_dim // 2
    t = half - 2 * (half // 3)
    return [t, half // 3, half // 3]


def _build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_TOKENIZER_CORPUS] * 20, trainer)
    return Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def is_tiny_model(path: str | os.PathLike, kind: str | None = None) -> bool:
    """True when ``path`` holds a complete tiny model (of ``kind``: embedding, reranker or multi_vector, when
    given)."""
    marker = Path(path) / MARKER_FILE
    if not marker.is_file():
        return False
    return kind is None or json.loads(marker.read_text()).get("kind", "embedding") == kind


def _backbone_fields(spec: TinyModelSpec) -> dict:
    """The spec as a model of a kind without token vectors records it: the markers of the previous releases, byte
    for byte (a tiny model made before ``token_dim`` existed is the same model)."""
    return {k: v for k, v in asdict(spec).items() if k != "token_dim"}


def build_tiny_model(out_dir: str | os.PathLike, spec: TinyModelSpec | None = None, *, overwrite: bool = False,
                     device: str = "cpu", dtype: str = "float32") -> Path:
    """Build and save the tiny model; returns its folder.

    Written to a temporary sibling folder and renamed into place, so an interrupted build never
    leaves a half-written model that later loads. An existing complete model is kept unless
    ``overwrite``; any other existing, non-empty folder is refused.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    spec = spec or TinyModelSpec()
    out = Path(out_dir)
    output = _start_build(out, overwrite, "embedding")
    if output is None:
        return out
    with output.writing() as tmp:
        _save_backbone(tmp, spec, device, dtype)
        # Re-save as a sentence-transformers model: module 0 keeps the HF files in the root folder.
        transformer = Transformer(str(tmp))
        st = SentenceTransformer(modules=[transformer, Pooling(spec.hidden_size, "lasttoken"), Normalize()],
                                 device="cpu")
        st.save(str(tmp))
        (tmp / MARKER_FILE).write_text(json.dumps({**_backbone_fields(spec), "kind": "embedding"}, indent=2))
    return out


def build_tiny_multi_vector(out_dir: str | os.PathLike, spec: TinyModelSpec | None = None, *,
                            overwrite: bool = False) -> Path:
    """Build and save the tiny multi-vector (late-interaction) model; returns its folder.

    A sentence-transformers ``MultiVectorEncoder`` over the backbone of :func:`build_tiny_model` (the same
    spec and seed give the same weights, tokenizer and processor): ``Transformer`` + a ``Dense`` projection
    to ``spec.token_dim`` + ``MultiVectorMask`` (padding and the chat template's special tokens are not
    scored) + a per-token ``Normalize`` (:func:`dist_vdr.kinds.multi_vector.model.multi_vector_head`).
    Records its kind (``dist_vdr_kind.json``). Atomic and idempotent like :func:`build_tiny_model`.
    """
    from sentence_transformers import MultiVectorEncoder
    from sentence_transformers.base.modules import Transformer

    from dist_vdr import kinds
    from dist_vdr.kinds.multi_vector.model import multi_vector_head

    spec = spec or TinyModelSpec()
    out = Path(out_dir)
    output = _start_build(out, overwrite, "multi_vector")
    if output is None:
        return out
    with output.writing() as tmp:
        _save_backbone(tmp, spec)
        transformer = Transformer(str(tmp))
        model = MultiVectorEncoder(modules=[transformer, *multi_vector_head(transformer, spec.token_dim,
                                                                             seed=spec.seed)], device="cpu")
        model.save(str(tmp))
        (tmp / kinds.KIND_FILE).write_text(kinds.record("multi_vector"))
        (tmp / MARKER_FILE).write_text(json.dumps({**asdict(spec), "kind": "multi_vector"}, indent=2))
    return out


def _save_backbone(tmp: Path, spec: TinyModelSpec, device: str = "cpu", dtype: str = "float32") -> None:
    """The tiny ``Qwen3VLModel`` (weights drawn from ``spec.seed``) and its processor, as transformers files
    in ``tmp``."""
    import torch
    from transformers import Qwen3VLModel

    tokenizer = _build_tokenizer(spec.vocab_size)
    config = _qwen3vl_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    # Built on ``device`` in ``dtype``: the 2B shapes initialise in seconds on a GPU, minutes on a CPU.
    with torch.device(device):
        Qwen3VLModel(config).to(getattr(torch, dtype)).save_pretrained(tmp)
    _processor(spec, tokenizer, CHAT_TEMPLATE).save_pretrained(tmp)


def _start_build(out: Path, overwrite: bool, kind: str, inputs: dict | None = None):
    """The guarded output to build in (:class:`dist_vdr.outputs.Output`: a scratch folder beside ``out``,
    renamed into place); None when a complete tiny model of ``kind`` is already there."""
    from dist_vdr.outputs import Output

    Output("make-tiny-model", "DIR", out).refuse_file()
    if out.exists() and any(out.iterdir()):
        if is_tiny_model(out, kind) and not overwrite:
            return None
        if not overwrite:
            raise ValueError(f"{out} exists and is not a tiny {kind} model; choose another folder or pass --overwrite")
    return Output("make-tiny-model", "DIR", out, inputs or {}, replace_any=True).check()


def _qwen3vl_config(spec: TinyModelSpec, tokenizer):
    from transformers import Qwen3VLConfig

    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS}
    text = dict(
        vocab_size=spec.embedding_rows or len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=32768 if spec.embedding_rows else 4096,
        rope_scaling={"rope_type": "default",
                      "mrope_section": list(spec.mrope_section or _mrope_section(spec.head_dim)),
                      "mrope_interleaved": True, **({"rope_theta": spec.rope_theta} if spec.rope_theta else {})},
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=spec.vision_depth,
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size,
        num_heads=spec.vision_num_heads,
        out_hidden_size=spec.vision_out_hidden_size or spec.hidden_size,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=2304,
        deepstack_visual_indexes=list(spec.deepstack_visual_indexes),
    )
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=spec.tie_word_embeddings,
    )


def _processor(spec: TinyModelSpec, tokenizer, chat_template: str):
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels
        ),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2),
        chat_template=chat_template,
    )


def build_tiny_reranker(out_dir: str | os.PathLike, spec: TinyModelSpec | None = None, *,
                        init_from: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Build and save the tiny multimodal reranker; returns its folder.

    The same tiny Qwen3-VL, with its language-model head (``Qwen3VLForConditionalGeneration``), the
    reranker chat template (query and document roles, answer "1" or "0") and the module layout of
    the published multimodal rerankers: ``Transformer(any-to-any)`` + ``LogitScore("1", "0")``.
    Atomic and idempotent like :func:`build_tiny_model`.

    ``init_from``: a tiny embedding model folder (e.g. the demo's trained ``runs/tiny/final``) whose
    backbone weights the reranker starts from, as real rerankers start from a pretrained VLM. From
    random weights a cross-encoder this small has no query-page interaction to start from and
    stalls (measured: the listwise loss stays at ln(1 + negatives) for 400 steps); warm-started it
    learns within ~100 steps. A folder built from another ``init_from`` is rebuilt.
    """
    import torch
    from sentence_transformers import CrossEncoder
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.cross_encoder.modules import LogitScore
    from transformers import Qwen3VLForConditionalGeneration

    from dist_vdr.kinds.reranker.model import RERANK_CHAT_TEMPLATE

    spec = spec or TinyModelSpec()
    out = Path(out_dir)
    source = str(Path(init_from).resolve()) if init_from else None
    marker = out / MARKER_FILE
    if marker.is_file() and json.loads(marker.read_text()).get("init_from") != source:
        overwrite = True  # our own derived artifact, built from another starting point
    output = _start_build(out, overwrite, "reranker", {"--init-from": source})
    if output is None:
        return out
    with output.writing() as tmp:
        tokenizer = _build_tokenizer(spec.vocab_size)
        torch.manual_seed(spec.seed + 1)
        model = Qwen3VLForConditionalGeneration(_qwen3vl_config(spec, tokenizer))
        if source:
            _load_backbone(model, Path(source))
        model.save_pretrained(tmp)
        _processor(spec, tokenizer, RERANK_CHAT_TEMPLATE).save_pretrained(tmp)
        true_id, false_id = (tokenizer.convert_tokens_to_ids(t) for t in ("1", "0"))
        reranker = CrossEncoder(modules=[Transformer(str(tmp), transformer_task="any-to-any"),
                                         LogitScore(true_token_id=true_id, false_token_id=false_id)], device="cpu")
        reranker.save(str(tmp))
        marker = {**_backbone_fields(spec), "kind": "reranker", "init_from": source}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2))
    return out


_LAYER_KEY = re.compile(r"language_model\.layers\.(\d+)\.")


def _layer_index(key: str) -> int | None:
    """Language-model layer a weight belongs to (None: not a layer weight)."""
    m = _LAYER_KEY.search(key)
    return int(m.group(1)) if m else None


def _load_backbone(model, source: Path) -> None:
    """Copy an embedding model's Qwen3-VL weights (vision tower + language model) into ``model.model``."""
    import torch
    from safetensors.torch import load_file

    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise ValueError(f"--init-from {source}: no *.safetensors weights there; give an embedding model folder "
                         f"(e.g. runs/tiny/final)")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    source_depth = 1 + max((i for k in state if (i := _layer_index(k)) is not None), default=-1)
    try:
        missing, unexpected = model.model.load_state_dict(state, strict=False)
        # Only the layers the source does not have may be missing.
        if unexpected or any(i is None or i < source_depth for i in map(_layer_index, missing)):
            raise RuntimeError(f"unexpected keys {unexpected[:3]}, missing keys {missing[:3]}")
    except RuntimeError as exc:
        raise ValueError(f"--init-from {source}: its weights do not fit the tiny reranker (build both with the same "
                         f"--hidden-size and seed): {str(exc).splitlines()[0]}") from exc
    # Layers beyond the source's start as the identity (zero output projections of attention and
    # MLP, the residual stream passes through): the warm start scores exactly as the source's
    # depth does, and the new layers add capacity for the query-page interaction.
    for layer in model.model.language_model.layers[source_depth:]:
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
