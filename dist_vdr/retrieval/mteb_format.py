"""Evaluation results in mteb's results format, so they compare with the leaderboards users read.

mteb keeps one JSON per (model, revision, task): ``<model>/<revision>/<TaskName>.json`` holding
``task_name``, ``dataset_revision``, ``mteb_version``, ``evaluation_time`` and ``scores`` = split ->
a list of score dicts (``ndcg_at_10``, ``recall_at_100``, ... , ``main_score``, ``hf_subset``,
``languages``). mteb has no notion of a Matryoshka dimension: each dim is written as a model variant of
its own (``<model>_dim<d>``), as a leaderboard lists truncated embeddings. Checked against mteb 2.26's
``TaskResult`` loader (tests/unit/test_card.py).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from dist_vdr.storage import atomic_write

MTEB_DIR = "mteb"
_KEY = re.compile(r"^(?P<name>[a-z]+)@(?P<k>\d+)$")


def scores(metrics: dict[str, float], main_metric: str = "ndcg@10") -> dict:
    """One mteb score dict from dist-vdr's metrics of one dim (``ndcg@10`` -> ``ndcg_at_10``)."""
    out = {}
    for key, value in metrics.items():
        m = _KEY.match(key)
        if m:
            name = {"accuracy": "hit_rate"}.get(m.group("name"), m.group("name"))
            out[f"{name}_at_{m.group('k')}"] = float(value)
    out["main_score"] = float(metrics.get(main_metric, float("nan")))
    out["hf_subset"] = "default"
    out["languages"] = ["und-Zyyy"]  # ISO 639-3 "undetermined", ISO 15924 "undetermined script"
    return out


def write_results(folder: str | os.PathLike, model_name: str, task: str, split: str,
                  metrics_by_dim: dict[int, dict[str, float]], evaluation_time: float | None = None,
                  main_metric: str = "ndcg@10") -> list[Path]:
    """``folder/mteb/<model>_dim<d>/no_revision_available/<task>.json`` for every dim; returns the files."""
    written = []
    for dim, metrics in sorted(metrics_by_dim.items(), reverse=True):
        path = Path(folder) / MTEB_DIR / f"{model_name}_dim{dim}" / "no_revision_available" / f"{task}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"dataset_revision": "local", "task_name": task, "mteb_version": None,
                   "scores": {split: [scores(metrics, main_metric)]}, "evaluation_time": evaluation_time,
                   "kg_co2_emissions": None}
        atomic_write(path, json.dumps(payload, indent=2))
        written.append(path)
    return written
