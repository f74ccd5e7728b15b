"""The fixed cost of one test launch, split into its parts, with real interpreters and with the tests'
preloaded Python side by side (docs/benchmarks.md#test-suite):

    .venv/bin/python tests/launch_cost.py [--repeats 3]

Prints, as the median of the repeats: an interpreter's start, the launcher's imports (accelerate, torch
elastic), a rank's imports (dist_vdr.run.training: torch, transformers, sentence-transformers), and a whole tiny
2-rank training launch of 2 steps (launch/train.sh launch/cpu.yaml, evaluation off) with its time to first step
by phase as the run records it (startup_times.json: imports + process group, data, model build, trainer
setup, first step), each with real interpreters and through the preloaded Python. Nothing else should run on
the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import conftest  # noqa: E402 - the tests' own launch environment and helpers


def _wall(cmd: list[str], env: dict, cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def _training(env: dict, model: Path, pages: Path, out: Path) -> tuple[float, dict]:
    args = ["bash", "launch/train.sh", "launch/cpu.yaml", "--config", "configs/tiny.yaml",
            *conftest.tiny_overrides(model, pages, out, "training.max_steps=2", "evaluation.enabled=false")]
    wall = _wall(args, env, conftest.REPO)
    return wall, json.loads((out / "startup_times.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats
    from dist_vdr.data.synthetic import SyntheticPagesSpec, generate_pages
    from dist_vdr.kinds.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="launch-cost-"))
    model = build_tiny_model(work / "tiny")
    pages = generate_pages(work / "pages", SyntheticPagesSpec(num_train=256, num_negatives=2, num_eval_queries=32,
                                                              seed=1), show_progress=False)
    rows: dict[str, dict[str, list[float]]] = {}
    for kind in ("real", "preloaded"):
        env = conftest.launch_env(preload=kind == "preloaded")
        python = conftest.python_of(env)
        parts = rows.setdefault(kind, {})
        for i in range(repeats):
            env["MASTER_PORT"] = str(conftest.free_port())
            parts.setdefault("interpreter start (python -c pass)", []).append(
                _wall([python, "-c", "pass"], env, work))
            parts.setdefault("launcher imports (accelerate, torch elastic)", []).append(
                _wall([python, "-c", "import accelerate.commands.launch, torch.distributed.run"], env, work))
            parts.setdefault("rank imports (dist_vdr.run.training)", []).append(
                _wall([python, "-c", "import dist_vdr.run.training"], env, work))
            wall, times = _training(env, model, pages, work / f"run-{kind}-{i}")
            parts.setdefault("2-rank launch of 2 steps, wall", []).append(wall)
            parts.setdefault("  rank: time to first step", []).append(times["total_s"])
            for phase, seconds in times["phases_s"].items():
                parts.setdefault(f"    {phase}", []).append(seconds)
    names = list(rows["real"])
    print(f"{'part (median of ' + str(repeats) + ')':<58} {'real':>8} {'preloaded':>10}")
    for name in names:
        a, b = statistics.median(rows["real"][name]), statistics.median(rows["preloaded"].get(name, [float("nan")]))
        print(f"{name:<58} {a:7.2f}s {b:9.2f}s")
    conftest.pytest_unconfigure(argparse.Namespace(workerinput={}))


if __name__ == "__main__":
    main()
