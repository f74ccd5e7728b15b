"""training.final=best through the real launcher under DDP, ZeRO-3 and FSDP2: final/ holds the weights of
the best evaluated checkpoint."""

from __future__ import annotations

import json

import pytest

from conftest import launch_env, log_tail, run_launcher, saved_weights, tiny_overrides
from dist_vdr import distributed
from dist_vdr.checkpoints import store as checkpoint


@pytest.mark.parametrize("launch", ["cpu", "cpu_zero3", "cpu_fsdp2"])
def test_final_holds_the_weights_of_the_best_evaluated_checkpoint(launch, tiny_model, pages, tmp_path, extensions_dir):
    out = tmp_path / "run"
    # A constant, too large learning rate: the held-out NDCG peaks early, then falls (measured: 0.1853, 0.1201,
    # 0.1436, 0.1597 at steps 2, 4, 6, 8): the best is not the last step.
    args = ["--config", "configs/tiny.yaml", *tiny_overrides(tiny_model, pages, out), "training.max_steps=8",
            "training.save_steps=2", "training.eval_steps=2", "training.save_total_limit=1",
            "training.keep_best=true", "training.final=best", "data.max_eval_queries=16",
            "training.lr_scheduler_type=constant", "training.learning_rate=2e-2"]
    result = run_launcher(f"launch/{launch}.yaml", args, env=launch_env(TORCH_EXTENSIONS_DIR=str(extensions_dir)),
                          timeout=400)
    assert result.returncode == 0, log_tail(result.stdout + result.stderr)
    newest = checkpoint.latest_complete(out)
    state = json.loads((newest / "trainer_state.json").read_text())
    evals = {h["step"]: h["eval_dim64_cosine_ndcg@10"] for h in state["log_history"]
             if "eval_dim64_cosine_ndcg@10" in h}
    assert sorted(evals) == [2, 4, 6, 8]
    best = max(evals, key=lambda s: (evals[s], -s))
    assert best < 8, evals
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert kept == sorted({f"checkpoint-{best}", "checkpoint-8"}), (kept, evals)
    marker = json.loads((out / "final" / checkpoint.MARKER_FILE).read_text())
    after = json.loads((out / "metrics_after.json").read_text())["metrics"]["64"]["ndcg@10"]
    assert after == pytest.approx(evals[best], abs=1e-6)  # the evaluation after training is of the best weights
    assert marker["weights_of_step"] == best and "final/ takes the weights of" in result.stdout
    # ... and every record says which step's weights final/ holds: metrics_after, the card, the report, the log
    assert json.loads((out / "metrics_after.json").read_text())["step"] == best
    card = (out / "final" / "README.md").read_text()
    assert f"final/'s weights, step {best} (training.final=best" in card and "after training, step 8" not in card
    assert f"the weights of step {best}, the best evaluation, training.final=best" in (out / "report.md").read_text()
    assert f"final/ holds the weights of step {best}" in result.stdout
    import torch

    a, b, last = (saved_weights(f) for f in (out / "final", out / f"checkpoint-{best}", out / "checkpoint-8"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    assert not all(torch.equal(a[k], last[k]) for k in last)  # and not the last step's
    assert checkpoint.verify(out / "final", distributed.DistInfo()) == []
