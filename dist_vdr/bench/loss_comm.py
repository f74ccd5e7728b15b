"""Communication of the distributed loss: stock sentence-transformers gather vs dist-vdr's global-batch loss.

W gloo processes (CPU), the tiny model, the published step shape scaled to it: a global batch of
query + page + hard-negative triplets, gradient caching with mini-batch 1, Matryoshka over 7 dims.
For each implementation: collectives and payload bytes per optimizer step (every torch.distributed
call, DDP's gradient reduction included) and seconds per step, side by side.

    dist-vdr bench loss --model artifacts/tiny-model [--world-size 2 --global-batch 64 --steps 3]
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

from dist_vdr import distributed

TINY_DIMS = (64, 48, 32, 16, 8, 4, 2)  # the recipe's [2048 ... 64] scaled to a 64-d model


def _rows(n: int, seed: int = 0):
    import random

    from dist_vdr.data.synthetic import all_attributes, describe, perturb, render_page

    rng = random.Random(seed)
    combos = [rng.choice(all_attributes()) for _ in range(n)]
    return [[describe(a, rng), render_page(a, rng), render_page(perturb(a, rng), rng)] for a in combos]


def _worker(rank: int, world: int, model_dir: str, global_batch: int, mini_batch: int, dims: tuple, steps: int,
            out_path: str) -> None:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss, MatryoshkaLoss
    from torch.nn.parallel import DistributedDataParallel

    from dist_vdr.losses.global_batch import GlobalBatchCachedMNRL

    per_device = global_batch // world
    rows = _rows(global_batch)[rank * per_device:(rank + 1) * per_device]
    results = {}
    for impl in ("stock", "dist-vdr"):
        torch.manual_seed(0)
        model = SentenceTransformer(model_dir, device="cpu")
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        distributed.register_counting_comm_hook(ddp)
        if impl == "stock":
            inner = CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch, gather_across_devices=True)
            loss_fn = MatryoshkaLoss(model, inner, list(dims))
            loss_fn.model = inner.model = ddp
        else:
            loss_fn = GlobalBatchCachedMNRL(model, matryoshka_dims=dims, rank=rank, world_size=world,
                                            mini_batch_size=mini_batch)
            loss_fn.model = ddp
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        feats = [model.preprocess([r[c] for r in rows]) for c in range(3)]
        times, counts, nbytes, kinds = [], [], [], {}
        for step in range(steps + 1):  # the first step warms up (DDP bucket rebuild)
            torch.distributed.barrier()
            t0 = time.perf_counter()
            with distributed.count_collectives() as count:
                loss = loss_fn([dict(f) for f in feats], None)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.distributed.barrier()
            if step:
                times.append(time.perf_counter() - t0)
                counts.append(count.total)
                nbytes.append(count.bytes)
                kinds = dict(count.calls)
        results[impl] = {"collectives_per_step": statistics.median(counts), "bytes_per_step": statistics.median(nbytes),
                         "s_per_step": statistics.median(times), "collectives_last_step": kinds}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


def run(model_dir: str, *, world_size: int = 2, global_batch: int = 64, mini_batch_size: int = 1,
        dims: tuple = TINY_DIMS, steps: int = 3) -> dict:
    if global_batch % world_size:
        raise ValueError(f"--global-batch {global_batch} is not divisible by --world-size {world_size}")
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/result.json"
        distributed.spawn_gloo(_worker, world_size,
                               (world_size, model_dir, global_batch, mini_batch_size, tuple(dims), steps, out), tmp)
        with open(out) as f:
            return json.load(f)


def format_table(results: dict, *, world_size: int, global_batch: int, mini_batch_size: int, dims) -> str:
    stock, ours = results["stock"], results["dist-vdr"]
    lines = [
        f"{world_size} gloo ranks, global batch {global_batch} triplets, mini-batch {mini_batch_size}, "
        f"{len(dims)} Matryoshka dims {list(dims)}",
        f"{'':24s}{'stock ST gather':>18s}{'dist-vdr':>14s}{'ratio':>10s}",
    ]
    for key, label in (("collectives_per_step", "collectives / step"), ("bytes_per_step", "bytes / step"),
                       ("s_per_step", "s / step")):
        a, b = stock[key], ours[key]
        fmt = "{:>18.3f}{:>14.3f}" if key == "s_per_step" else "{:>18,.0f}{:>14,.0f}"
        lines.append(f"{label:24s}" + fmt.format(a, b) + f"{a / b if b else float('inf'):>9.1f}x")
    lines.append(f"by kind, stock: {stock['collectives_last_step']}; dist-vdr: {ours['collectives_last_step']}")
    lines.append("(collectives include DDP's gradient all-reduce; bytes = tensor payload handed to collectives)")
    return "\n".join(lines)
