"""The trained model in ``<output_dir>/final``: written beside, marked with its file hashes, renamed.

Never half a model there. A rerun of a finished run finds ``final/`` holding this step and leaves
it; a final of another step is kept as ``final.previous``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from dist_vdr import distributed, log
from dist_vdr.checkpoints import store as checkpoint
from dist_vdr.config import ModelConfig
from dist_vdr.models import adapters
from dist_vdr.run.folder import RunDir

logger = log.get(__name__)

# The launcher's process-group and engine settings: not for the merge subprocess
_DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_", "MASTER_",
                    "TORCHELASTIC_", "ACCELERATE_", "FSDP_")


def save_final(trainer, info: distributed.DistInfo, out: Path, extra_files: dict[str, str],
               merge_with: ModelConfig | None = None, record: dict | None = None) -> None:
    """Write the model (collective under ZeRO-3/FSDP2) plus the task's ``extra_files`` (name -> text);
    a LoRA run writes its adapter, and given ``merge_with`` (the recipe's model section) also the merged
    plain model (``merged/``)."""
    run = RunDir(out)
    tmp, final = run.final_tmp, run.final
    step = trainer.state.global_step
    if final_holds(final, step, info):
        logger.info(f"{final} already holds the model of step {step}")
        return
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier()
    trainer.save_final_model(str(tmp))
    distributed.barrier()
    if info.is_main:
        for name, text in extra_files.items():
            (tmp / name).write_text(text)
        if merge_with is not None:
            _write_merged(tmp, merge_with)
    checkpoint.mark_complete(tmp, info, {"step": step, **(record or {})})
    if info.is_main:
        if final.exists():
            previous = run.final_previous
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(final, previous)
        os.replace(tmp, final)
    distributed.barrier()


def _write_merged(folder: Path, model_cfg: ModelConfig) -> None:
    """``folder/merged``: the base model with the adapter just written to ``folder`` merged in, built from
    the files (what a user gets) by ``dist-vdr merge-adapter`` in a process of its own: in this one the
    trained module holds shards (ZeRO-3/FSDP2) and a model loaded here would be partitioned by DeepSpeed's
    ZeRO-3 context, a collective the other ranks never join."""
    import tempfile

    env = {k: v for k, v in os.environ.items() if not k.startswith(_DISTRIBUTED_ENV)}
    # Merged beside the adapter folder, then moved in: an output never lies inside its input (the output guard).
    beside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.merging-", dir=folder.parent))
    cmd = [sys.executable, "-m", "dist_vdr.cli", "merge-adapter", str(folder), str(beside / adapters.MERGED),
           "--dtype", model_cfg.dtype, *(["--trust-remote-code"] if model_cfg.trust_remote_code else [])]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode == 0:
            os.replace(beside / adapters.MERGED, folder / adapters.MERGED)
    finally:
        shutil.rmtree(beside, ignore_errors=True)
    if proc.returncode != 0:  # the adapter is saved: the run is not lost for want of its merged copy
        logger.error(f"final/merged was not written (merge-adapter exit {proc.returncode}: "
                     f"{(proc.stdout + proc.stderr).strip()[-1500:]}); the adapter in final/ is complete: merge it "
                     f"later with `dist-vdr merge-adapter <output_dir>/final <output_dir>/merged`")


def final_holds(final: Path, step: int, info: distributed.DistInfo) -> bool:
    """Whether ``final/`` is marked with ``step`` and its files verify (collective)."""
    def marked_step() -> int | None:
        if not checkpoint.is_complete(final):
            return None
        return json.loads((final / checkpoint.MARKER_FILE).read_text()).get("step")

    return distributed.main_then_share(info.is_main, marked_step) == step and not checkpoint.verify(final, info)


def write_card(out: Path, text: str) -> None:
    """``final/README.md`` (the model card) into the marked final folder (rank 0)."""
    from dist_vdr.run.card import CARD_FILE

    folder = RunDir(out).final
    if checkpoint.is_complete(folder):
        checkpoint.add_file(folder, CARD_FILE, text)


def logged_losses(log_history: list[dict]) -> float | None:
    """The last training loss the Trainer logged."""
    losses = [h["loss"] for h in log_history if "loss" in h]
    return losses[-1] if losses else None
