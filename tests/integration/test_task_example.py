"""The worked example of docs/tasks.md: a kind defined outside the package -- its own config section, loss name and
score rule, registered with one line -- trains on 2 ranks, evaluates through `dist-vdr eval` and mines negatives, and
no file under dist_vdr/ names it."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from conftest import REPO, launch_env, log_tail, run_cli, run_launcher, tiny_overrides


def _doc_module() -> str:
    """The kind's module of docs/tasks.md (its first Python block)."""
    text = (REPO / "docs" / "tasks.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]


def test_no_file_of_the_package_names_the_example_kind():
    names = ("l1_kind", "L1Task", "NegativeL1", "L1Config", "l1_infonce", '"l1"', "task=l1")
    named = [f"{p.relative_to(REPO)}: {n}" for p in (REPO / "dist_vdr").rglob("*.py") for n in names
             if n in p.read_text()]
    assert not named, named


def test_a_kind_from_outside_trains_on_two_ranks_evaluates_and_mines(tiny_model, pages, tmp_path):
    (tmp_path / "l1_kind.py").write_text(_doc_module())
    env = launch_env(DIST_VDR_KINDS="l1_kind", PYTHONPATH=str(tmp_path))
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_model, pages, out, "task=l1", "loss.name=auto", "l1.weight=0.25",
                               "training.max_steps=4", "training.save_steps=4", "evaluation.before_training=false",
                               "data.max_eval_queries=8")
    train = run_launcher("launch/cpu.yaml", ["--config", "configs/tiny.yaml", *overrides], env=env)
    log = train.stdout + train.stderr
    assert train.returncode == 0, log_tail(log)
    assert "loss: GlobalBatchCachedMNRL" in log and re.search(r"NDCG@10 before=n/a after=\d\.\d{4}", log)
    recipe = (out / "resolved_config.yaml").read_text()
    assert "task: l1" in recipe and "name: l1_infonce" in recipe and "weight: 0.25" in recipe  # its section
    final = out / "final"
    assert json.loads((final / "dist_vdr_kind.json").read_text()) == {"task": "l1"}
    after = json.loads((out / "metrics_after.json").read_text())["metrics"]

    # dist-vdr eval reads the kind from final/ and ranks by its rule: the run's own evaluation, scores <= 0.
    ev = run_cli(["eval", "--model", str(final), "--data", str(pages), "--device", "cpu", "--dims", "64,32,16",
                  "--output", str(tmp_path / "eval"), "data.max_eval_queries=8", "l1.weight=0.25"], env=env)
    assert ev.returncode == 0, log_tail(ev.stdout + ev.stderr)
    metrics = json.loads((tmp_path / "eval" / "retrieval_metrics.json").read_text())["metrics"]
    assert metrics.keys() == after.keys() == {"64", "32", "16"}
    for dim in metrics:
        assert metrics[dim]["ndcg@10"] == pytest.approx(after[dim]["ndcg@10"], abs=1e-6), dim
    scores = [float(line.split()[4]) for line in (tmp_path / "eval" / "run.dim64.trec").read_text().splitlines()]
    assert scores and max(scores) <= 0  # minus the weight x an L1 distance (cosine scores are mostly > 0)
    # A process that does not register the kind says so in one line.
    unknown = run_cli(["eval", "--model", str(final), "--data", str(pages), "--device", "cpu"])
    assert unknown.returncode == 2 and unknown.stderr.strip().splitlines()[-1].startswith("error: --model ") \
        and "task='l1', which is not registered here" in unknown.stderr and "DIST_VDR_KINDS" in unknown.stderr

    # mine-negatives scores by the kind's rule too: the recorded retriever scores are -weight x L1.
    mined = run_cli(["mine-negatives", "--model", str(final), "--data", str(pages), "--out", str(tmp_path / "mined"),
                     "--num-negatives", "2", "--device", "cpu", "l1.weight=0.25"], env=env)
    assert mined.returncode == 0, log_tail(mined.stdout + mined.stderr)
    import datasets

    rows = datasets.load_from_disk(str(tmp_path / "mined"))
    retriever = np.array(rows["retriever_scores"])
    assert retriever.shape == (len(rows), 3) and (retriever < 0).all()  # cosine scores of these pages are > 0
