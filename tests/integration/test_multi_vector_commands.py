"""A multi-vector model in `mine-negatives` under the real launcher: 2 ranks give the mined rows of 1 process (the
corpus sharded, each rank scoring its shard by MaxSim, one gather). `dist-vdr eval` of one on 2 ranks vs 1:
tests/integration/test_eval_command.py."""

from __future__ import annotations

from conftest import log_tail, run_accelerate, run_cli


def test_mining_on_two_ranks_equals_one_process(tiny_multi_vector, pages, tmp_path):
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
