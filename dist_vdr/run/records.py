"""A run's records: the resolved recipe, one line of run info per (re)start, the startup times."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import accelerate
import sentence_transformers
import torch
import transformers

from dist_vdr import distributed, log
from dist_vdr.config import Config, to_yaml
from dist_vdr.run.folder import RunDir
from dist_vdr.run.startup_timer import Phases

logger = log.get(__name__)


def git_revision() -> str:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if rev.returncode != 0:
        return "unknown"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def write_run_records(out: Path, cfg: Config, info: distributed.DistInfo, resume_from: str | None,
                      datasets: list[dict] | None = None, tracker_run: str | None = None) -> None:
    """Resolved config + run info (``datasets``: a mixture's per-dataset plan; ``tracker_run``: the trackers'
    run name, continued on resume). An earlier, different config is kept under a timestamped name."""
    out.mkdir(parents=True, exist_ok=True)
    text = to_yaml(cfg)
    resolved = RunDir(out).resolved_config
    if resolved.is_file() and resolved.read_text() != text:
        os.replace(resolved, out / f"resolved_config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    resolved.write_text(text)
    run = {
        "git_revision": git_revision(),
        "command": sys.argv,
        "world_size": info.world_size,
        "device": info.device,
        "resumed_from": resume_from,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "sentence_transformers": sentence_transformers.__version__, "accelerate": accelerate.__version__},
    }
    if datasets:
        run["datasets"] = datasets
    if tracker_run:
        run["tracker_run"] = tracker_run
    with open(RunDir(out).run_info, "a") as f:  # one line per (re)start: the run's history
        f.write(json.dumps(run) + "\n")


def first_step_report(info: distributed.DistInfo, out: Path):
    """What the first optimizer step does with the startup phases: a log line, startup_times.json."""
    def report(phases: Phases) -> None:
        logger.info(phases.line())
        if info.is_main:
            phases.write(RunDir(out).startup_times)

    return report
