"""The demo's numbers belong to a tested set of versions: a silent numeric change fails here.

`make demo` prints an NDCG@10 measured with the versions of constraints.txt (README, "The two
commands"). A dependency whose arithmetic changes (a kernel, a default, a processor) moves that
figure without any test failing -- a fresh install once printed 0.6673 instead of 0.6249. This
test runs the demo exactly (recipe, model, 4,000 generated rows, 2 ranks through launch/train.sh,
the same schedule), stops it by preemption after its second logged loss, and compares the logged
losses of steps 5 and 10 with the values recorded for the tested set (tests/data/demo_losses.json).
A different CPU rounds differently in the last bits (measured below 1e-6 relative at these steps);
a changed computation moves them by far more than the 1e-4 bound.

After a deliberate upgrade (constraints.txt changed), re-record with
    DIST_VDR_RECORD_DEMO_LOSSES=1 .venv/bin/python -m pytest tests/integration/test_demo_numbers.py
and re-measure the README's demo figure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, descendants, launch_env, log_tail, logged_losses

RECORD = Path(__file__).parents[1] / "data" / "demo_losses.json"
STEPS = (5, 10)


def _versions() -> dict:
    import accelerate
    import datasets
    import sentence_transformers
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__, "accelerate": accelerate.__version__,
            "datasets": datasets.__version__}


def test_the_demo_starts_with_the_recorded_losses(tmp_path):
    from dist_vdr.data.synthetic import SyntheticPagesSpec, generate_pages
    from dist_vdr.kinds.tiny import TinyModelSpec, build_tiny_model

    # What `make demo` builds: `dist-vdr make-tiny-model` and `make-synthetic-pages --num-train 4000`.
    model = build_tiny_model(tmp_path / "tiny-model", TinyModelSpec())
    pages = generate_pages(tmp_path / "pages", SyntheticPagesSpec(num_train=4000), show_progress=False)
    out = tmp_path / "run"
    args = ["bash", "launch/train.sh", "launch/cpu.yaml", "--config", "configs/tiny.yaml",
            f"model.name_or_path={model}", f"data.path={pages}", f"training.output_dir={out}",
            "evaluation.enabled=false"]  # evaluation changes no training number
    same_arithmetic = dict(line.split("=", 1) for line in (REPO / "launch" / "same-x86-arithmetic.env").read_text()
                           .splitlines() if line and not line.startswith("#"))  # as `make demo` runs
    proc = subprocess.Popen(args, cwd=REPO, env=launch_env(**same_arithmetic), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, logged = [], 0
    for line in proc.stdout:
        lines.append(line)
        logged += line.count("'loss':")
        if logged >= len(STEPS):  # preempt the ranks: they save at the next step boundary and exit 0
            for rank in descendants(proc.pid):
                if "dist_vdr.cli" in " ".join(rank.cmdline()):
                    rank.send_signal(signal.SIGUSR2)
            break
    lines.extend(proc.stdout)
    assert proc.wait(timeout=300) == 0, log_tail("".join(lines))
    got = {str(s): v for s, v in logged_losses(out).items() if s in STEPS}
    assert sorted(got) == sorted(map(str, STEPS)), got
    if os.environ.get("DIST_VDR_RECORD_DEMO_LOSSES"):
        RECORD.write_text(json.dumps({"versions": _versions(), "losses": got,
                                      "recorded": time.strftime("%Y-%m-%d")}, indent=2) + "\n")
    recorded = json.loads(RECORD.read_text())
    for step, value in recorded["losses"].items():
        assert got[step] == pytest.approx(value, rel=1e-4), (
            f"step {step}: loss {got[step]} vs {value} recorded with {recorded['versions']}; these versions: "
            f"{_versions()}. A dependency changed the arithmetic: re-record (see this file's docstring) and "
            f"re-measure the README's demo figure")
