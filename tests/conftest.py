"""Shared fixtures: the tiny model and a small page dataset, built once per test session."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
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


# Bounds for two runs of one training that differ only in the order of fp32 summations (the ranks'
# split, an engine's partitioned reductions). Measured on this CPU, ZeRO-3 vs DDP (tests/test_engines):
# losses agree to <= 8.4e-7 at every step, the first step's gradient norm to 2.2e-8; later gradient
# norms drift more -- the weights differ by rounding after each Adam step and the norm over every
# gradient element (many of them near zero) is far more sensitive to that than the loss: 2.2e-5 at
# step 4 on this CPU and another ("Intel Xeon, AVX512, MKL 2024.2"), 2.3e-5 for the reranker 1 vs
# 2 ranks. Ranks run with one thread each (launch_env: OMP_NUM_THREADS=1), so machine load cannot
# change a kernel's summation order. A real defect (a reduction missed or doubled, a wrong scale, a
# negative lost) moves both by >= 1e-3 (the broken variants of test_loss_equivalence).
LOSS_REL = 1e-5
FIRST_GRAD_NORM_REL = 1e-5
LATER_GRAD_NORM_REL = 1e-4


def assert_same_step(key: str, step: int, got: float, ref: float, first_step: int = 1) -> None:
    """One logged value of two runs of the same training (bounds above)."""
    rel = LOSS_REL if key == "loss" or step <= first_step else LATER_GRAD_NORM_REL
    assert got == pytest.approx(ref, rel=rel), f"step {step} {key}: {got} vs reference {ref} (bound {rel:g})"


def assert_merged_is_base_plus_update(base: Path, final: Path, scale: float) -> None:
    """``final/merged`` of a LoRA run = the base model's files + (B @ A) * scale of ``final``'s adapter on
    the adapted weights, every other weight bit-identical (the base stayed frozen)."""
    import torch
    from safetensors.torch import load_file

    adapter = load_file(str(final / "adapter_model.safetensors"))
    base_w = load_file(str(base / "model.safetensors"))
    merged = load_file(str(final / "merged" / "model.safetensors"))
    assert set(base_w) == set(merged)
    adapted = {k for k in base_w
               if any(k.startswith(a.removesuffix(".lora_A.weight")) for a in adapter if "lora_A" in a)}
    assert adapted and all(torch.equal(base_w[k], merged[k]) for k in base_w if k not in adapted)
    for key in adapted:
        stem = key.removesuffix(".weight")
        delta = (adapter[f"{stem}.lora_B.weight"] @ adapter[f"{stem}.lora_A.weight"]) * scale
        assert torch.allclose(merged[key], base_w[key] + delta, atol=1e-6), key


ENGINES = ["cpu_zero2", "cpu_zero3", "cpu_fsdp2"]
"""The sharded engines' CPU launch configs (launch/<name>.yaml)."""
REDUCTIONS = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single",
              "_reduce_scatter_base", "all_reduce_coalesced")
"""Collectives that reduce gradients (the collective log's names)."""


def train_engine(launch: str, recipe: str, out: Path, nproc: int, extensions_dir: Path, model: Path, data: Path,
                 *more: str, steps: int = 6) -> str:
    """A tiny training run through launch/<launch>.yaml on ``nproc`` ranks, checkpoints every 2 steps
    (all kept); returns its log, failing the test on a non-zero exit."""
    env = launch_env(NUM_PROCESSES=str(nproc), TORCH_EXTENSIONS_DIR=str(extensions_dir))
    args = ["--config", recipe, *tiny_overrides(model, data, out, f"training.max_steps={steps}",
                                                 "training.save_steps=2", "training.save_total_limit=10", *more)]
    proc = run_launcher(f"launch/{launch}.yaml", args, env=env, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log_tail(log)
    return log


def logged_losses(out: Path, key: str = "loss") -> dict[int, float]:
    """step -> logged training loss (or ``key``), from the newest complete checkpoint's trainer state."""
    from dist_vdr.checkpoint import latest_complete

    state = json.loads((latest_complete(out) / "trainer_state.json").read_text())
    return {h["step"]: h[key] for h in state["log_history"] if key in h}


def kill_after_first_checkpoint(args: list[str], out: Path, timeout_s: float = 300, env: dict | None = None) -> None:
    """Start ``args`` (a launcher command) and SIGKILL it with all its workers as soon as ``out`` holds
    a complete checkpoint: an interruption at an arbitrary point after the first save."""
    victim = subprocess.Popen(args, cwd=REPO, env=env or launch_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline and not list(out.glob("checkpoint-*/dist_vdr_complete.json")):
            assert victim.poll() is None, "run ended before it could be interrupted"
            time.sleep(0.02)
    finally:
        kill_tree(victim)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every worker at once (torchrun's workers may sit in their own groups)."""
    import psutil

    victims = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs([p for p in psutil.process_iter() if p.pid in victims], timeout=30)


@pytest.fixture(scope="session")
def tiny_reranker(tmp_path_factory) -> Path:
    from dist_vdr.tiny import build_tiny_reranker

    return build_tiny_reranker(tmp_path_factory.mktemp("models") / "tiny-reranker")


@pytest.fixture(scope="session")
def extensions_dir(tmp_path_factory) -> Path:
    # DeepSpeed JIT-compiles a CPU op once per session; a private folder cannot hold a stale lock.
    return tmp_path_factory.mktemp("torch_extensions")


# The integration tests: real processes (launchers, process groups, page builders, SLURM daemons)
# and training runs. Every other test is a unit test: one process, no process group, seconds each
# (`make test-fast` runs those alone: `pytest -m "not integration"`). A test marked slow is an
# integration test wherever it lives.
INTEGRATION_MODULES = frozenset({
    "test_bench_train", "test_corpus", "test_demo_numbers", "test_engines", "test_loss_equivalence",
    "test_pages", "test_preemption", "test_reliability", "test_reranker", "test_slurm", "test_startup",
    "test_train_cli",
})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") or item.module.__name__ in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)
