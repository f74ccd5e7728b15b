"""Cost of verifiable checkpoints: hashing a checkpoint's files next to writing them, same run.

Writes ``--size-gb`` of bf16 weights as one safetensors file (the Qwen3-VL-2B model is 4.26 GB in
bf16), times the write, then the xxh3-128 hash that the completion marker records (and resume
checks), with the file in the page cache as it is right after a save. Prints both and their ratio,
and what that means for a full 2B-parameter training state (bf16 weights + fp32 master weights and
Adam moments: 29.8 GB) hashed by 1, 8 and 64 ranks (each rank hashes its share of the files).

    dist-vdr bench checkpoint --work-dir /tmp/bc [--size-gb 4.26]
"""

from __future__ import annotations

import os
import time
from pathlib import Path

STATE_2B_GB = 2.1275e9 * (2 + 4 + 4 + 4) / 1e9  # bf16 weights + fp32 master + Adam m and v


def run(work_dir: str, size_gb: float) -> dict:
    import torch
    from safetensors.torch import save_file

    from dist_vdr.checkpoints.store import file_digest

    folder = Path(work_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    # Elements per tensor: 128 MiB in bf16, like a model's larger matrices (less for a file below that size).
    per = max(1, min(64 << 20, int(size_gb * 1e9 / 2)))
    count = max(1, int(size_gb * 1e9 / 2 / per))
    gen = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(per, generator=gen).to(torch.bfloat16) for i in range(count)}
    start = time.perf_counter()
    save_file(tensors, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    write_s = time.perf_counter() - start
    del tensors
    start = time.perf_counter()
    file_digest(path)
    hash_s = time.perf_counter() - start
    size = path.stat().st_size
    path.unlink()
    rate = size / hash_s / 1e9
    return {"bytes": size, "write_s": write_s, "hash_s": hash_s, "hash_gb_s": rate,
            "state_2b_gb": STATE_2B_GB, "state_2b_hash_s": {w: STATE_2B_GB / rate / w for w in (1, 8, 64)}}


def format_result(r: dict) -> str:
    lines = [
        f"file {r['bytes'] / 1e9:.2f} GB: write + fsync {r['write_s']:.2f} s, xxh3-128 hash {r['hash_s']:.2f} s "
        f"({r['hash_gb_s']:.2f} GB/s, {r['hash_s'] / r['write_s']:.2f}x the write)",
        f"2B full-finetune state ({r['state_2b_gb']:.1f} GB) hashed at that rate: "
        + ", ".join(f"{w} rank(s) {s:.1f} s" for w, s in r["state_2b_hash_s"].items()),
    ]
    return "\n".join(lines)
