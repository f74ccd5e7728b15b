"""`dist-vdr average` as a command: two checkpoints averaged and evaluated, bad arguments refused."""

from __future__ import annotations

from conftest import log_tail, perturbed_copy, run_cli


def test_the_command_averages_and_evaluates(tiny_model, pages, tmp_path):
    other = perturbed_copy(tiny_model, tmp_path / "other", 0.001)
    proc = run_cli(["average", str(tiny_model), str(other), "--out", str(tmp_path / "avg"), "--eval-data", str(pages),
                    "--device", "cpu"])
    assert proc.returncode == 0, log_tail(proc.stdout + proc.stderr)
    assert "averaged 2 checkpoints" in proc.stdout and "NDCG@10" in proc.stdout
    assert (tmp_path / "avg" / "eval" / "retrieval_metrics.json").is_file()
    bad = run_cli(["average", str(tiny_model), "--out", str(tmp_path / "x")])
    assert bad.returncode == 2 and "at least two" in bad.stderr
    bad = run_cli(["average", str(tiny_model), str(tiny_model), "--weights", "1,,2", "--out", str(tmp_path / "x")])
    assert bad.returncode == 2 and "--weights '1,,2': give one number per checkpoint" in bad.stderr
