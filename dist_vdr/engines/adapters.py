"""LoRA adapters under DeepSpeed ZeRO-1/2/3 and FSDP2: the adapter gathered alone, checkpoints without
the frozen base, adapter weights loaded into shards.

The engines themselves need nothing special for a model whose base is frozen: ZeRO partitions the
optimizer state of the trainable parameters only, FSDP2 (``fully_shard``) shards units that mix frozen
and trainable parameters and reduce-scatters only the gradients that exist. What they do by default
with the *checkpoints* is wrong for an adapter, though: DeepSpeed writes the whole module (every frozen
weight, ZeRO-2 even their fragments), accelerate's FSDP2 save writes the whole model as distcp shards,
and gathering the "full state dict" for ``final/`` gathers the frozen base too (16 GB for the 8B
model, on rank 0). transformers avoids that only for ``PeftModel`` instances; dist-vdr puts the
adapter into the SentenceTransformer's backbone instead (see :mod:`dist_vdr.models.adapters`), so:

- checkpoints: DeepSpeed's ``save_checkpoint(exclude_frozen_parameters=True)`` (its model file then
  holds the adapter alone; loading it is non-strict, the frozen weights stay the base model's), and
  under FSDP2 no distcp model shards (the adapter is written in PEFT's format beside the sharded
  optimizer state, which covers the trainable parameters only and reshards to any number of ranks);
- the adapter is gathered alone (:func:`gather_adapter`), for checkpoints and ``final/``;
- resuming under FSDP2 puts the adapter file's full tensors into the DTensor shards.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from dist_vdr import compat
from dist_vdr.engines import gradient_cache as engines
from dist_vdr.models import adapters


def gather_adapter(trainer) -> dict[str, torch.Tensor]:
    """The adapter's full weights under DeepSpeed or FSDP2, keyed as in the model's state dict (collective:
    every rank calls it; rank 0's result is complete). The frozen base is neither gathered nor copied."""
    wrapped = trainer.model_wrapped
    if trainer.is_fsdp_enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                      ignore_frozen_params=True))
    assert trainer.is_deepspeed_enabled, "gather_adapter is for the sharded engines (DDP saves the module)"
    if wrapped.zero_optimization_partition_weights():  # ZeRO-3: the parameters are partitions
        return compat.zero3_gathered_state_dict(wrapped, exclude_frozen=True)
    return wrapped.module_state_dict(exclude_frozen_parameters=True)


@contextlib.contextmanager
def checkpoint_without_base(trainer):
    """While the trainer writes a checkpoint's engine state: the frozen base is left out (DeepSpeed's
    module file holds the adapter alone; FSDP2 writes no model shards). A no-op for other models."""
    if not adapters.is_adapted(trainer.model):
        yield
        return
    engine = trainer.model_wrapped if trainer.is_deepspeed_enabled else None
    if engine is not None:
        engine.save_checkpoint = functools.partial(type(engine).save_checkpoint, engine,
                                                   exclude_frozen_parameters=True)
    try:
        yield
    finally:
        if engine is not None:
            del engine.save_checkpoint  # back to the class method


def install_loaders() -> None:
    """Make transformers' engine checkpoint calls adapter-aware (idempotent): DeepSpeed loads an adapter
    run's module file non-strictly, FSDP2 writes no model shards for an adapted model."""
    compat.wrap_trainer_engine_checkpointing(_deepspeed_load, _fsdp_save_model)


def _deepspeed_load(stock, engine, checkpoint_path, load_module_strict=True):
    # exclude_frozen_parameters checkpoints hold the adapter alone: the base stays as loaded
    strict = load_module_strict and not adapters.is_adapted(engine.module)
    return stock(engine, checkpoint_path, load_module_strict=strict)


def _fsdp_save_model(stock, fsdp_plugin, accelerator, model, output_dir, *args, **kwargs):
    if adapters.is_adapted(model):
        return None  # the adapter is written by the trainer's save_model (gather_adapter)
    return stock(fsdp_plugin, accelerator, model, output_dir, *args, **kwargs)


def load_adapter(model, folder: str | Path, key: str) -> None:
    """The adapter of ``folder`` into ``model``, whose parameters may be FSDP2 shards."""
    if not engines.is_fsdp2(model):
        return adapters.load_weights(model, folder, key=key)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    weights = adapters.read_weights(folder, key=key)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    mapped = {n: weights[adapters.file_key(n)] for n in names if adapters.file_key(n) in weights}
    missing = [n for n in names if n not in mapped]
    if missing or len(mapped) != len(weights):
        raise ValueError(f"{key}={str(folder)!r} does not fit this model's adapter (missing {missing[:3]}): use "
                         f"the same model.adapter rank and targets as the run that wrote it")
    set_model_state_dict(model, mapped, options=StateDictOptions(full_state_dict=True, strict=False))
