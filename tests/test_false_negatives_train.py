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

from conftest import assert_same_step, log_tail, logged_losses, run_cli, run_launcher, tiny_overrides

pytestmark = pytest.mark.slow
STEPS = 4
MASK = "loss.false_negatives.id_column=document_id"


def _guide(model) -> list[str]:  # the base model as the guide, GIST's absolute margin
    return [f"loss.false_negatives.guide={model}", "loss.false_negatives.margin=0.1"]


def _args(model, pages, out, *more):
    return ["--config", "configs/tiny.yaml",
            *tiny_overrides(model, pages, out, f"training.max_steps={STEPS}", "evaluation.enabled=false",
                            "data.negative_columns=[negative_0,negative_1]", *more)]


def test_masking_on_two_ranks_equals_one_process_and_lowers_the_loss(tiny_model, pages, tmp_path):
    two = run_launcher("launch/cpu.yaml", _args(tiny_model, pages, tmp_path / "two", MASK, *_guide(tiny_model)))
    assert two.returncode == 0, log_tail(two.stdout + two.stderr)
    assert "false negatives masked by id and guide" in two.stdout + two.stderr
    assert "Hashing dataset values" not in two.stdout + two.stderr  # the startup pass's hashes still serve
    one = run_cli(["train", *_args(tiny_model, pages, tmp_path / "one", MASK, *_guide(tiny_model),
                                   "launch.device=cpu")])
    assert one.returncode == 0, log_tail(one.stdout + one.stderr)
    for key in ("loss", "grad_norm"):
        a, b = logged_losses(tmp_path / "one", key), logged_losses(tmp_path / "two", key)
        assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
        for step in a:
            assert_same_step(key, step, b[step], a[step])

    plain = run_launcher("launch/cpu.yaml", _args(tiny_model, pages, tmp_path / "plain"))
    assert plain.returncode == 0, log_tail(plain.stdout + plain.stderr)
    masked, unmasked = logged_losses(tmp_path / "two")[1], logged_losses(tmp_path / "plain")[1]
    print(f"step-1 loss: masked {masked:.6f} vs unmasked {unmasked:.6f}")
    assert masked < unmasked - 1e-3


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
