"""Experiment tracking (training.report_to): the trainer's own integrations, set up for a dist-vdr run.

transformers' callbacks (TensorBoard, Trackio, W&B, MLflow) log from rank 0 only and take every
``Trainer.log`` call: the per-step loss, learning rate and gradient norm, dist-vdr's additions
(``loss/<dataset>``, ``masked_per_query``, ``step_seconds``, ``samples_per_second``) and the evaluations
(during training, and before/after it: :func:`log_evaluation`). Here TensorBoard gets a fixed place in
the run folder (``<output_dir>/tensorboard``) and the resolved recipe; the other trackers keep their own
settings (project names, offline modes: their environment variables).
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

TENSORBOARD_DIR = "tensorboard"


def configure(trainer, out: Path, config_text: str) -> None:
    """Point the trainer's tracker callbacks at this run (rank 0 writes; the others hold inert callbacks)."""
    from transformers.integrations import TensorBoardCallback

    boards = [c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)]
    for callback in boards:
        callback.logging_dir = str(out / TENSORBOARD_DIR)
    if boards:
        trainer.add_callback(RecipeToTensorBoard(config_text, boards))


class RecipeToTensorBoard(TrainerCallback):
    """The resolved recipe as text in TensorBoard (the other trackers record the trainer's arguments).
    Added after the tracker callbacks: their writers exist when this runs."""

    def __init__(self, config_text: str, boards: list) -> None:
        self.config_text, self.boards = config_text, boards

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        for board in self.boards:
            if board.tb_writer is not None:
                board.tb_writer.add_text("dist_vdr/resolved_config", f"```yaml\n{self.config_text}\n```")


def log_evaluation(trainer, which: str, raw: dict[str, float]) -> None:
    """An evaluation before or after training, to the trackers (``before/dim64_cosine_ndcg@10``...)."""
    if not trainer.args.report_to or trainer.args.report_to == ["none"]:
        return
    trainer.log({f"{which}/{key}": float(value) for key, value in raw.items()})
