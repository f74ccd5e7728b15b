"""The worked example of docs/tasks.md, registered and trained as written there."""

from __future__ import annotations

import re
import subprocess

from conftest import REPO, launch_env, python_of


def _doc_module() -> str:
    """The task module of docs/tasks.md (its first Python block)."""
    text = (REPO / "docs" / "tasks.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]


_RUN = """
import sys
sys.path.insert(0, {folder!r})
from dist_vdr import kinds as tasks
from dist_vdr.config import load_config
from dist_vdr.run.training import headline, run_training
tasks.register("triplet", "triplet_task:TripletTask")  # the one registry line
cfg = load_config(None, {overrides!r})
result = run_training(cfg)
print("RESULT", result.task, result.global_step, cfg.loss.name)
print("HEADLINE", headline(result, "ndcg@10"))
"""


def test_the_documented_toy_task_trains(tiny_model, pages, tmp_path):
    (tmp_path / "triplet_task.py").write_text(_doc_module())
    out = tmp_path / "run"
    overrides = ["task=triplet", f"model.name_or_path={tiny_model}", f"data.path={pages}",
                 f"training.output_dir={out}", "training.max_steps=2", "training.global_batch_size=4",
                 "training.save_steps=2", "evaluation.before_training=false", "launch.device=cpu"]
    env = launch_env()
    proc = subprocess.run([python_of(env), "-c", _RUN.format(folder=str(tmp_path), overrides=overrides)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "RESULT triplet 2 cmnrl" in proc.stdout
    assert "loss: TripletLoss" in proc.stdout  # the task's loss, not the recipe's
    assert re.search(r"HEADLINE NDCG@10 before=n/a after=\d\.\d{4}", proc.stdout)
    assert (out / "final" / "model.safetensors").is_file() and (out / "metrics.json").is_file()
    bad = subprocess.run([python_of(env), "-c", _RUN.format(folder=str(tmp_path), overrides=[
        *overrides, "data.negative_columns=[]"])], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert "set data.negative_columns to one column" in bad.stderr
