"""Mixtures of datasets: every optimizer step draws ONE dataset, on every rank at once.

In-batch negatives from another dataset (another language, another domain) are too easy to teach
anything; users want each step's global batch drawn from one dataset, with that dataset's negatives
across all GPUs. sentence-transformers' round-robin/proportional samplers build single-dataset
batches in one stream, but accelerate hands consecutive batches to different ranks, so at one step
the ranks hold different datasets. Here the mixture is planned per optimizer step:

1. The datasets are concatenated (dataset k's rows at ``offsets[k]`` ...); each has its own
   no-duplicates sampler building global batches of W x B rows (its own seed stream), so the global
   no-duplicates guarantee holds within every batch and the order does not depend on W.
2. A schedule (seeded per epoch) says which dataset each optimizer step draws from:
   ``weighted`` -- dataset k with probability weight_k / sum(weights) at every step, for as many steps
   as all datasets have (one pass over the data volume); a dataset that runs out starts another pass
   (upsampled); ``exhaust`` -- every step of every dataset once, in shuffled order (stock
   "proportional"); ``round_robin`` -- datasets in turn until the first runs out (stock round robin).
3. A step takes ``accumulation`` global batches of its dataset and each is cut into W consecutive
   per-rank batches (accelerate hands batch i to rank i mod W), as :mod:`.sampler` does for one dataset.

The sampler is deterministic per (seed, epoch): a resumed run skips the batches already consumed and
continues with exactly the rows an uninterrupted run would train on.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from functools import partial

import torch
from sentence_transformers.base.sampler import DefaultBatchSampler, NoDuplicatesBatchSampler

from dist_vdr.data import sampler as sampler_hashes

STRATEGIES = ("weighted", "exhaust", "round_robin")
# Distinct seed streams for the datasets' samplers (the stock sampler seeds with seed + epoch).
_DATASET_SEED_STRIDE = 1_000_003


def check_mixture(num_datasets: int, weights: list[float], strategy: str) -> None:
    """ValueError with the fix unless ``strategy`` and ``weights`` describe a mixture of the datasets."""
    if strategy not in STRATEGIES:
        raise ValueError(f"data mixture strategy {strategy!r}: use one of {list(STRATEGIES)}")
    if len(weights) != num_datasets or not num_datasets:
        raise ValueError("a mixture needs one weight per dataset")
    if strategy == "weighted" and (any(w < 0 for w in weights) or not sum(weights) > 0):
        raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {weights}")


def drawn(strategy: str, weight: float | None) -> bool:
    """Whether the mixture draws optimizer steps from a dataset of this weight (None: its rows): never under
    weighted with weight 0, never under mixed (no per-step dataset), always under exhaust and round_robin."""
    if strategy == "mixed":
        return False
    return strategy != "weighted" or weight is None or weight > 0


def schedule(steps: list[int], weights: list[float], strategy: str, seed: int) -> list[int]:
    """Which dataset each optimizer step of an epoch draws from, given each dataset's number of steps."""
    check_mixture(len(steps), weights, strategy)
    rng = random.Random(seed)
    if strategy == "round_robin":
        return [k for _ in range(min(steps)) for k in range(len(steps))]
    if strategy == "exhaust":
        order = [k for k, n in enumerate(steps) for _ in range(n)]
        rng.shuffle(order)
        return order
    # One pass over the data volume of the datasets drawn at all (a weight of 0 adds no steps).
    return rng.choices(range(len(steps)), weights=weights, k=sum(n for n, w in zip(steps, weights, strict=True) if w))


def plan_summary(names: list[str], sizes: list[int], weights: list[float], strategy: str,
                 step_rows: int) -> list[dict]:
    """Per dataset, for run_info.jsonl: rows, weight, optimizer steps per epoch (expected, for weighted)
    and epochs of its own rows per training epoch (> 1: upsampled; < 1: not all of its rows seen)."""
    steps = [n // step_rows for n in sizes]
    if strategy == "weighted":
        total = sum(n for n, w in zip(steps, weights, strict=True) if w)
        planned = [total * w / sum(weights) for w in weights]
    elif strategy in ("exhaust", "mixed"):  # mixed: every row once, in batches of all datasets
        planned = [float(n) for n in steps]
    else:
        planned = [float(min(steps))] * len(steps)
    return [{"name": name, "rows": n, "weight": w, "steps_per_epoch": round(p, 2),
             "epochs_per_epoch": round(p / k, 3) if k else 0.0}
            for name, n, w, p, k in zip(names, sizes, weights, planned, steps, strict=True)]


class MixtureBatchSampler(DefaultBatchSampler):
    """Per-rank batches of a concatenation of datasets (``sizes`` rows each, in order), every optimizer
    step from one dataset (see the module docstring). ``batch_size`` is per rank."""

    def __init__(self, dataset, batch_size: int, drop_last: bool, valid_label_columns=None, generator=None,
                 seed: int = 0, *, sizes: list[int], weights: list[float] | None = None, strategy: str = "weighted",
                 world_size: int = 1, accumulation: int = 1, precompute_hashes: bool = True,
                 row_hashes=None) -> None:
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last,
                         valid_label_columns=valid_label_columns, generator=generator, seed=seed)
        if sum(sizes) != len(dataset) or any(n < 1 for n in sizes):
            raise ValueError(f"mixture sizes {sizes} do not add up to the {len(dataset)} rows given")
        if world_size < 1 or accumulation < 1:
            raise ValueError("world_size and accumulation must be >= 1")
        self.world_size, self.accumulation, self.strategy = world_size, accumulation, strategy
        self.weights = list(weights) if weights is not None else [float(n) for n in sizes]
        self.offsets = [sum(sizes[:k]) for k in range(len(sizes))]
        self.samplers = []
        for k, (offset, n) in enumerate(zip(self.offsets, sizes, strict=True)):
            part = dataset.select(range(offset, offset + n))
            self.samplers.append(NoDuplicatesBatchSampler(
                part, batch_size=batch_size * world_size, drop_last=True, valid_label_columns=valid_label_columns,
                generator=torch.Generator(), seed=seed + _DATASET_SEED_STRIDE * (k + 1),
                precompute_hashes=precompute_hashes))
            if precompute_hashes and row_hashes is not None:
                sampler_hashes.use(self.samplers[-1], row_hashes[offset:offset + n])
        check_mixture(len(sizes), self.weights, strategy)  # now, not at the first step
        short = [k for k, n in enumerate(self.steps_per_dataset()) if n < 1 and drawn(strategy, self.weights[k])]
        if short:
            raise ValueError(f"mixture dataset(s) {short} hold fewer rows than one optimizer step "
                             f"({batch_size * world_size * accumulation} rows: per-device batch x ranks x "
                             f"accumulation): lower the global batch or drop them")
        self.last_schedule: list[int] = []

    def steps_per_dataset(self) -> list[int]:
        """Full optimizer steps each dataset holds in one pass (its global batches // accumulation)."""
        return [len(s) // self.accumulation for s in self.samplers]

    def _plan(self) -> list[int]:
        return schedule(self.steps_per_dataset(), self.weights, self.strategy, self.seed + self.epoch)

    def _global_batches(self, k: int) -> Iterator[list[int]]:
        """Dataset k's full global batches (concatenated-row indices), pass after pass (upsampling)."""
        full = self.batch_size * self.world_size
        sampler, passes = self.samplers[k], 0
        while True:
            # Pass p of epoch e: the stock sampler's epoch e * 1000 + p (its own shuffle).
            sampler.set_epoch(self.epoch * 1000 + passes)
            found = False
            for batch in sampler:
                if len(batch) == full:
                    found = True
                    yield [self.offsets[k] + i for i in batch]
            if not found:
                return
            passes += 1

    def __iter__(self) -> Iterator[list[int]]:
        self.last_schedule = plan = self._plan()
        streams = [self._global_batches(k) for k in range(len(self.samplers))]
        for k in plan:
            for _ in range(self.accumulation):
                global_batch = next(streams[k], None)
                if global_batch is None:
                    raise ValueError(f"mixture dataset {k}: no full batch of {self.batch_size * self.world_size} "
                                     f"rows without repeated values (too many duplicate queries or pages); "
                                     f"de-duplicate it or lower the global batch")
                for r in range(self.world_size):
                    yield global_batch[r * self.batch_size:(r + 1) * self.batch_size]

    def __len__(self) -> int:
        return len(self._plan()) * self.accumulation * self.world_size


def mixture_sampler(sizes: list[int], weights: list[float], strategy: str, world_size: int, accumulation: int,
                    precompute_hashes: bool = True, row_hashes=None):
    """A batch-sampler factory for SentenceTransformerTrainingArguments(batch_sampler=...)."""
    return partial(MixtureBatchSampler, sizes=sizes, weights=weights, strategy=strategy, world_size=world_size,
                   accumulation=accumulation, precompute_hashes=precompute_hashes, row_hashes=row_hashes)
