"""Shared fixtures: the tiny model and a small page dataset, built once per test session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from dist_vdr.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def pages(tmp_path_factory) -> Path:
    from dist_vdr.data.synthetic import SyntheticPagesSpec, generate_pages

    spec = SyntheticPagesSpec(num_train=256, num_negatives=2, num_eval_queries=32, seed=1)
    return generate_pages(tmp_path_factory.mktemp("data") / "pages", spec, show_progress=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"MASTER_PORT": str(free_port()), "PYTHON": sys.executable, "PATH": f"{BIN}:{env.get('PATH', '')}",
                "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    env.update(extra)
    return env


def tiny_overrides(model: Path, data: Path, out: Path, *more: str) -> list[str]:
    """Overrides that make configs/tiny.yaml a quick, deterministic test run."""
    return [
        f"model.name_or_path={model}", f"data.path={data}", f"training.output_dir={out}",
        "training.global_batch_size=16", "loss.mini_batch_size=4", "training.logging_steps=1",
        "training.save_steps=2", "training.save_total_limit=3", "training.warmup_ratio=0",
        "training.learning_rate=5e-4", *more,
    ]


def run_cli(args: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_vdr.cli", *args], cwd=REPO, env=env or launch_env(),
                          capture_output=True, text=True, timeout=timeout)


def run_launcher(launch_cfg: str, args: list[str], env: dict | None = None, timeout: int = 600):
    return subprocess.run(["bash", "launch/train.sh", launch_cfg, *args], cwd=REPO, env=env or launch_env(),
                          capture_output=True, text=True, timeout=timeout)


def log_tail(text: str, chars: int = 6000) -> str:
    """The end of a process log for an assertion message, without faulthandler's huge module list."""
    lines = [ln for ln in text.splitlines() if not ln.startswith(("Extension modules:", "WARNING: Location"))]
    return "\n".join(lines)[-chars:]
