"""`dist-vdr eval` on a folder in the ViDoRe BEIR layout equals the evaluation of the same data given as
dataset splits."""

from __future__ import annotations

import json

from conftest import log_tail, run_cli


def _beir_folder(pages, out):
    """The generated eval splits of ``pages`` rewritten as the ViDoRe BEIR layout, ids as integers."""
    import datasets

    ds = datasets.load_from_disk(str(pages))
    number = {pid: i for i, pid in enumerate(ds["eval_corpus"]["page_id"])}
    qnumber = {qid: 1000 + i for i, qid in enumerate(ds["eval_queries"]["query_id"])}
    tables = {
        "corpus": ds["eval_corpus"].map(lambda r: {"corpus-id": number[r["page_id"]]}).remove_columns(["page_id"]),
        "queries": datasets.Dataset.from_dict({"query-id": [qnumber[q] for q in ds["eval_queries"]["query_id"]],
                                               "query": ds["eval_queries"]["query"]}),
        "qrels": datasets.Dataset.from_dict({"query-id": [qnumber[q] for q in ds["eval_qrels"]["query_id"]],
                                             "corpus-id": [number[p] for p in ds["eval_qrels"]["page_id"]],
                                             "score": ds["eval_qrels"]["score"]}),
    }
    for part, table in tables.items():
        (out / part).mkdir(parents=True)
        table.to_parquet(str(out / part / "test-00000-of-00001.parquet"))
    return out


def test_beir_folder_eval_equals_eval_of_the_same_data_as_splits(tiny_model, pages, tmp_path):
    folder = _beir_folder(pages, tmp_path / "beir")
    common = ["eval", "--model", str(tiny_model), "--device", "cpu", "--dims", "64,16"]
    splits = run_cli([*common, "--data", str(pages), "--output", str(tmp_path / "splits")])
    beir = run_cli([*common, "--data", str(folder), "--eval-format", "beir", "--output", str(tmp_path / "beir-out")])
    assert splits.returncode == 0, log_tail(splits.stdout + splits.stderr)
    assert beir.returncode == 0, log_tail(beir.stdout + beir.stderr)
    a, b = (json.loads((tmp_path / d / "retrieval_metrics.json").read_text()) for d in ("splits", "beir-out"))
    assert a["num_queries"] == b["num_queries"] == 32 and a["num_pages"] == b["num_pages"]
    assert a["metrics"] == b["metrics"]
    # the set is named after the folder in the mteb-format results
    assert (tmp_path / "beir-out" / "mteb" / "dist-vdr_dim64" / "no_revision_available" / "beir.json").is_file()
