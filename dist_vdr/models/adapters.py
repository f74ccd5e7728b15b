"""LoRA adapters (PEFT) on a model's backbone: attach, freeze the base, save and load the adapter alone.

The adapter is injected into the Hugging Face module inside the first sentence-transformers module
(``model[0].model``) with PEFT's ``inject_adapter_in_model``; every other parameter is frozen, so
only the adapter reaches the optimizer, the gradient reduction and the checkpoints. A folder of a
LoRA run (a checkpoint or ``final/``) holds the adapter in PEFT's format (``adapter_config.json``,
``adapter_model.safetensors``) and ``dist_vdr_adapter.json`` naming the base model; loading it
builds the base and puts the adapter on (:func:`dist_vdr.models.build.build_model` does that for any
command given such a folder).

Why not sentence-transformers' ``add_adapter``: it goes through transformers' PEFT integration,
which needs peft >= 0.22 with transformers 5.24, and no such release exists (0.21.2 is the newest);
PEFT's own injection API works with 0.21. The saved folders are PEFT's format, which
sentence-transformers' ``load_adapter`` reads onto the base model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from dist_vdr.config import AdapterConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
RECORD = "dist_vdr_adapter.json"
"""The base model and the recipe's adapter section, next to the adapter files."""
TRAINED_MODULES = "dist_vdr_trained_modules.safetensors"
"""The weights of the modules trained in full beside the adapter (``attach``'s ``trained_modules``: e.g. a
multi-vector model's new token projection), keyed as in the model's state dict."""
_ADAPTER_NAME = "default"  # PEFT's name of the one adapter inject_adapter_in_model puts in
MERGED = "merged"
"""``final/merged``: the base with the adapter merged in, a plain model (model.adapter.merge_on_save)."""

_LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_VISION_TARGETS = r"visual\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.linear_fc1|mlp\.linear_fc2)"


def default_targets(vision: bool) -> str:
    """The language model's attention and MLP projections (never the vision tower's, unless ``vision``)."""
    lm = rf"(?!visual\.).*\.({'|'.join(_LM_TARGETS)})"
    return rf"^({lm}|{_VISION_TARGETS})$" if vision else rf"^{lm}$"


def lora_config(cfg: AdapterConfig) -> LoraConfig:
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                      target_modules=list(cfg.target_modules) if cfg.target_modules else default_targets(cfg.vision))


def backbone(model) -> torch.nn.Module:
    """The Hugging Face module the adapter goes into (the first module's ``.model``)."""
    first = model[0]
    inner = getattr(first, "model", None)
    if not isinstance(inner, torch.nn.Module):
        raise ValueError(f"model.adapter: {type(first).__name__} holds no transformers model to adapt")
    return inner


def attach(model, cfg: AdapterConfig, base: str, seed: int = 0, *, trained_modules: tuple[str, ...] = (),
           record: dict | None = None) -> int:
    """Put a fresh adapter on ``model`` (or the one of ``cfg.init_from``), freeze the rest; returns the
    number of trainable parameters.

    ``trained_modules``: prefixes of parameter names (``"1."``: the model's second module) trained in full beside
    the adapter, saved with it (:data:`TRAINED_MODULES`) -- a head the base model does not have. ``record``:
    what else the adapter folder records for its loader (e.g. how that head was built).

    LoRA's A matrices start random: they are drawn from ``seed`` alone (the global random stream is
    left as it was), so every rank and a 1-process run of the same recipe start from the same adapter
    -- drawn from whatever state each process's stream had, 1 process and 2 ranks trained different
    adapters (DDP copies rank 0's to the others, but not the 1-process run's).
    """
    inner = backbone(model)
    base_fingerprint = fingerprint(inner)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(lora_config(cfg), inner)
        except ValueError as exc:  # PEFT: no module matched the targets
            raise ValueError(f"model.adapter.target_modules: {exc}") from exc
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name or name.startswith(tuple(trained_modules))
    model._dist_vdr_adapter = {"base_model": base, "base_fingerprint": base_fingerprint, "adapter": _section(cfg),
                               **({"trained_modules": list(trained_modules)} if trained_modules else {}),
                               **(record or {})}
    if cfg.init_from:
        load_weights(model, cfg.init_from, key="model.adapter.init_from")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fingerprint(module: torch.nn.Module) -> str | None:
    """A fingerprint of a base model's weights (before an adapter goes in): its parameters' names and shapes
    and the first and last 8 values of each, rounded to bfloat16 -- the same whether the base is loaded in
    float32 or bfloat16, different for another model of the same shapes. None when the weights are not
    materialised (meta tensors, ZeRO-3 partitions)."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
        if param.device.type == "meta" or hasattr(param, "ds_id"):  # meta, or partitioned by ZeRO-3's zero.Init
            return None
        flat = param.detach().reshape(-1)
        sample = torch.cat([flat[:8], flat[-8:]]).to("cpu", torch.bfloat16).view(torch.int16)
        digest.update(f"{name}:{tuple(param.shape)}:".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


def check_base(model, folder: str | Path) -> None:
    """ValueError when the base model just loaded for the adapter of ``folder`` is not the one it was trained
    on (its recorded fingerprint differs: the base folder was replaced); folders that predate it are trusted."""
    record = json.loads((Path(folder) / RECORD).read_text())
    recorded, loaded = record.get("base_fingerprint"), model._dist_vdr_adapter.get("base_fingerprint")
    if recorded and loaded and recorded != loaded:
        raise ValueError(f"the adapter {folder} was trained on another base model than the one now at "
                         f"{record['base_model']} (weights fingerprint {loaded}, recorded {recorded}): the base was "
                         f"replaced; put the original base back at that path, or retrain the adapter on this one")


def is_adapted(model) -> bool:
    return getattr(model, "_dist_vdr_adapter", None) is not None


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / RECORD).is_file()


def base_of(folder: str | Path) -> tuple[str, AdapterConfig]:
    """(base model, adapter section) recorded in an adapter folder."""
    record = json.loads((Path(folder) / RECORD).read_text())
    return record["base_model"], AdapterConfig(**record["adapter"])


def record_of(folder: str | Path) -> dict:
    """Everything an adapter folder records (:data:`RECORD`)."""
    return json.loads((Path(folder) / RECORD).read_text())


def save(model, folder: str | Path, state_dict: dict | None = None) -> None:
    """The adapter alone, in PEFT's format, with the record of its base (``state_dict``: a gathered
    full state dict of ``model``, when the module's own parameters are shards)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    inner = backbone(model)
    weights = get_peft_model_state_dict(inner, state_dict=_backbone_part(state_dict))
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(folder / ADAPTER_WEIGHTS))
    prefixes = tuple(model._dist_vdr_adapter.get("trained_modules", ()))
    if prefixes:
        full = state_dict if state_dict is not None else model.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in full.items() if k.startswith(prefixes)},
                  str(folder / TRAINED_MODULES))
    lora_config(AdapterConfig(**model._dist_vdr_adapter["adapter"])).save_pretrained(str(folder))
    (folder / RECORD).write_text(json.dumps(model._dist_vdr_adapter, indent=2))


def read_weights(folder: str | Path, key: str = "adapter") -> dict[str, torch.Tensor]:
    """The adapter weights saved in ``folder`` (PEFT's keys: see :func:`file_key`)."""
    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise ValueError(f"{key}={str(folder)!r} holds no {ADAPTER_WEIGHTS}: give the final/ folder or a "
                         f"checkpoint of a LoRA run")
    return load_file(str(path))


def file_key(name: str) -> str:
    """The key in an adapter file of the model's parameter ``name`` (``0.model.<path>.lora_A.default.weight``
    -> ``<path>.lora_A.weight``: relative to the backbone, without PEFT's adapter name, as PEFT saves)."""
    return name.removeprefix("0.model.").replace(f".{_ADAPTER_NAME}.", ".")


def load_weights(model, folder: str | Path, key: str = "adapter") -> None:
    """The adapter weights of ``folder`` into ``model``'s adapter (same targets and rank)."""
    weights = read_weights(folder, key)
    fix = "use the same model.adapter rank and targets as the run that wrote it"
    try:
        result = set_peft_model_state_dict(backbone(model), weights)
    except RuntimeError as exc:  # torch: shapes differ (another rank)
        raise ValueError(f"{key}={str(folder)!r} does not fit this model's adapter "
                         f"({str(exc).splitlines()[1].strip()}): {fix}") from exc
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{key}={str(folder)!r} does not fit this model's adapter (missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]}): {fix}")
    prefixes = tuple(model._dist_vdr_adapter.get("trained_modules", ()))
    if prefixes:
        path = Path(folder) / TRAINED_MODULES
        if not path.is_file():
            raise ValueError(f"{key}={str(folder)!r} holds no {TRAINED_MODULES} (the modules {list(prefixes)} trained "
                             f"beside the adapter): give the final/ folder or a checkpoint of that run")
        trained = load_file(str(path))
        own = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
        if set(trained) != set(own) or any(trained[k].shape != own[k].shape for k in own):
            shapes = lambda d: {k: tuple(v.shape) for k, v in sorted(d.items())[:2]}  # noqa: E731
            raise ValueError(f"{key}={str(folder)!r}: {TRAINED_MODULES} holds {shapes(trained)}, this model's "
                             f"modules {list(prefixes)} are {shapes(own)}: {fix} (and the same head)")
        model.load_state_dict(trained, strict=False)


def merged_copy(model):
    """A copy of ``model`` with the adapter merged into the base weights and removed: a plain model."""
    return merge_into_base(copy.deepcopy(model))


def merge_into_base(merged):
    """``merged`` itself, its adapter merged into the base weights and removed: a plain model."""
    inner = backbone(merged)
    for name, module in list(inner.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = inner.get_submodule(parent_name) if parent_name else inner
            setattr(parent, child, module.get_base_layer())
    merged._dist_vdr_adapter = None
    for param in merged.parameters():
        param.requires_grad = True
    return merged


def _section(cfg: AdapterConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("type", "rank", "alpha", "dropout", "target_modules", "vision")}


def _backbone_part(state_dict: dict | None) -> dict | None:
    """The keys of a full SentenceTransformer state dict that belong to ``model[0].model``."""
    if state_dict is None:
        return None
    return {k.removeprefix("0.model."): v for k, v in state_dict.items() if k.startswith("0.model.")}
