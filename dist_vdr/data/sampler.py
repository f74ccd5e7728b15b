"""No duplicates across the whole global batch, not just per rank.

sentence-transformers' NoDuplicatesBatchSampler de-duplicates the batch it builds, and under DDP
every rank receives its own batch: a page (or query) on rank 0 may repeat on rank 1, and with
cross-device negatives that copy becomes a false negative. Here the stock sampler (with its content
hashes, images included) builds batches of world_size x per-device rows, and each is cut into
world_size consecutive per-device batches. accelerate hands batch i of the sampler to rank
i mod world_size, so the W pieces of one global batch land on the W ranks in the same step.

With world_size 1 this is exactly the stock sampler, and the global batch of W ranks holds the same
rows in the same order as one process with a W-times larger batch (the tests compare both).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

from sentence_transformers.base.sampler import DefaultBatchSampler, NoDuplicatesBatchSampler

from dist_vdr import compat


class GlobalNoDuplicatesBatchSampler(DefaultBatchSampler):
    def __init__(self, dataset, batch_size: int, drop_last: bool, valid_label_columns=None, generator=None,
                 seed: int = 0, *, world_size: int = 1, precompute_hashes: bool = True, row_hashes=None) -> None:
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last,
                         valid_label_columns=valid_label_columns, generator=generator, seed=seed)
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        # Incomplete global batches cannot be split evenly over the ranks: always drop them.
        self.global_sampler = NoDuplicatesBatchSampler(
            dataset, batch_size=batch_size * world_size, drop_last=True, valid_label_columns=valid_label_columns,
            generator=generator, seed=seed, precompute_hashes=precompute_hashes)
        # Hashes of every row from dist-vdr's startup pass (data/startup.py: the same per-value digest,
        # computed once, sharded over the ranks): set as the stock sampler's own precomputed ones
        # (compat: st.sampler_row_hashes), so it does not hash again.
        if precompute_hashes and row_hashes is not None:
            use(self.global_sampler, row_hashes)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.global_sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        full = self.batch_size * self.world_size
        for global_batch in self.global_sampler:
            if len(global_batch) < full:
                continue
            for r in range(self.world_size):
                yield global_batch[r * self.batch_size:(r + 1) * self.batch_size]

    def __len__(self) -> int:
        return len(self.global_sampler) * self.world_size


def use(sampler: NoDuplicatesBatchSampler, row_hashes) -> None:
    """Give ``sampler`` the startup pass's hashes of its rows when they are of its columns (else it hashes)."""
    columns = sampler.dataset.column_names
    excluded = set(columns) & compat.sampler_excluded_columns()
    if row_hashes.shape == (len(sampler.dataset), len(columns)) and not excluded:
        compat.set_sampler_row_hashes(sampler, row_hashes)


def global_no_duplicates(world_size: int, precompute_hashes: bool = True, row_hashes=None):
    """A batch-sampler factory for SentenceTransformerTrainingArguments(batch_sampler=...)."""
    return partial(GlobalNoDuplicatesBatchSampler, world_size=world_size, precompute_hashes=precompute_hashes,
                   row_hashes=row_hashes)
