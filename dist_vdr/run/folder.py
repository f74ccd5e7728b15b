"""The one owner of a training run's folder (``training.output_dir``): every name in it is defined here.

Modules that read or write a run's files ask a :class:`RunDir` for the path (``RunDir(out).final``) instead of
spelling ``"final"`` or ``"metrics_after.json"`` themselves; ``tests/unit/test_architecture.py`` checks that no
other module does. Checkpoint folders (``checkpoint-N``) are :mod:`dist_vdr.checkpoints.store`'s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

FINAL = "final"
"""The trained model (marked like a checkpoint; a LoRA run's adapter, + ``merged/`` with merge_on_save)."""
MINED = "mined"
"""Negatives mined at the start of a reranker run."""
RETRIEVAL_CANDIDATES = "retrieval_candidates.json"
RESOLVED_CONFIG = "resolved_config.yaml"
RUN_INFO = "run_info.jsonl"
"""One line per (re)start: launch, versions, data plan."""
STARTUP = "startup"
"""Records of the startup pass (validated and hashed rows), one folder per data key."""
STARTUP_TIMES = "startup_times.json"
STEP_STATS = "step_stats.json"
COLLECTIVES = "collectives"
SUMMARY = "metrics.json"
"""Before/after metrics of a finished run, per row."""
NDCG_PLOT = "ndcg_vs_dim.png"
REPORT_MD, REPORT_PNG = "report.md", "report.png"
README = "README.md"
"""The model card, inside ``final/``."""
CHECKPOINT_PREFIX = "checkpoint-"
"""A checkpoint's folder: ``checkpoint-<step>`` (transformers' naming, which the Trainer writes)."""
EVAL_DURING_TRAINING = "eval"
"""The evaluator's outputs of the evaluations during training (the last one's)."""
SLURM_LOGS = "slurm-logs"
"""`dist-vdr submit`'s default log folder, made before the job starts."""


@dataclass(frozen=True)
class RunDir:
    """The paths of one run folder."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    def checkpoint(self, step: int) -> Path:
        return self.root / f"{CHECKPOINT_PREFIX}{step}"

    @property
    def eval_during_training(self) -> Path:
        return self.root / EVAL_DURING_TRAINING

    @property
    def slurm_logs(self) -> Path:
        return self.root / SLURM_LOGS

    @property
    def final(self) -> Path:
        return self.root / FINAL

    @property
    def final_tmp(self) -> Path:
        """``final/`` being written (renamed to ``final`` once marked)."""
        return self.root / f"{FINAL}.tmp"

    @property
    def final_previous(self) -> Path:
        """The model an extended run replaced (kept until the next one)."""
        return self.root / f"{FINAL}.previous"

    @property
    def card(self) -> Path:
        return self.final / README

    @property
    def mined(self) -> Path:
        return self.root / MINED

    @property
    def retrieval_candidates(self) -> Path:
        return self.root / RETRIEVAL_CANDIDATES

    @property
    def resolved_config(self) -> Path:
        return self.root / RESOLVED_CONFIG

    @property
    def run_info(self) -> Path:
        return self.root / RUN_INFO

    @property
    def startup(self) -> Path:
        return self.root / STARTUP

    @property
    def startup_times(self) -> Path:
        return self.root / STARTUP_TIMES

    @property
    def step_stats(self) -> Path:
        return self.root / STEP_STATS

    def collectives(self, rank: int) -> Path:
        return self.root / COLLECTIVES / f"rank{rank}.jsonl"

    def metrics(self, which: str) -> Path:
        """``metrics_before.json`` / ``metrics_after.json``: the evaluation before or after training."""
        return self.root / f"metrics_{which}.json"

    def eval_outputs(self, which: str) -> Path:
        """The evaluator's files (TREC runs, per-dim metrics) of the evaluation ``which``."""
        return self.root / f"eval_{which}"

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY

    @property
    def ndcg_plot(self) -> Path:
        return self.root / NDCG_PLOT

    @property
    def report_md(self) -> Path:
        return self.root / REPORT_MD

    @property
    def report_png(self) -> Path:
        return self.root / REPORT_PNG
