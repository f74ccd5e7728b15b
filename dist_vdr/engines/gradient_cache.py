"""Gradient caching under the sharded engines: one gradient reduction per optimizer step.

A cached loss (GradCache) runs one backward per mini-batch during its replay. Engines reduce
gradients at the end of every backward, so without help a step with N mini-batches reduces N
times (DDP), or fails outright (DeepSpeed ZeRO-2/3: "gradient computed twice for this partition",
the reason tevatron's GradCache does not run under DeepSpeed). sentence-transformers 6.2 handles
DDP only (``no_sync`` for all replays but the last). This module adds the two sharded engines:

- **DeepSpeed ZeRO-1/2/3**: the whole ``engine.backward`` (outer loss + every replay) runs inside
  ``engine.coalesce_grad_reduction()``: gradients stay on the parameters and one reduction pass
  runs on exit, then ``engine.step()``. Installed by :func:`prepare_trainer` on the accelerate
  wrapper that the HF Trainer calls.
- **FSDP2** (``fully_shard``): every replay but the last runs with
  ``set_requires_gradient_sync(False)``: unsharded gradients accumulate locally, the last replay's
  backward reduce-scatters them once. Installed into sentence-transformers' replay context, which
  already receives "is this the last replay" from the cached loss.

Both trade memory for communication: full (unsharded) gradients live on every rank for the duration
of the replay, as under DDP. Parameters are gathered as the engine does by default (per forward and
per backward of each mini-batch under ZeRO-3/FSDP2); ``launch.keep_parameters_gathered`` keeps
FSDP2's parameters unsharded for the whole step instead (memory of one full model copy, one
all-gather per step).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Any

from dist_vdr import compat, log

logger = log.get(__name__)

_INSTALLED = False


def is_fsdp2(model: Any) -> bool:
    """Whether ``model`` is (or has been turned into) an FSDP2 ``fully_shard`` module."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def install_replay_context() -> None:
    """Make sentence-transformers' GradCache replay engine-aware (idempotent).

    The cached losses call sentence-transformers' private replay context (compat:
    st.gradcache_replay_context) as ``(model, synchronize)`` around every mini-batch replay,
    ``synchronize`` being true for the last one. DDP keeps the stock behaviour; an FSDP2 module gets
    ``set_requires_gradient_sync(synchronize)``.
    """
    global _INSTALLED
    if _INSTALLED:
        return
    compat.replace_gradcache_replay_context(_fsdp2_aware_replay_context)
    _INSTALLED = True


def _fsdp2_aware_replay_context(stock):
    @contextlib.contextmanager
    def replay_context(model, synchronize: bool):
        if not is_fsdp2(model):
            with stock(model, synchronize):
                yield
            return
        model.set_requires_gradient_sync(synchronize)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    return replay_context


def coalesced_deepspeed_backward(wrapper) -> None:
    """Replace accelerate's ``DeepSpeedEngineWrapper.backward`` by one that coalesces the replays.

    Same contract as accelerate's (compat: accelerate.deepspeed_engine_wrapper: boundary flag,
    backward, step at the boundary); the backward runs
    inside ``engine.coalesce_grad_reduction()``, so the cached loss's N replays cost one reduction.
    """
    engine = wrapper.engine
    if getattr(wrapper, "_dist_vdr_coalesced", False):
        return

    def backward(loss, sync_gradients: bool = True, **kwargs):
        engine.set_gradient_accumulation_boundary(is_boundary=sync_gradients)
        with engine.coalesce_grad_reduction():
            engine.backward(loss, **kwargs)
        if sync_gradients:
            engine.step()

    wrapper.backward = backward
    wrapper._dist_vdr_coalesced = True


def prepare_trainer(trainer, *, keep_parameters_gathered: bool = False) -> None:
    """Called once the trainer has wrapped the model (first training step): set up the engine hooks."""
    install_replay_context()
    wrapper = compat.deepspeed_engine_wrapper(trainer.accelerator)
    if wrapper is not None:
        coalesced_deepspeed_backward(wrapper)
    model = trainer.model_wrapped
    if not is_fsdp2(model):
        return
    if trainer.is_world_process_zero():
        units = sum(1 for m in model.modules() if is_fsdp2(m))
        logger.warning("FSDP2: %d sharded units%s", units,
                       ", parameters kept gathered during each step" if keep_parameters_gathered else "")
    if keep_parameters_gathered:
        # One all-gather per layer and step instead of two per mini-batch: the unsharded parameters
        # stay until the optimizer step (see release_parameters).
        model.set_reshard_after_forward(False)
        model.set_reshard_after_backward(False)


def release_parameters(trainer) -> None:
    """Reshard FSDP2 parameters kept gathered during a step (before the optimizer touches the shards)."""
    model = trainer.model_wrapped
    if is_fsdp2(model):
        for module in model.modules():
            if is_fsdp2(module):
                module.reshard()


def adapt_model(model, engine: str | None) -> None:
    """Model tweaks an engine needs before the trainer wraps it.

    FSDP2 (accelerate, compat: accelerate.fsdp_auto_wrap) puts the "final norm" of the model in its own unit,
    found by class name
    among the children of ``model.<base_model_prefix>`` (the model itself when unset). For a
    SentenceTransformer that is the parameterless ``Normalize`` module, which fully_shard cannot
    wrap ("object layout differs"). Pointing the prefix at the backbone module makes the search
    look there instead (the language model's own norm is sharded with its layers' root group).
    """
    if engine != "fsdp":
        return
    compat.point_fsdp_final_norm_search(model, "0")
    # The transformer-based wrap policy reads the layer classes from the model's ``_no_split_modules``,
    # which a SentenceTransformer reports empty: the whole model would be ONE FSDP unit (a full
    # all-gather at every forward, DDP-like peak memory). Name the backbone's layer classes
    # (decoder layers, vision blocks) instead, unless the launch config names its own.
    backbone = getattr(model[0], "model", None)
    compat.set_fsdp_wrap_classes(compat.no_split_modules(backbone) or [])


@contextlib.contextmanager
def saving_state_dict(model, state_dict: dict):
    """While active, the model's save writes ``state_dict`` (gathered full weights).

    Its first module (Transformer) saves the backbone with ``save_pretrained``; that call gets the
    backbone's part of ``state_dict``. Later modules with weights (a reranker's Dense head) save
    ``self.state_dict()``, which returns their part of ``state_dict`` meanwhile (under ZeRO-3/FSDP2
    their own parameters are shards).
    """
    backbone = model[0].model
    prefix = "0.model."
    backbone_sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not backbone_sd:
        raise ValueError(f"the gathered state dict has no backbone weights (keys like {prefix}*); got "
                         f"{sorted(state_dict)[:5]}")
    heads: dict[int, dict] = {}
    for key, value in state_dict.items():
        index, _, rest = key.partition(".")
        if index.isdigit() and int(index) > 0:
            # Own storage: DeepSpeed's gathered tensors can be views into one flat buffer, which
            # safetensors refuses to save ("not covering the entire storage"). Heads are small.
            heads.setdefault(int(index), {})[rest] = value.detach().clone().contiguous()
    unknown = sorted(k for k in state_dict if not k.startswith(prefix) and not k.partition(".")[0].isdigit())
    if unknown:
        raise ValueError(f"cannot place gathered weights {unknown[:5]} in the model's modules")
    original = backbone.save_pretrained

    def save_pretrained(path, *args, **kwargs):
        kwargs["state_dict"] = backbone_sd
        return original(path, *args, **kwargs)

    backbone.save_pretrained = save_pretrained
    for index, sd in heads.items():
        model[index].state_dict = lambda *args, _sd=sd, **kwargs: dict(_sd)
    try:
        yield
    finally:
        del backbone.save_pretrained  # back to the class methods
        for index in heads:
            del model[index].state_dict


def configure_deepspeed(args, *, load_universal: bool) -> None:
    """Adjust the DeepSpeed config the launcher gave before the trainer builds the engine.

    - ZeRO-3: gather full weights at save time (``stage3_gather_16bit_weights_on_model_save``), so
      every checkpoint and the final folder hold a loadable SentenceTransformer, not only shards.
    - ``load_universal``: resume from a universal checkpoint (different number of ranks).
    """
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    zero = ds.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True


def _read_tag(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def deepspeed_tag(checkpoint_dir: str) -> str:
    latest = os.path.join(checkpoint_dir, compat.DS_LATEST)
    if not os.path.isfile(latest):
        raise ValueError(f"{checkpoint_dir} holds no DeepSpeed checkpoint ('latest' missing): it was written "
                         f"by another engine; resume it with the launch config that wrote it")
    return _read_tag(latest)


def make_universal(checkpoint_dir: str) -> str:
    """Convert a DeepSpeed checkpoint to the universal format (any number of ranks); idempotent.

    Runs DeepSpeed's own converter (``ds_to_universal``, compat: deepspeed.universal_checkpoint) into
    ``<tag>_universal`` beside the original and writes ``latest_universal``; the original shards stay
    untouched.
    """
    tag = deepspeed_tag(checkpoint_dir)
    marker = os.path.join(checkpoint_dir, compat.DS_LATEST_UNIVERSAL)
    if os.path.isfile(marker):
        return _read_tag(marker)
    out = os.path.join(checkpoint_dir, f"{tag}_universal")
    cmd = compat.ds_to_universal_command(os.path.join(checkpoint_dir, tag), out)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.isfile(marker):
        raise ValueError(f"ds_to_universal failed for {checkpoint_dir} (exit {proc.returncode}):\n"
                         f"{(proc.stdout + proc.stderr)[-3000:]}")
    return _read_tag(marker)
