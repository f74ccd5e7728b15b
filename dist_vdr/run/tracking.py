"""Experiment tracking (training.report_to): the trainer's own integrations, set up for a dist-vdr run.

transformers' callbacks (TensorBoard, Trackio, W&B, MLflow) log from rank 0 only and take every
``Trainer.log`` call: the per-step loss, learning rate and gradient norm, dist-vdr's additions
(``loss/<dataset>``, ``masked_per_query``, ``step_seconds``, ``samples_per_second``) and the evaluations
(during training, and before/after it: :func:`log_evaluation`). Every tracker's run is named after the run
folder and its start (:func:`run_name`; a resumed run continues it) in the project ``dist-vdr`` (trackio's project;
``training.trainer_args.project`` changes it). TensorBoard gets a fixed place in the run folder
(``<output_dir>/tensorboard``); TensorBoard and trackio get the resolved recipe. trackio stores locally
(``$TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``; ``trackio show`` opens its dashboard); W&B and
MLflow keep their own settings (offline modes: their environment variables).
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

TENSORBOARD_DIR = "tensorboard"
PROJECT = "dist-vdr"
"""The trackers' project (trackio's project; transformers' default is "huggingface"): training.trainer_args.project
changes it."""


def run_name(out: Path, resuming: bool) -> str:
    """The trackers' run name (rank 0 decides): a resumed run continues the one its run folder recorded
    (``run_info.jsonl`` ``tracker_run``; trackio resumes a run by name); a fresh start, also in a reused folder,
    opens a new one, named after the folder and the start time."""
    import time

    from dist_vdr.run.report import run_infos

    recorded = [info["tracker_run"] for info in run_infos(out) if info.get("tracker_run")] if resuming else []
    return recorded[-1] if recorded else f"{out.resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}"


CONFIG_KEY = "dist_vdr/resolved_config"


def configure(trainer, out: Path, config_text: str) -> None:
    """Point the trainer's tracker callbacks at this run (rank 0 writes; the others hold inert callbacks)."""
    from transformers.integrations import TensorBoardCallback, TrackioCallback

    callbacks = trainer.callback_handler.callbacks
    boards = [c for c in callbacks if isinstance(c, TensorBoardCallback)]
    for callback in boards:
        callback.logging_dir = str(out / TENSORBOARD_DIR)
    if boards:
        trainer.add_callback(RecipeToTensorBoard(config_text, boards))
    if any(type(c) is TrackioCallback for c in callbacks):
        trainer.remove_callback(TrackioCallback)
        trainer.add_callback(_recipe_trackio(config_text))


class RecipeToTensorBoard(TrainerCallback):
    """The resolved recipe as text in TensorBoard (it records the trainer's arguments, not the recipe). Added
    after the tracker callbacks: their writers exist when this runs."""

    def __init__(self, config_text: str, boards: list) -> None:
        self.config_text, self.boards = config_text, boards

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        for board in self.boards:
            if board.tb_writer is not None:
                board.tb_writer.add_text(CONFIG_KEY, f"```yaml\n{self.config_text}\n```")


def _recipe_trackio(config_text: str):
    """transformers' trackio callback, with the resolved recipe in the run's config. trackio stores a run's
    config with the run's first log after ``trackio.init``, which the callback's ``setup`` calls at the first
    log (the evaluation before training comes before ``on_train_begin``) and again for the evaluation after
    training (a new run object, resumed by name): the recipe goes in at each ``setup``."""
    from transformers.integrations import TrackioCallback

    class RecipeTrackio(TrackioCallback):
        def setup(self, args, state, model, **kwargs):
            super().setup(args, state, model, **kwargs)
            if state.is_world_process_zero:
                import trackio  # the run ``setup`` started

                trackio.config.update({CONFIG_KEY: config_text})

    return RecipeTrackio()


def log_evaluation(trainer, which: str, raw: dict[str, float]) -> None:
    """An evaluation before or after training, to the trackers (``before/dim64_cosine_ndcg@10``...)."""
    if not trainer.args.report_to or trainer.args.report_to == ["none"]:
        return
    trainer.log({f"{which}/{key}": float(value) for key, value in raw.items()})
    if which == "after":
        _close_trackio(trainer)


def _close_trackio(trainer) -> None:
    """The evaluation after training is logged once training has ended (and the trackio callback closed its run):
    the callback reopens the run for it, and nothing closes it again: its queued records were lost at exit
    (seen with evaluation.before_training=false). Close it as the end of training does."""
    from transformers.integrations import TrackioCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TrackioCallback):
            callback.on_train_end(trainer.args, trainer.state, trainer.control, model=trainer.model)
