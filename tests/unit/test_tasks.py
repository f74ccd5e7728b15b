"""The kind registry and the Task seam: what a kind declares is checked the same way for a kind from outside."""

from __future__ import annotations

import pytest

from dist_vdr import kinds as tasks
from dist_vdr.config import load_config


def test_registry_names_every_task_and_refuses_others():
    assert tasks.names()[:2] == ["embedding", "reranker"]
    assert type(tasks.get("embedding")).__name__ == "EmbeddingTask"
    assert tasks.get("reranker").name == "reranker"
    with pytest.raises(ValueError, match="task='multivector' is not one of"):
        load_config(None, ["task=multivector"], check_paths=False)
    with pytest.raises(ValueError, match="module:Class"):
        tasks.register("bad", "no_colon")


def test_a_kind_from_outside_composes_its_section_and_is_checked_like_the_others(tmp_path, monkeypatch):
    """docs/tasks.md's kind registered in this process: its section is in the recipe (and checked there), its
    loss name is the only one it takes, another kind's options are refused, its score rule rules out the stock
    evaluator. (tests/integration/test_task_example.py trains it.)"""
    import re
    import sys

    from conftest import REPO

    module = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "tasks.md").read_text(), flags=re.S)[0]
    (tmp_path / "l1_kind.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(tasks, "REGISTRY", dict(tasks.REGISTRY))  # the registration is undone after the test
    monkeypatch.delitem(sys.modules, "l1_kind", raising=False)
    __import__("l1_kind")
    cfg = load_config(None, ["task=l1", "l1.weight=0.3"], check_paths=False)
    assert cfg.loss.name == "l1_infonce" and cfg.l1.weight == 0.3
    for overrides, message in ((["l1.weight=-1"], "l1.weight must be > 0"),
                               (["loss.name=cmnrl"], r"is not a loss of task=l1; use one of \['l1_infonce'\]"),
                               (["loss.pos_weight=2"], "pos_weight applies to task=reranker; remove it for task=l1"),
                               (["evaluation.implementation=stock"], "use evaluation.implementation=sharded")):
        with pytest.raises(ValueError, match=message):
            load_config(None, ["task=l1", *overrides], check_paths=False)
    assert load_config(None, ["l1.weight=0.3"], check_paths=False).task == "embedding"  # any recipe has the section


def test_every_evaluator_implements_the_run_protocol():
    from dist_vdr.kinds.reranker.evaluation import RerankEvaluator
    from dist_vdr.retrieval.protocol import RunEvaluator
    from dist_vdr.retrieval.sharded import ShardedRetrievalEvaluator
    from dist_vdr.retrieval.stock import StockRetrievalEvaluator

    for cls in (ShardedRetrievalEvaluator, StockRetrievalEvaluator, RerankEvaluator):
        assert isinstance(getattr(cls, "all_ranks", None), bool), cls
        assert callable(getattr(cls, "summarise", None)) and callable(cls.__call__), cls
    assert not isinstance({}, RunEvaluator)  # the protocol can fail


def test_metrics_records_round_trip_with_explicit_keys(tmp_path):
    from dist_vdr.run.results import Metrics, RunResult

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


def test_a_kind_module_that_does_not_import_is_one_line(monkeypatch, capfd):
    from dist_vdr.cli import main

    monkeypatch.setenv("DIST_VDR_KINDS", "no_such_kind_module")
    assert main(["eval", "--model", "m", "--data", "d"]) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: DIST_VDR_KINDS: cannot import 'no_such_kind_module'") and len(err.splitlines()) == 1
