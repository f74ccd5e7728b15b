"""`dist-vdr bench`: the CPU smoke run of the throughput benchmark, and its FLOP estimate."""

from __future__ import annotations

import json
import random
import subprocess

import pytest

from conftest import REPO, launch_env, log_tail, logged_losses, python_of, run_cli


def test_flop_estimate_agrees_with_torch_flop_counter(tiny_model):
    """The per-step FLOPs the bench reports (MFU) come from token counts and parameter shapes; torch's
    own counter of the executed matmuls must agree within 15% (forward without a graph, and with one
    plus the backward: counted 1x and 3x)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from torch.utils.flop_counter import FlopCounterMode

    from dist_vdr.bench.train_speed import _page, _query
    from dist_vdr.run.step_stats import TokenCounter, find_hf_model

    model = SentenceTransformer(str(tiny_model), device="cpu", model_kwargs={"attn_implementation": "eager"})
    counter = TokenCounter(find_hf_model(model))
    rng = random.Random(0)
    feats = model.preprocess([_query(rng), _page(rng, 1240, 1754), _page(rng, 1920, 1080), _query(rng)])
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(dict(feats))
    assert counter.text_tokens == 0 and counter.flops > 0  # no graph: FLOPs counted, tokens not
    assert counter.flops == pytest.approx(fc.get_total_flops(), rel=0.15)
    counter.reset()
    with FlopCounterMode(display=False) as fc:
        model(dict(feats))["sentence_embedding"].sum().backward()
    assert counter.flops == pytest.approx(fc.get_total_flops(), rel=0.15)
    assert counter.sequences == 4
    assert counter.text_tokens == int(feats["attention_mask"].sum())
    assert counter.patches == feats["pixel_values"].shape[0]


def test_bench_cpu_smoke(tmp_path):
    """The benchmark command end to end on CPU: a stock setting and dist-vdr's trainer, side by side."""
    work = tmp_path / "bench"
    cmd = [python_of(launch_env()), "-m", "dist_vdr.cli", "bench", "--model", "tiny", "--work-dir", str(work),
           "--global-batch-size", "4", "--steps", "1", "--warmup-steps", "1", "--stock", "mb2",
           "--ours", "recipe", "--ours", "mb1:loss.mini_batch_size=1", "--timeout-s", "300"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| setting | s/step | triplets/s |" in proc.stdout
    report = json.loads((work / "bench.json").read_text())
    rows = {r["setting"]: r for r in report["settings"]}
    assert set(rows) == {"stock mb2", "dist-vdr recipe", "dist-vdr mb1"}, rows
    for r in rows.values():
        assert "error" not in r, r
        assert r["s_per_step"] > 0 and r["triplets_per_s"] == pytest.approx(4 / r["s_per_step"], rel=1e-2)
        assert r["tokens_per_s"] > 0 and r["patches_per_s"] > 0 and r["flop_per_step"] > 0
        assert r["peak_gib"] > 0 and r["measured_steps"] == 1 and r["device"] == "cpu"
    assert rows["stock mb2"]["vs_best_stock"] == 1.0
    # Same pages, same batch: every setting processes the same tokens per step (up to the sampler's order).
    tokens = {name: r["tokens_per_s"] * r["s_per_step"] for name, r in rows.items()}
    assert max(tokens.values()) == pytest.approx(min(tokens.values()), rel=0.1), tokens
    # The dist-vdr settings ran `dist-vdr train` itself (its run records), with their overrides.
    ours = next((work / "runs").glob("*dist-vdr-mb1"))
    assert "mini_batch_size: 1" in (ours / "resolved_config.yaml").read_text()


def test_bench_rejects_bad_settings(tmp_path):
    from dist_vdr.bench.train_speed import parse_ours, parse_stock

    with pytest.raises(ValueError, match="mbN"):
        parse_stock("mini8", 64)
    with pytest.raises(ValueError, match="key=value"):
        parse_ours("fast:loss.mini_batch_size")
    assert parse_stock("tok6000", 64).mini_batch_num_tokens == 6000
    assert parse_ours("a:x.y=1,z.w=2").overrides == ["x.y=1", "z.w=2"]
    assert parse_ours("a:x.y=1").extra_warmup_steps == 0
    assert parse_ours("c:model.compile=true").extra_warmup_steps == 3  # recompilations are not measured


def test_compiled_blocks_train_like_eager(tiny_model, pages, tmp_path):
    """model.compile=true (a throughput lever) compiles each transformer block and computes the same
    training: every logged loss and gradient norm of 3 steps within 1e-4 of the eager run."""
    outs = {}
    for flag in ("false", "true"):
        outs[flag] = tmp_path / f"compile-{flag}"
        proc = run_cli(["train", "--config", "configs/tiny.yaml", f"model.name_or_path={tiny_model}",
                        f"data.path={pages}", f"training.output_dir={outs[flag]}", "training.max_steps=3",
                        "training.global_batch_size=8", "training.logging_steps=1", "training.save_steps=3",
                        "evaluation.enabled=false", "launch.device=cpu", f"model.compile={flag}"], timeout=900)
        assert proc.returncode == 0, log_tail(proc.stdout + proc.stderr)
        assert ("model.compile: 4 transformer blocks compiled" in proc.stdout + proc.stderr) == (flag == "true")
    for key in ("loss", "grad_norm"):
        eager, compiled = logged_losses(outs["false"], key), logged_losses(outs["true"], key)
        assert sorted(eager) == sorted(compiled) == [1, 2, 3]
        for step in eager:
            assert compiled[step] == pytest.approx(eager[step], rel=1e-4), (key, step)


def test_compile_refuses_a_model_without_blocks():
    import torch

    from dist_vdr.models.build import compile_blocks

    with pytest.raises(ValueError, match="model.compile"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
