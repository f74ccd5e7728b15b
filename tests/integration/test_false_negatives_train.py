"""Masking false negatives (by id and by a guide) through the real launcher: 2 ranks equal 1 process,
and it masks.

The generated pages give rows of the same three attributes one document_id, and a global batch of
16 of them regularly holds two rows of one document (each the other's negative) or a negative of
another row's document. With loss.false_negatives.id_column=document_id those candidates leave the
softmax, and so do those the guide (the base model) scores within 0.1 of the positive: at step 1 (same
weights, same batch: masking does not change the batches) the masked loss is below the unmasked one,
and 2 ranks give the losses of 1 process holding the global batch.
"""

from __future__ import annotations

import pytest

from conftest import assert_same_step, log_tail, logged_losses, run_accelerate, run_cli, run_launcher, tiny_overrides

STEPS = 4
MASK = "loss.false_negatives.id_column=document_id"


def _guide(model) -> list[str]:  # the base model as the guide, GIST's absolute margin
    return [f"loss.false_negatives.guide={model}", "loss.false_negatives.margin=0.1"]


def _args(model, pages, out, *more):
    return ["--config", "configs/tiny.yaml",
            *tiny_overrides(model, pages, out, f"training.max_steps={STEPS}", "evaluation.enabled=false",
                            "data.negative_columns=[negative_0,negative_1]", *more)]


def test_masking_on_two_ranks_lowers_the_loss_and_logs_what_it_masked(tiny_model, pages, tmp_path):
    """Masking by id and guide through the launcher, on 2 ranks. That 2 and 4 ranks compute the loss and
    gradients of one process with masking on is the in-process gloo harness's claim
    (tests/integration/test_loss_equivalence.py: mask_ids_*, mask_guide_*, w4_mask_*, and the broken variants
    that mask with one rank's ids or guide only); here, that the trainer wires it in end to end."""
    two = run_launcher("launch/cpu.yaml", _args(tiny_model, pages, tmp_path / "two", MASK, *_guide(tiny_model)))
    assert two.returncode == 0, log_tail(two.stdout + two.stderr)
    assert "false negatives masked by id and guide" in two.stdout + two.stderr
    assert "Hashing dataset values" not in two.stdout + two.stderr  # the startup pass's hashes still serve
    assert sorted(logged_losses(tmp_path / "two")) == list(range(1, STEPS + 1))

    plain = run_launcher("launch/cpu.yaml", _args(tiny_model, pages, tmp_path / "plain"))
    assert plain.returncode == 0, log_tail(plain.stdout + plain.stderr)
    masked, unmasked = logged_losses(tmp_path / "two")[1], logged_losses(tmp_path / "plain")[1]
    print(f"step-1 loss: masked {masked:.6f} vs unmasked {unmasked:.6f}")
    assert masked < unmasked - 1e-3
    # How many candidates left each query's softmax, logged at every logging step (rank 0's queries).
    counts = logged_losses(tmp_path / "two", "masked_per_query")
    assert sorted(counts) == list(range(1, STEPS + 1)) and max(counts.values()) > 0, counts
    assert not logged_losses(tmp_path / "plain", "masked_per_query")


def test_mine_negatives_writes_teacher_scores_that_distillation_trains_on(tiny_model, pages, tmp_path):
    """--teacher scores each mined row's positive and negatives; with the retriever itself as the teacher
    they are its own scores. The rows then train with loss.distillation (and masking by nothing else)."""
    import datasets
    import numpy as np

    out = tmp_path / "mined"
    mined = run_cli(["mine-negatives", "--model", str(tiny_model), "--data", str(pages), "--out", str(out),
                     "--num-negatives", "2", "--teacher", str(tiny_model), "--device", "cpu"])
    assert mined.returncode == 0, log_tail(mined.stdout + mined.stderr)
    rows = datasets.load_from_disk(str(out))
    teacher, retriever = np.array(rows["teacher_scores"]), np.array(rows["retriever_scores"])
    assert teacher.shape == (len(rows), 3) and np.allclose(teacher, retriever, atol=1e-5)
    assert np.allclose(np.array(rows["negative_margins"]), retriever[:, :1] - retriever[:, 1:], atol=1e-6)

    train = run_cli(["train", "--config", "configs/tiny.yaml",
                     *tiny_overrides(tiny_model, out, tmp_path / "run", "training.max_steps=2",
                                     "evaluation.enabled=false", "data.negative_columns=[negative_0,negative_1]",
                                     "launch.device=cpu", "loss.distillation.scores_column=teacher_scores",
                                     "loss.distillation.kind=kl")])
    assert train.returncode == 0, log_tail(train.stdout + train.stderr)
    assert "1 x kl distillation from teacher_scores" in train.stdout + train.stderr


def test_reranker_teacher_scores_on_two_ranks_equal_the_reranker(tiny_model, tiny_reranker, pages, tmp_path):
    """--teacher with a reranker (a dist-vdr CrossEncoder folder, found as such by --teacher-type auto):
    mined on 2 ranks (the rows' pairs split between them), teacher_scores are the reranker's own scores
    of each row's (query, positive) and (query, negative) pairs, each scored alone in this process."""

    import datasets
    import numpy as np
    import torch

    from dist_vdr.config import ModelConfig
    from dist_vdr.kinds.reranker.config import RerankerConfig
    from dist_vdr.kinds.reranker.model import build_reranker
    from dist_vdr.kinds.reranker.scoring import forward_scores

    out = tmp_path / "mined"
    two = run_accelerate(["mine-negatives", "--model", str(tiny_model), "--data", str(pages), "--out", str(out),
                          "--num-negatives", "2", "--teacher", str(tiny_reranker), "--device", "cpu",
                          "--batch-size", "2", "reranker.prompt=Does the page answer the query?"],
                         "--num_processes", "2")
    assert two.returncode == 0, log_tail(two.stdout + two.stderr)
    rows = datasets.load_from_disk(str(out))
    taught = np.array(rows["teacher_scores"])
    assert taught.shape == (len(rows), 3) and len(rows) > 100
    reranker = build_reranker(ModelConfig(name_or_path=str(tiny_reranker), dtype="float32", attn_implementation="sdpa"),
                              RerankerConfig(), device="cpu")
    reranker.eval()
    picked = range(0, len(rows), 17)  # every 17th row: both ranks' shares
    with torch.no_grad():
        ref = np.array([[float(forward_scores(reranker, [(rows[i]["query"], rows[i][c])],
                                              "Does the page answer the query?")[0])
                         for c in ("image", "negative_0", "negative_1")] for i in picked])
    np.testing.assert_allclose(taught[list(picked)], ref, rtol=1e-4, atol=1e-5)
    assert np.ptp(ref) > 1e-3  # the scores differ between pairs: a wrong pairing would not pass


def test_score_rows_adds_a_teachers_scores_to_the_rows_as_they_are(tiny_model, tiny_reranker, pages, tmp_path):
    """score-rows keeps every row and column and adds teacher_scores: the teacher's cosine scores of
    the row's query with its positive and each negative column (no mining). A reranker folder given
    as an embedding teacher is refused with the fix."""
    import datasets
    import numpy as np

    from dist_vdr.config import ModelConfig
    from dist_vdr.models.build import build_model

    out = tmp_path / "scored"
    scored = run_cli(["score-rows", "--teacher", str(tiny_model), "--data", str(pages), "--out", str(out),
                      "--negative-columns", "negative_0", "negative_1", "--device", "cpu"])
    assert scored.returncode == 0, log_tail(scored.stdout + scored.stderr)
    rows, source = datasets.load_from_disk(str(out)), datasets.load_from_disk(str(pages))["train"]
    assert rows.column_names == [*source.column_names, "teacher_scores"] and len(rows) == len(source)
    assert rows["document_id"] == source["document_id"]
    model = build_model(ModelConfig(name_or_path=str(tiny_model), dtype="float32", attn_implementation="sdpa"))
    picked = list(range(0, len(rows), 31))
    queries = model.encode_query([rows[i]["query"] for i in picked], normalize_embeddings=True)
    ref = np.stack([np.sum(queries * model.encode_document([rows[i][c] for i in picked], normalize_embeddings=True),
                           axis=1) for c in ("image", "negative_0", "negative_1")], axis=1)
    np.testing.assert_allclose(np.array(rows["teacher_scores"])[picked], ref, atol=1e-4)

    refused = run_cli(["score-rows", "--teacher", str(tiny_reranker), "--teacher-type", "embedding", "--data",
                       str(pages), "--out", str(tmp_path / "no"), "--device", "cpu"])
    assert refused.returncode == 2 and "use --teacher-type reranker" in refused.stderr
    not_a_reranker = run_cli(["score-rows", "--teacher", str(tiny_model), "--teacher-type", "reranker", "--data",
                              str(pages), "--out", str(tmp_path / "no"), "--device", "cpu"])
    assert not_a_reranker.returncode == 2, log_tail(not_a_reranker.stderr)
    error = [line for line in not_a_reranker.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "does not load as a reranker" in error[0] and len(error[0]) < 600
    no_negatives = run_cli(["score-rows", "--teacher", str(tiny_model), "--data", str(pages), "--out",
                            str(tmp_path / "no"), "--negative-columns", "--device", "cpu"])
    assert no_negatives.returncode == 2 and "needs the rows' negative columns" in no_negatives.stderr
    datasets.Dataset.from_dict({"query": ["a", "b"], "image": ["p1", "p2"], "negative_0": ["p2", "p1"]}).save_to_disk(
        str(tmp_path / "by-id"))
    by_id = run_cli(["score-rows", "--teacher", str(tiny_model), "--data", str(tmp_path / "by-id"), "--out",
                     str(tmp_path / "no"), "--device", "cpu"])
    assert by_id.returncode == 2 and "mine-negatives --corpus ... --teacher" in by_id.stderr
    assert not (tmp_path / "no").exists()


@pytest.fixture(scope="module")
def scored_pages(tiny_model, pages, tmp_path_factory):
    """The test pages with the base model's scores of each row's pages (teacher_scores)."""
    out = tmp_path_factory.mktemp("scored") / "rows"
    scored = run_cli(["score-rows", "--teacher", str(tiny_model), "--data", str(pages), "--out", str(out),
                      "--negative-columns", "negative_0", "negative_1", "--device", "cpu"])
    assert scored.returncode == 0, log_tail(scored.stdout + scored.stderr)
    return out


SIGNAL = [MASK, "loss.distillation.scores_column=teacher_scores", "loss.distillation.temperature=0.05"]


@pytest.fixture(scope="module")
def ddp_signal_run(tiny_model, scored_pages, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    run = run_launcher("launch/cpu.yaml", _args(tiny_model, scored_pages, out, *SIGNAL, *_guide(tiny_model)))
    assert run.returncode == 0, log_tail(run.stdout + run.stderr)
    return out


@pytest.mark.parametrize("engine", ["cpu_zero3", "cpu_fsdp2"])
def test_masking_and_distillation_under_sharded_engines_equal_ddp(engine, tiny_model, scored_pages, ddp_signal_run,
                                                                  extensions_dir, tmp_path):
    """Masking by id and by guide plus distillation under ZeRO-3 and FSDP2 (the model's parameters
    partitioned; the guide stays a whole frozen copy): each step's loss and gradient norm equal DDP's."""
    from conftest import train_engine

    out = tmp_path / engine
    log = train_engine(engine, "configs/tiny.yaml", out, 2, extensions_dir, tiny_model, scored_pages,
                       "evaluation.enabled=false", "data.negative_columns=[negative_0,negative_1]", *SIGNAL,
                       *_guide(tiny_model), steps=STEPS)
    assert "false negatives masked by id and guide" in log
    for key in ("loss", "grad_norm"):
        got, ref = logged_losses(out, key), logged_losses(ddp_signal_run, key)
        assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
        for step in got:
            assert_same_step(key, step, got[step], ref[step])
