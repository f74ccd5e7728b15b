"""The one input check (dist_vdr.data.checks, config numbers): ids unique in every source, numbers finite and in
range, per-row lists of the right length -- at load, naming the row and the column (#33 items 2, 6, 7, 11, 12)."""

from __future__ import annotations

import json
import math

import pytest

from conftest import run_cli
from dist_vdr.config import load_config


def test_repeated_ids_are_refused_in_every_eval_source(tmp_path):
    """A BEIR folder (or hub configuration) and a dataset's eval_queries split with one query id twice: refused
    naming the column and both rows. (It was accepted: NDCG@10 0.1549 for 0.1467, 15 queries counted as 16.)"""
    import datasets

    from dist_vdr.config import DataConfig
    from dist_vdr.data.loading import ir_eval_data

    corpus = datasets.Dataset.from_dict({"page_id": ["p1", "p2"], "image": [None, None]})
    queries = datasets.Dataset.from_dict({"query_id": ["q1", "q2", "q1"], "query": ["a", "b", "c"]})
    qrels = datasets.Dataset.from_dict({"query_id": ["q1", "q2"], "page_id": ["p1", "p2"], "score": [1, 1]})
    cfg = DataConfig(path="x", validate_images=False)
    with pytest.raises(ValueError, match=r"query id 'q1' repeats in column 'query_id' \(rows 0 and 2\)"):
        ir_eval_data(cfg, corpus, queries, qrels, "x", "BEIR eval data x (test)")
    pages = datasets.Dataset.from_dict({"page_id": ["p1", "p2", "p1"], "image": [None] * 3})
    with pytest.raises(ValueError, match=r"page id 'p1' repeats in column 'page_id' \(rows 0 and 2\)"):
        ir_eval_data(cfg, pages, queries.select([0, 1]), qrels, "x", "x")
    bad = qrels.remove_columns(["score"]).add_column("score", [1.0, float("nan")])
    with pytest.raises(ValueError, match=r"row 1 of column 'score' holds nan, not an integer grade"):
        ir_eval_data(cfg, corpus, queries.select([0, 1]), bad, "x", "x")
    twice = datasets.Dataset.from_dict({"query_id": ["q1", "q1"], "page_id": ["p1", "p1"], "score": [1, 0]})
    with pytest.raises(ValueError, match=r"row 1 judges query 'q1' page 'p1' 0, an earlier row 1"):
        ir_eval_data(cfg, corpus, queries.select([0, 1]), twice, "x", "x")


@pytest.mark.parametrize("override,message", [
    ("loss.false_negatives.margin=.nan", "loss.false_negatives.margin=nan: give a finite number"),
    ("loss.false_negatives.margin=nan", "loss.false_negatives.margin=nan: give a finite number"),
    ("training.learning_rate=inf", "training.learning_rate=inf: give a finite number"),
    ("loss.distillation.temperature=-inf", "loss.distillation.temperature=-inf"),
])
def test_every_number_of_a_recipe_is_finite(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        load_config("configs/tiny.yaml", [override], check_paths=False)


@pytest.mark.parametrize("weight,message", [("nan", r"a weight is a finite relative share in \[0, 1e6\].*got \[nan\]"),
                                            ("1e308", r"a weight is a finite relative share in \[0, 1e6\]")])
def test_a_mixture_weight_is_a_finite_share(weight, message):
    datasets = f"data.datasets=[{{name: a, path: x}}, {{name: b, path: y, weight: {weight}}}]"
    with pytest.raises(ValueError, match=message):
        load_config("configs/tiny.yaml", [datasets, "data.mixture=weighted"], check_paths=False)


@pytest.mark.parametrize("scores,message", [
    ([[0.9, 0.1], [0.8, float("nan")]], r"row 1 of column 'teacher_scores' holds nan \(score 1\)"),
    ([[0.9, 0.1], [0.8, float("inf")]], r"row 1 of column 'teacher_scores' holds inf"),
    ([[0.9, 0.1], [0.8]], r"row 1 of column 'teacher_scores' holds 1 scores, not 2"),
    ([[0.9, 0.1], None], r"row 1 of column 'teacher_scores' has no scores \(null\)"),
    ([[0.9, 0.1], [0.8, None]], r"row 1 of column 'teacher_scores' holds nan"),
])
def test_teacher_scores_are_checked_at_load_for_every_row(scores, message):
    import datasets

    from dist_vdr.data.checks import score_lists

    ds = datasets.Dataset.from_dict({"teacher_scores": scores})
    with pytest.raises(ValueError, match=message):
        score_lists(ds, "teacher_scores", 2, "training data d[train]")
    score_lists(ds.select([0]), "teacher_scores", 2, "training data d[train]")  # a good row passes


def test_data_check_refuses_a_bad_teacher_score_before_training_and_needs_no_model(pages, tmp_path):
    """`dist-vdr data check DATA` without --config (it failed on the default recipe's model path, which it does
    not load), and a NaN teacher score named by row and column at load (it trained until the row's step)."""
    import datasets

    rows = datasets.load_from_disk(str(pages))["train"].select(range(32))
    scores = [[1.0, 0.0, 0.0]] * 32
    scores[11] = [1.0, math.nan, 0.0]
    datasets.DatasetDict({"train": rows.add_column("teacher_scores", scores)}).save_to_disk(str(tmp_path / "scored"))
    home = {"HOME": str(tmp_path / "home")}
    from conftest import launch_env

    ok = run_cli(["data", "check", str(pages), "evaluation.enabled=false", "data.validate_images=false",
                  "launch.device=cpu"], env=launch_env(**home))
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = run_cli(["data", "check", str(tmp_path / "scored"), "loss.distillation.scores_column=teacher_scores",
                   "evaluation.enabled=false", "data.negative_columns=[negative_0,negative_1]", "launch.device=cpu"],
                  env=launch_env(**home))
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "row 11 of column 'teacher_scores' holds nan (score 1)" in bad.stderr, bad.stderr[-2000:]


def test_the_resume_guard_names_the_key_and_treats_dataset_keys_as_their_twins(tmp_path):
    from dist_vdr.config import to_yaml
    from dist_vdr.run import resume_guard

    def recipe(*more):
        return to_yaml(load_config("configs/tiny.yaml", [
            "data.datasets=[{name: a, path: x, eval_path: e1}, {name: b, path: y}]", "data.mixture=weighted", *more],
            check_paths=False))

    base = recipe()
    # a dataset's eval set and its gradient-caching mini-batch: reporting, as data.eval_path / loss.mini_batch_size
    changed = recipe("data.datasets=[{name: a, path: x, eval_path: e2, mini_batch_size: 2}, {name: b, path: y}]")
    notes = resume_guard.check(base, changed, "checkpoint-4", allow_change=False)
    assert any("data.datasets[a].eval_path: 'e1' -> 'e2'" in n and "data.datasets[a].mini_batch_size" in n
               for n in notes), notes
    # a change of what trains names the key alone, not both lists (~4 KB before)
    moved = recipe("data.datasets=[{name: a, path: x, eval_path: e1}, {name: b, path: z}]")
    with pytest.raises(ValueError) as info:
        resume_guard.check(base, moved, "checkpoint-4", allow_change=False)
    assert "data.datasets[b].path: 'y' -> 'z'" in str(info.value) and len(str(info.value)) < 400, str(info.value)


def test_report_reads_the_newest_intact_checkpoint_and_names_the_damage(tmp_path):
    from dist_vdr import distributed
    from dist_vdr.checkpoints import store as checkpoint
    from dist_vdr.config import Config, to_yaml
    from dist_vdr.run.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "resolved_config.yaml").write_text(to_yaml(Config()))
    for step in (2, 4):
        folder = run / f"checkpoint-{step}"
        folder.mkdir()
        history = [{"step": s, "loss": 1.0 / s} for s in range(1, step + 1)]
        (folder / "trainer_state.json").write_text(json.dumps({"log_history": history}))
        checkpoint.mark_complete(folder, distributed.DistInfo(), {"step": step})
    (run / "checkpoint-4" / "trainer_state.json").unlink()
    _, md = write_report(run)
    text = md.read_text()
    assert "steps logged: 2" in text and "newest checkpoint: checkpoint-2" in text, text
    assert "checkpoint-4/trainer_state.json does not read" in text
