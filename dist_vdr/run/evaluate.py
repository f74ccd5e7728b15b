"""Evaluation inside a run: before training, after it; records stored so a rerun does not redo them."""

from __future__ import annotations

from pathlib import Path

from dist_vdr import distributed
from dist_vdr.run import tracking
from dist_vdr.run.folder import RunDir
from dist_vdr.run.results import Metrics


def metrics_file(out: Path, which: str) -> Path:
    return RunDir(out).metrics(which)


def evaluate(trainer, info: distributed.DistInfo, out: Path, which: str, step: int) -> Metrics:
    """Evaluate; rank 0 stores the record (and, for all-rank evaluators, their outputs in eval_<which>/).

    The trainer's evaluator implements :class:`dist_vdr.retrieval.protocol.RunEvaluator`.
    """
    evaluator = trainer.evaluator
    if evaluator.all_ranks:
        where = str(RunDir(out).eval_outputs(which)) if info.is_main else None
        raw = evaluator(trainer.model, output_path=where, steps=step)
    else:
        raw = trainer.evaluate()  # the trainer drives rank 0 + DDP encode serving
    if which in ("before", "after"):  # the evaluations during training reach the trackers through the trainer
        tracking.log_evaluation(trainer, which, raw)
    metrics = Metrics.of(step, evaluator.summarise(raw))
    if info.is_main:
        metrics.write(metrics_file(out, which))
    return metrics


def stored(out: Path, which: str, step: int | None = None) -> Metrics | None:
    """The stored record (of ``step``, when given: a finished run rerun reuses its final evaluation)."""
    return Metrics.read(metrics_file(out, which), step)
