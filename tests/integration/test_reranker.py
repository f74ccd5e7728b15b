"""Reranker training end to end through the real launcher: mining, training, retrieve-and-rerank.

2 CPU ranks (gloo) against one process holding the same global batch, with the recipe's residual
listwise loss: the mined data and the retriever's scores, every logged loss and gradient norm, and
the retrieval and rerank metrics before and after training must be the same. A killed run resumes
on its loss curve (mined data reused). The dense head with the BCE loss trains the same under
DeepSpeed ZeRO-3 as under DDP and its gathered weights are saved.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    assert_same_step,
    kill_after_first_checkpoint,
    launch_env,
    log_tail,
    logged_losses,
    run_cli,
    run_launcher,
)

RECIPE = "configs/tiny-reranker.yaml"


def rerank_overrides(reranker: Path, retriever: Path, data: Path, out: Path, *more: str) -> list[str]:
    return [f"model.name_or_path={reranker}", f"reranker.retriever={retriever}", f"data.path={data}",
            f"training.output_dir={out}", "training.global_batch_size=8", "loss.mini_batch_size=6",
            "training.logging_steps=1", "training.save_steps=2", "training.save_total_limit=5",
            "training.warmup_ratio=0", "training.learning_rate=1e-3", "mining.num_negatives=2",
            "evaluation.batch_size=8", "reranker.rerank_depth=10", *more]


def _mined_digest(out: Path) -> list[tuple]:
    import datasets

    ds = datasets.load_from_disk(str(out / "mined"))
    cols = ["image", "negative_0", "negative_1"]
    raw = ds.cast(datasets.Features({**ds.features, **{c: datasets.Image(decode=False) for c in cols}}))
    return [(row["query"], *(hashlib.sha256(row[c]["bytes"]).hexdigest() for c in cols)) for row in raw]


def _retriever_scores(out: Path) -> list[list[float]]:
    import datasets

    return datasets.load_from_disk(str(out / "mined"))["retriever_scores"]


def _metrics(out: Path, which: str) -> dict:
    return json.loads((out / f"metrics_{which}.json").read_text())["metrics"]


def test_two_ranks_mine_train_and_rerank_like_one_process(tiny_reranker, tiny_model, pages, tmp_path):
    # The recipe's loss: listwise over reranker score + 20 x the mined rows' retriever scores.
    common = ["training.max_steps=4", "training.eval_steps=null"]
    one_out, two_out = tmp_path / "one", tmp_path / "two"
    one = run_cli(["train", "--config", RECIPE,
                   *rerank_overrides(tiny_reranker, tiny_model, pages, one_out, *common), "launch.device=cpu"])
    assert one.returncode == 0, log_tail(one.stdout + one.stderr)
    two = run_launcher("launch/cpu.yaml", ["--config", RECIPE,
                                           *rerank_overrides(tiny_reranker, tiny_model, pages, two_out, *common)])
    log = two.stdout + two.stderr
    assert two.returncode == 0, log_tail(log)
    assert "mining 2 hard negatives per query" in log
    assert "loss: ListwiseLoss(reranker score + 20 x retrieval score)" in log
    for rank in (0, 1):
        assert f"[dist-vdr rank {rank}/2] training finished at step 4" in log

    assert _mined_digest(one_out) == _mined_digest(two_out)
    assert len(_mined_digest(one_out)) > 200
    # The standalone command, with the recipe's mining settings, writes the same rows.
    mine = run_cli(["mine-negatives", "--model", str(tiny_model), "--data", str(pages), "--out",
                    str(tmp_path / "cli_mined" / "mined"), "--page-columns", "negative_0", "--num-negatives", "2",
                    "--num-random-negatives", "0", "--max-rank", "100", "--max-uses-per-page", "2",
                    "--document-id-column", "image=document_id",
                    "--document-id-column", "negative_0=negative_0_document_id", "--batch-size", "8",
                    "--device", "cpu"])
    assert mine.returncode == 0, log_tail(mine.stdout + mine.stderr)
    assert _mined_digest(tmp_path / "cli_mined") == _mined_digest(one_out)
    # The retriever's score of each row's positive and negatives (what the residual loss adds): the
    # same from 1 and 2 ranks, and in each row the better-ranked negative has the higher score.
    scores = np.array(_retriever_scores(one_out))
    assert scores.shape == (len(_mined_digest(one_out)), 3) and not np.isnan(scores).any()
    assert np.allclose(scores, np.array(_retriever_scores(two_out)), atol=1e-6)
    assert np.allclose(scores, np.array(_retriever_scores(tmp_path / "cli_mined")), atol=1e-6)
    import datasets

    ranks = np.array(datasets.load_from_disk(str(one_out / "mined"))["negative_ranks"])
    first = ranks[:, 0] < ranks[:, 1]
    assert (np.where(first, scores[:, 1] >= scores[:, 2], scores[:, 2] >= scores[:, 1])).all()
    for key in ("loss", "grad_norm"):
        a, b = logged_losses(one_out, key), logged_losses(two_out, key)
        assert sorted(a) == sorted(b) == [1, 2, 3, 4]
        for step in a:
            assert_same_step(key, step, b[step], a[step])
    for which in ("before", "after"):
        m1, m2 = _metrics(one_out, which), _metrics(two_out, which)
        assert set(m1) == {"retrieval", "rerank", "rerankonly"}  # fused, and the reranker's score alone
        for stage in m1:
            for name, value in m1[stage].items():
                assert m2[stage][name] == pytest.approx(value, abs=1e-9), (which, stage, name)
    # Training changed the reranking (the test can tell a trained model from an untrained one).
    assert _metrics(two_out, "before")["rerank"] != _metrics(two_out, "after")["rerank"]
    assert _metrics(two_out, "before")["retrieval"] == _metrics(two_out, "after")["retrieval"]
    assert re.search(r"NDCG@10 retrieval=\d\.\d{4} reranked: before training=\d\.\d{4} after=\d\.\d{4}", two.stdout)

    evals = two_out / "eval_after"
    for name in ("rerank_metrics.json", "rerank_metrics.csv", "run.retrieval.trec", "run.rerank.trec", "qrels.trec"):
        assert (evals / name).is_file(), name
    first = (evals / "run.rerank.trec").read_text().splitlines()[0].split()
    assert len(first) == 6 and first[1] == "Q0" and first[3] == "1"

    # The fusion weight is saved with the model: `dist-vdr eval --reranker` on the saved model ranks
    # by the same fused score and reproduces the run's final evaluation.
    fusion = json.loads((two_out / "final" / "dist_vdr_fusion.json").read_text())
    assert fusion == {"retriever": str(tiny_model), "retrieval_score_weight": 20}
    cli = run_cli(["eval", "--model", str(tiny_model), "--reranker", str(two_out / "final"), "--data", str(pages),
                   "--rerank-depth", "10", "--batch-size", "8", "--output", str(tmp_path / "cli_eval"),
                   "--device", "cpu"])
    assert cli.returncode == 0, log_tail(cli.stdout + cli.stderr)
    got = json.loads((tmp_path / "cli_eval" / "rerank_metrics.json").read_text())["metrics"]
    assert got["rerank"]["ndcg@10"] == pytest.approx(_metrics(two_out, "after")["rerank"]["ndcg@10"], abs=1e-9)
    assert got["rerankonly"]["ndcg@10"] == pytest.approx(_metrics(two_out, "after")["rerankonly"]["ndcg@10"],
                                                         abs=1e-9)
    assert "ranking by reranker score + 20 x retrieval score" in cli.stdout
    assert re.search(r"reranked: NDCG@10 \d\.\d{4}", cli.stdout)

    from sentence_transformers import CrossEncoder

    final = CrossEncoder(str(two_out / "final"), device="cpu")
    import datasets

    row = datasets.load_from_disk(str(pages))["train"][0]
    assert final.predict([(row["query"], row["image"])]).shape == (1,)
    # The model card names the kind and holds the ranking stages' figures of metrics_after.json.
    card = (two_out / "final" / "README.md").read_text()
    assert "CrossEncoder(" in card and "pipeline_tag: text-ranking" in card and "dist_vdr_fusion.json" in card
    rerank = _metrics(two_out, "after")["rerank"]["ndcg@10"]
    assert f"| rerank | {rerank:.4f} |" in card
    report = (two_out / "report.md").read_text()  # `train` ends with the run report: the ranking stages
    assert re.search(rf"\| rerank \| \d\.\d{{4}} \| {rerank:.4f} \|", report) and (two_out / "report.png").is_file()


def test_killed_reranker_run_resumes_on_its_loss_curve(tiny_reranker, tiny_model, pages, tmp_path):
    steps = 6
    common = [f"training.max_steps={steps}", "evaluation.enabled=false", "training.eval_steps=null"]
    ref_out, out = tmp_path / "uninterrupted", tmp_path / "interrupted"
    ref = run_launcher("launch/cpu.yaml", ["--config", RECIPE,
                                           *rerank_overrides(tiny_reranker, tiny_model, pages, ref_out, *common)])
    assert ref.returncode == 0, log_tail(ref.stdout + ref.stderr)

    args = ["bash", "launch/train.sh", "launch/cpu.yaml", "--config", RECIPE,
            *rerank_overrides(tiny_reranker, tiny_model, pages, out, *common)]
    kill_after_first_checkpoint(args, out)
    resumed = run_launcher("launch/cpu.yaml", ["--config", RECIPE,
                                               *rerank_overrides(tiny_reranker, tiny_model, pages, out, *common)])
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log_tail(log)
    m = re.search(r"resuming from \S*checkpoint-(\d+)", log)
    assert m and int(m.group(1)) < steps, log_tail(log)
    assert "mining" not in log  # the mined data of the first attempt is reused
    ref_losses, got = logged_losses(ref_out), logged_losses(out)
    assert sorted(got) == sorted(ref_losses) == list(range(1, steps + 1))
    for step in got:
        assert got[step] == pytest.approx(ref_losses[step], rel=1e-5), (step, got[step], ref_losses[step])


def test_dense_head_trains_under_zero3_like_ddp(tiny_reranker, tiny_model, pages, tmp_path, extensions_dir):
    common = ["training.max_steps=3", "evaluation.enabled=false", "training.eval_steps=null", "reranker.head=dense",
              "loss.name=bce", "loss.pos_weight=2.0", "reranker.retrieval_score_weight=0"]
    env = launch_env(TORCH_EXTENSIONS_DIR=str(extensions_dir))
    outs = {}
    for launch in ("cpu", "cpu_zero3"):
        outs[launch] = tmp_path / launch
        proc = run_launcher(f"launch/{launch}.yaml", ["--config", RECIPE, *rerank_overrides(
            tiny_reranker, tiny_model, pages, outs[launch], *common)], env=env, timeout=500)
        assert proc.returncode == 0, log_tail(proc.stdout + proc.stderr)
    for key in ("loss", "grad_norm"):
        a, b = logged_losses(outs["cpu"], key), logged_losses(outs["cpu_zero3"], key)
        for step in (1, 2, 3):
            assert_same_step(key, step, b[step], a[step])

    import datasets
    from sentence_transformers import CrossEncoder

    rows = datasets.load_from_disk(str(pages))["train"].select(range(4))
    pairs = list(zip(rows["query"], rows["image"], strict=True))
    ddp, zero3 = (CrossEncoder(str(outs[k] / "final"), device="cpu") for k in ("cpu", "cpu_zero3"))
    assert type(zero3[-1]).__name__ == "Dense"
    # The head trained (moved from its initial value) and ZeRO-3 saved the gathered weights.
    assert (zero3[-1].linear.weight - ddp[-1].linear.weight).abs().max() < 1e-4
    assert abs(float(zero3[-1].linear.bias)) > 0
    # Weights agree to ~1e-4 after 3 Adam steps (the loss curves to 1e-5); scores to well under 1e-3.
    assert ddp.predict(pairs) == pytest.approx(zero3.predict(pairs), abs=1e-3)
