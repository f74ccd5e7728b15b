"""The Trainer callbacks of a run: thin hooks that call the modules owning the logic.

Defined here, at module level, where importing transformers costs nothing extra: the modules they
call (preemption, checkpoint, phases, distributed) stay importable without it (preemption's
signal handling is installed before any heavy import).
"""

from __future__ import annotations

import json
import math
import os

from transformers import TrainerCallback

from dist_vdr import distributed, log
from dist_vdr.checkpoints import store as checkpoint
from dist_vdr.run import preemption
from dist_vdr.run.folder import RunDir
from dist_vdr.run.startup_timer import Phases

logger = log.get(__name__)


class RankLogger(TrainerCallback):
    """Every rank says when it starts and ends, so the log proves all of them trained."""

    def __init__(self, info: distributed.DistInfo) -> None:
        self.info = info

    def on_train_begin(self, args, state, control, **kwargs):
        per_device = args.per_device_train_batch_size
        logger.info(f"training: {state.max_steps} steps, per-device batch {per_device}, global batch "
                    f"{per_device * self.info.world_size * args.gradient_accumulation_steps}, "
                    f"starting at step {state.global_step}", extra=log.ALL_RANKS)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1 or state.global_step % max(1, state.max_steps // 4) == 0:
            logger.info(f"step {state.global_step}/{state.max_steps} done", extra=log.ALL_RANKS)

    def on_train_end(self, args, state, control, **kwargs):
        logger.info(f"training finished at step {state.global_step}", extra=log.ALL_RANKS)


class PreemptionCallback(TrainerCallback):
    """At each step end, agree (all ranks, one all-reduce) whether to checkpoint and stop, and whether
    a loss went non-finite (:func:`dist_vdr.run.preemption.agree_at_step_end`)."""

    def __init__(self, health: preemption.StepHealth | None = None) -> None:
        self.health = health
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        stop = preemption.agree_at_step_end(self.health, state.global_step, args.output_dir)
        if stop and state.global_step < state.max_steps:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


class CheckpointMarker(TrainerCallback):
    """Each saved checkpoint: the recipe recorded, marked once every rank wrote its part, old ones
    rotated away (:func:`dist_vdr.checkpoints.store.mark_saved`)."""

    def __init__(self, info: distributed.DistInfo, config_text: str, save_total_limit: int | None,
                 metric_key: str | None = None, keep_best: bool = False) -> None:
        self.info, self.config_text, self.save_total_limit = info, config_text, save_total_limit
        # keep_best: the main metric of the evaluation at a step rides in that step's checkpoint marker (every
        # rank holds the same gathered metrics; rank 0 writes the marker and rotates).
        self.metric_key, self.keep_best = metric_key, keep_best
        self.evaluated: tuple[int, float] | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = metrics.get(self.metric_key) if self.metric_key and metrics else None
        if isinstance(value, (int, float)) and math.isfinite(value):  # a NaN never wins (nor reaches JSON)
            self.evaluated = (state.global_step, float(value))
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = RunDir(args.output_dir).checkpoint(state.global_step)
        metric = self.evaluated[1] if self.evaluated and self.evaluated[0] == state.global_step else None
        checkpoint.mark_saved(folder, self.info, self.config_text, self.save_total_limit, metric, self.keep_best)
        return control


class FirstStepTimer(TrainerCallback):
    """Marks the train() setup (resume load, data loader) and the first step; then ``on_first_step``."""

    SETUP = "trainer.train setup (resume load, first batch)"

    def __init__(self, phases: Phases, on_first_step) -> None:
        self.phases, self.on_first_step, self.done = phases, on_first_step, False

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.done and self.SETUP not in self.phases.times:
            self.phases.mark(self.SETUP)

    def on_step_end(self, args, state, control, **kwargs):
        if not self.done:
            self.done = True
            self.phases.mark("first step")
            self.on_first_step(self.phases)


class CollectiveLogger(TrainerCallback):
    """Per training step, the collectives this rank issued (calls by name, bytes), one JSON line each
    in ``<output_dir>/collectives/rank<r>.jsonl`` (launch.log_collectives: a communication audit)."""

    def __init__(self, output_dir: str, rank: int) -> None:
        self.path = str(RunDir(output_dir).collectives(rank))
        self.counter = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.counter = distributed.count_collectives()
        self.count = self.counter.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.counter is None:
            return
        self.counter.__exit__(None, None, None)
        self.counter = None
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": state.global_step, "calls": self.count.calls,
                                "bytes": self.count.bytes}) + "\n")
