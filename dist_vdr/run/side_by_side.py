"""Runs side by side (``dist-vdr report RUN RUN ...``): each run's metric before and after training at every
dimension it evaluated, and what a page costs to store at that dimension.

The cost of a page is measured, not assumed: the run's ``final/`` encodes a sample of the run's own evaluation
pages through sentence-transformers' ``encode_document`` (one vector per page for a single-vector model, one per
scored token for a multi-vector model), and a page's bytes are its vectors x the dimension x 2 (float16 storage).
Nothing here names a kind: the model is loaded by the kind its folder records.
"""

from __future__ import annotations

from pathlib import Path

from dist_vdr.run.folder import RunDir
from dist_vdr.run.results import Metrics

SAMPLE_PAGES = 32
BYTES_PER_VALUE = 2  # float16 storage


def vectors_per_page(final: Path, cfg, sample: int = SAMPLE_PAGES) -> float | None:
    """Mean number of vectors ``final/`` stores per page, over the first ``sample`` evaluation pages of ``cfg``
    (None: no final model, or a kind that stores no page vectors)."""
    import dataclasses

    from dist_vdr import kinds
    from dist_vdr.data.loading import load_eval

    if not (final / kinds.KIND_FILE).is_file():
        return None
    task = kinds.get(kinds.of_folder(final))
    model_cfg = dataclasses.replace(cfg.model, name_or_path=str(final), adapter=dataclasses.replace(cfg.model.adapter,
                                                                                                     type=None))
    model = task.load_model(model_cfg, cfg, device="cpu", precision="fp32")
    if not hasattr(model, "encode_document"):
        return None
    corpus = load_eval(cfg.data).corpus
    pages = [corpus[i]["image"] for i in range(min(sample, len(corpus)))]
    encoded = model.encode_document(pages, batch_size=8, show_progress_bar=False)
    counts = [item.numel() // item.shape[-1] if item.dim() > 1 else 1 for item in _rows(encoded)]
    return sum(counts) / len(counts)


def _rows(encoded) -> list:
    import numpy as np
    import torch

    if isinstance(encoded, np.ndarray):
        encoded = torch.from_numpy(encoded)
    return list(encoded)


def table(runs: list[str | Path], metric: str = "ndcg@10", sample: int = SAMPLE_PAGES) -> str:
    """The markdown table of ``runs`` side by side (one row per run and dimension)."""
    from dist_vdr.config import load_config

    lines = [f"| run | task | dim | {metric} before | {metric} after | vectors per page | bytes per page (fp16) |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        folder = RunDir(run)
        if not folder.resolved_config.is_file():
            raise ValueError(f"{run} is not a dist-vdr run folder (no resolved_config.yaml): give a "
                             f"training.output_dir")
        cfg = load_config(folder.resolved_config, check_paths=False)
        before, after = (Metrics.read(folder.metrics(w)) if folder.metrics(w).is_file() else None
                         for w in ("before", "after"))
        vectors = vectors_per_page(folder.final, cfg, sample)
        dims = (after or before).dims if (after or before) else []
        for dim in dims:
            cost = "n/a" if vectors is None else f"{vectors * dim * BYTES_PER_VALUE:,.0f}"
            count = "n/a" if vectors is None else f"{vectors:.1f}"
            lines.append(f"| {run} | {cfg.task} | {dim} | {_value(before, dim, metric)} | {_value(after, dim, metric)} "
                         f"| {count} | {cost} |")
    return "\n".join(lines)


def _value(metrics: Metrics | None, dim: int, metric: str) -> str:
    value = metrics.get(dim, metric) if metrics is not None else None
    return "n/a" if value is None else f"{value:.4f}"
