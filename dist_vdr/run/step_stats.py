"""Per-step time, tokens, FLOPs and peak memory of a training run, for benchmarks.

``StepStatsCallback`` times every optimizer step from the end of the previous one (the batch fetch
included; the device synchronised at each end, so the time is the step's and not the queue's;
``compute_seconds`` leaves the fetch out), counts the tokens each forward pass of the
vision-language model sees (forward pre-hooks: text tokens from the attention mask, image patches
from ``pixel_values``, per-sequence and per-image lengths for attention) and estimates the FLOPs
executed from them:

    forward = 2 x (language-model parameters x text tokens + vision parameters x patches)
              + 4 x layers x attention width x sum(length^2)   (per tower; QK^T and AV, full square)

with the patch mergers' parameters counted per merged token, embedding lookups left out, and
padding not counted (the useful work: a setting that pads less gets no credit for padding).
Checked against torch's FlopCounterMode on the tiny model (tests/integration/test_bench_train.py).

A forward without gradients (gradient caching's first pass) counts once, one with gradients three
times (forward + backward). So a gradient-cached step counts 2 forwards + backward, the convention of
the throughput issue's anchors (~1.16e15 FLOP per 64-triplet step for Qwen3-VL-2B). Written as JSON
at the end of training (rank 0).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from transformers import TrainerCallback

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity), matched on the device name.
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "H800": 989.4e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "B200": 2250e12, "GH200": 989.4e12}


def peak_flops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # GH200 before H200
        if key in device_name:
            return PEAK_BF16_FLOPS[key]
    return None


def find_hf_model(module):
    """The outermost transformers PreTrainedModel inside ``module`` (a SentenceTransformer, CrossEncoder, wrapper)."""
    from transformers import PreTrainedModel

    for m in module.modules():
        if isinstance(m, PreTrainedModel):
            return m
    return None


class _Tower:
    """Shapes of one transformer stack, for the FLOP estimate."""

    def __init__(self, module, embedding_names: tuple[str, ...] = ("embed_tokens", "pos_embed")):
        cfg = getattr(module, "config", None)
        # Patch mergers (Qwen-VL: the final merger and the deepstack mergers) see one token per
        # merge_size^2 patches: their parameters count at that fraction per patch.
        merged_share = 1 / (getattr(cfg, "spatial_merge_size", 1) or 1) ** 2
        # ds_numel: a ZeRO-3 partitioned parameter's full size (its local tensor is empty); FSDP2's
        # DTensors report their global size.
        self.params = sum(getattr(p, "ds_numel", p.numel()) * (merged_share if "merger" in n else 1)
                          for n, p in (module.named_parameters() if module is not None else ())
                          if not any(e in n for e in embedding_names))
        self.layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "depth", 0) or 0
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "num_heads", 0) or 0
        head_dim = getattr(cfg, "head_dim", None) or ((getattr(cfg, "hidden_size", 0) or 0) // max(heads, 1))
        self.width = heads * head_dim

    def forward_flops(self, tokens: int, sum_sq_lengths: int) -> float:
        return 2.0 * self.params * tokens + 4.0 * self.layers * self.width * sum_sq_lengths


class TokenCounter:
    """Counts tokens and estimated FLOPs of every forward of ``hf_model`` (see the module docstring).

    The hooks sit on the language model and the vision tower, not on ``hf_model`` itself:
    sentence-transformers calls ``model.forward(...)`` directly, which bypasses the outer module's hooks.
    """

    def __init__(self, hf_model) -> None:
        inner = getattr(hf_model, "model", hf_model)  # *ForConditionalGeneration wraps the base model
        text = getattr(inner, "language_model", None) or inner
        visual = getattr(inner, "visual", None)
        self.text, self.vision = _Tower(text), _Tower(visual)
        self.reset()
        self._handles = [text.register_forward_pre_hook(self._text_hook, with_kwargs=True)]
        if visual is not None:
            self._handles.append(visual.register_forward_pre_hook(self._vision_hook, with_kwargs=True))

    def reset(self) -> None:
        self.text_tokens = 0
        self.patches = 0
        self.sequences = 0
        self.flops = 0.0

    def _add(self, fwd: float) -> bool:
        import torch

        with_graph = torch.is_grad_enabled()
        self.flops += (3 if with_graph else 1) * fwd  # with a graph: forward + backward (2x)
        return with_graph  # each input has exactly one pass with a graph: count its tokens there

    def _text_hook(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is not None and mask.dim() == 2:
            lengths = mask.sum(dim=-1).tolist()
        else:
            ref = embeds if embeds is not None else ids
            if ref is None:
                return
            lengths = [ref.shape[1]] * ref.shape[0]
        if self._add(self.text.forward_flops(sum(lengths), sum(n * n for n in lengths))):
            self.text_tokens += sum(lengths)
            self.sequences += len(lengths)

    def _vision_hook(self, module, args, kwargs):
        pixels = kwargs.get("hidden_states", args[0] if args else None)
        if pixels is None:
            return
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        patches = int(pixels.shape[0])
        per_image = grid.prod(dim=-1).tolist() if grid is not None else [patches]
        if self._add(self.vision.forward_flops(patches, sum(n * n for n in per_image))):
            self.patches += patches

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class StepStatsCallback(TrainerCallback):
    """Times each optimizer step; writes ``path`` (JSON) at the end of training on rank 0."""

    def __init__(self, path: str | os.PathLike, *, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main
        self.steps: list[dict] = []
        self.counter: TokenCounter | None = None
        self._t0 = 0.0
        self._last_end: float | None = None

    def _sync(self):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import torch

        hf = find_hf_model(model) if model is not None else None
        if hf is not None and self.counter is None:
            self.counter = TokenCounter(hf)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        if self.counter is not None:
            self.counter.reset()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        now = time.perf_counter()
        # A step's time is from the previous step's end: the batch fetch (DataLoader, collation)
        # happens before on_step_begin and counts, so a GPU waiting for pages shows here.
        seconds = now - (self._last_end if self._last_end is not None else self._t0)
        self._last_end = now
        c = self.counter
        self.steps.append({"step": state.global_step, "seconds": seconds, "compute_seconds": now - self._t0,
                           "text_tokens": c.text_tokens if c else None, "patches": c.patches if c else None,
                           "sequences": c.sequences if c else None, "flops": c.flops if c else None})

    def on_train_end(self, args, state, control, **kwargs):
        if self.counter is not None:
            self.counter.remove()
        if not self.is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**device_facts(), "steps": self.steps}, indent=1))
        os.replace(tmp, self.path)


def device_facts() -> dict:
    """Device name, peak memory so far (GPU: allocated by torch; CPU: the process's max RSS)."""
    import resource

    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        name = torch.cuda.get_device_name()
        return {"device": name, "peak_memory_bytes": torch.cuda.max_memory_allocated(),
                "peak_memory_kind": "cuda max_memory_allocated", "peak_bf16_flops": peak_flops(name)}
    return {"device": "cpu", "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_kind": "max RSS", "peak_bf16_flops": None}


def own_peak_rss_gib() -> float:
    """This process's peak resident memory in GiB: VmHWM, the high-water mark of its own address space
    (``ru_maxrss`` keeps the parent's peak across the exec of a spawned process); ``ru_maxrss`` where there is
    no /proc."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2 ** 20
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
