"""Mixtures of datasets (dist_vdr.data.mixture): every optimizer step's global batch from one dataset
on every rank, the order independent of the number of ranks, weights respected, deterministic for resume."""

from __future__ import annotations

import collections

import datasets
import pytest

from dist_vdr.data.mixture import MixtureBatchSampler, schedule

SIZES = [96, 64, 160]


def _mixture():
    # Dataset k's rows are "k:<i>"; queries repeat within a dataset (rows i and i + n/2), so only a
    # global de-duplication keeps copies out of one step's batch.
    rows = [f"{k}:q{i % (n // 2)}" for k, n in enumerate(SIZES) for i in range(n)]
    pages = [f"{k}:p{i}" for k, n in enumerate(SIZES) for i in range(n)]
    return datasets.Dataset.from_dict({"query": rows, "image": pages})


def _sampler(ds, batch_size, world_size, *, strategy="weighted", weights=None, accumulation=1, epoch=0, seed=5):
    s = MixtureBatchSampler(ds, batch_size=batch_size, drop_last=True, seed=seed, sizes=SIZES, weights=weights,
                            strategy=strategy, world_size=world_size, accumulation=accumulation)
    s.set_epoch(epoch)
    return s


def _dataset_of(row: int) -> int:
    return next(k for k in reversed(range(len(SIZES))) if row >= sum(SIZES[:k]))


def _steps(batches, world_size, accumulation=1):
    """Per optimizer step: the global micro-batches (ranks' batches joined) it trained on."""
    per_micro = [sum(batches[i:i + world_size], []) for i in range(0, len(batches), world_size)]
    return [per_micro[i:i + accumulation] for i in range(0, len(per_micro), accumulation)]


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("strategy", ["weighted", "exhaust", "round_robin"])
def test_every_step_holds_one_dataset_on_all_ranks_and_equals_one_process(strategy, world_size):
    ds = _mixture()
    sampler = _sampler(ds, 16 // world_size, world_size, strategy=strategy)
    batches = list(sampler)
    assert len(batches) == len(sampler) and len(batches) % world_size == 0
    one = list(_sampler(ds, 16, 1, strategy=strategy))
    steps = _steps(batches, world_size)
    assert [step[0] for step in steps] == one  # the union over ranks = one process's global batch, in order
    queries = ds["query"]
    for (global_batch,) in steps:
        assert len({_dataset_of(i) for i in global_batch}) == 1  # every rank: the same dataset
        assert len({queries[i] for i in global_batch}) == 16  # no duplicate across the ranks
    used = [_dataset_of(step[0][0]) for step in steps]
    assert used == sampler.last_schedule
    if strategy == "exhaust":  # every dataset's steps once
        assert collections.Counter(used) == {k: n // 16 for k, n in enumerate(SIZES)}
    if strategy == "round_robin":
        assert used == [0, 1, 2] * (min(SIZES) // 16)


def test_weights_give_the_asked_proportions():
    """weighted: over the epochs, dataset k's share of the steps is weight_k / sum; with n steps the
    binomial standard deviation is sqrt(p(1-p)/n): asserted within 3 of them."""
    ds = _mixture()
    weights = [1.0, 3.0, 0.0]
    used = []
    for epoch in range(20):
        sampler = _sampler(ds, 8, 2, weights=weights, epoch=epoch)
        list(sampler)
        used += sampler.last_schedule
    n = len(used)
    share = used.count(1) / n
    assert n == 20 * sum(s // 16 for s in SIZES)
    assert abs(share - 0.75) < 3 * (0.75 * 0.25 / n) ** 0.5, share
    assert used.count(2) == 0  # weight 0: never drawn


def test_accumulation_keeps_one_dataset_for_the_whole_optimizer_step():
    ds = _mixture()
    steps = _steps(list(_sampler(ds, 4, 2, accumulation=2)), 2, accumulation=2)
    for micro in steps:
        assert len(micro) == 2 and len({_dataset_of(i) for batch in micro for i in batch}) == 1


def test_a_dataset_upsampled_past_its_rows_starts_another_pass():
    """weighted with most weight on the smallest dataset: it is drawn more often than it has batches and
    continues with a fresh shuffle (upsampling), never an empty step."""
    ds = _mixture()
    sampler = _sampler(ds, 8, 2, weights=[0.0, 1.0, 0.0])
    steps = _steps(list(sampler), 2)
    assert len(steps) == sum(n // 16 for n in SIZES) > SIZES[1] // 16
    assert all(_dataset_of(step[0][0]) == 1 and len(step[0]) == 16 for step in steps)


def test_deterministic_per_epoch_so_a_resume_continues_with_the_same_rows():
    """The trainer resumes by skipping the batches already consumed of the epoch's iteration: the
    iteration must be the same every time (and differ between epochs)."""
    ds = _mixture()
    a, b = list(_sampler(ds, 8, 2)), list(_sampler(ds, 8, 2))
    assert a == b
    assert list(_sampler(ds, 8, 2, epoch=1)) != a
    # 2 ranks -> 1 rank: the global batches (and so the order of everything) are unchanged
    assert [x + y for x, y in zip(a[::2], a[1::2], strict=True)] == list(_sampler(ds, 16, 1))


def test_user_errors_say_the_fix():
    ds = _mixture()
    with pytest.raises(ValueError, match="fewer rows than one optimizer step"):
        _sampler(ds, 64, 2)
    with pytest.raises(ValueError, match="positive sum"):
        _sampler(ds, 8, 2, weights=[0, 0, 0])
    same = datasets.Dataset.from_dict({"query": ["q"] * sum(SIZES), "image": ["p"] * sum(SIZES)})
    with pytest.raises(ValueError, match="no full batch of 16 rows without repeated values"):
        list(_sampler(same, 8, 2))
    with pytest.raises(ValueError, match="use one of"):
        schedule([1, 2], [1, 1], "proportionate", 0)
    with pytest.raises(ValueError, match="positive sum"):
        schedule([1, 2], [0, 0], "weighted", 0)
