"""The model card (final/README.md) from the records, and adding a file to a marked folder."""

from __future__ import annotations

from dist_vdr import distributed
from dist_vdr.checkpoints import store as checkpoint
from dist_vdr.config import load_config
from dist_vdr.kinds import get
from dist_vdr.run.card import build_card
from dist_vdr.run.results import Metrics, RunResult


def _result(rows_after: dict, rows_before: dict | None = None, dims=(64, 32)) -> RunResult:
    return RunResult(task="embedding", global_step=12, final_loss=1.25, dims=list(dims),
                     before=Metrics.of(0, rows_before) if rows_before else None, after=Metrics.of(12, rows_after))


def test_the_card_holds_the_recipe_the_data_and_every_evaluated_row():
    cfg = load_config(None, ["loss.matryoshka_dims=[64,32]", "training.max_steps=12"], check_paths=False)
    result = _result({64: {"ndcg@10": 0.5, "mrr@10": 0.25}, 32: {"ndcg@10": 0.375}}, {64: {"ndcg@10": 0.125}})
    task = get("embedding")
    text = build_card(cfg, result, usage=task.card_usage(cfg), model_class=task.card_model_class,
                      run_info={"world_size": 4, "device": "cuda", "versions": {"torch": "2.14.1"}},
                      data_rows={"./artifacts/pages": 4000})
    assert text.startswith("---\nlibrary_name: sentence-transformers\n")
    assert "trained on 4 rank(s), cuda" in text and "`./artifacts/pages`: 4,000 rows" in text
    assert "| 64 | 0.5000 | 0.2500 | 0.1250 |" in text and "| 32 | 0.3750 | - | - |" in text
    assert "| `global_batch_size` | 32 |" in text and "Final training loss: 1.2500" in text
    assert 'SentenceTransformer("path/to/final")' in text and "- torch: 2.14.1" in text and "- matryoshka" in text


def test_an_adapter_card_says_how_to_load_it_and_a_reranker_card_is_a_cross_encoders():
    cfg = load_config(None, ["model.adapter.type=lora"], check_paths=False)
    usage = get("embedding").card_usage(cfg)
    assert 'load_adapter("path/to/final")' in usage and cfg.model.name_or_path in usage
    rcfg = load_config(None, ["task=reranker"], check_paths=False)
    reranker = get("reranker")
    text = build_card(rcfg, _result({"retrieval": {"ndcg@10": 0.5}, "rerank": {"ndcg@10": 0.625}}, dims=()),
                      usage=reranker.card_usage(rcfg), model_class=reranker.card_model_class, run_info=None,
                      data_rows={"rows": 10})
    assert "pipeline_tag: text-ranking" in text and "| rerank | 0.6250 |" in text and "CrossEncoder(" in text


def test_a_file_added_to_a_marked_folder_keeps_it_verifiable(tmp_path):
    info = distributed.DistInfo()
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    checkpoint.mark_complete(tmp_path, info, {"step": 3})
    checkpoint.add_file(tmp_path, "README.md", "# card\n")
    assert checkpoint.verify(tmp_path, info) == []
    checkpoint.add_file(tmp_path, "README.md", "# card, with the evaluation\n")  # replaced: still verifies
    assert checkpoint.verify(tmp_path, info) == []
    (tmp_path / "README.md").write_text("edited")
    assert checkpoint.verify(tmp_path, info) == ["README.md has 6 bytes, the marker says 28"]


def test_the_report_reads_the_series_and_the_evaluations_of_a_run_folder(tmp_path):
    import json

    from dist_vdr.run.report import eval_curves, series, write_report

    log = [{"step": 1, "loss": 3.0, "learning_rate": 1e-3, "grad_norm": 2.0},
           {"step": 2, "loss": 2.5, "learning_rate": 5e-4, "grad_norm": 1.5, "samples_per_second": 40.0},
           {"step": 2, "eval_dim64_cosine_ndcg@10": 0.25, "eval_dim32_cosine_ndcg@10": 0.125,
            "eval_charts/dim64_cosine_ndcg@10": 0.5, "eval_rerank_ndcg@10": 0.75, "eval_loss": 1.0}]
    assert series(log, "loss") == ([1, 2], [3.0, 2.5]) and series(log, "samples_per_second") == ([2], [40.0])
    assert eval_curves(log) == {"64": ([2], [0.25]), "32": ([2], [0.125]), "rerank": ([2], [0.75])}
    with __import__("pytest").raises(ValueError, match="not a dist-vdr run folder"):
        write_report(tmp_path)
    # a run killed midway: a checkpoint, no final/, no evaluation after
    (tmp_path / "resolved_config.yaml").write_text("task: embedding\nmodel: {name_or_path: m}\ndata: {path: d}\n")
    (tmp_path / "run_info.jsonl").write_text(json.dumps({"world_size": 2, "device": "cpu"}) + "\n")
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"log_history": log}))
    checkpoint.mark_complete(ckpt, distributed.DistInfo(), {"step": 2})
    Metrics.of(0, {64: {"ndcg@10": 0.125}}).write(tmp_path / "metrics_before.json")
    with open(tmp_path / "run_info.jsonl", "a") as f:
        f.write('{"world_size": 4, "dev')  # a run killed while appending: half a line, skipped
    png, md = write_report(tmp_path)
    text = md.read_text()
    assert png.is_file() and "in progress or stopped; newest checkpoint: checkpoint-2" in text
    assert "| 64 | 0.1250 | - | - |" in text and "world size 2, device cpu" in text
    with __import__("pytest").raises(ValueError, match="--metric NDCG@10: the run's evaluations hold"):
        write_report(tmp_path, "NDCG@10")
    (tmp_path / "metrics_after.json").write_text('{"step": 2, "metr')
    with __import__("pytest").raises(ValueError, match="metrics_after.json does not read as a metrics record"):
        write_report(tmp_path)


def test_results_in_mtebs_format_load_with_mtebs_own_loader(tmp_path):
    import json

    from dist_vdr.data.loading import set_name
    from dist_vdr.retrieval.mteb_format import write_results

    assert set_name("./data/vidore-v3-hr/") == "vidore-v3-hr" and set_name("org/name with space") == "name-with-space"
    files = write_results(tmp_path, "dist-vdr", "pages", "test",
                          {64: {"ndcg@10": 0.5, "recall@100": 0.9, "accuracy@1": 0.25}, 32: {"ndcg@10": 0.375}})
    other = write_results(tmp_path / "m", "x", "pages", "test", {8: {"ndcg@5": 0.5, "mrr@5": 0.25}},
                          main_metric="mrr@5")
    assert json.loads(other[0].read_text())["scores"]["test"][0]["main_score"] == 0.25
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [
        "mteb/dist-vdr_dim64/no_revision_available/pages.json", "mteb/dist-vdr_dim32/no_revision_available/pages.json"]
    payload = json.loads(files[0].read_text())
    assert payload["scores"]["test"][0] == {"ndcg_at_10": 0.5, "recall_at_100": 0.9, "hit_rate_at_1": 0.25,
                                            "main_score": 0.5, "hf_subset": "default", "languages": ["und-Zyyy"]}
    from mteb.results import TaskResult  # installed by the test extra (setup.cfg)

    loaded = [TaskResult.from_disk(f, load_historic_data=False) for f in files]
    assert [r.task_name for r in loaded] == ["pages", "pages"]
    assert [r.get_score() for r in loaded] == [0.5, 0.375]
