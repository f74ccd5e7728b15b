"""`dist-vdr bench train`: training throughput of dist-vdr's training path next to stock sentence-transformers.

One run measures, on the same device, model, pages and global batch:
- dist-vdr settings: ``dist-vdr train`` itself (the recipe with overrides, the real trainer, loss,
  data path and sampler) for ``warmup + steps`` optimizer steps;
- stock settings: ``SentenceTransformerTrainer`` with ``MatryoshkaLoss(CachedMultipleNegativesRankingLoss)``
  at a mini-batch size (``mb8``) or a token budget (``tok6000``), the published recipe's data settings.
Every setting runs in its own process (its peak memory is its own; an out-of-memory setting is
reported as such and the others go on) with the same step statistics (``dist_vdr.run.step_stats``):
median s/step after the warm-up, triplets/s, tokens/s, estimated FLOPs and MFU, peak memory.

The model is built offline with random weights: ``tiny`` (the test model, CPU in seconds) or
``qwen3-vl-2b`` (Qwen3-VL-2B shapes, 2.13 B parameters, the issue's anchors), or any model folder.
Pages are generated: ``mixed`` page shapes of real documents at 150 dpi, or ``anchor`` (1416x1648, as
the stock anchors were measured), with text lines; queries of ~55 tokens.

    dist-vdr bench train --model qwen3-vl-2b --work-dir /tmp/bench            # GPU
    dist-vdr bench train --model tiny --work-dir /tmp/bench --global-batch-size 8 --steps 2   # CPU smoke
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dist_vdr.outputs import mark
from dist_vdr.run.folder import RunDir

RECIPES = {"tiny": "configs/tiny.yaml", "qwen3-vl-2b": "configs/qwen3-vl-embedding-2b-vdr.yaml"}
# (width, height, share) of pages at 150 dpi: A4 and Letter portrait, A4 landscape, 16:9 slides, scans.
MIXED_SHAPES = ((1240, 1754, 0.3), (1275, 1650, 0.3), (1754, 1240, 0.1), (1920, 1080, 0.2), (1416, 1648, 0.1))
ANCHOR_SHAPE = (1416, 1648)
PAGES_MARKER = "dist_vdr_bench_pages.json"
_WORDS = ("quarterly", "revenue", "grew", "percent", "annual", "report", "table", "figure", "region", "segment",
          "operating", "margin", "cash", "flow", "guidance", "outlook", "page", "chart", "summary")


@dataclass(kw_only=True)
class Setting:
    name: str
    kind: str
    """ours (dist-vdr train with ``overrides``) or stock (sentence-transformers' trainer)."""
    overrides: list[str] = field(default_factory=list)
    mini_batch_size: int | None = None
    mini_batch_num_tokens: int | None = None
    extra_warmup_steps: int = 0
    """Compiled settings: the first steps compile, then recompile once or twice for new shapes
    (measured on CPU: 25 s, 8.6 s, 0.17 s, 6.6 s, then 0.17 s per step), so they warm up longer."""


def parse_stock(spec: str, global_batch: int) -> Setting:
    """``mb8`` -> mini_batch_size 8; ``tok6000`` -> mini_batch_num_tokens 6000 (mini_batch_size = the batch)."""
    if spec.startswith("mb") and spec[2:].isdigit():
        return Setting(name=f"stock {spec}", kind="stock", mini_batch_size=int(spec[2:]))
    if spec.startswith("tok") and spec[3:].isdigit():
        return Setting(name=f"stock {spec}", kind="stock", mini_batch_size=global_batch,
                       mini_batch_num_tokens=int(spec[3:]))
    raise ValueError(f"--stock {spec!r}: use mbN (mini_batch_size N) or tokN (mini_batch_num_tokens N)")


def parse_ours(spec: str) -> Setting:
    """``NAME`` or ``NAME:key=value,key=value`` (recipe overrides, as on the train command line)."""
    name, _, rest = spec.partition(":")
    overrides = [o for o in rest.split(",") if o]
    if not name or any("=" not in o for o in overrides):
        raise ValueError(f"--ours {spec!r}: use NAME or NAME:key=value,key=value "
                         f"(e.g. tok6000:loss.mini_batch_num_tokens=6000)")
    compiled = any(o.replace(" ", "").lower() in ("model.compile=true", "model.compile=1") for o in overrides)
    return Setting(name=f"dist-vdr {name}", kind="ours", overrides=overrides, extra_warmup_steps=3 if compiled else 0)


def _query(rng: random.Random) -> str:
    return "What does the page say about " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(14, 20))) + "?"


def _page(rng: random.Random, width: int, height: int):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (250, 250, 250))
    d = ImageDraw.Draw(img)
    for k in range(0, height - 80, 38):
        d.text((40, 40 + k), " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))), fill=(0, 0, 0))
    x = rng.randint(60, width // 3)
    d.rectangle([x, height // 2, x + width // 3, height // 2 + height // 5], outline=(200, 0, 0), width=5)
    return img


def make_pages(out: Path, num_rows: int, pages: str, scale: float = 1.0, seed: int = 0) -> Path:
    """A training set of ``num_rows`` (query, image, negative_0) rows, saved with ``datasets`` (cached)."""
    from dist_vdr.retrieval.mining import read_marker, save_atomic

    want = {"num_rows": num_rows, "pages": pages, "scale": scale, "seed": seed}
    if read_marker(out, PAGES_MARKER) == want:
        return out
    from datasets import Dataset, DatasetDict, Features, Image, Value
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    shapes = [ANCHOR_SHAPE] if pages == "anchor" else [s[:2] for s in MIXED_SHAPES]
    weights = [1.0] if pages == "anchor" else [s[2] for s in MIXED_SHAPES]
    rows = {"query": [], "image": [], "negative_0": []}
    for _ in tqdm(range(num_rows), desc="generating bench pages", unit="row"):
        rows["query"].append(_query(rng))
        for col in ("image", "negative_0"):
            w, h = rng.choices(shapes, weights)[0]
            rows[col].append(_page(rng, max(32, int(w * scale)), max(32, int(h * scale))))
    feats = Features({"query": Value("string"), "image": Image(), "negative_0": Image()})
    return save_atomic(DatasetDict({"train": Dataset.from_dict(rows, features=feats)}), out, want, PAGES_MARKER)


def summarise(setting: Setting, stats: dict | None, global_batch: int, warmup_steps: int, error: str | None) -> dict:
    row = {"setting": setting.name, "kind": setting.kind}
    if stats is None:
        return {**row, "error": error or "no statistics written"}
    steps = stats["steps"][warmup_steps + setting.extra_warmup_steps:] or stats["steps"]
    seconds = statistics.median(s["seconds"] for s in steps)
    mid = min(steps, key=lambda s: abs(s["seconds"] - seconds))
    flops = statistics.median(s["flops"] for s in steps) if steps[0]["flops"] is not None else None
    peak = stats.get("peak_bf16_flops")
    return {**row, "s_per_step": round(seconds, 4), "triplets_per_s": round(global_batch / seconds, 3),
            "tokens_per_s": round((mid["text_tokens"] or 0) / seconds, 1),
            "patches_per_s": round((mid["patches"] or 0) / seconds, 1),
            "flop_per_step": flops,
            "mfu": None if (flops is None or not peak) else round(flops / seconds / peak, 4),
            "peak_gib": round(stats["peak_memory_bytes"] / 2**30, 2), "peak_memory_kind": stats["peak_memory_kind"],
            "device": stats["device"], "measured_steps": len(steps)}


def _run_worker(job: dict, log: Path, timeout_s: float | None) -> str | None:
    """Runs one setting in a fresh process; returns an error line or None."""
    cmd = [sys.executable, "-m", "dist_vdr.bench.train_speed_worker", json.dumps(job)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout_s:.0f} s (log: {log})"
    if proc.returncode == 0:
        return None
    text = log.read_text(errors="replace")
    tail = text.strip().splitlines()[-1:] or ["?"]
    if "OutOfMemoryError" in text or "out of memory" in tail[0].lower():
        return "out of memory"
    return f"exit {proc.returncode}: {tail[0][:300]} (log: {log})"


def run_train_bench(work_dir: str, *, model: str = "tiny", config: str | None = None, steps: int = 3,
                    warmup_steps: int = 1, global_batch_size: int | None = None, stock: list[str] | None = None,
                    ours: list[str] | None = None, pages: str = "mixed", device: str = "auto",
                    timeout_s: float | None = None) -> dict:
    """Runs every setting and returns {"settings": [...], "config": ..., ...}; see the module docstring."""
    from dist_vdr.config import load_config

    if steps < 1 or warmup_steps < 0:
        raise ValueError("--steps must be >= 1 and --warmup-steps >= 0")
    if pages not in ("mixed", "anchor"):
        raise ValueError(f"--pages {pages!r}: use mixed or anchor")
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    recipe = config or RECIPES.get(model)
    if recipe is None:
        raise ValueError(f"--model {model!r} is a folder: give the recipe to run it with (--config)")
    if config is None and not Path(recipe).is_file():  # run from outside the repository
        recipe = str(Path(__file__).resolve().parents[2] / recipe)
    cfg = load_config(recipe, check_paths=False)  # its model and data paths are replaced by the bench's
    batch = global_batch_size or cfg.training.global_batch_size
    total_steps = warmup_steps + steps

    model_dir = _build_model(model, work, device, timeout_s)
    data_dir = make_pages(work / f"pages-{pages}-{batch}", batch * min(total_steps, 4), pages,
                          scale=0.25 if model == "tiny" else 1.0)
    stock_specs = stock if stock is not None else ["mb1", "mb8", "mb16", "tok6000"]
    settings = [parse_stock(s, batch) for s in stock_specs] + [parse_ours(s) for s in (ours or ["recipe"])]
    common = {"recipe": recipe, "model_dir": str(model_dir), "data_dir": str(data_dir), "global_batch_size": batch,
              "max_steps": total_steps, "device": device}
    results = []
    for i, setting in enumerate(settings):
        out = work / "runs" / f"{i:02d}-{setting.name.replace(' ', '-')}"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        mark(out, "train", {"by": "bench"})  # the run's log goes in first: the folder is this run's
        print(f"[bench] {setting.name} ...", flush=True)
        job = {**common, "setting": asdict(setting), "output_dir": str(out),
               "max_steps": total_steps + setting.extra_warmup_steps}
        error = _run_worker(job, out / "log.txt", timeout_s)
        stats_file = RunDir(out).step_stats
        stats = json.loads(stats_file.read_text()) if error is None and stats_file.is_file() else None
        row = summarise(setting, stats, batch, warmup_steps, error)
        print(f"[bench] {json.dumps(row)}", flush=True)
        results.append(row)
    report = {"model": model, "recipe": recipe, "pages": pages, "global_batch_size": batch, "steps": steps,
              "warmup_steps": warmup_steps, "settings": results}
    _add_ratios(report)
    (work / "bench.json").write_text(json.dumps(report, indent=1))
    (work / "bench.md").write_text(format_table(report))
    return report


def _build_model(model: str, work: Path, device: str, timeout_s: float | None) -> Path:
    if model not in RECIPES:
        return Path(model)
    out = work / f"model-{model}"
    log = work / f"build-{model}.log"
    error = _run_worker({"build": model, "model_dir": str(out), "device": device}, log, timeout_s)
    if error:
        raise RuntimeError(f"building the {model} model failed: {error}")
    return out


def _add_ratios(report: dict) -> None:
    ok = [r for r in report["settings"] if "triplets_per_s" in r]
    best = max((r for r in ok if r["kind"] == "stock"), key=lambda r: r["triplets_per_s"], default=None)
    report["best_stock"] = best["setting"] if best else None
    for r in ok:
        r["vs_best_stock"] = round(r["triplets_per_s"] / best["triplets_per_s"], 2) if best else None


def format_table(report: dict) -> str:
    dev = next((r["device"] for r in report["settings"] if "device" in r), "?")
    title = (f"model {report['model']} ({report['recipe']}), {report['pages']} pages, global batch "
             f"{report['global_batch_size']}, median of {report['steps']} steps after {report['warmup_steps']} "
             f"warm-up, device {dev}")
    lines = [title, "",
             "| setting | s/step | triplets/s | tokens/s | est. MFU | peak GiB | vs best stock |",
             "|---|---|---|---|---|---|---|"]
    for r in report["settings"]:
        if "error" in r:
            lines.append(f"| {r['setting']} | {r['error']} | | | | | |")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['setting']} | {r['s_per_step']:.3f} | {r['triplets_per_s']:.2f} | {r['tokens_per_s']:.0f} "
                     f"| {mfu} | {r['peak_gib']:.2f} | {r['vs_best_stock']}x |")
    return "\n".join(lines) + "\n"
