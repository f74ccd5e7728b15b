"""The Task seam: the worked example of docs/tasks.md is registered and trained as written there."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO
from dist_vdr import tasks
from dist_vdr.config import load_config


def _doc_module() -> str:
    """The task module of docs/tasks.md (its first Python block)."""
    text = (REPO / "docs" / "tasks.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]


def test_registry_names_every_task_and_refuses_others():
    assert tasks.names()[:2] == ["embedding", "reranker"]
    assert type(tasks.get("embedding")).__name__ == "EmbeddingTask"
    assert tasks.get("reranker").name == "reranker"
    with pytest.raises(ValueError, match="task='multivector' is not one of"):
        load_config(None, ["task=multivector"], check_paths=False)
    with pytest.raises(ValueError, match="module:Class"):
        tasks.register("bad", "no_colon")


_RUN = """
import sys
sys.path.insert(0, {folder!r})
from dist_vdr import tasks
from dist_vdr.config import load_config
from dist_vdr.training import headline, run_training
tasks.register("triplet", "triplet_task:TripletTask")  # the one registry line
cfg = load_config(None, {overrides!r})
result = run_training(cfg)
print("RESULT", result.task, result.global_step, cfg.loss.name)
print("HEADLINE", headline(result, "ndcg@10"))
"""


@pytest.mark.slow
def test_the_documented_toy_task_trains(tiny_model, pages, tmp_path):
    (tmp_path / "triplet_task.py").write_text(_doc_module())
    out = tmp_path / "run"
    overrides = ["task=triplet", f"model.name_or_path={tiny_model}", f"data.path={pages}",
                 f"training.output_dir={out}", "training.max_steps=2", "training.global_batch_size=4",
                 "training.save_steps=2", "evaluation.before_training=false", "launch.device=cpu"]
    proc = subprocess.run([sys.executable, "-c", _RUN.format(folder=str(tmp_path), overrides=overrides)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "RESULT triplet 2 cmnrl" in proc.stdout
    assert "loss: TripletLoss" in proc.stdout  # the task's loss, not the recipe's
    assert re.search(r"HEADLINE NDCG@10 before=n/a after=\d\.\d{4}", proc.stdout)
    assert (out / "final" / "model.safetensors").is_file() and (out / "metrics.json").is_file()
    bad = subprocess.run([sys.executable, "-c", _RUN.format(folder=str(tmp_path), overrides=[
        *overrides, "data.negative_columns=[]"])], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert "set data.negative_columns to one column" in bad.stderr


def test_every_evaluator_implements_the_run_protocol():
    from dist_vdr.evaluation.protocol import RunEvaluator
    from dist_vdr.evaluation.sharded import ShardedRetrievalEvaluator
    from dist_vdr.evaluation.stock import StockRetrievalEvaluator
    from dist_vdr.reranker.evaluation import RerankEvaluator

    for cls in (ShardedRetrievalEvaluator, StockRetrievalEvaluator, RerankEvaluator):
        assert isinstance(getattr(cls, "all_ranks", None), bool), cls
        assert callable(getattr(cls, "summarise", None)) and callable(cls.__call__), cls
    assert not isinstance({}, RunEvaluator)  # the protocol can fail


def test_metrics_records_round_trip_with_explicit_keys(tmp_path):
    from dist_vdr.results import Metrics, RunResult

    m = Metrics.of(7, {64: {"ndcg@10": 0.5}, 16: {"ndcg@10": 0.25}})
    assert m.rows == {"64": {"ndcg@10": 0.5}, "16": {"ndcg@10": 0.25}} and m.dims == [64, 16]
    m.write(tmp_path / "m.json")
    assert Metrics.read(tmp_path / "m.json") == m
    assert Metrics.read(tmp_path / "m.json", step=8) is None and Metrics.read(tmp_path / "none.json") is None
    stages = Metrics.of(3, {"retrieval": {"ndcg@10": 0.1}, "rerank": {"ndcg@10": 0.2}})
    assert stages.dims == [] and stages.get("rerank", "ndcg@10") == 0.2
    assert list(stages.to_json()["metrics"]) == ["retrieval", "rerank"]  # the evaluator's order
    result = RunResult(task="embedding", global_step=3, after=m, dims=m.dims)
    assert result.finished and tasks.get("embedding").headline(result, "ndcg@10") == \
        "NDCG@10 before=n/a after=0.5000"
    assert tasks.get("embedding").headline(RunResult(task="embedding", global_step=3, preempted=True),
                                           "ndcg@10") is None
