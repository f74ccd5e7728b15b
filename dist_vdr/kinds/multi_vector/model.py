"""Build the multi-vector model a recipe describes, and run its forward as (token embeddings, scoring mask).

The model is sentence-transformers' ``MultiVectorEncoder`` (6.2) over a vision-language backbone, the module
layout ST itself gives a bare backbone and that ``dist-vdr make-tiny-model --multi-vector`` saves:

- ``0 Transformer`` (feature-extraction): the backbone's last hidden states, ``features["token_embeddings"]``
  ``[B, T, H]``; the processor renders text and page images through the chat template.
- ``1 Dense(H -> token_dim, bias=False, identity)`` on ``token_embeddings`` (ColQwen's ``custom_text_proj``;
  128-d in the published recipes).
- ``2 MultiVectorMask``: overwrites ``features["attention_mask"]`` with the *scoring* mask, a bool ``[B, T]``:
  the tokenizer's real tokens (padding dropped) minus the skiplist, which here is the tokenizer's special tokens
  other than the image / video placeholders (``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``,
  ``<|vision_end|>``, ``<|endoftext|>``, ...) on queries and pages alike; with ``image_tokens_only`` a page
  keeps its image-patch tokens only (colpali-engine's ``mask_non_image_embeddings``). It reads the forward's
  ``task`` keyword: ``"query"`` or ``"document"`` (:data:`TASKS`).
- ``3 Normalize`` on ``token_embeddings``: L2 per token (padded positions are normalised too: only the mask
  tells them apart).

``task`` reaches the mask as sentence-transformers passes it: ``encode_query`` / ``encode_document`` call
``encode(task=...)``, which calls ``model.preprocess(inputs, prompt=..., task=task)`` (the Transformer's
per-task length, query expansion and chat-template ``task`` variable) and then ``model(features, task=task)``;
``BaseModel.forward`` hands each module the keywords its ``forward_kwargs`` names, and ``MultiVectorMask``
names ``task``. :func:`preprocess` and :func:`forward_tokens` do the same for a training batch.

Not here yet: masking the query's instruction (ST 6.2's mask
has no such option: a prompt becomes a system message of the chat template, whose token span ST does not
track), hybrid single-vector heads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dist_vdr import log
from dist_vdr.config import ModelConfig
from dist_vdr.kinds.multi_vector.scoring import TASKS

if TYPE_CHECKING:
    from torch import Tensor

logger = log.get(__name__)

DEFAULT_TOKEN_DIM = 128
"""The token vectors' dimension of a new projection (ColQwen / ColPali and sentence-transformers' default)."""
MULTI_VECTOR_TYPES = ("MultiVectorEncoder", "ColBERT")
"""``model_type`` values of ``config_sentence_transformers.json`` that MultiVectorEncoder loads as its own
(``ColBERT``: PyLate's saves)."""


def _task(kind: str) -> str:
    if kind not in TASKS:
        raise ValueError(f"kind must be one of {tuple(TASKS)}, got {kind!r}")
    return TASKS[kind]


def is_multi_vector_model(name_or_path: str) -> bool:
    """Whether ``name_or_path`` is a saved MultiVectorEncoder (its ``config_sentence_transformers.json`` says so;
    for a hub id that one file is fetched)."""
    from sentence_transformers.util import load_file_path

    config = load_file_path(name_or_path, "config_sentence_transformers.json")
    return config is not None and json.loads(Path(config).read_text()).get("model_type") in MULTI_VECTOR_TYPES


def is_multi_vector_folder(path: str) -> bool:
    """Whether the local folder ``path`` holds a saved MultiVectorEncoder, or a multi-vector run's adapter (a
    checkpoint of a LoRA run; nothing is fetched): the kind's recogniser of model folders that record no kind."""
    from dist_vdr.models import adapters

    if adapters.is_adapter_folder(path):
        return adapters.record_of(path).get("task") == "multi_vector"
    config = Path(path) / "config_sentence_transformers.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") in MULTI_VECTOR_TYPES


def token_dim_of(model) -> int:
    """The dimension of the model's token vectors (the last Dense's output; else the backbone's hidden size)."""
    from sentence_transformers.base.modules import Dense

    dims = [m.out_features for m in model if isinstance(m, Dense)]
    return dims[-1] if dims else model[0].get_embedding_dimension()


token_dim = token_dim_of  # the name the Task uses (a parameter of build_multi_vector shadows it there)


def special_token_skiplist(transformer) -> list[str]:
    """The tokens :class:`MultiVectorMask` drops from scoring: the tokenizer's special tokens (chat-template
    markers, vision start / end, padding) except the image and video placeholders, which carry the page."""
    tokenizer = transformer.tokenizer
    processor = transformer.processor
    content = {getattr(processor, "image_token", None), getattr(processor, "video_token", None)}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return [tok.content for _, tok in sorted(added.items()) if tok.special and tok.content not in content]


def multi_vector_head(transformer, token_dim: int = DEFAULT_TOKEN_DIM, *, seed: int = 0,
                      image_tokens_only: bool = False) -> list:
    """The modules after ``transformer`` (module docstring): a new projection to ``token_dim``, drawn from
    ``seed`` alone (the global random stream is left as it was, so every rank and a 1-process run start from the
    same projection), the scoring mask and the per-token normalisation."""
    import torch
    from sentence_transformers.base.modules import Dense, Normalize
    from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask

    if token_dim < 1:
        raise ValueError(f"token_dim must be positive, got {token_dim}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projection = Dense(transformer.get_embedding_dimension(), token_dim, bias=False,
                           activation_function=torch.nn.Identity(), module_input_name="token_embeddings")
    keep = None
    if image_tokens_only:
        image_token = getattr(transformer.processor, "image_token", None)
        if image_token is None:
            raise ValueError("image_tokens_only: this processor names no image token")
        keep = [transformer.tokenizer.convert_tokens_to_ids(image_token)]
    mask = MultiVectorMask(special_token_skiplist(transformer), skiplist_tasks=["query", "document"],
                           keep_only_token_ids=keep)
    return [projection, mask, Normalize(module_input_name="token_embeddings")]


def _backbone_folder(path: str) -> str:
    """Where the backbone's transformers files are: a local SentenceTransformer folder's Transformer module
    (the root folder for the models dist-vdr and sentence-transformers save), else ``path`` itself."""
    modules = Path(path) / "modules.json"
    if not modules.is_file():
        return path
    for entry in json.loads(modules.read_text()):
        if str(entry.get("type", "")).endswith(".Transformer"):
            return str(Path(path) / entry.get("path", ""))
    raise ValueError(f"model.name_or_path={path!r}: its modules.json holds no Transformer module to build a "
                     f"multi-vector model on")


def build_multi_vector(model_cfg: ModelConfig, *, precision: str = "fp32", device: str = "cpu", seed: int = 0,
                       token_dim: int = DEFAULT_TOKEN_DIM, image_tokens_only: bool = False, hybrid: bool = False,
                       pooling: str | None = None):
    """The MultiVectorEncoder of ``model_cfg`` on ``device``, its weights in the dtype and attention
    implementation ``model.dtype`` / ``model.attn_implementation`` resolve to (as the embedding kind's), with
    the recipe's LoRA adapter (``model.adapter``) on the backbone.

    A saved MultiVectorEncoder (``make-tiny-model --multi-vector``, a run's ``final/``, a ColBERT / ColPali-style
    checkpoint sentence-transformers loads) keeps its own modules; ``token_dim``, ``image_tokens_only`` and
    ``seed`` do not apply to it. Any other backbone (a plain vision-language checkpoint, or a SentenceTransformer
    such as Qwen3-VL-Embedding, whose pooling is dropped) gets :func:`multi_vector_head`: a new projection to
    ``token_dim`` drawn from ``seed``. With an adapter, the modules after the backbone (the projection) are
    trained in full beside it (ColQwen trains its projection so) and saved with it; a folder written by such a
    run loads as its base, the same head, the adapter and the trained head. ``hybrid``: a ``Pooling`` module right
    after the backbone too (:func:`add_pooling`), unless the model has one: its ``sentence_embedding`` is the
    single vector of a hybrid model."""
    import dataclasses

    from dist_vdr.config import AdapterConfig
    from dist_vdr.models import adapters
    from dist_vdr.models.build import check_model_path

    path = check_model_path(model_cfg.name_or_path, "make-tiny-model --multi-vector")
    if adapters.is_adapter_folder(path):
        if model_cfg.adapter.type:
            raise ValueError(f"model.name_or_path={path!r} is a LoRA adapter: to train it further, give its base "
                             f"model as model.name_or_path and this folder as model.adapter.init_from")
        record = adapters.record_of(path)
        base, section = adapters.base_of(path)
        model = build_multi_vector(dataclasses.replace(model_cfg, name_or_path=base, adapter=AdapterConfig()),
                                   precision=precision, device=device, **record.get("head", {}))
        adapters.attach(model, dataclasses.replace(section, init_from=path), base,
                        trained_modules=tuple(record.get("trained_modules", ())), record=_adapter_record(record))
        adapters.check_base(model, path)
        return model
    model = _build_base(model_cfg, path, precision=precision, device=device, seed=seed, token_dim=token_dim,
                        image_tokens_only=image_tokens_only)
    if hybrid and not is_hybrid(model):
        add_pooling(model, path, pooling or model_cfg.pooling)
    if model_cfg.adapter.type:
        base = str(Path(path).resolve()) if Path(path).is_dir() else path
        head = {} if is_multi_vector_model(path) else \
            {"token_dim": token_dim, "seed": seed, "image_tokens_only": image_tokens_only}
        if hybrid:
            head.update(hybrid=True, pooling=pooling or model_cfg.pooling)
        trained = tuple(f"{i}." for i, module in enumerate(model) if i and any(True for _ in module.parameters()))
        count = adapters.attach(model, model_cfg.adapter, base=base, seed=seed, trained_modules=trained,
                                record=_adapter_record({"head": head}))
        logger.info(f"model.adapter: LoRA r={model_cfg.adapter.rank} + the token projection, {count} trainable "
                    f"parameters of {sum(p.numel() for p in model.parameters())}; the backbone is frozen")
        if model_cfg.gradient_checkpointing:  # frozen inputs would give the checkpointed blocks no gradient path
            model[0].model.enable_input_require_grads()
    return model


def is_hybrid(model) -> bool:
    """Whether the model also pools a single vector (a ``Pooling`` module in its pipeline)."""
    from sentence_transformers.sentence_transformer.modules import Pooling

    return any(isinstance(module, Pooling) for module in model)


def add_pooling(model, path: str, pooling: str = "auto") -> None:
    """Insert a ``Pooling`` module right after the backbone: it reads the backbone's token states (before the
    projection) and writes ``sentence_embedding``, which the later modules leave alone. ``pooling`` auto: the
    base's own Pooling mode when ``path`` is a SentenceTransformer folder that has one (Qwen3-VL-Embedding: last
    token), else last token."""
    from sentence_transformers.sentence_transformer.modules import Pooling

    mode = pooling
    if mode == "auto":
        mode = "lasttoken"
        modules = Path(path) / "modules.json"
        for entry in json.loads(modules.read_text()) if modules.is_file() else []:
            config = Path(path) / entry.get("path", "") / "config.json"
            if str(entry.get("type", "")).endswith(".Pooling") and config.is_file():
                mode = json.loads(config.read_text()).get("pooling_mode", mode)
    pooling_module = Pooling(model[0].get_embedding_dimension(), pooling_mode=mode)
    modules = list(model)
    for key in list(model._modules):
        del model._modules[key]
    for i, module in enumerate([modules[0], pooling_module, *modules[1:]]):
        model.add_module(str(i), module)
    logger.info("hybrid: %s pooling of the backbone's %d-d states as the single vector", mode,
                model[0].get_embedding_dimension())


def _adapter_record(record: dict) -> dict:
    """What a multi-vector adapter folder records beside the base: its kind, and how a new head was built."""
    return {"task": "multi_vector", "head": record.get("head", {})}


def _build_base(model_cfg: ModelConfig, path: str, *, precision: str, device: str, seed: int, token_dim: int,
                image_tokens_only: bool):
    from sentence_transformers import MultiVectorEncoder
    from sentence_transformers.base.modules import Transformer

    from dist_vdr.models.build import model_load_kwargs

    load_kwargs = model_load_kwargs(model_cfg, precision, device.startswith("cuda"))
    processor_kwargs = dict(model_cfg.processor_kwargs) or None
    if is_multi_vector_model(path):
        model = MultiVectorEncoder(path, device=device, trust_remote_code=model_cfg.trust_remote_code,
                                   model_kwargs=load_kwargs, processor_kwargs=processor_kwargs)
        if token_dim != token_dim_of(model) or image_tokens_only:
            logger.info("%s is a saved MultiVectorEncoder: its own %d-d head is kept (multi_vector.token_dim and "
                        "image_tokens_only apply to a new head only)", path, token_dim_of(model))
    else:
        config_kwargs = {"trust_remote_code": True} if model_cfg.trust_remote_code else None
        transformer = Transformer(_backbone_folder(path), model_kwargs=load_kwargs, processor_kwargs=processor_kwargs,
                                  config_kwargs=config_kwargs)
        head = multi_vector_head(transformer, token_dim, seed=seed, image_tokens_only=image_tokens_only)
        # MultiVectorEncoder casts the head to the backbone's dtype.
        model = MultiVectorEncoder(modules=[transformer, *head], device=device)
        logger.info("%s is no MultiVectorEncoder: a new %d-d token projection (seed %d), special tokens masked",
                    path, token_dim, seed)
    if model_cfg.gradient_checkpointing:
        model[0].model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def preprocess(model, inputs: list, kind: str) -> dict[str, Any]:
    """The input features of a batch of queries (``kind="query"``, texts) or pages (``"page"``, images), prepared
    as ``encode_query`` / ``encode_document`` prepare them: the model's ``query`` / ``document`` prompt (else its
    default prompt) and ``task``. On the CPU; move them with the batch."""
    task = _task(kind)
    if task in model.prompts:
        prompt = model.prompts[task]
    else:
        prompt = model.prompts.get(model.default_prompt_name) if model.default_prompt_name else None
    return model.preprocess(inputs, prompt=prompt, task=task)


def forward_tokens(model, features: dict[str, Any], kind: str) -> tuple[Tensor, Tensor]:
    """``(token_embeddings [B, T, D], mask [B, T] bool)`` of one forward of ``features`` (:func:`preprocess`'s,
    on the model's device) as a query (``kind="query"``) or page (``"page"``) batch: ``mask`` is True where a
    token is scored (:func:`~dist_vdr.kinds.multi_vector.scoring.from_masked` turns the pair into a
    representation). Differentiable; the caller picks grad / no_grad / autocast.

    ``features`` is left as it was: the modules write their outputs into the dict they are given (the mask
    replaces ``attention_mask``), so the forward runs on a shallow copy, and a second forward of the same
    ``features`` (gradient caching's recomputation) sees the tokenizer's attention mask again."""
    out = model(dict(features), task=_task(kind))
    return out["token_embeddings"], out["attention_mask"].bool()
