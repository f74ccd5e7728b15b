"""Rebuild tests/data/previous_release_run.tar.gz and previous_release_run.json with the previous release's code.

The fixture of tests/integration/test_previous_release_run.py: a run folder written by the release before the
regrouping into subpackages (commit 915902f, "Reliability (#33 ...)": flat modules dist_vdr/training.py,
dist_vdr/checkpoint.py, ...), interrupted as a user's run is, for the current code to resume. Made by this
script from commit 915902f, with the versions of constraints.txt (recorded in the .json).

    .venv/bin/python tests/data/make_previous_run_fixture.py [--commit 915902f]

What it does, every dist-vdr command run with the previous commit's code (a `git worktree` of it, on
PYTHONPATH; the cwd is a scratch folder, so no path of this checkout is recorded):

1. `make-tiny-model tiny-model` and `make-synthetic-pages pages` with the arguments of the suite's session
   fixtures (tests/conftest.py: the default tiny model; 256 rows, 2 negatives, 32 eval queries, seed 1); the
   sha256 of their files is recorded, so the test can check that the current code's makers give the same inputs.
2. `train` of the suite's "tiny-one" run (configs/tiny.yaml + tiny_overrides, one process, evaluation before and
   after on 8 queries) for 6 steps, checkpoints every 2 steps, one kept, the model and the data named by
   RELATIVE paths (the run folder records them as given; the test resumes from a folder holding the same names).
   After the loss of step 2 is logged it gets SIGUSR2 (preemption): it saves the step it is in and exits 0 --
   the folder a preempted or Ctrl-C'ed run leaves (a checkpoint, startup records, metrics_before.json and
   eval_before/, no final/). That folder, as it is, is the fixture (run/ in the .tar.gz).
3. The reference: a copy of that folder resumed to the end by the same previous code; its logged losses after
   the interruption and its metrics_after.json are recorded, and the current code's resume must reproduce them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TARBALL = HERE / "previous_release_run.tar.gz"
RECORD = HERE / "previous_release_run.json"
COMMIT = "915902f"

MAX_STEPS = 6
# tests/conftest.py: tiny_overrides(model, data, out) + SHARED_RUNS["tiny-one"], with relative paths, 6 steps and
# one checkpoint kept (the fixture's size).
TRAIN_ARGS = [
    "model.name_or_path=tiny-model", "data.path=pages", "training.output_dir=run",
    "training.global_batch_size=16", "loss.mini_batch_size=4", "training.logging_steps=1",
    "training.save_steps=2", "training.save_total_limit=1", "training.warmup_ratio=0",
    "training.learning_rate=5e-4", f"training.max_steps={MAX_STEPS}", "data.max_eval_queries=8",
    "launch.device=cpu",
]
PAGES_ARGS = ["--num-train", "256", "--num-negatives", "2", "--num-eval-queries", "32", "--seed", "1"]


def sha256_tree(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file but the makers' output stamp (it holds the time it was written)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".dist-vdr-output.json"}


def versions() -> dict:
    import accelerate
    import datasets
    import sentence_transformers
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__, "accelerate": accelerate.__version__,
            "datasets": datasets.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--commit", default=COMMIT)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", parser.parse_args().commit], check=True,
                            capture_output=True, text=True).stdout.strip()
    scratch = Path(tempfile.mkdtemp(prefix="dist-vdr-previous-release-"))
    src, root = scratch / "src", scratch / "root"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(src), commit], check=True)
    try:
        root.mkdir()
        env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false", "DIST_VDR_CACHE": str(scratch / "cache")}
        old = [sys.executable, "-m", "dist_vdr.cli"]
        subprocess.run([*old, "make-tiny-model", "tiny-model"], cwd=root, env=env, check=True)
        subprocess.run([*old, "make-synthetic-pages", "pages", *PAGES_ARGS], cwd=root, env=env, check=True)
        train = [*old, "train", "--config", str(src / "configs" / "tiny.yaml"), *TRAIN_ARGS]
        stopped_at = preempted_run(train, root, env)

        with tarfile.open(TARBALL, "w:gz", compresslevel=9) as tar:
            tar.add(root / "run", arcname="run", filter=_normalised)
        shutil.copytree(root / "run", root / "reference")
        subprocess.run([*train[:-len(TRAIN_ARGS)], *TRAIN_ARGS[:2], "training.output_dir=reference",
                        *TRAIN_ARGS[3:]], cwd=root, env=env, check=True)
        state = json.loads((root / "reference" / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
        losses = {str(h["step"]): h["loss"] for h in state["log_history"] if "loss" in h and h["step"] > stopped_at}
        record = {
            "commit": commit, "versions": versions(), "recorded": time.strftime("%Y-%m-%d"),
            "train_args": TRAIN_ARGS, "pages_args": PAGES_ARGS, "stopped_at": stopped_at, "max_steps": MAX_STEPS,
            "inputs_sha256": {"tiny-model": sha256_tree(root / "tiny-model"), "pages": sha256_tree(root / "pages")},
            "reference": {"losses": losses,
                          "metrics_after": json.loads((root / "reference" / "metrics_after.json").read_text())},
        }
        RECORD.write_text(json.dumps(record, indent=2) + "\n")
        print(f"{TARBALL} ({TARBALL.stat().st_size} bytes): run/ stopped at step {stopped_at} by commit {commit[:7]}")
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(src)], check=False)
        shutil.rmtree(scratch, ignore_errors=True)


def preempted_run(train: list[str], root: Path, env: dict) -> int:
    """Run ``train``, SIGUSR2 it once step 2's loss is logged; the step it stopped at (checked: no final/)."""
    proc = subprocess.Popen(train, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, logged = [], 0
    for line in proc.stdout:
        lines.append(line)
        logged += line.count("'loss':")
        if logged >= 2:
            proc.send_signal(signal.SIGUSR2)
            break
    lines.extend(proc.stdout)
    if proc.wait() != 0:
        sys.exit("".join(lines)[-6000:])
    run = root / "run"
    checkpoints = sorted(int(p.parent.name.split("-")[1]) for p in run.glob("checkpoint-*/dist_vdr_complete.json"))
    if (run / "final").exists() or not checkpoints or checkpoints[-1] >= MAX_STEPS:
        sys.exit(f"the run was not stopped before its end: {sorted(p.name for p in run.iterdir())}")
    return checkpoints[-1]


def _normalised(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


if __name__ == "__main__":
    main()
