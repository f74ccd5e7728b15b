"""Multi-process harness for loss equivalence: W gloo ranks (real DDP) vs one process with the global batch.

Spawned workers import this module by name, so it lives beside the tests (on sys.path) and holds
only top-level, picklable functions.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import torch


@dataclass
class Case:
    name: str
    implementation: str = "global_batch"  # global_batch | stock | broken_* (deliberately wrong variants)
    dims: tuple = (64, 32, 16)
    num_negatives: int = 1
    mini_batch_size: int = 1
    mini_batch_num_tokens: int | None = None
    grad_accum: int = 1
    per_rank_batch: int = 2
    reference: str = "cached"  # cached | plain: the single-process reference loss
    extra: dict = field(default_factory=dict)


def make_rows(n: int, num_negatives: int, seed: int):
    """Deterministic (query, page, negatives...) rows of generated pages."""
    from dist_vdr.data.synthetic import all_attributes, describe, perturb, render_page

    rng = random.Random(seed)
    combos = rng.sample(all_attributes(), n)
    rows = []
    for attrs in combos:
        row = [describe(attrs, rng), render_page(attrs, rng)]
        row += [render_page(perturb(attrs, rng), rng) for _ in range(num_negatives)]
        rows.append(row)
    return rows


def make_id_labels(n: int, num_negatives: int):
    """Ids that make false negatives across ranks (``Case.extra["ids"]``): rows i and i + n/2 share their
    positive's id; row i's negatives carry ids n<i>, and row i lists n<i+1> among its positive ids."""
    from dist_vdr.data.id_labels import id_labels

    half = max(n // 2, 1)
    rows = [{"pos": f"doc{i % half}", **{f"neg{k}": f"n{i}" for k in range(num_negatives)},
             "more": [f"n{(i + 1) % n}"]} for i in range(n)]
    return id_labels(rows, ["pos", *(f"neg{k}" for k in range(num_negatives))], "more")


def load_guide(model_dir: str):
    """A guide for loss.false_negatives (``Case.extra["guide"]``): the model with perturbed weights, the
    same on every rank."""
    guide = load_model(model_dir)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in guide.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return guide


def load_model(model_dir: str):
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model = SentenceTransformer(model_dir, device="cpu", model_kwargs={"attn_implementation": "sdpa"})
    model.train()
    return model


def build_case_loss(model, case: Case, rank: int, world: int, distributed_run: bool, model_dir: str = ""):
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MatryoshkaLoss,
        MultipleNegativesRankingLoss,
    )

    from dist_vdr.config import DistillationConfig
    from dist_vdr.losses.global_batch import GlobalBatchCachedMNRL

    masked = bool(case.extra.get("ids"))
    guide = dict(guide=load_guide(model_dir), guide_margin=case.extra.get("margin", 0.0),
                 guide_margin_strategy=case.extra.get("strategy", "absolute")) if case.extra.get("guide") else {}
    if case.extra.get("teacher"):
        guide["distillation"] = DistillationConfig(scores_column="teacher", kind=case.extra["teacher"], weight=0.5,
                                                   temperature=case.extra.get("temperature", 1.0))
    if not distributed_run and (masked or guide):  # reference: the same loss on one process, the global batch
        return GlobalBatchCachedMNRL(model, matryoshka_dims=case.dims, mini_batch_size=case.mini_batch_size,
                                     mini_batch_num_tokens=case.mini_batch_num_tokens, mask_same_ids=masked, **guide)
    if not distributed_run:  # the single-process reference: stock sentence-transformers
        if case.reference == "plain":
            inner = MultipleNegativesRankingLoss(model)
        else:
            inner = CachedMultipleNegativesRankingLoss(model, mini_batch_size=case.mini_batch_size,
                                                       mini_batch_num_tokens=case.mini_batch_num_tokens)
        return MatryoshkaLoss(model, inner, list(case.dims)) if case.dims else inner
    if case.implementation == "stock":
        inner = CachedMultipleNegativesRankingLoss(model, mini_batch_size=case.mini_batch_size,
                                                   mini_batch_num_tokens=case.mini_batch_num_tokens,
                                                   gather_across_devices=True)
        return MatryoshkaLoss(model, inner, list(case.dims)) if case.dims else inner
    cls = {"global_batch": GlobalBatchCachedMNRL, "broken_no_return": NoReturnLoss, "broken_scale": WrongScaleLoss,
           "broken_local_ids": LocalIdsLoss, "broken_local_guide": LocalGuideLoss,
           "broken_options_ignored": GlobalBatchCachedMNRL}[case.implementation]
    if "dataset" in case.extra and case.implementation != "broken_options_ignored":
        from dist_vdr.losses.global_batch import DatasetOptions

        # A mixture of one dataset, index 0, with the case's options (data.datasets[]).
        guide["datasets"] = [DatasetOptions(index=0, **case.extra["dataset"])]
    return cls(model, matryoshka_dims=case.dims, rank=rank, world_size=world, mini_batch_size=case.mini_batch_size,
               mini_batch_num_tokens=case.mini_batch_num_tokens, mask_same_ids=masked, **guide)


def _broken_classes():
    from dist_vdr.losses.global_batch import GlobalBatchCachedMNRL

    class NoReturnLoss(GlobalBatchCachedMNRL):
        """Deliberately broken: the gathered columns' gradients never reach their owners."""

        def _owner_gradients(self, grad, rank, world):
            return grad[rank]

    class WrongScaleLoss(GlobalBatchCachedMNRL):
        """Deliberately broken: gradients scaled by W, as if DDP summed instead of averaging."""

        def _owner_gradients(self, grad, rank, world):
            return super()._owner_gradients(grad, rank, world) * world

    class LocalIdsLoss(GlobalBatchCachedMNRL):
        """Deliberately broken: every rank's candidates carry this rank's ids (as if the ids were not
        gathered), so false negatives held by other ranks stay in the softmax."""

        def calculate_loss(self, reps, labels=None, *, with_backward=False):
            from dist_vdr.losses import false_negatives

            stock = false_negatives.candidate_order

            def local_only(ids):
                return stock(ids[self.rank:self.rank + 1].expand_as(ids))

            false_negatives.candidate_order = local_only
            try:
                return super().calculate_loss(reps, labels, with_backward=with_backward)
            finally:
                false_negatives.candidate_order = stock

    class LocalGuideLoss(GlobalBatchCachedMNRL):
        """Deliberately broken: the guide's candidate embeddings of every rank are this rank's (as if they
        were not gathered)."""

        def _gather(self, stacked, labels, num_columns, batch_size, rank, world):
            gathered, masking = super()._gather(stacked, labels, num_columns, batch_size, rank, world)
            queries, candidates = masking.guide
            blocks = candidates.view(num_columns - 1, world, batch_size, -1)
            local = blocks[:, rank:rank + 1].expand_as(blocks).reshape(candidates.shape)
            masking.guide = (queries, local)
            return gathered, masking

    return NoReturnLoss, WrongScaleLoss, LocalIdsLoss, LocalGuideLoss


NoReturnLoss, WrongScaleLoss, LocalIdsLoss, LocalGuideLoss = _broken_classes()


def override_model(loss, ddp) -> None:
    """Swap the DDP wrapper into the loss and any nested loss, like SentenceTransformerTrainer does (only a
    ``model`` that is a SentenceTransformer: a guide's inner transformers ``model`` stays)."""
    from sentence_transformers import SentenceTransformer

    for name, child in list(loss.named_children()):
        if name == "model" and isinstance(child, SentenceTransformer):
            setattr(loss, name, ddp)
        elif isinstance(child, torch.nn.Module):
            override_model(child, ddp)


def features(model, rows, columns: int):
    return [model.preprocess([row[c] for row in rows]) for c in range(columns)]


def run_step(model, loss_fn, micro_batches: list[list], case: Case, ddp=None, labels: list | None = None):
    """Forward/backward over the micro-batches (gradient accumulation), return (mean loss, grads)."""
    columns = 2 + case.num_negatives
    model.zero_grad(set_to_none=True)
    total = 0.0
    for i, rows in enumerate(micro_batches):
        feats = features(model, rows, columns)
        last = i == len(micro_batches) - 1
        ctx = ddp.no_sync() if (ddp is not None and not last) else _null()
        with ctx:
            loss = loss_fn(feats, labels[i] if labels else None) / len(micro_batches)
            loss.backward()
        total += float(loss.detach())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, grads


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def global_micro_batches(case: Case, world: int, seed: int = 0):
    n = case.per_rank_batch * world
    return [make_rows(n, case.num_negatives, seed + k) for k in range(case.grad_accum)]


def teacher_scores(n: int, num_negatives: int, seed: int) -> torch.Tensor:
    """Deterministic teacher scores [n, 1 + num_negatives] (``Case.extra["teacher"]``), cosine-like."""
    gen = torch.Generator().manual_seed(100 + seed)
    return torch.rand(n, 1 + num_negatives, generator=gen) * 0.8 + 0.1


def global_labels(case: Case, world: int) -> list | None:
    if not case.extra.get("ids") and not case.extra.get("teacher") and "dataset" not in case.extra:
        return None
    n = case.per_rank_batch * world
    out = []
    for k in range(case.grad_accum):
        labels = {"dataset": torch.zeros(n, dtype=torch.int64)} if "dataset" in case.extra else {}
        if case.extra.get("ids"):
            labels["ids"] = make_id_labels(n, case.num_negatives)
        if case.extra.get("teacher"):
            labels["teacher"] = teacher_scores(n, case.num_negatives, k)
        out.append(labels)
    return out


def _rows(labels: dict, part: slice) -> dict:
    return {key: value[part] for key, value in labels.items()}


def reference(model_dir: str, case: Case, world: int):
    model = load_model(model_dir)
    loss_fn = build_case_loss(model, case, 0, 1, distributed_run=False, model_dir=model_dir)
    if "dataset" in case.extra:  # per-dataset options: the stock loss over the blocks the options keep apart
        return run_step(model, loss_fn, _option_blocks(case, world), case)
    return run_step(model, loss_fn, global_micro_batches(case, world), case, labels=global_labels(case, world))


def _option_blocks(case: Case, world: int) -> list[list]:
    """One process's equivalent of a dataset's options, as gradient accumulation over blocks of the global
    batch (the mean of the blocks' losses and gradients): cross_device_negatives off -- each rank's rows,
    a contrastive batch of their own; in_batch_negatives off -- each row alone (its own pages only)."""
    assert case.grad_accum == 1
    rows = global_micro_batches(case, world)[0]
    if case.extra["dataset"].get("in_batch_negatives") is False:
        return [[row] for row in rows]
    b = case.per_rank_batch
    return [rows[r * b:(r + 1) * b] for r in range(world)]


def worker(rank: int, world: int, init_file: str, model_dir: str, cases: list, out_path: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from dist_vdr import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    try:
        for case in cases:
            model = load_model(model_dir)
            ddp = DistributedDataParallel(model, find_unused_parameters=False)
            distributed.register_counting_comm_hook(ddp)
            loss_fn = build_case_loss(model, case, rank, world, distributed_run=True, model_dir=model_dir)
            override_model(loss_fn, ddp)  # as the trainer does: the replay runs through DDP (no_sync handling)
            part = slice(rank * case.per_rank_batch, (rank + 1) * case.per_rank_batch)
            mine = [rows[part] for rows in global_micro_batches(case, world)]
            labels = global_labels(case, world)
            with distributed.count_collectives() as count:
                loss, grads = run_step(model, loss_fn, mine, case, ddp=ddp,
                                       labels=[_rows(lab, part) for lab in labels] if labels else None)
            # The logged loss is the mean over ranks (as the HF trainer's logging gathers it).
            t = torch.tensor([loss])
            dist.all_reduce(t)
            results[case.name] = {"loss": float(t) / world, "grads": grads, "collectives": dict(count.calls),
                                  "bytes": count.bytes}
    finally:
        if rank == 0:
            torch.save(results, out_path)
        dist.barrier()
        dist.destroy_process_group()


def run_distributed(model_dir: str, cases: list, world: int, tmp_dir: str) -> dict:
    import torch.multiprocessing as mp

    init_file = os.path.join(tmp_dir, f"init-{world}")
    out_path = os.path.join(tmp_dir, f"results-{world}.pt")
    mp.start_processes(worker, args=(world, init_file, model_dir, cases, out_path), nprocs=world, join=True,
                       start_method="spawn")
    return torch.load(out_path, weights_only=False)


def max_rel_diff(a: dict, b: dict) -> float:
    """Largest relative difference over all parameter gradients (norm-relative per tensor)."""
    assert a.keys() == b.keys(), set(a) ^ set(b)
    worst = 0.0
    for k in a:
        denom = max(float(b[k].norm()), 1e-12)
        worst = max(worst, float((a[k] - b[k]).norm()) / denom)
    return worst
