"""Mixtures of datasets through the real launcher: every optimizer step one dataset on every rank, the
ranks' rows the one-process global batch (W in {1, 2, 4}), a killed run resuming with exactly the same
rows (on 2 ranks and on 1), per-dataset losses logged and the plan in run_info.jsonl.

The row trace (DIST_VDR_TRACE_ROWS) names each row as ``<dataset index>:<row within its dataset>``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import (
    kill_after_first_checkpoint,
    launch_env,
    log_tail,
    logged_losses,
    run_cli,
    run_launcher,
    tiny_overrides,
)

STEPS = 6


@pytest.fixture(scope="module")
def forms(tmp_path_factory) -> Path:
    from dist_vdr.data.synthetic import SyntheticPagesSpec, generate_pages

    spec = SyntheticPagesSpec(num_train=128, num_negatives=2, num_eval_queries=16, seed=2, style="forms")
    return generate_pages(tmp_path_factory.mktemp("data") / "forms", spec, show_progress=False)


def _args(tiny_model: Path, pages: Path, forms: Path, out: Path, *more: str) -> list[str]:
    mixture = (f"data.datasets=[{{name: charts, path: {pages}}}, "
               f"{{name: forms, path: {forms}, weight: 200, cross_device_negatives: false}}]")
    return ["--config", "configs/tiny.yaml", *tiny_overrides(tiny_model, pages, out), mixture,
            "data.negative_columns=[negative_0,negative_1]", f"training.max_steps={STEPS}",
            "evaluation.enabled=false", *more]


def _trace(folder: Path, world: int) -> dict[int, list[str]]:
    """step -> the global batch trained on (the ranks' rows joined in rank order)."""
    steps: dict[int, list[list[str]]] = {}
    for rank in range(world):
        for line in (folder / f"rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            steps.setdefault(rec["step"], [[] for _ in range(world)])
            assert not steps[rec["step"]][rank], f"rank {rank} trained step {rec['step']} twice"
            steps[rec["step"]][rank] = rec["rows"]
    return {step: sum(ranks, []) for step, ranks in steps.items()}


def _train(world: int, args: list[str], trace: Path):
    result = run_launcher("launch/cpu.yaml", args,
                          env=launch_env(DIST_VDR_TRACE_ROWS=str(trace), NUM_PROCESSES=str(world)))
    assert result.returncode == 0, log_tail(result.stdout + result.stderr)
    return result


def test_every_step_is_one_dataset_on_all_ranks_and_the_ranks_hold_the_one_process_batch(tiny_model, pages, forms,
                                                                                         tmp_path):
    traces = {}
    for world in (1, 2, 4):
        out, trace = tmp_path / f"w{world}", tmp_path / f"trace-w{world}"
        result = _train(world, _args(tiny_model, pages, forms, out), trace)
        traces[world] = _trace(trace, world)
        assert sorted(traces[world]) == list(range(1, STEPS + 1))
        for step, rows in traces[world].items():
            assert len(rows) == 16 and len(set(rows)) == 16, (world, step)
            assert len({r.split(":")[0] for r in rows}) == 1, f"W={world} step {step} mixes datasets: {rows}"
    assert traces[2] == traces[1] and traces[4] == traces[1]
    # weight 200 vs 256 rows: most steps are forms steps, but not all
    datasets_seen = [rows[0].split(":")[0] for rows in traces[1].values()]
    assert set(datasets_seen) == {"0", "1"}, datasets_seen
    assert "dataset forms: 128 rows, weight 200" in result.stdout
    info = json.loads((tmp_path / "w4" / "run_info.jsonl").read_text().splitlines()[-1])
    assert [(d["name"], d["rows"], d["weight"]) for d in info["datasets"]] == [("charts", 256, 256.0),
                                                                             ("forms", 128, 200.0)]
    state = logged_losses(tmp_path / "w2", "loss/forms")
    assert state and all(v > 0 for v in state.values())


def test_a_killed_mixture_resumes_with_the_same_rows_on_two_ranks_and_on_one(tiny_model, pages, forms, tmp_path):
    whole_trace = tmp_path / "trace-whole"
    _train(2, _args(tiny_model, pages, forms, tmp_path / "whole"), whole_trace)
    expected = _trace(whole_trace, 2)

    out = tmp_path / "killed"
    args = _args(tiny_model, pages, forms, out)
    kill_after_first_checkpoint(["bash", "launch/train.sh", "launch/cpu.yaml", *args], out,
                                env=launch_env(DIST_VDR_TRACE_ROWS=str(tmp_path / "trace-killed")))
    one_rank = tmp_path / "killed-then-1-rank"
    shutil.copytree(out, one_rank)
    report = run_cli(["report", str(out)])  # a killed run's report: up to its newest checkpoint
    assert report.returncode == 0 and "in progress or stopped" in (out / "report.md").read_text()
    for world, folder in ((2, out), (1, one_rank)):
        trace = tmp_path / f"trace-resumed-{world}"
        again = _train(world, _args(tiny_model, pages, forms, folder), trace)
        assert "resuming from" in again.stdout
        after = _trace(trace, world)
        assert min(after) >= 3 and max(after) == STEPS  # resumed after the first checkpoint (save_steps=2)
        for step, rows in after.items():
            assert rows == expected[step], f"resumed on {world} rank(s): step {step} trained other rows"


def test_each_dataset_is_evaluated_on_its_own_set_and_the_macro_average_is_the_main_metric(tiny_model, pages, forms,
                                                                                          tmp_path):
    out = tmp_path / "run"
    mixture = (f"data.datasets=[{{name: charts, path: {pages}, eval_path: {pages}}}, "
               f"{{name: forms, path: {forms}, eval_path: {forms}}}]")
    args = ["--config", "configs/tiny.yaml", *tiny_overrides(tiny_model, pages, out), mixture,
            "data.negative_columns=[negative_0,negative_1]", "training.max_steps=2", "data.max_eval_queries=8"]
    result = _train(2, args, tmp_path / "trace")
    assert "eval sets: charts, forms (their macro average is the main metric)" in result.stdout
    after = json.loads((out / "metrics_after.json").read_text())["metrics"]
    for dim in ("64", "32", "16"):
        mean = (after[f"charts/{dim}"]["ndcg@10"] + after[f"forms/{dim}"]["ndcg@10"]) / 2
        assert after[dim]["ndcg@10"] == pytest.approx(mean, abs=1e-12)
    assert f"after={after['64']['ndcg@10']:.4f} (macro average of 2 eval sets" in result.stdout
    for name in ("charts", "forms"):  # each set's own outputs, from the sharded evaluator
        assert (out / "eval_after" / name / "run.dim64.trec").is_file()
