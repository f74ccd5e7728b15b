"""The trained model in ``<output_dir>/final``: written beside, marked with its file hashes, renamed.

Never half a model there. A rerun of a finished run finds ``final/`` holding this step and leaves
it; a final of another step is kept as ``final.previous``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .. import adapters, checkpoint, distributed, log

logger = log.get(__name__)


def save_final(trainer, info: distributed.DistInfo, out: Path, extra_files: dict[str, str],
               merge_adapter: bool = False) -> None:
    """Write the model (collective under ZeRO-3/FSDP2) plus the task's ``extra_files`` (name -> text);
    a LoRA run writes its adapter, and with ``merge_adapter`` also the merged plain model (``merged/``)."""
    tmp, final = out / "final.tmp", out / "final"
    step = trainer.state.global_step
    if final_holds(final, step, info):
        logger.info(f"{final} already holds the model of step {step}")
        return
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier()
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        # Gather the full weights (collective), rank 0 writes a plain SentenceTransformer folder.
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        if info.is_main:
            trainer._save(str(tmp), state_dict=state_dict)
    else:
        trainer.save_model(str(tmp))
    distributed.barrier()
    if info.is_main:
        for name, text in extra_files.items():
            (tmp / name).write_text(text)
        if merge_adapter and adapters.is_adapted(trainer.model):
            adapters.merged_copy(trainer.model).save_pretrained(str(tmp / adapters.MERGED), create_model_card=False)
    checkpoint.mark_complete(tmp, info, {"step": step})
    if info.is_main:
        if final.exists():
            previous = out / "final.previous"
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(final, previous)
        os.replace(tmp, final)
    distributed.barrier()


def final_holds(final: Path, step: int, info: distributed.DistInfo) -> bool:
    """Whether ``final/`` is marked with ``step`` and its files verify (collective)."""
    def marked_step() -> int | None:
        if not checkpoint.is_complete(final):
            return None
        return json.loads((final / checkpoint.MARKER_FILE).read_text()).get("step")

    return distributed.main_then_share(info.is_main, marked_step) == step and not checkpoint.verify(final, info)


def logged_losses(log_history: list[dict]) -> float | None:
    """The last training loss the Trainer logged."""
    losses = [h["loss"] for h in log_history if "loss" in h]
    return losses[-1] if losses else None
