"""task: multi_vector end to end, through the real launcher on CPU (gloo), with the tiny MultiVectorEncoder.

One 2-rank DDP run (configs/tiny-multi-vector.yaml, 6 steps, checkpoints 2/4/6, evaluation on 8 queries) is the
reference of every test here:
- one process holding the global batch logs the same loss and gradient norm at every step;
- ZeRO-2, ZeRO-3 and FSDP2 log DDP's loss and gradient norm at every step and evaluate to DDP's metrics;
- a run SIGKILLed after its first checkpoint and launched again logs the uninterrupted run's losses;
- ``final/`` is a MultiVectorEncoder that sentence-transformers loads, whose token embeddings are those dist-vdr's
  loader gives, and ``dist-vdr eval`` of it gives the run's own metrics at every token dim.
The loss itself (W = 1, 2, 4 against one process, every gradient, collectives counted, broken variants caught) is
tested on a toy token encoder in test_score_exchange_loss.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import (
    ENGINES,
    REDUCTIONS,
    assert_same_step,
    kill_after_first_checkpoint,
    logged_history,
    logged_losses,
    run_cli,
    run_launcher,
    tiny_overrides,
    train_engine,
)

RECIPE = "configs/tiny-multi-vector.yaml"
STEPS = 6
DIMS = [32, 16, 8]  # the recipe's loss.matryoshka_dims: token dims
# Collectives logged; the eval set cut to 8 queries (the evaluation runs before and after, under every engine).
COMMON = ("data.max_eval_queries=8", "launch.log_collectives=true")


def _args(model: Path, pages: Path, out: Path, *more: str) -> list[str]:
    return ["--config", RECIPE, *tiny_overrides(model, pages, out, f"training.max_steps={STEPS}",
                                                "training.save_total_limit=10", *COMMON, *more)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_multi_vector, pages) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("mv-ddp") / "run"
    proc = run_launcher("launch/cpu.yaml", _args(tiny_multi_vector, pages, out))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return out, log


def _assert_same_curve(got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        for name, a, b in zip(("loss", "grad_norm"), got[step], ref[step], strict=True):
            assert_same_step(name, step, a, b)


def _per_step_calls(out: Path) -> list[dict]:
    return [json.loads(line)["calls"] for line in (out / "collectives" / "rank0.jsonl").read_text().splitlines()]


def test_two_ranks_train_as_one_process_and_the_final_model_is_sentence_transformers(
        ddp_run, tiny_multi_vector, pages, tmp_path):
    out, log = ddp_run
    assert "loss: ScoreExchangeCachedLoss(dims=[32, 16, 8])" in log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dims"] == DIMS and set(metrics["after"]) == {str(d) for d in DIMS}
    # The loss's collectives per step do not change from step to step (3 + the agreed query length; DDP's
    # gradient buckets): none grows with columns, mini-batches or dims (counted exactly in the loss's test).
    calls = _per_step_calls(out)
    assert len(calls) == STEPS and all(c == calls[0] for c in calls), calls
    assert calls[0]["all_gather"] == 2 or calls[0].get("all_gather_into_tensor") == 2, calls[0]

    # One process holding the global batch of 16: the same loss and gradient norm at every step.
    one = tmp_path / "one"
    proc = run_cli(["train", *_args(tiny_multi_vector, pages, one, "launch.device=cpu", "evaluation.enabled=false")])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    _assert_same_curve(logged_history(one), logged_history(out))

    # final/: sentence-transformers loads it as a MultiVectorEncoder, with dist-vdr's token embeddings.
    import torch
    from PIL import Image
    from sentence_transformers import MultiVectorEncoder

    from dist_vdr import kinds
    from dist_vdr.config import ModelConfig
    from dist_vdr.kinds.multi_vector.model import build_multi_vector
    from dist_vdr.kinds.multi_vector.scoring import MaxSimScoring

    final = out / "final"
    assert kinds.of_folder(final) == "multi_vector"
    stock = MultiVectorEncoder(str(final), device="cpu")
    ours = build_multi_vector(ModelConfig(name_or_path=str(final)), precision="fp32", device="cpu")
    pages_in = [Image.new("RGB", (120, 160), (200, 30, 30)), Image.new("RGB", (64, 96), (20, 90, 200))]
    for a, b in zip(stock.encode_document(pages_in), ours.encode_document(pages_in), strict=True):
        assert torch.equal(a, b)
    texts = ["red bar chart", "a blue page"]
    scoring = MaxSimScoring(divide_by_query_length=True)
    assert torch.equal(scoring.encode_queries(stock, texts, 8), scoring.encode_queries(ours, texts, 8))

    # dist-vdr eval of final/ reads its kind and gives the run's own evaluation at every token dim.
    ev = run_cli(["eval", "--model", str(final), "--data", str(pages), "--device", "cpu", "--dims", "32,16,8",
                  "--output", str(tmp_path / "eval"), "data.max_eval_queries=8",
                  "multi_vector.divide_by_query_length=true"])
    assert ev.returncode == 0, (ev.stdout + ev.stderr)[-4000:]
    got = json.loads((tmp_path / "eval" / "retrieval_metrics.json").read_text())["metrics"]
    for dim in DIMS:
        assert got[str(dim)]["ndcg@10"] == pytest.approx(metrics["after"][str(dim)]["ndcg@10"], abs=1e-6), dim


def test_a_killed_run_resumes_to_the_same_losses(ddp_run, tiny_multi_vector, pages, tmp_path):
    ref_out, _ = ddp_run
    out = tmp_path / "interrupted"
    args = _args(tiny_multi_vector, pages, out, "evaluation.enabled=false")
    kill_after_first_checkpoint(["bash", "launch/train.sh", "launch/cpu.yaml", *args], out)
    from dist_vdr.checkpoints.store import latest_complete

    killed_at = latest_complete(out)
    assert killed_at is not None and int(killed_at.name.split("-")[1]) < STEPS
    resumed = run_launcher("launch/cpu.yaml", args)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-4000:]
    assert "resuming from" in log
    ref, got = logged_losses(ref_out), logged_losses(out)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), step


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_trains_like_ddp(engine, ddp_run, tmp_path_factory, tiny_multi_vector, pages, extensions_dir):
    ref_out, _ = ddp_run
    out = tmp_path_factory.mktemp(f"mv-{engine}") / "run"
    more = [*COMMON, "training.save_total_limit=10"]
    if engine == "cpu_fsdp2":
        more.append("launch.keep_parameters_gathered=true")
    log = train_engine(engine, RECIPE, out, 2, extensions_dir, tiny_multi_vector, pages, *more, steps=STEPS)
    assert {"cpu_zero2": "DeepSpeed", "cpu_zero3": "DeepSpeed", "cpu_fsdp2": "FSDP2"}[engine] in log
    assert "loss: ScoreExchangeCachedLoss" in log
    _assert_same_curve(logged_history(out), logged_history(ref_out))
    # The sharded MaxSim evaluation under the engine (sharded parameters after training) agrees with DDP's.
    mine, theirs = (json.loads((d / "metrics.json").read_text()) for d in (out, ref_out))
    assert mine["before"] == theirs["before"]
    for dim, metrics in theirs["after"].items():
        assert mine["after"][dim]["ndcg@10"] == pytest.approx(metrics["ndcg@10"], abs=1e-4)
    # One gradient reduction per step, as for the embedding kind: the reductions of every step are those of
    # the first (the loss's own all-reduces included), the same each step.
    calls = _per_step_calls(out)
    reductions = [{k: v for k, v in c.items() if k in REDUCTIONS} for c in calls]
    assert len(calls) == STEPS and all(r == reductions[0] for r in reductions), reductions


def test_lora_hybrid_on_two_ranks_saves_adapter_and_head_and_merges(tiny_model, pages, tmp_path):
    """ColQwen-style LoRA on a bare backbone (the tiny embedding model, its pooling dropped) with a new token
    projection trained in full beside it, as a hybrid (the base's last-token pooling kept as a single vector,
    trained together), on 2 ranks. final/ is the adapter + the projection; final/merged (merge_on_save) is a plain
    MultiVectorEncoder that sentence-transformers loads, with both outputs; dist-vdr eval of either gives the
    run's metrics, of the token vectors and of the single vector."""
    out = tmp_path / "lora"
    proc = run_launcher("launch/cpu.yaml", [
        "--config", RECIPE, *tiny_overrides(tiny_model, pages, out, "training.max_steps=4", "training.save_steps=4",
                                            "data.max_eval_queries=8", "evaluation.before_training=false",
                                            "multi_vector.token_dim=16", "loss.matryoshka_dims=[16,8]",
                                            "multi_vector.hybrid=true", "multi_vector.single_vector_dims=[64,32]",
                                            "model.adapter.type=lora", "model.adapter.rank=4",
                                            "model.adapter.merge_on_save=true", "training.learning_rate=5e-3")])
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "LoRA r=4 + the token projection" in log and "loss: HybridCachedLoss" in log
    assert "(single vector, dim 64: before=n/a after=" in log
    from dist_vdr.models import adapters

    final = out / "final"
    assert (final / adapters.ADAPTER_WEIGHTS).is_file() and (final / adapters.TRAINED_MODULES).is_file()
    after = json.loads((out / "metrics_after.json").read_text())["metrics"]
    assert {"16", "8", "single/64", "single/32"} <= set(after), sorted(after)
    for model in (final, final / adapters.MERGED):
        ev = run_cli(["eval", "--model", str(model), "--data", str(pages), "--device", "cpu", "--dims", "16,8",
                      "--output", str(tmp_path / f"eval-{model.name}"), "data.max_eval_queries=8",
                      "multi_vector.divide_by_query_length=true"])
        assert ev.returncode == 0, (ev.stdout + ev.stderr)[-4000:]
        got = json.loads((tmp_path / f"eval-{model.name}" / "retrieval_metrics.json").read_text())["metrics"]
        for dim in ("16", "8"):
            assert got[dim]["ndcg@10"] == pytest.approx(after[dim]["ndcg@10"], abs=1e-4), (model, dim)
        single = json.loads((tmp_path / f"eval-{model.name}" / "single" / "retrieval_metrics.json").read_text())
        assert single["metrics"]["64"]["ndcg@10"] == pytest.approx(after["single/64"]["ndcg@10"], abs=1e-4), model
    from sentence_transformers import MultiVectorEncoder

    merged = MultiVectorEncoder(str(final / adapters.MERGED), device="cpu")
    assert merged.encode_query("red bar chart").shape[-1] == 16
    assert merged.encode_query(["red bar chart"], output_value=None)[0]["sentence_embedding"].shape == (64,)


def test_teacher_scores_then_masking_and_distillation_on_two_ranks(tiny_multi_vector, pages, tmp_path):
    """score-rows with the multi-vector model as the teacher (sharded over 2 ranks) gives each row's MaxSim
    scores as sentence-transformers computes them; the multi-vector recipe then trains on 2 ranks with false
    negatives masked by id and by a guide (the tiny model itself) and distillation from those scores (the loss's
    exactness with these on, against one process: test_score_exchange_loss.py's mask_* and distill_* cases)."""
    from conftest import run_accelerate

    scored = tmp_path / "scored"
    proc = run_accelerate(["score-rows", "--teacher", str(tiny_multi_vector), "--data", str(pages), "--out",
                           str(scored), "--negative-columns", "negative_0", "--device", "cpu",
                           "multi_vector.divide_by_query_length=true"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    import torch
    from datasets import load_from_disk
    from sentence_transformers import MultiVectorEncoder

    rows = load_from_disk(str(scored))
    model = MultiVectorEncoder(str(tiny_multi_vector), device="cpu")
    queries = model.encode_query(rows["query"][:4])
    for column, k in (("image", 0), ("negative_0", 1)):
        docs = model.encode_document(rows[column][:4])
        expected = torch.stack([model.similarity(queries[i:i + 1], docs[i:i + 1])[0, 0] for i in range(4)])
        lengths = torch.tensor([len(q) for q in queries], dtype=expected.dtype)
        got = torch.tensor([row[k] for row in rows["teacher_scores"][:4]])
        assert torch.allclose(got, expected / lengths, atol=1e-5), (column, got, expected / lengths)

    out = tmp_path / "run"
    proc = run_launcher("launch/cpu.yaml", _args(tiny_multi_vector, scored, out, "training.save_steps=4",
                                                 "training.max_steps=4", "evaluation.enabled=false",
                                                 "loss.false_negatives.id_column=document_id",
                                                 f"loss.false_negatives.guide={tiny_multi_vector}",
                                                 "loss.false_negatives.margin=0.1",
                                                 "loss.distillation.scores_column=teacher_scores",
                                                 "loss.distillation.temperature=0.05"))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "false negatives masked by id and guide, + 1 x kl distillation from teacher_scores" in log
    counts = logged_losses(out, "masked_per_query")
    assert sorted(counts) == [1, 2, 3, 4] and max(counts.values()) > 0, counts
