"""`dist-vdr bench startup`: time from process start to the first optimizer step, by phase.

Runs ``dist-vdr train`` itself (the tiny model, CPU) on generated data of realistic pages
(1416x1648 as the published data, and A4 at 144 dpi, 1191x1684; PNG) and reads each run's
``startup_times.json`` (dist_vdr.run.startup_timer): imports + process group, data (load, validation,
hashing), lock + resume decision, model build, trainer setup, the first batch and step. Settings,
side by side in one run:

- rows naming pages of a small corpus by id (``ids``), at each ``--rows`` count: 100,000 rows stay
  cheap to generate, and the row-count-dependent work (loading, id checks, hashing) shows;
- rows holding their pages (``images``, ``--image-rows``): the decode-bound validation + hashing;
- 1 and W ranks, a first start and a resume (the run stopped after step 1 and restarted).

Printed: the phases per setting, the ratios the issue judges (resume at the most rows vs the fewest;
the data pass on W ranks vs 1 at the first start), and what the measured per-page cost means for
the published recipes (10,000 and 94,225 rows x 2 page columns) on 8 ranks, before (rank 0 alone,
every start) and now.

    dist-vdr bench startup --work-dir /tmp/bs [--rows 1000,100000 --image-rows 1000 --world-size 2]
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

from dist_vdr.run.folder import RunDir

PAGE_SHAPES = ((1416, 1648), (1191, 1684))  # the published data's pages; A4 at 144 dpi
PUBLISHED = {"published recipe (10,000 rows)": 10_000, "multilingual recipe (94,225 rows)": 94_225}


def make_corpus(out: Path, num_pages: int, seed: int = 0) -> Path:
    """A page corpus dataset (page_id, image) of realistic pages."""
    from datasets import Dataset, Features, Image, Value

    from dist_vdr.bench.train_speed import _page

    rng = random.Random(seed)
    pages = [_page(rng, *PAGE_SHAPES[i % 2]) for i in range(num_pages)]
    feats = Features({"page_id": Value("string"), "image": Image()})
    Dataset.from_dict({"page_id": [f"p{i}" for i in range(num_pages)], "image": pages},
                      features=feats).save_to_disk(str(out))
    return out


def make_rows(out: Path, num_rows: int, corpus: Path, images: bool, seed: int = 0) -> Path:
    """Training rows (query, image, negative_0): page ids of ``corpus``, or its images themselves."""
    import datasets

    from dist_vdr.bench.train_speed import _query

    pages = datasets.load_from_disk(str(corpus))
    n = len(pages)
    rng = random.Random(seed)
    positives = [i % n for i in range(num_rows)]
    negatives = [(i * 7 + 3) % n for i in range(num_rows)]
    queries = [f"{_query(rng)} ({i})" for i in range(num_rows)]
    if images:
        raw = pages.cast_column("image", datasets.Image(decode=False))["image"]
        feats = datasets.Features({"query": datasets.Value("string"), "image": datasets.Image(),
                                   "negative_0": datasets.Image()})
        rows = {"query": queries, "image": [raw[i] for i in positives], "negative_0": [raw[i] for i in negatives]}
    else:
        feats = None
        rows = {"query": queries, "image": [f"p{i}" for i in positives], "negative_0": [f"p{i}" for i in negatives]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=feats)}).save_to_disk(str(out))
    return out


def _train(model: Path, rows: Path, corpus: Path | None, out: Path, world_size: int, max_steps: int,
           launch_config: str, extra: list[str], env: dict) -> dict:
    overrides = [f"model.name_or_path={model}", f"data.path={rows}", f"training.output_dir={out}",
                 "training.global_batch_size=8", "loss.mini_batch_size=4", f"training.max_steps={max_steps}",
                 "training.save_steps=1", "evaluation.enabled=false", "launch.device=cpu",
                 f"launch.expected_world_size={world_size}", *([f"data.pages_path={corpus}"] if corpus else []),
                 *extra]
    train = ["-m", "dist_vdr.cli", "train", "--config", "configs/tiny.yaml", *overrides, "--allow-config-change"]
    cmd = [sys.executable, *train] if world_size == 1 else [
        sys.executable, "-m", "dist_vdr.cli.launcher", "--config_file", launch_config, "--num_processes",
        str(world_size), "--main_process_port", env["MASTER_PORT"], *train]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench startup run failed ({' '.join(cmd)}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(RunDir(out).startup_times.read_text())


def run(work_dir: str, *, rows: list[int], image_rows: int, world_size: int, num_pages: int = 64,
        launch_config: str = "launch/cpu.yaml") -> dict:
    from dist_vdr.kinds.tiny import build_tiny_model

    work = Path(work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model = build_tiny_model(work / "model")
    corpus = make_corpus(work / "corpus", num_pages)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIST_VDR_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
    # One process per rank (startup_workers=1) compares ranks with ranks; the last setting is one rank
    # with a worker per core, dist-vdr's default on a machine to itself.
    settings = [("ids", n, w, 1) for n in rows for w in sorted({1, world_size})]
    if image_rows:
        settings += [("images", image_rows, w, 1) for w in sorted({1, world_size})]
        settings.append(("images", image_rows, 1, 0))
    results = []
    for kind, n, w, workers in settings:
        data = work / f"rows-{kind}-{n}"
        if not data.exists():
            make_rows(data, n, corpus, images=kind == "images")
        out = work / f"run-{kind}-{n}-w{w}-{workers}"
        env_w = {**env, "MASTER_PORT": str(29600 + len(results))}
        extra = [f"launch.startup_workers={workers}"]
        pages = corpus if kind == "ids" else None
        first = _train(model, data, pages, out, w, 1, launch_config, extra, env_w)
        shutil.rmtree(RunDir(out).final)  # so the rerun resumes from checkpoint-1 and trains step 2
        resume = _train(model, data, pages, out, w, 2, launch_config, extra, env_w)
        results.append({"kind": kind, "rows": n, "world_size": w, "workers": workers or "auto", "first": first,
                        "resume": resume})
        shutil.rmtree(out)
        shutil.rmtree(work / "cache", ignore_errors=True)  # each setting's first start really starts cold
    return {"results": results, "world_size": world_size}


DATA_PHASE = "data: load, validation, hashing"


def _pass_s(times: dict) -> float:
    """The startup pass itself (validation + hashing, all ranks, the gather included); older records:
    the whole data phase (loading and imports included)."""
    return times.get("startup_pass_s", times["phases_s"].get(DATA_PHASE, 0.0))


def summarise(report: dict) -> dict:
    res = report["results"]
    ids = sorted((r for r in res if r["kind"] == "ids" and r["world_size"] == report["world_size"]),
                 key=lambda r: r["rows"])
    out: dict = {}
    if len(ids) >= 2:
        out["resume_most_vs_fewest_rows"] = ids[-1]["resume"]["total_s"] / ids[0]["resume"]["total_s"]
    images = {r["world_size"]: r for r in res if r["kind"] == "images" and r["workers"] == 1}
    if len(images) == 2:
        w = report["world_size"]
        out["pass_w_vs_1_rank"] = _pass_s(images[w]["first"]) / _pass_s(images[1]["first"])
        pages = 2 * images[1]["rows"]
        per_page = _pass_s(images[1]["first"]) / pages
        out["per_page_s"] = per_page
        out["projection"] = {name: {"before_rank0_s": 2 * n * per_page, "now_8_ranks_first_s": 2 * n * per_page / 8,
                                    "now_resume_s": 0.0} for name, n in PUBLISHED.items()}
    return out


def format_report(report: dict) -> str:
    lines = ["| rows | pages in rows | ranks x workers | start | time to first step (s) | data phase (s) | "
             "of it the pass (s) | other phases (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        for start in ("first", "resume"):
            t = r[start]
            others = ", ".join(f"{k} {v:.1f}" for k, v in t["phases_s"].items() if k != DATA_PHASE)
            lines.append(f"| {r['rows']:,} | {'images' if r['kind'] == 'images' else 'ids'} | "
                         f"{r['world_size']} x {r['workers']} | "
                         f"{start} | {t['total_s']:.1f} | {t['phases_s'].get(DATA_PHASE, 0.0):.1f} | "
                         f"{_pass_s(t):.1f} | {others} |")
    s = summarise(report)
    if "resume_most_vs_fewest_rows" in s:
        lines.append(f"\nresume, most rows vs fewest: {s['resume_most_vs_fewest_rows']:.2f}x (goal <= 1.2)")
    if "pass_w_vs_1_rank" in s:
        lines.append(f"first start, the pass on {report['world_size']} ranks vs 1: {s['pass_w_vs_1_rank']:.2f}x "
                     f"(goal <= 0.6); {s['per_page_s'] * 1e3:.1f} ms per page on one rank (decode + hash)")
        for name, p in s["projection"].items():
            lines.append(f"{name}: before {p['before_rank0_s'] / 60:.1f} min on rank 0 at every start; now "
                         f"{p['now_8_ranks_first_s'] / 60:.1f} min on 8 ranks at the first start, none on resume")
    return "\n".join(lines)
