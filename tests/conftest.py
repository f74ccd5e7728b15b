"""Shared fixtures: the tiny model and a small page dataset, built once per test session."""

from __future__ import annotations

import collections
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
    from dist_vdr.kinds.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_multi_vector(tmp_path_factory) -> Path:
    from dist_vdr.kinds.tiny import build_tiny_multi_vector

    return build_tiny_multi_vector(tmp_path_factory.mktemp("models") / "tiny-multi-vector")


@pytest.fixture(scope="session")
def pages(tmp_path_factory) -> Path:
    from dist_vdr.data.synthetic import SyntheticPagesSpec, generate_pages

    spec = SyntheticPagesSpec(num_train=256, num_negatives=2, num_eval_queries=32, seed=1)
    return generate_pages(tmp_path_factory.mktemp("data") / "pages", spec, show_progress=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_env() -> dict:
    env = dict(os.environ)
    env.update({"PATH": f"{BIN}:{env.get('PATH', '')}", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    return env


_PRELOADED: dict = {}


def preloaded_python() -> tuple[str, str] | None:
    """(the stub executable, the server's socket) of the session's preloaded Python
    (tests/preloaded_python.py), started at the first launch; None where it could not start."""
    if "stub" not in _PRELOADED:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="dist-vdr-preload-"))
        stub, sock = folder / "python", folder / "server.sock"
        stub.write_text(f"#!{sys.executable} -S\nimport sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\n"
                        "import preloaded_python\npreloaded_python.stub()\n")
        stub.chmod(0o755)
        server = subprocess.Popen([sys.executable, str(REPO / "tests" / "preloaded_python.py"), "serve", str(sock)],
                                  # this checkout's dist_vdr, as `python -m` from REPO imports it (not the
                                  # installed one, which may be another clone's: an old commit tested against)
                                  cwd=REPO, env={**_base_env(), "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)},
                                  stdout=subprocess.PIPE,
                                  text=True, start_new_session=True)
        ready = server.stdout.readline().strip() == "ready"
        _PRELOADED.update(folder=folder, server=server, stub=str(stub) if ready else None, socket=str(sock))
    return (_PRELOADED["stub"], _PRELOADED["socket"]) if _PRELOADED["stub"] else None


def pytest_unconfigure(config):  # after the summary, which reads the server's log and the workers' records
    if not hasattr(config, "workerinput") and os.environ.get("DIST_VDR_SUITE_RECORDS"):
        import shutil

        shutil.rmtree(os.environ.pop("DIST_VDR_SUITE_RECORDS"), ignore_errors=True)
    server = _PRELOADED.get("server")
    if server is not None:
        server.kill()
        server.wait()
        for record in Path(_PRELOADED["socket"] + ".pids").glob("*"):
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(record.read_text()), signal.SIGKILL)
        import shutil

        shutil.rmtree(_PRELOADED["folder"], ignore_errors=True)


def launch_env(preload: bool | None = None, **extra: str) -> dict:
    """The environment of a test's launch: one thread per process, offline, a free rendezvous port, and
    (``preload``) the preloaded Python as the interpreter of the launcher and of every rank (see
    tests/preloaded_python.py; False: real interpreters, for claims about the processes themselves). By default
    the integration tests preload; a unit test's few commands do not wait for the server to import."""
    env = _base_env()
    env.update({"MASTER_PORT": str(free_port()), "PYTHON": sys.executable})
    if preload is None:
        preload = _in_integration_test()
    preloaded = preloaded_python() if preload else None
    if preloaded:
        stub, sock = preloaded
        env.update({"PYTHON": stub, "PYTHON_EXEC": stub, "DIST_VDR_TEST_PRELOAD": sock,
                    "DIST_VDR_TEST_REAL_PYTHON": sys.executable})
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
    env = env or launch_env()
    return subprocess.run([python_of(env), "-m", "dist_vdr.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def python_of(env: dict | None) -> str:
    """The interpreter a test's launch runs: the preloaded Python of ``env`` (launch_env), if any."""
    return (env or {}).get("PYTHON", sys.executable)


def run_accelerate(args: list[str], *launch_args: str, env: dict | None = None,
                   timeout: int = 600) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file launch/cpu.yaml LAUNCH_ARGS -m dist_vdr.cli ARGS`` (a command other
    than train under the launcher, as the docs show it), on the environment's free port."""
    _integration_only("a launcher")
    env = env or launch_env()
    cmd = [python_of(env), "-m", "accelerate.commands.launch", "--config_file", "launch/cpu.yaml", *launch_args,
           "--main_process_port", env["MASTER_PORT"], "-m", "dist_vdr.cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_launcher(launch_cfg: str, args: list[str], env: dict | None = None, timeout: int = 600):
    _integration_only("a launcher")
    return subprocess.run(["bash", "launch/train.sh", launch_cfg, *args], cwd=REPO, env=env or launch_env(),
                          capture_output=True, text=True, timeout=timeout)


def log_tail(text: str, chars: int = 6000) -> str:
    """The end of a process log for an assertion message, without faulthandler's huge module list."""
    lines = [ln for ln in text.splitlines() if not ln.startswith(("Extension modules:", "WARNING: Location"))]
    return "\n".join(lines)[-chars:]


# Bounds for two runs of one training that differ only in the order of fp32 summations (the ranks'
# split, an engine's partitioned reductions). Measured on this CPU, ZeRO-3 vs DDP (tests/integration/test_engines.py):
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


def saved_weights(folder) -> dict:
    """The model weights a checkpoint or model folder holds, read without dist-vdr: model.safetensors, or for
    an FSDP2 checkpoint its DCP shards through torch's own converter (keys as in model.safetensors)."""
    import tempfile

    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(folder / "pytorch_model_fsdp_0"), f"{tmp}/model.pt")
        state = torch.load(f"{tmp}/model.pt", weights_only=True)["model"]
    assert all(k.startswith("0.model.") for k in state), sorted(state)[:3]  # the tiny model has no head weights
    return {k[len("0.model."):]: v for k, v in state.items()}


def perturbed_copy(model: Path, out: Path, scale: float) -> Path:
    """A copy of the model folder with every floating weight moved by a seeded random amount."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out)
    weights = load_file(str(out / "model.safetensors"))
    gen = torch.Generator().manual_seed(int(scale * 1000))
    moved = {k: (v + scale * torch.randn(v.shape, generator=gen).to(v.dtype)) if v.is_floating_point() else v
             for k, v in weights.items()}
    save_file(moved, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


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
    from dist_vdr.checkpoints.store import latest_complete

    state = json.loads((latest_complete(out) / "trainer_state.json").read_text())
    return {h["step"]: h[key] for h in state["log_history"] if key in h}


def logged_history(out: Path) -> dict[int, tuple[float, float]]:
    """step -> (loss, grad_norm) from the newest complete checkpoint's trainer state."""
    from dist_vdr.checkpoints.store import latest_complete

    state = json.loads((latest_complete(out) / "trainer_state.json").read_text())
    return {h["step"]: (h["loss"], h["grad_norm"]) for h in state["log_history"] if "loss" in h}


def kill_after_first_checkpoint(args: list[str], out: Path, timeout_s: float = 300, env: dict | None = None) -> None:
    """Start ``args`` (a launcher command) and SIGKILL it with all its workers as soon as ``out`` holds
    a complete checkpoint: an interruption at an arbitrary point after the first save."""
    _integration_only("a launcher")
    victim = subprocess.Popen(args, cwd=REPO, env=env or launch_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline and not list(out.glob("checkpoint-*/dist_vdr_complete.json")):
            assert victim.poll() is None, "run ended before it could be interrupted"
            time.sleep(0.02)
    finally:
        kill_tree(victim)


def descendants(pid: int) -> list:
    """The processes below ``pid`` (psutil), the preloaded Python's forks for any of them included (a forked
    launcher's ranks are its children, not the stub's)."""
    import psutil

    found = []
    for child in _process_tree(pid)[1:]:
        with contextlib.suppress(psutil.NoSuchProcess):
            found.append(psutil.Process(child))
    return found


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, with the processes the preloaded Python forked for any of them."""
    import psutil

    forked = Path(_PRELOADED["socket"] + ".pids") if _PRELOADED.get("socket") else None
    tree, todo = [], [pid]
    while todo:
        top = todo.pop()
        if top in tree:
            continue
        tree.append(top)
        with contextlib.suppress(psutil.NoSuchProcess):
            todo += [c.pid for c in psutil.Process(top).children(recursive=True)]
        record = forked / str(top) if forked else None
        if record is not None and record.exists():
            with contextlib.suppress(ValueError, FileNotFoundError):
                todo.append(int(record.read_text()))
    return tree


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every worker at once (torchrun's workers may sit in their own groups)."""
    import psutil

    victims = _process_tree(proc.pid)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs([p for p in psutil.process_iter() if p.pid in victims], timeout=30)


# The shared runs: tiny trainings that several tests assert on, each trained once per session, on first use.
# name -> (launch config, or None for one process; recipe; overrides after tiny_overrides). A test reads a
# shared run and never writes into it; one that must change or interrupt it starts from its arguments
# (SharedRuns.args) or a copy. A new test that needs one of these trainings uses it instead of launching its own.
SHARED_RUNS = {
    # 2 ranks (DDP), 6 steps, checkpoints 2/4/6, evaluation before and after on 8 queries, collectives logged:
    # the reference of the engines, of 1 process vs 2 ranks and of kill -> resume
    "tiny-ddp": ("launch/cpu.yaml", "configs/tiny.yaml",
                 ["training.max_steps=6", "training.save_total_limit=10", "data.max_eval_queries=8",
                  "launch.log_collectives=true"]),
    # the same training in one process holding the global batch
    "tiny-one": (None, "configs/tiny.yaml",
                 ["training.max_steps=6", "training.save_total_limit=10", "data.max_eval_queries=8",
                  "launch.log_collectives=true", "launch.device=cpu"]),
    # a LoRA adapter on 2 ranks, 6 steps, merged on save: 1 process vs 2 ranks and kill -> resume
    "lora-ddp": ("launch/cpu.yaml", "configs/tiny-lora.yaml",
                 ["training.max_steps=6", "evaluation.enabled=false", "training.learning_rate=5e-3",
                  "model.adapter.merge_on_save=true"]),
}


class SharedRuns:
    def __init__(self, root: Path, model: Path, data: Path):
        self.root, self.model, self.data = root, model, data
        self.logs: dict[str, str] = {}

    def args(self, name: str, out: Path, *more: str) -> list[str]:
        """The command (after `bash launch/train.sh CONFIG`, or `dist-vdr` for one process) of run ``name``
        into ``out``, with ``more`` overrides."""
        _, recipe, overrides = SHARED_RUNS[name]
        return ["--config", recipe, *tiny_overrides(self.model, self.data, out, *overrides, *more)]

    def command(self, name: str, out: Path, *more: str) -> list[str]:
        """The whole command line of run ``name`` into ``out`` (to interrupt it, e.g.)."""
        launch = SHARED_RUNS[name][0]
        if launch is None:
            return [python_of(launch_env()), "-m", "dist_vdr.cli", "train", *self.args(name, out, *more)]
        return ["bash", "launch/train.sh", launch, *self.args(name, out, *more)]

    def __getitem__(self, name: str) -> Path:
        """The folder of run ``name``, trained now if no test needed it before."""
        out = self.root / name
        if name not in self.logs:
            launch = SHARED_RUNS[name][0]
            if launch is None:
                proc = run_cli(["train", *self.args(name, out)])
            else:
                proc = run_launcher(launch, self.args(name, out))
            log = proc.stdout + proc.stderr
            assert proc.returncode == 0, log_tail(log)
            self.logs[name] = log
        return out

    def log(self, name: str) -> str:
        self[name]
        return self.logs[name]


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory, tiny_model, pages) -> SharedRuns:
    return SharedRuns(tmp_path_factory.mktemp("shared-runs"), tiny_model, pages)


@pytest.fixture(scope="session")
def tiny_reranker(tmp_path_factory) -> Path:
    from dist_vdr.kinds.tiny import build_tiny_reranker

    return build_tiny_reranker(tmp_path_factory.mktemp("models") / "tiny-reranker")


@pytest.fixture(scope="session")
def extensions_dir(tmp_path_factory, worker_id) -> Path:
    # DeepSpeed JIT-compiles a CPU op once per session, in a folder of this run (a private folder cannot hold a
    # stale lock); pytest-xdist's workers share it (torch's build lock serialises them) so it is built once.
    if worker_id == "master":
        return tmp_path_factory.mktemp("torch_extensions")
    shared = tmp_path_factory.getbasetemp().parent / "torch_extensions"
    shared.mkdir(exist_ok=True)
    return shared


# Two folders (docs/testing.md): tests/unit -- one process, no process group, no training run, seconds
# each (plain `pytest` and `make test-fast` run these) -- and tests/integration -- real processes
# (launchers, process groups, page builders, SLURM daemons) and training runs, marked `integration` here
# from the folder they are in, so that a renamed module cannot escape the mark. `make test` runs both.
INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_DIR in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)


def _in_integration_test() -> bool:
    return "integration/" in _SUITE["current"].split("::")[0]


def _integration_only(what: str) -> None:
    """A training launch belongs to tests/integration: refuse it from a unit test (which `make test-fast` and
    plain `pytest` run, and which must stay seconds long)."""
    test = _SUITE["current"]
    if "::" in test and not _in_integration_test():
        raise AssertionError(f"{test} starts {what}: a unit test may not; move it to tests/integration")


# The suite's own measurement (docs/benchmarks.md#test-suite): every process the tests start (each
# subprocess.Popen of this pytest process: a launcher, a CLI command, a SLURM daemon, a git call), counted
# against the test whose setup, call or teardown started it, and every test's duration. The totals close the
# run's summary; $DIST_VDR_TEST_RECORD names a JSON file that gets the per-test rows.
_SUITE = {"current": "(collection)", "launches": {}, "seconds": {}}
_popen_init = subprocess.Popen.__init__


def _counted_popen_init(self, args, *rest, **kwargs):
    launches = _SUITE["launches"].setdefault(_SUITE["current"], [])
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
    launches.append(" ".join(str(a) for a in argv[:4])[:160])
    _popen_init(self, args, *rest, **kwargs)


subprocess.Popen.__init__ = _counted_popen_init


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _SUITE["current"] = item.nodeid
    start = time.perf_counter()
    yield
    _SUITE["seconds"][item.nodeid] = time.perf_counter() - start
    _SUITE["current"] = "(between tests)"


def _is_python_launch(cmd: str) -> bool:
    """A recorded launch that starts Python: an interpreter (real or the preloaded stub) or a launch script."""
    first = Path(cmd.split(" ", 1)[0]).name
    return first.startswith("python") or first == "bash"


def _preload_counts() -> dict:
    log = Path(_PRELOADED["socket"] + ".log") if _PRELOADED.get("socket") else None
    lines = [ln.split("\t") for ln in log.read_text().splitlines()] if log is not None and log.exists() else []
    refused = collections.Counter(ln[2] for ln in lines if ln[0] == "refused")
    return {"forked": len(lines) - sum(refused.values()), "refused": dict(refused)}


def pytest_configure(config):
    if hasattr(config, "workerinput"):
        # pytest-xdist: one thread per worker process, so that two workers on two cores do not oversubscribe
        # them (torch's OpenMP threads spin while they wait). Set before the tests import torch.
        os.environ["OMP_NUM_THREADS"] = "1"
    # The workers write their records into a folder the controller names, and it sums them up.
    if not hasattr(config, "workerinput") and "DIST_VDR_SUITE_RECORDS" not in os.environ:
        import tempfile

        os.environ["DIST_VDR_SUITE_RECORDS"] = tempfile.mkdtemp(prefix="dist-vdr-suite-")


def pytest_sessionfinish(session, exitstatus):
    worker = getattr(session.config, "workerinput", {}).get("workerid")
    if worker and os.environ.get("DIST_VDR_SUITE_RECORDS"):
        record = {**_SUITE, "preload": _preload_counts()}
        (Path(os.environ["DIST_VDR_SUITE_RECORDS"]) / f"{worker}.json").write_text(json.dumps(record))


def pytest_terminal_summary(terminalreporter):
    records = [{**_SUITE, "preload": _preload_counts()}]
    folder = os.environ.get("DIST_VDR_SUITE_RECORDS")
    if folder and Path(folder).is_dir():
        records += [json.loads(f.read_text()) for f in sorted(Path(folder).glob("*.json"))]
    launches = {t: v for r in records for t, v in r["launches"].items() if v and "::" in t}
    seconds = {t: v for r in records for t, v in r["seconds"].items()}
    if not seconds:
        return
    total = sum(len(v) for v in launches.values())
    python = sum(1 for v in launches.values() for cmd in v if _is_python_launch(cmd))
    terminalreporter.write_line(f"suite record: {len(seconds)} tests, {sum(seconds.values()):.0f} s in tests, "
                                f"{total} process launches by {len(launches)} tests "
                                f"({python} interpreters or launch scripts, {total - python} SLURM and system tools)")
    forked = sum(r["preload"]["forked"] for r in records)
    refused = collections.Counter()
    for r in records:
        refused.update(r["preload"]["refused"])
    if forked or refused:
        terminalreporter.write_line(f"preloaded python: {forked} processes forked, {sum(refused.values())} run by "
                                    "the real interpreter"
                                    + "".join(f"; {n}: {why}" for why, n in refused.most_common(3)))
    target = os.environ.get("DIST_VDR_TEST_RECORD")
    if target:
        rows = [{"test": t, "seconds": round(s, 2), "launches": launches.get(t, [])} for t, s in seconds.items()]
        Path(target).write_text(json.dumps(rows, indent=1) + "\n")
