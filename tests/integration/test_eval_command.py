"""`dist-vdr eval` as a command: 2 ranks under the launcher give the metrics of 1 process; eval and mining
write nothing into the data folder."""

from __future__ import annotations

import json

import pytest

from conftest import log_tail, run_accelerate, run_cli


@pytest.mark.parametrize("model, dims", [("tiny_model", (64, 32)), ("tiny_multi_vector", (32, 16))])
def test_eval_command_two_ranks_equal_one_rank(model, dims, request, pages, tmp_path):
    """`dist-vdr eval` under the real launcher with 2 ranks gives the metrics and rankings of 1 process, for a
    single-vector and a multi-vector model (its kind read from the folder; MaxSim over each rank's shard)."""
    model = request.getfixturevalue(model)
    args = ["--model", str(model), "--data", str(pages), "--dims", ",".join(map(str, dims)), "--batch-size", "8"]
    one = run_cli(["eval", *args, "--output", str(tmp_path / "one")], timeout=300)
    assert one.returncode == 0, log_tail(one.stderr)
    two = run_accelerate(["eval", *args, "--device", "cpu", "--output", str(tmp_path / "two")], timeout=300)
    assert two.returncode == 0, log_tail(two.stderr)
    peaks = [line for line in two.stdout.splitlines() if line.startswith("peak resident memory per rank: ")]
    assert len(peaks) == 1 and len(peaks[0].split(": ")[1].split(" / ")) == 2, two.stdout[-2000:]
    a = json.loads((tmp_path / "one" / "retrieval_metrics.json").read_text())["metrics"]
    b = json.loads((tmp_path / "two" / "retrieval_metrics.json").read_text())["metrics"]
    assert a.keys() == b.keys() == {str(d) for d in dims}
    for d in a:
        for name, value in a[d].items():
            assert b[d][name] == pytest.approx(value, abs=1e-9), (d, name)
    for dim in dims:  # the same pages in the same order (ties broken by trec_eval's rule on both)
        assert (tmp_path / "one" / f"run.dim{dim}.trec").read_text().split()[2::6] == \
            (tmp_path / "two" / f"run.dim{dim}.trec").read_text().split()[2::6]


def _listing(folder) -> dict[str, tuple[int, int]]:
    return {str(f.relative_to(folder)): (f.stat().st_size, f.stat().st_mtime_ns) for f in folder.rglob("*")}


def test_eval_and_mining_never_write_into_the_data_folder(tiny_model, pages, tmp_path):
    """`dist-vdr eval` (with a cache), triplets loading and mining leave the data folder as it was
    (`Dataset.cast` on a dataset loaded from disk wrote a full copy of the pages there)."""
    import shutil

    from sentence_transformers import SentenceTransformer

    from dist_vdr.config import DataConfig, MiningConfig
    from dist_vdr.data.loading import load_eval, load_train
    from dist_vdr.retrieval import mining

    data = tmp_path / "pages"
    shutil.copytree(pages, data)
    before = _listing(data)
    done = run_cli(["eval", "--model", str(tiny_model), "--data", str(data), "--dims", "64", "--batch-size", "8",
                    "--device", "cpu", "--cache", str(tmp_path / "cache"), "--output", str(tmp_path / "out")])
    assert done.returncode == 0, log_tail(done.stderr)
    assert _listing(data) == before

    load_eval(DataConfig(path=str(data), eval_format="triplets", eval_split="train", max_eval_queries=8,
                         eval_negative_columns=["negative_0"]))
    rows = load_train(DataConfig(path=str(data), max_train_samples=12, negative_columns=["negative_0", "negative_1"],
                                 validate_images=True))
    model = SentenceTransformer(str(tiny_model), device="cpu")
    found = mining.mine(model, rows, MiningConfig(num_negatives=1, max_rank=10), query_column="query",
                        positive_column="image", page_columns=["negative_0", "negative_1"], batch_size=8,
                        num_workers=0, cache_dir=str(tmp_path / "mining-cache"), show_progress=False)
    mining.write_mined(rows, found, tmp_path / "mined", query_column="query", positive_column="image",
                       fingerprint={})
    assert _listing(data) == before
