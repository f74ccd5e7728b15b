"""`import dist_vdr` (every module) works without a GPU, deepspeed or submitit."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

_PROBE = """
import sys, pkgutil, importlib
sys.modules['deepspeed'] = None   # import deepspeed -> ImportError
sys.modules['submitit'] = None
import dist_vdr
for m in pkgutil.walk_packages(dist_vdr.__path__, 'dist_vdr.'):
    if m.name.endswith('.__main__'):
        continue  # runs the command
    importlib.import_module(m.name)
import torch
print('cuda', torch.cuda.is_available())
"""


def test_import_without_gpu_deepspeed_submitit():
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cuda False" in proc.stdout


def test_cli_help_lists_subcommands():
    proc = subprocess.run([sys.executable, "-m", "dist_vdr.cli", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for sub in ("train", "make-tiny-model", "make-synthetic-pages"):
        assert sub in proc.stdout
