"""Every command that writes, against the same hostile outputs (dist_vdr.outputs, docs/usage.md#outputs).

For each command (a real process, the tiny model, real files) and each hostile output -- an input itself, a
folder inside an input, a folder containing an input, an existing file, a real read-only mount, a real full
file system (tmpfs), Ctrl-C while the finished output waits in its scratch folder -- the test checks: the
exit status (2; 130 for the signal), one ``error:`` line and no traceback, the inputs byte-identical, no
partial output left, and (full disk, Ctrl-C) that the rerun succeeds once the cause is gone.

A command added later joins by one line in COMMANDS.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO, kill_tree, launch_env, log_tail, perturbed_copy, python_of, run_cli
from dist_vdr.outputs import HOLD_ENV

HOLD_S = "60"  # the finished output waits this long in its scratch folder for the test's Ctrl-C


@dataclass
class World:
    """The inputs every command reads (built once per module)."""

    root: Path
    model: Path
    data: Path
    other: Path  # the model, its weights moved (a second checkpoint to average)
    adapter: Path
    shards: Path  # an FSDP2 checkpoint (DCP shards + recipe + marker)
    docs: Path  # PDFs and images to build pages from
    queries: Path  # userq/queries.jsonl, userq/qrels.trec: the user's own judgement files
    qrels: Path
    run: Path  # a run folder to report on


@dataclass
class Command:
    """How to run one writing command into OUT, and what it reads."""

    argv: Callable[[World, Path], list[str]]
    inputs: Callable[[World], list[Path]]
    hostile: Callable[[World], Path] | None = None
    """The input the output is set to, into and around (None: the command reads no local input)."""
    fixed_output: bool = False
    """report: the output is named files inside the run folder it reads, not a folder the user names."""
    resumable: bool = False
    interruptible: bool = True
    env: dict = field(default_factory=dict)


def _tiny_train(w: World, out: Path) -> list[str]:
    return ["train", "--config", "configs/tiny.yaml", f"model.name_or_path={w.model}", f"data.path={w.data}",
            f"training.output_dir={out}", "training.max_steps=1", "training.global_batch_size=8",
            "loss.mini_batch_size=8", "evaluation.enabled=false", "training.save_steps=100", "launch.device=cpu",
            "training.record_step_stats=false"]


COMMANDS: dict[str, Command] = {
    "train": Command(_tiny_train, lambda w: [w.model, w.data], lambda w: w.data, interruptible=False),
    "eval": Command(lambda w, out: ["eval", "--model", str(w.model), "--data", str(w.data), "--queries", str(w.queries),
                                    "--qrels", str(w.qrels), "--dims", "16", "--output", str(out), "--device", "cpu"],
                    lambda w: [w.model, w.data, w.queries.parent], lambda w: w.queries),
    "mine-negatives": Command(lambda w, out: ["mine-negatives", "--model", str(w.model), "--data", str(w.data),
                                              "--out", str(out), "--num-negatives", "1", "--device", "cpu"],
                              lambda w: [w.model, w.data], lambda w: w.data),
    "score-rows": Command(lambda w, out: ["score-rows", "--teacher", str(w.model), "--data", str(w.data), "--out",
                                          str(out), "--negative-columns", "negative_0", "--device", "cpu"],
                          lambda w: [w.model, w.data], lambda w: w.model),
    "pages build": Command(lambda w, out: ["pages", "build", "--input", str(w.docs), "--out", str(out), "--dpi", "20",
                                           "--num-workers", "1", "--quiet"],
                           lambda w: [w.docs], lambda w: w.docs, resumable=True),
    "average": Command(lambda w, out: ["average", str(w.model), str(w.other), "--out", str(out)],
                       lambda w: [w.model, w.other], lambda w: w.other),
    "consolidate": Command(lambda w, out: ["consolidate", str(w.shards), str(out)], lambda w: [w.shards, w.model],
                           lambda w: w.shards),
    "merge-adapter": Command(lambda w, out: ["merge-adapter", str(w.adapter), str(out)], lambda w: [w.adapter, w.model],
                             lambda w: w.adapter),
    "report": Command(lambda w, out: ["report", str(out)], lambda w: [], fixed_output=True),
    "make-tiny-model": Command(lambda w, out: ["make-tiny-model", str(out), "--hidden-size", "32"], lambda w: []),
    "make-synthetic-pages": Command(lambda w, out: ["make-synthetic-pages", str(out), "--num-train", "4",
                                                    "--num-eval-queries", "2"], lambda w: []),
    "make-synthetic-pdfs": Command(lambda w, out: ["make-synthetic-pdfs", str(out), "--num-documents", "3",
                                                   "--num-scans", "1"], lambda w: []),
    "bench checkpoint": Command(lambda w, out: ["bench", "checkpoint", "--work-dir", str(out), "--size-gb", "0.001"],
                                lambda w: []),
    "bench eval-multi-vector": Command(lambda w, out: [
        "bench", "eval-multi-vector", "--work-dir", str(out), "--pages", "120", "--page-tokens", "8", "--queries", "4",
        "--query-tokens", "4", "--dim", "8", "--candidates", "120", "--world-size", "1",
        "bench_mv_search.sentence_transformers=false", "bench_mv_search.in_process=true"], lambda w: []),
}

HOSTILE = ("is-an-input", "inside-an-input", "contains-an-input", "a-file", "read-only", "full-disk", "ctrl-c")


def _cases() -> list:
    cases = []
    for name, command in COMMANDS.items():
        for hostile in HOSTILE:
            if hostile.endswith("an-input") and command.hostile is None:
                continue  # it reads no local input
            if hostile in ("a-file", *(h for h in HOSTILE if h.endswith("an-input"))) and command.fixed_output:
                continue  # report writes named files into the run it reads: no output path to give
            if hostile == "ctrl-c" and not command.interruptible:
                continue  # train stops at a step boundary and resumes (test_reliability.py)
            cases.append(pytest.param(name, hostile, id=f"{name.replace(' ', '-')}:{hostile}"))
    return cases


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model) -> World:
    from dist_vdr import distributed
    from dist_vdr.checkpoints import store as checkpoint
    from dist_vdr.config import AdapterConfig, ModelConfig, load_config, to_yaml
    from dist_vdr.data.judgements import write_qrels_trec, write_queries_jsonl
    from dist_vdr.data.synthetic import SyntheticPagesSpec, generate_pages
    from dist_vdr.data.synthetic_pdfs import SyntheticPdfSpec, generate_pdf_folder
    from dist_vdr.models import adapters
    from dist_vdr.models.build import build_model

    root = tmp_path_factory.mktemp("guard")
    data = generate_pages(root / "pages", SyntheticPagesSpec(num_train=16, num_negatives=1, num_eval_queries=6, seed=3),
                          show_progress=False)
    import datasets

    qs, qrels = datasets.load_from_disk(str(data))["eval_queries"], datasets.load_from_disk(str(data))["eval_qrels"]
    userq = root / "userq"
    userq.mkdir()
    write_queries_jsonl(userq / "queries.jsonl", dict(zip(map(str, qs["query_id"]), qs["query"], strict=True)))
    judged: dict = {}
    for q, p, s in zip(qrels["query_id"], qrels["page_id"], qrels["score"], strict=True):
        judged.setdefault(str(q), {})[str(p)] = int(s)
    write_qrels_trec(userq / "qrels.trec", judged)

    model = build_model(ModelConfig(name_or_path=str(tiny_model), adapter=AdapterConfig(type="lora", rank=2)))
    adapters.save(model, root / "adapter")
    cfg = load_config("configs/tiny.yaml", [f"model.name_or_path={tiny_model}", f"data.path={data}"],
                      check_paths=False)
    shards = _fsdp2_checkpoint(tiny_model, root / "run-fsdp2" / "checkpoint-2", to_yaml(cfg))
    checkpoint.mark_complete(shards, distributed.DistInfo(), {"step": 2})
    run = root / "run"
    run.mkdir()
    (run / "resolved_config.yaml").write_text(to_yaml(cfg))
    (run / "run_info.jsonl").write_text(json.dumps({"world_size": 1, "device": "cpu"}) + "\n")
    (run / "metrics_before.json").write_text(json.dumps({"step": 0, "metrics": {"64": {"ndcg@10": 0.1}}}))
    docs = generate_pdf_folder(root / "pdfs", SyntheticPdfSpec(num_documents=2, max_pages_per_document=2,
                                                               num_scans=1)) / "documents"
    return World(root, tiny_model, data, perturbed_copy(tiny_model, root / "other", 0.01), root / "adapter", shards,
                 docs, userq / "queries.jsonl", userq / "qrels.trec", run)


def _fsdp2_checkpoint(model_dir: Path, folder: Path, recipe: str) -> Path:
    """The model's weights as an FSDP2 run saves them (DCP shards under accelerate's key), with its recipe."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from sentence_transformers import SentenceTransformer

    from dist_vdr.checkpoints.consolidate import FSDP_MODEL_DIR

    state = {k: v.clone() for k, v in SentenceTransformer(str(model_dir), device="cpu").state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": state}, checkpoint_id=str(folder / FSDP_MODEL_DIR), no_dist=True)
    (folder / "dist_vdr_config.yaml").write_text(recipe)
    return folder


@pytest.fixture(scope="module")
def mounts(tmp_path_factory):
    """A real small file system to fill (tmpfs, 48 MiB) and a real read-only one (needs root, as CI has)."""
    base = tmp_path_factory.mktemp("mounts")
    small, ro = base / "small", base / "ro"
    small.mkdir()
    ro.mkdir()
    for where, options in ((small, "size=48m"), (ro, "ro,size=1m")):
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                                               capture_output=True).returncode != 0:
            pytest.fail("mounting a tmpfs needs root (make test on CI runs as root)")
    try:
        yield small, ro
    finally:
        for where in (small, ro):
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte; returns the filler to delete."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


def _digest(paths: list[Path]) -> dict[str, str]:
    out = {}
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _one_error_line(proc: subprocess.CompletedProcess | tuple, *expected: str) -> str:
    code, stdout, stderr = proc if isinstance(proc, tuple) else (proc.returncode, proc.stdout, proc.stderr)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in stderr, log_tail(stdout + stderr)
    assert len(errors) == 1, log_tail(stdout + stderr)
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def _leftovers(parent: Path, name: str) -> list[str]:
    """Anything the command left beside or instead of its output named ``name`` in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((name, f".{name}")))


# ----------------------------------------------------------------------------------------------- the test
@pytest.mark.parametrize("name,hostile", _cases())
def test_a_writing_command_against_a_hostile_output(name, hostile, world, mounts, tmp_path):
    command = COMMANDS[name]
    inputs = command.inputs(world)
    before = _digest(inputs)
    run = _CASES["path" if hostile.endswith(("an-input", "a-file")) else hostile]
    run(name, command, hostile, world, mounts, tmp_path, launch_env(**command.env))
    assert _digest(inputs) == before, "an input changed"


def _path_case(name, command, hostile, world, mounts, tmp_path, env) -> None:
    """The output is an input, inside one, around one, or a file: refused before any work, nothing written."""
    target = command.hostile(world) if command.hostile else None
    out = {"is-an-input": target, "inside-an-input": target / "out" if target else None,  # under a file too
           "contains-an-input": target.parent if target else None, "a-file": tmp_path / "notes.txt"}[hostile]
    if hostile == "a-file":
        out.write_text("the user's notes")
    listing = sorted(p.name for p in out.parent.iterdir()) if out.parent.is_dir() else []
    proc = run_cli(command.argv(world, out), env=env)
    assert proc.returncode == 2, log_tail(proc.stdout + proc.stderr)
    line = _one_error_line(proc)
    assert "is a file" in line if hostile == "a-file" else "the input" in line, line
    if hostile == "a-file":
        assert out.read_text() == "the user's notes"
    if out.parent.is_dir():
        assert sorted(p.name for p in out.parent.iterdir()) == listing  # nothing written beside it either


def _read_only_case(name, command, hostile, world, mounts, tmp_path, env) -> None:
    """The output on a real read-only mount: one line before any work, nothing written; writable again, it runs."""
    _, ro = mounts
    if command.fixed_output:  # the run folder itself on the read-only mount
        subprocess.run(["mount", "-o", "remount,rw", str(ro)], check=True)
        out = _copy(world.run, ro / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    else:
        out = ro / "out"
    proc = run_cli(command.argv(world, out), env=env)
    assert proc.returncode == 2, log_tail(proc.stdout + proc.stderr)
    _one_error_line(proc, "read-only file system")
    subprocess.run(["mount", "-o", "remount,rw", str(ro)], check=True)
    try:
        if command.fixed_output:
            assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in world.run.iterdir())
        else:
            assert not out.exists()
    finally:
        for p in ro.iterdir():
            _remove(p)
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)


def _full_disk_case(name, command, hostile, world, mounts, tmp_path, env) -> None:
    """The output on a real full file system: one line naming its device, nothing half-written; freed, it runs."""
    small, _ = mounts
    out = _copy(world.run, small / "run") if command.fixed_output else small / "out"
    listing = sorted(p.name for p in out.iterdir()) if command.fixed_output else []
    try:
        filler = _fill(small)
        proc = run_cli(command.argv(world, out), env=env)
        assert proc.returncode == 2, log_tail(proc.stdout + proc.stderr)
        line = _one_error_line(proc, "no space left on the device of")
        assert str(small) in line, line  # the output's device, not the working folder's
        if command.fixed_output:
            assert sorted(p.name for p in out.iterdir()) == listing
        elif name != "train":  # train's run folder keeps its (atomic) records: it resumes
            left = _leftovers(small, "out")
            assert left == ([".out.pages-build-partial"] if command.resumable else []), left
        else:
            assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".partial"))]
        filler.unlink()
        again = run_cli(command.argv(world, out), env=env)
        assert again.returncode == 0, log_tail(again.stdout + again.stderr)
    finally:
        for p in small.iterdir():
            _remove(p)


def _ctrl_c_case(name, command, hostile, world, mounts, tmp_path, env) -> None:
    """SIGINT while the finished output waits in its scratch folder: exit 130, one line, the output as it was
    (a resumable command keeps its hidden scratch); the rerun succeeds."""
    out = _copy(world.run, tmp_path / "run") if command.fixed_output else tmp_path / "out"
    listing = sorted(p.name for p in out.iterdir()) if command.fixed_output else []
    victim = subprocess.Popen([python_of(env), "-m", "dist_vdr.cli", *command.argv(world, out)], cwd=REPO,
                              env={**env, HOLD_ENV: HOLD_S}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        where, deadline = out if command.fixed_output else out.parent, time.time() + 300
        while not any(where.glob(".*.held")):
            assert victim.poll() is None, log_tail("".join(victim.communicate()))
            assert time.time() < deadline, "the command never reached its rename"
            time.sleep(0.05)
        victim.send_signal(signal.SIGINT)
        stdout, stderr = victim.communicate(timeout=60)
    finally:
        if victim.poll() is None:
            kill_tree(victim)
    assert victim.returncode == 130, log_tail(stdout + stderr)
    _one_error_line((victim.returncode, stdout, stderr), "interrupted by SIGINT")
    if command.fixed_output:
        assert sorted(p.name for p in out.iterdir()) == listing
    else:
        left = _leftovers(out.parent, "out")
        assert left == ([".out.pages-build-partial"] if command.resumable else []), left
    again = run_cli(command.argv(world, out), env=env)
    assert again.returncode == 0, log_tail(again.stdout + again.stderr)
    if not command.fixed_output:
        assert _leftovers(out.parent, "out") == ["out"]


_CASES = {"path": _path_case, "read-only": _read_only_case, "full-disk": _full_disk_case, "ctrl-c": _ctrl_c_case}


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def test_eval_never_writes_over_the_users_judgement_files(world, tmp_path):
    """The first case of the report (#33): --output = the folder of the user's --queries/--qrels files replaced
    the qrels with eval's filtered copy, exit 0. Now: refused before anything loads, the files as they were."""
    before = _digest([world.queries.parent])
    for out in (world.queries.parent, world.data, world.data / "eval_queries", world.model):
        proc = run_cli(COMMANDS["eval"].argv(world, out))
        assert proc.returncode == 2, log_tail(proc.stdout + proc.stderr)
        _one_error_line(proc, "the input")
    assert _digest([world.queries.parent]) == before


def test_merge_adapter_never_writes_into_its_adapter_even_with_overwrite(world, tmp_path):
    """`merge-adapter F F --overwrite` (or OUT = the adapter's parent) wrote the merged model into the adapter
    folder, exit 0: its marker no longer verified and it no longer loaded. Refused now, the adapter intact."""
    before = _digest([world.adapter])
    for out in (world.adapter, world.adapter.parent, world.adapter / "merged"):
        proc = run_cli(["merge-adapter", str(world.adapter), str(out), "--overwrite"])
        assert proc.returncode == 2, log_tail(proc.stdout + proc.stderr)
        _one_error_line(proc, "the input ADAPTER_DIR")
    assert _digest([world.adapter]) == before


def test_average_checks_its_eval_data_before_writing_anything(world, tmp_path):
    """`average --eval-data WRONG` wrote OUT, then failed, and the rerun was refused (OUT not empty). Now the path
    is checked first; a failing evaluation leaves no OUT; a good one joins OUT as OUT/eval."""
    out = tmp_path / "avg"
    proc = run_cli(["average", str(world.model), str(world.other), "--out", str(out), "--eval-data", "./no-such-data"])
    assert proc.returncode == 2 and not out.exists(), log_tail(proc.stdout + proc.stderr)
    _one_error_line(proc, "--eval-data ./no-such-data does not exist")
    broken = tmp_path / "broken"  # a folder that exists but holds no eval data: the evaluation itself fails
    broken.mkdir()
    proc = run_cli(["average", str(world.model), str(world.other), "--out", str(out), "--eval-data", str(broken)])
    assert proc.returncode == 2 and not out.exists(), log_tail(proc.stdout + proc.stderr)
    assert "the evaluation of the averaged model failed" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no scratch folder left either
    proc = run_cli(["average", str(world.model), str(world.other), "--out", str(out), "--eval-data", str(world.data),
                    "--device", "cpu"])  # (an earlier average replaced by the rerun: the guard's cases above)
    assert proc.returncode == 0, log_tail(proc.stdout + proc.stderr)
    assert json.loads((out / "eval" / "retrieval_metrics.json").read_text())["num_queries"] == 6


def test_a_cache_is_apart_from_the_inputs_and_from_the_output(world, tmp_path):
    """mine-negatives --cache wrote its encode cache into the dataset or the model folder (exit 0); a cache inside
    the output was replaced with it (eval and mine-negatives). Both refused before any work now."""
    before = _digest([world.data, world.model])
    source = ["--model", str(world.model), "--data", str(world.data)]
    for cmd, out in ((["mine-negatives", *source, "--out", str(tmp_path / "m")], tmp_path / "m"),
                     (["eval", *source, "--output", str(tmp_path / "e")], tmp_path / "e")):
        for cache, expected in ((world.data, "the input"), (world.model, "the input"), (out / "cache", "overlaps")):
            proc = run_cli([*cmd, "--cache", str(cache), "--device", "cpu"])
            assert proc.returncode == 2, log_tail(proc.stdout + proc.stderr)
            _one_error_line(proc, expected)
    assert _digest([world.data, world.model]) == before
