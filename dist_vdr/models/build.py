"""Build the SentenceTransformer a recipe describes.

Any sentence-transformers-loadable multimodal model works (local folder or hub id). A model that
ships ``modules.json`` keeps its own pooling; a raw vision-language model (no ``modules.json``)
gets last-token pooling + Normalize, the layout of the Qwen3-VL-Embedding models, instead of the
mean pooling sentence-transformers would pick for it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
from pathlib import Path
from typing import Any

from dist_vdr import log
from dist_vdr.config import AdapterConfig, ModelConfig
from dist_vdr.kinds import KIND_FILE
from dist_vdr.models import adapters

logger = log.get(__name__)

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def resolve_attn_implementation(requested: str, on_cuda: bool) -> str:
    """auto: flash_attention_2 when the flash_attn package is installed and we run on CUDA, else sdpa."""
    if requested != "auto":
        return requested
    if on_cuda and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def precision_of(dtype: str) -> str:
    """The precision a command (eval, mining, teacher scoring) computes in for a ``model.dtype``: bf16 weights in
    bf16, anything else in fp32."""
    return "bf16" if dtype == "bfloat16" else "fp32"


def resolve_dtype(requested: str, precision: str, on_cuda: bool) -> str:
    """auto: bf16 weights for bf16 training on CUDA (as the published recipe), fp32 otherwise."""
    if requested != "auto":
        return _DTYPES[requested]
    return "bfloat16" if (precision == "bf16" and on_cuda) else "float32"


def model_load_kwargs(cfg: ModelConfig, precision: str, on_cuda: bool) -> dict[str, Any]:
    import torch

    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, resolve_dtype(cfg.dtype, precision, on_cuda)),
        "attn_implementation": resolve_attn_implementation(cfg.attn_implementation, on_cuda),
    }
    kwargs.update(cfg.model_kwargs)
    if "torch_dtype" in kwargs:  # transformers 5 renamed it; accept the old spelling of published recipes
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    if isinstance(kwargs.get("dtype"), str) and kwargs["dtype"] != "auto":
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    return kwargs


def has_modules_json(name_or_path: str) -> bool:
    """A sentence-transformers model (SentenceTransformer or CrossEncoder): it keeps its own modules."""
    if Path(name_or_path).is_dir():
        return (Path(name_or_path) / "modules.json").is_file()
    from sentence_transformers.util.file_io import is_sentence_transformer_model

    return is_sentence_transformer_model(name_or_path)


def is_cross_encoder(name_or_path: str) -> bool:
    """A local sentence-transformers folder saved as a CrossEncoder (reranker); False for anything else."""
    import json

    config = Path(name_or_path) / "config_sentence_transformers.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "CrossEncoder"


def check_model_path(path: str, make: str = "make-tiny-model", key: str = "model.name_or_path") -> str:
    """``path`` when it is a folder or looks like a hub id (org/name); ValueError with the fix otherwise."""
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") != 1
    if looks_local and not Path(path).expanduser().is_dir():
        tool, *flags = make.split()
        raise ValueError(
            f"{key}={path!r} is not a folder (and not a hub id of the form org/name); "
            f"build the offline tiny model with `dist-vdr {tool} {' '.join(flags + [path])}`"
        )
    return path


def build_model(cfg: ModelConfig, *, precision: str = "fp32", device: str = "cpu", seed: int = 0):
    """Load the model on ``device``, with the recipe's adapter (model.adapter) on it. A folder written by
    a LoRA run is loaded as its base model with that adapter. Raises ValueError for a path that is
    neither a folder nor a hub id. ``seed``: the adapter's initialisation (training.seed)."""
    if adapters.is_adapter_folder(cfg.name_or_path):
        if cfg.adapter.type:
            raise ValueError(f"model.name_or_path={cfg.name_or_path!r} is a LoRA adapter: to train it further, "
                             f"give its base model as model.name_or_path and this folder as model.adapter.init_from")
        base, section = adapters.base_of(cfg.name_or_path)
        model = build_model(dataclasses.replace(cfg, name_or_path=base, adapter=AdapterConfig()), precision=precision,
                            device=device)
        adapters.attach(model, dataclasses.replace(section, init_from=cfg.name_or_path), base)
        adapters.check_base(model, cfg.name_or_path)
        return model
    model = _build_base(cfg, precision=precision, device=device)
    if cfg.adapter.type:
        # A local base is recorded by its absolute path: the adapter folder then loads from any directory.
        base = str(Path(cfg.name_or_path).resolve()) if Path(cfg.name_or_path).is_dir() else cfg.name_or_path
        trainable = adapters.attach(model, cfg.adapter, base=base, seed=seed)
        total = sum(p.numel() for p in model.parameters())
        logger.info(f"model.adapter: LoRA r={cfg.adapter.rank}, {trainable} trainable parameters of {total} "
                    f"({100 * trainable / total:.2f} %); the base is frozen")
        if cfg.gradient_checkpointing:  # frozen inputs would give the checkpointed blocks no gradient path
            model[0].model.enable_input_require_grads()
    return model


def merge_adapter_folder(folder: str | Path, out: str | Path, *, dtype: str = "auto",
                         trust_remote_code: bool = False, overwrite: bool = False, load=None) -> Path:
    """Write to ``out`` the base model of the adapter ``folder`` with the adapter merged in: a plain model of the
    adapter's kind (``dist-vdr merge-adapter``; ``final/merged`` of model.adapter.merge_on_save). ``load``:
    ``ModelConfig -> model`` of that kind (the command asks the folder's kind), default a SentenceTransformer."""
    from dist_vdr.outputs import Output

    if not adapters.is_adapter_folder(folder):
        raise ValueError(f"{str(folder)!r} is not the folder of a LoRA run (no {adapters.RECORD}): give its final/ "
                         f"or one of its checkpoints")
    inputs = {"ADAPTER_DIR": folder, "its base model": adapters.base_of(folder)[0]}
    output = Output("merge-adapter", "OUT_DIR", out, inputs, replace_any=overwrite).check()
    cfg = ModelConfig(name_or_path=str(folder), dtype=dtype, trust_remote_code=trust_remote_code)
    model = adapters.merge_into_base((load or build_model)(cfg))
    with output.writing({"adapter": str(Path(folder).resolve())}) as tmp:
        model.save_pretrained(str(tmp), create_model_card=False)
        kind = Path(folder) / KIND_FILE  # the merged model is of the adapter's kind
        if kind.is_file():
            shutil.copy2(kind, tmp / KIND_FILE)
    return output.path


def _build_base(cfg: ModelConfig, *, precision: str, device: str):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    on_cuda = device.startswith("cuda")
    path = check_model_path(cfg.name_or_path)
    load_kwargs = model_load_kwargs(cfg, precision, on_cuda)
    common = dict(trust_remote_code=cfg.trust_remote_code, model_kwargs=load_kwargs,
                  processor_kwargs=dict(cfg.processor_kwargs) or None)
    if cfg.pooling == "auto" and has_modules_json(path):
        model = SentenceTransformer(path, device=device, **common)
    else:
        pooling = "lasttoken" if cfg.pooling == "auto" else cfg.pooling
        config_kwargs = {"trust_remote_code": cfg.trust_remote_code} if cfg.trust_remote_code else None
        transformer = Transformer(path, model_kwargs=load_kwargs, processor_kwargs=dict(cfg.processor_kwargs) or None,
                                  config_kwargs=config_kwargs)
        dim = transformer.get_embedding_dimension()
        model = SentenceTransformer(modules=[transformer, Pooling(dim, pooling), Normalize()], device=device)
        logger.info("%s has no modules.json: using %s pooling + Normalize", path, pooling)
    if cfg.gradient_checkpointing:
        model[0].model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def compile_blocks(model) -> int:
    """torch.compile each transformer block of ``model`` in place (regional compilation); returns how many.

    Blocks are transformers' ``GradientCheckpointingLayer``s (decoder layers, vision blocks): compiling
    them rather than the whole model keeps the Python glue between them (image splitting, pooling,
    the loss) out of the graph, so pages of new sizes do not recompile the model, and the module tree
    stays as it was for DDP, FSDP2 and DeepSpeed wrapping and for checkpoints.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not blocks:
        raise ValueError("model.compile=true: this model has no transformers blocks to compile; set it to false")
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def embedding_dim(model) -> int:
    return int(model.get_embedding_dimension())


def check_dims(dims: list[int], dim: int, what: str) -> None:
    """ValueError when a Matryoshka/eval dim exceeds the model's embedding dimension."""
    too_big = [d for d in dims if d > dim]
    if too_big:
        raise ValueError(f"{what} {too_big} exceed the model's embedding dimension {dim}; use dims <= {dim}")
