"""``bench corpus``: page-corpus ingestion and hard-negative mining, 1 process vs W, with figures.

Everything runs through the real commands in subprocesses (``dist-vdr pages build`` with 1 and W
rendering workers; ``dist-vdr mine-negatives --corpus`` in one process and under ``accelerate
launch`` with W ranks, one thread per rank, and in one process with W threads), on a generated
folder of PDFs and scans. The mined rows of W ranks are compared with those of one rank.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return seconds


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dist_vdr.cli", *args]


def run_corpus_bench(work: str, *, model: str, num_documents: int, num_scans: int, render_documents: int,
                     dpi: float, world_size: int) -> dict:
    import datasets

    work_dir = Path(work)
    src = work_dir / "pdfs"
    _run(_cli("make-synthetic-pdfs", str(src), "--num-documents", str(num_documents), "--num-scans", str(num_scans)), 1)
    results: dict = {"cores": os.cpu_count(), "world_size": world_size}

    # Ingestion at a real resolution, on the first render_documents PDFs.
    sub = work_dir / "render-input"
    shutil.rmtree(sub, ignore_errors=True)
    (sub / "reports").mkdir(parents=True)
    for pdf in sorted((src / "documents" / "reports").glob("*.pdf"))[:render_documents]:
        shutil.copy(pdf, sub / "reports" / pdf.name)
    for workers in (1, world_size):
        out = work_dir / f"render-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        seconds = _run(_cli("pages", "build", "--input", str(sub), "--out", str(out), "--dpi", str(dpi),
                            "--num-workers", str(workers), "--quiet"), 1)
        summary = json.loads((out / "dist_vdr_pages_build.json").read_text())
        results[f"build_{workers}"] = {"pages": summary["pages"], "seconds": seconds,
                                       "render_pages_per_s": summary["pages_per_s"]}

    # The whole folder at the generated pages' own resolution: the mining corpus.
    corpus = work_dir / "corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    seconds = _run(_cli("pages", "build", "--input", str(src / "documents"), "--out", str(corpus), "--dpi", "20",
                        "--num-workers", str(world_size), "--quiet"), 1)
    summary = json.loads((corpus / "dist_vdr_pages_build.json").read_text())
    results["corpus"] = {"pages": summary["pages"], "seconds": seconds}

    mine = ["mine-negatives", "--model", model, "--corpus", str(corpus), "--queries", str(src / "train_queries.jsonl"),
            "--qrels", str(src / "train_qrels.trec"), "--num-negatives", "3", "--max-rank", "100",
            "--max-uses-per-page", "2", "--exclude-same-document", "--batch-size", "32", "--device", "cpu"]
    runs = {"1 rank x 1 thread": (1, 1), f"1 rank x {world_size} threads": (1, world_size),
            f"{world_size} ranks x 1 thread": (world_size, 1)}
    rows = {}
    for name, (ranks, threads) in runs.items():
        out = work_dir / f"mined-{ranks}x{threads}"
        args = [*mine, "--out", str(out), "--threads", str(threads)]
        if ranks == 1:
            cmd = _cli(*args)
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch/cpu.yaml"),
                   "--num_processes", str(ranks), "--main_process_port", str(29400 + os.getpid() % 500),
                   "-m", "dist_vdr.cli", *args]
        results[f"mine {name}"] = _run(cmd, threads)
        rows[name] = datasets.load_from_disk(str(out)).to_dict()
    with open(src / "train_queries.jsonl") as f:
        results["queries"] = sum(1 for _ in f)
    results["mined_rows"] = len(rows["1 rank x 1 thread"]["query"])
    results["ranks_equal_1_rank_same_threads"] = rows[f"{world_size} ranks x 1 thread"] == rows["1 rank x 1 thread"]
    results["ranks_equal_1_rank_more_threads"] = rows[f"{world_size} ranks x 1 thread"] == \
        rows[f"1 rank x {world_size} threads"]
    return results


def format_corpus(r: dict) -> str:
    w = r["world_size"]
    b1, bw = r["build_1"], r[f"build_{w}"]
    one, wide, many = r["mine 1 rank x 1 thread"], r[f"mine 1 rank x {w} threads"], r[f"mine {w} ranks x 1 thread"]
    return "\n".join([
        f"{r['cores']} cores",
        f"pages build, {b1['pages']} pages: 1 worker {b1['seconds']:.1f} s ({b1['render_pages_per_s']:.1f} pages/s "
        f"rendering), {w} workers {bw['seconds']:.1f} s ({bw['render_pages_per_s']:.1f} pages/s): "
        f"{b1['seconds'] / bw['seconds']:.2f}x",
        f"mining corpus: {r['corpus']['pages']} pages built in {r['corpus']['seconds']:.1f} s ({w} workers)",
        f"mine-negatives, {r['queries']} queries -> {r['mined_rows']} rows: 1 rank x 1 thread {one:.1f} s, "
        f"1 rank x {w} threads {wide:.1f} s, {w} ranks x 1 thread {many:.1f} s: "
        f"{one / many:.2f}x / {wide / many:.2f}x",
        f"{w} ranks wrote exactly the rows of 1 rank (1 thread per process): {r['ranks_equal_1_rank_same_threads']}; "
        f"of 1 rank with {w} threads: {r['ranks_equal_1_rank_more_threads']}",
    ])
