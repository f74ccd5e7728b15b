"""A multi-vector model in `dist-vdr eval` and `mine-negatives` under the real launcher: 2 ranks give the rankings,
metrics and mined rows of 1 process (the corpus sharded, each rank scoring its shard by MaxSim, one gather)."""

from __future__ import annotations

import json

import pytest

from conftest import log_tail, run_accelerate, run_cli


def test_eval_and_mining_on_two_ranks_equal_one_process(tiny_multi_vector, pages, tmp_path):
    args = ["--model", str(tiny_multi_vector), "--data", str(pages), "--dims", "32,16", "--batch-size", "8"]
    one = run_cli(["eval", *args, "--output", str(tmp_path / "one")], timeout=300)
    assert one.returncode == 0, log_tail(one.stderr)
    two = run_accelerate(["eval", *args, "--device", "cpu", "--output", str(tmp_path / "two")], timeout=300)
    assert two.returncode == 0, log_tail(two.stderr)
    a = json.loads((tmp_path / "one" / "retrieval_metrics.json").read_text())["metrics"]
    b = json.loads((tmp_path / "two" / "retrieval_metrics.json").read_text())["metrics"]
    assert a.keys() == b.keys() == {"32", "16"}
    for d in a:
        for name, value in a[d].items():
            assert b[d][name] == pytest.approx(value, abs=1e-9), (d, name)
    for dim in (32, 16):  # the same pages in the same order (ties broken by trec_eval's rule on both)
        assert (tmp_path / "one" / f"run.dim{dim}.trec").read_text().split()[2::6] == \
            (tmp_path / "two" / f"run.dim{dim}.trec").read_text().split()[2::6]

    mine = ["mine-negatives", "--model", str(tiny_multi_vector), "--data", str(pages), "--num-negatives", "2",
            "--batch-size", "8", "--device", "cpu"]
    one = run_cli([*mine, "--out", str(tmp_path / "mined-one")])
    assert one.returncode == 0, log_tail(one.stdout + one.stderr)
    two = run_accelerate([*mine, "--out", str(tmp_path / "mined-two")])
    assert two.returncode == 0, log_tail(two.stdout + two.stderr)
    import datasets

    x, y = (datasets.load_from_disk(str(tmp_path / f"mined-{n}")) for n in ("one", "two"))
    assert x.column_names == y.column_names and len(x) == len(y) > 0
    for column in ("query", "retriever_scores"):
        assert x[column] == y[column], column
