"""`dist-vdr average CKPT... --out DIR`: the weighted mean of several checkpoints' weights (model soup /
checkpoint averaging), written as a model folder that loads like any other.

Every ``*.safetensors`` file present in all the folders is averaged tensor by tensor (a full model's
``model.safetensors``, or a LoRA run's ``adapter_model.safetensors``), in float64 and cast back to each
tensor's dtype; the other model files (config, tokenizer, processor, modules) are copied from the first
folder, the training state (optimizer, scheduler, RNG, trainer state, DeepSpeed's engine files) is not.
The result is marked like a checkpoint (file hashes). Folders must hold the same tensors (names, shapes,
dtypes). ZeRO-2/3 checkpoints hold the gathered model and average as they are; an FSDP2 checkpoint holds
shards only and is consolidated first (:mod:`dist_vdr.checkpoints.consolidate`). A marked input that fails verification
is refused.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from dist_vdr.checkpoints import consolidate
from dist_vdr.checkpoints import store as checkpoint

# Training state, not model: never copied into the averaged folder.
_STATE = ("optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin", "dist_vdr_config.yaml",
          checkpoint.MARKER_FILE, "README.md", ".dist-vdr-output.json")
_STATE_PREFIXES = ("rng_state", "global_step", "pytorch_model_fsdp", "optimizer_", "latest", "zero_to_")


def check_inputs(folders: list[Path], weights: list[float] | None) -> list[float]:
    """The normalised weights; ValueError with the fix for inputs that cannot be averaged."""
    if len(folders) < 2:
        raise ValueError("average needs at least two checkpoint folders")
    for folder in folders:
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder")
        if not list(folder.glob("*.safetensors")) and not consolidate.is_sharded(folder):
            raise ValueError(f"{folder} holds no *.safetensors weights (nor FSDP2 shards): give checkpoint or "
                             f"final/ folders of a run")
    weights = weights or [1.0] * len(folders)
    total = sum(weights) if all(math.isfinite(w) for w in weights) else math.nan
    if len(weights) != len(folders) or any(w < 0 for w in weights) or not (math.isfinite(total) and total > 0):
        raise ValueError(f"--weights: one finite weight >= 0 per folder with a positive sum, got {weights} for "
                         f"{len(folders)} folders")
    return [w / total for w in weights]


def weight_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors")}


def average(folders: list[str | Path], out: str | Path, weights: list[float] | None = None,
            evaluate=None) -> Path:
    """Write the weighted mean of ``folders``' weights into ``out`` (new, empty or an earlier average); returns
    ``out``. FSDP2 checkpoints (model shards only) are consolidated first, into a scratch folder beside ``out``.
    ``evaluate(model_folder)``: called on the averaged model before it is put in place (its files join it)."""
    from dist_vdr.outputs import Output

    folders = [Path(f) for f in folders]
    output = Output("average", "--out", out, {"CHECKPOINT": folders}).check()
    shares = check_inputs(folders, weights)
    for f in folders:  # a corrupted input would average into a model that looks fine
        consolidate.check_intact(f)
    check_same_adapters(folders)
    scratch = checkpoint.hidden_folder(output.path, "consolidated")  # FSDP2 inputs as model folders, removed at the end
    try:
        with checkpoint.writing_marked(output, {"averaged": [str(f) for f in folders], "weights": shares}) as tmp:
            sources = [consolidate.write_model(f, scratch / str(i)) if consolidate.is_sharded(f) else f
                       for i, f in enumerate(folders)]  # every input was verified above
            _write_mean(sources, shares, tmp, labels=folders)
            if evaluate is not None:  # before the rename: a failed evaluation leaves no output
                evaluate(tmp)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return output.path


def check_same_adapters(folders: list[Path]) -> None:
    """LoRA adapters average only with the same configuration and base: rank, alpha, dropout, targets and
    base model. (Averaging the A and the B matrices is not the mean of the weight updates B·A: the docs say
    so; merge each adapter first for that.)"""
    from dist_vdr.models import adapters

    records = [(f, json.loads((f / adapters.RECORD).read_text())) if adapters.is_adapter_folder(f) else (f, None)
               for f in folders]
    kinds = {r is None for _, r in records}
    if len(kinds) > 1:
        raise ValueError(f"{', '.join(str(f) for f, r in records if r is not None)} hold LoRA adapters and "
                         f"{', '.join(str(f) for f, r in records if r is None)} full models: average one kind")
    first_folder, first = records[0]
    if first is None:
        return
    for folder, record in records[1:]:
        for key in ("adapter", "base_model", "base_fingerprint"):
            a, b = first.get(key), record.get(key)
            if key == "base_fingerprint" and (a is None or b is None):
                continue  # adapters saved before the fingerprint: their base_model path is compared
            if a != b:
                detail = _first_difference(a, b) if isinstance(a, dict) and isinstance(b, dict) else f"{a} vs {b}"
                raise ValueError(f"{folder} is a LoRA adapter with another {key.replace('_', ' ')} than {first_folder} "
                                 f"({detail}): adapters average only with the same rank, alpha, dropout, targets and "
                                 f"base; merge each (`dist-vdr merge-adapter`) and average the merged models instead")


def _first_difference(a: dict, b: dict) -> str:
    key = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
    return f"{key}: {a.get(key)} vs {b.get(key)}"


def _write_mean(sources: list[Path], shares: list[float], tmp: Path, labels: list[Path]) -> None:
    """The model files of ``sources[0]`` and the weighted mean of every weight file into ``tmp``."""
    from safetensors.torch import load_file, save_file

    names = weight_files(sources[0])
    for src, label in zip(sources[1:], labels[1:], strict=True):
        if weight_files(src) != names:
            raise ValueError(f"{label} holds other weight files ({sorted(weight_files(src))}) than {labels[0]} "
                             f"({sorted(names)}): checkpoints of different models (or kinds) cannot be averaged")
    shutil.copytree(sources[0], tmp, ignore=lambda _, files: [n for n in files if _is_state(n)], dirs_exist_ok=True)
    for name in sorted(names):
        tensors = [load_file(str(f / name)) for f in sources]
        _check_same(tensors, name, labels)
        mean = {key: sum(share * t[key].double() for share, t in zip(shares, tensors, strict=True))
                .to(tensors[0][key].dtype) for key in tensors[0]}
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in mean.items()}, str(tmp / name), metadata={"format": "pt"})
        del tensors


def _is_state(name: str) -> bool:
    return name in _STATE or name.startswith(_STATE_PREFIXES) or name.endswith(".safetensors")


def _check_same(tensors: list[dict], name: str, folders: list[Path]) -> None:
    first = tensors[0]
    for folder, other in zip(folders[1:], tensors[1:], strict=True):
        if other.keys() != first.keys():
            diff = sorted(set(other) ^ set(first))[:3]
            raise ValueError(f"{folder / name} holds other tensors than {folders[0] / name} (e.g. {diff}): "
                             f"checkpoints of different models cannot be averaged")
        bad = [k for k in first if other[k].shape != first[k].shape or other[k].dtype != first[k].dtype]
        if bad:
            raise ValueError(f"{folder / name}: tensor {bad[0]} is {tuple(other[bad[0]].shape)} "
                             f"{other[bad[0]].dtype}, in {folders[0]} {tuple(first[bad[0]].shape)} "
                             f"{first[bad[0]].dtype}: checkpoints of different models cannot be averaged")
