"""Multi-process harness for the score-exchange loss (token embeddings scored by MaxSim): W gloo ranks (real
DDP) against one process holding the global batch.

A toy multi-vector encoder (:class:`TokenEncoder`) stands in for the kind's model: token ids ``[B, L]`` with
ragged lengths in, per-token L2-normalised vectors ``[B, L, D]`` and the attention mask out (the layout of
sentence-transformers' ``MultiVectorEncoder`` output: padded positions hold values of their own, told apart only
by the mask). Spawned workers import this module by name, so it lives beside the tests and holds only
top-level, picklable functions.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dist_vdr.losses.score_exchange import ScoreExchangeCachedLoss

VOCAB, HIDDEN, DIM = 40, 24, 16
QUERY_TOKENS, PAGE_TOKENS = (2, 6), (4, 11)  # ragged lengths, inclusive ranges
QUERY_LENGTH = 8  # the fixed query length of the exchange (>= the longest query)


@dataclass
class Case:
    name: str
    implementation: str = "score_exchange"  # score_exchange | stock (sentence-transformers' gather) | broken_*
    dims: tuple = (16, 8)  # Matryoshka token dims; () the full dim only
    page_columns: int = 2  # positive + hard negatives
    mini_batch_size: int = 1
    mini_batch_num_tokens: int | None = None  # a token budget per mini-batch (the gradient cache's)
    per_rank_batch: int = 2
    grad_accum: int = 1
    query_length: int | None = QUERY_LENGTH  # None: agreed per step (all-reduce MAX)
    scale: float = 2.0
    mask_ids: bool = False  # false negatives masked by id (ids of few values: many collide, across ranks too)
    mask_guide: bool = False  # false negatives masked by a guide (another TokenEncoder), GIST's absolute margin
    distillation: str | None = None  # kl | margin_mse: teacher scores of each row's own candidates
    dataset: tuple = ()  # a mixture dataset's options, e.g. (("in_batch_negatives", False),): the step's dataset
    hybrid_dims: tuple | None = None  # the hybrid loss: + the pooled vector's cosine InfoNCE at these dims (() full)


class TokenEncoder(torch.nn.Sequential):
    """ids -> per-token vectors that depend on the whole sequence (a masked mean of the embeddings mixed into
    every token), L2-normalised per token. Deterministic (no dropout), every parameter used by every input."""

    def __init__(self) -> None:
        super().__init__(torch.nn.Embedding(VOCAB, HIDDEN), torch.nn.Linear(HIDDEN, DIM))

    def forward(self, features: dict, task: str | None = None) -> dict:
        ids, mask = features["input_ids"], features["attention_mask"]
        hidden = self[0](ids)
        weights = mask[..., None].to(hidden.dtype)
        context = (hidden * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1)
        tokens = F.normalize(self[1](torch.tanh(hidden + context)), dim=-1)
        pooled = self[1](torch.tanh(context[:, 0]))  # a hybrid model's single vector (unnormalised, as pooled)
        return {"token_embeddings": tokens, "attention_mask": mask.bool(), "sentence_embedding": pooled}


def make_model() -> TokenEncoder:
    torch.manual_seed(0)
    return TokenEncoder().train()


GUIDE_MARGIN = 0.3
SINGLE_WEIGHT, SINGLE_SCALE = 0.5, 3.0  # the hybrid cases' single-vector term


def make_guide() -> TokenEncoder:
    """The frozen guide of mask_guide cases: the same architecture, other weights (the base model's role)."""
    torch.manual_seed(7)
    return TokenEncoder().eval()


def make_columns(n: int, page_columns: int, seed: int) -> list[list[torch.Tensor]]:
    """``1 + page_columns`` columns of n token-id sequences of ragged lengths (ids 1..VOCAB-1; 0 pads)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    columns = []
    for c in range(1 + page_columns):
        low, high = QUERY_TOKENS if c == 0 else PAGE_TOKENS
        lengths = torch.randint(low, high + 1, (n,), generator=gen).tolist()
        columns.append([torch.randint(1, VOCAB, (length,), generator=gen) for length in lengths])
    return columns


def collate(sequences: list[torch.Tensor]) -> dict:
    """Right-padded to the longest of these rows (as a collator pads a rank's batch)."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.int64)
    mask = torch.zeros(len(sequences), width, dtype=torch.int64)
    for i, s in enumerate(sequences):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


def global_micro_batches(case: Case, world: int) -> list[list[list[torch.Tensor]]]:
    return [make_columns(case.per_rank_batch * world, case.page_columns, k) for k in range(case.grad_accum)]


EXTRA_IDS = 2  # further positive ids per row (0-padded), as a positive_ids column gives them


def global_labels(case: Case, world: int) -> list[dict | None]:
    """Per micro-batch: ``ids`` [N, (C-1) + EXTRA_IDS] int64 (each candidate column's id, then further positive
    ids; ids 1..5 so that many candidates of other rows, on other ranks too, share one) and ``teacher``
    [N, C-1] scores, as the collator builds them; None without masking or distillation."""
    if not case.mask_ids and case.distillation is None and not case.dataset:
        return [None] * case.grad_accum
    out = []
    for k in range(case.grad_accum):
        gen = torch.Generator().manual_seed(2000 + k)
        n = case.per_rank_batch * world
        ids = torch.randint(1, 6, (n, case.page_columns + EXTRA_IDS), generator=gen)
        ids[:, case.page_columns + 1:] = 0  # one further id per row, the rest padding
        labels = {"ids": ids} if case.mask_ids else {}
        if case.distillation is not None:
            labels["teacher"] = torch.rand(n, case.page_columns, generator=gen) * 4
        if case.dataset:
            labels["dataset"] = torch.zeros(n, dtype=torch.int64)
        out.append(labels)
    return out


def distillation_config(case: Case):
    from dist_vdr.config import DistillationConfig

    if case.distillation is None:
        return None
    return DistillationConfig(scores_column="teacher_scores", kind=case.distillation, weight=0.7, temperature=0.5)


def rows_of(labels: dict | None, part: slice) -> dict | None:
    return None if labels is None else {k: v[part] for k, v in labels.items()}


def represent_output(output: dict, side: str) -> torch.Tensor:
    """The kind's reading of a forward pass: the scored tokens in MaxSimScoring's mask-free layout."""
    from dist_vdr.kinds.multi_vector.scoring import from_masked

    return from_masked(output["token_embeddings"], output["attention_mask"], side)


def _broken_classes():
    class NoScoreExchangeLoss(ScoreExchangeCachedLoss):
        """Deliberately broken: the scores are not exchanged -- every rank takes its own block of the score
        matrix for every rank's (each rank's loss is over its local pages only)."""

        def _exchange_scores(self, local, rank, world):
            return local.repeat(1, 1, world)

    class NoQueryReturnLoss(ScoreExchangeCachedLoss):
        """Deliberately broken: the query gradients computed on other ranks never reach their owners."""

        def _query_gradients(self, grads, rank, world):
            return grads[rank]

    return NoScoreExchangeLoss, NoQueryReturnLoss


NoScoreExchangeLoss, NoQueryReturnLoss = _broken_classes()


def build_loss(model, case: Case, rank: int, world: int):
    from dist_vdr.kinds.multi_vector.scoring import MaxSimScoring

    if case.implementation == "stock":
        from sentence_transformers.multi_vector_encoder.losses import CachedMultiVectorMultipleNegativesRankingLoss

        assert not case.dims, "sentence-transformers has no Matryoshka on token dims"
        return CachedMultiVectorMultipleNegativesRankingLoss(model, scale=case.scale,
                                                             mini_batch_size=case.mini_batch_size,
                                                             mini_batch_num_tokens=case.mini_batch_num_tokens,
                                                             gather_across_devices=world > 1)
    cls = {"score_exchange": ScoreExchangeCachedLoss, "broken_no_score_exchange": NoScoreExchangeLoss,
           "broken_no_query_return": NoQueryReturnLoss}[case.implementation]
    hybrid = {}
    if case.hybrid_dims is not None:
        from dist_vdr.kinds.multi_vector.loss import HybridCachedLoss

        cls, hybrid = HybridCachedLoss, dict(single_dims=case.hybrid_dims, single_weight=SINGLE_WEIGHT,
                                             single_scale=SINGLE_SCALE)
    return cls(model, MaxSimScoring(chunk_elements=256), matryoshka_dims=case.dims, rank=rank, world_size=world,
               scale=case.scale, mini_batch_size=case.mini_batch_size,
               mini_batch_num_tokens=case.mini_batch_num_tokens, query_length=case.query_length,
               represent_output=represent_output, mask_same_ids=case.mask_ids,
               guide=make_guide() if case.mask_guide else None, guide_margin=GUIDE_MARGIN,
               distillation=distillation_config(case), datasets=dataset_options(case), **hybrid)


def dataset_options(case: Case) -> list:
    from dist_vdr.losses.global_batch import DatasetOptions

    return [DatasetOptions(index=0, **dict(case.dataset))] if case.dataset else []


def run_step(model, loss_fn, micro_batches: list[list[dict]], ddp=None, labels: list | None = None) -> dict:
    """Forward/backward over the micro-batches (gradient accumulation): the mean loss, the gradients and the
    collectives issued by the loss's forward (steps a-f) and by the backward (the replay + DDP)."""
    from dist_vdr import distributed

    model.zero_grad(set_to_none=True)
    total, forward, backward, nbytes = 0.0, {}, {}, 0
    labels = labels or [None] * len(micro_batches)
    for i, feats in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with ddp.no_sync() if (ddp is not None and not last) else nullcontext():
            with distributed.count_collectives() as fwd:
                loss = loss_fn(feats, labels[i]) / len(micro_batches)
            with distributed.count_collectives() as bwd:
                loss.backward()
        total += float(loss.detach())
        for into, count in ((forward, fwd), (backward, bwd)):
            for name, calls in count.calls.items():
                into[name] = into.get(name, 0) + calls
        nbytes += fwd.bytes
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": total, "grads": grads, "forward": forward, "backward": backward, "forward_bytes": nbytes}


def reference(case: Case, world: int) -> tuple[float, dict]:
    """One process, the global batch, plain autograd (no mini-batches, no cache, no exchange): MaxSimScoring of
    the whole batch's representations, InfoNCE summed over the dims (largest first), mean over queries; each
    option's effect written out (masks, distillation, a dataset's options, the hybrid's single vector)."""
    from dist_vdr.kinds.multi_vector.scoring import PAGE, QUERY, MaxSimScoring
    from dist_vdr.losses import distillation

    scoring = MaxSimScoring()
    model = make_model()
    model.zero_grad(set_to_none=True)
    dims = sorted(case.dims, reverse=True) or [None]
    d = distillation_config(case)
    total = 0.0
    for columns, labels in zip(global_micro_batches(case, world), global_labels(case, world), strict=True):
        outputs = [model(collate(col), task="query" if c == 0 else "document") for c, col in enumerate(columns)]
        reps = [scoring.represent(represent_output(out, QUERY if c == 0 else PAGE)) for c, out in enumerate(outputs)]
        n = reps[0].shape[0]
        loss = _single_vector_term(case, outputs, n)
        hidden = _hidden(case, columns, labels, n, scoring)
        for dim in dims:
            queries, pages = reps[0], reps[1:]
            if dim is not None:
                queries, pages = scoring.truncate(queries, dim), [scoring.truncate(p, dim) for p in pages]
            scores = torch.cat([scoring.scores(queries, p) for p in pages], dim=1).masked_fill(hidden, float("-inf"))
            loss = loss + F.cross_entropy(scores * case.scale, torch.arange(n))
            if d is not None:  # each row's own candidates, the batch mean
                own = torch.stack([scoring.pair_scores(queries, p) for p in pages], dim=1)
                loss = loss + d.weight * distillation.term(own, labels["teacher"], d.kind, d.temperature, None)
        loss = loss / case.grad_accum
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _single_vector_term(case: Case, outputs: list[dict], n: int) -> torch.Tensor:
    """The hybrid's term: cosine InfoNCE of the pooled vectors over the global batch, at its dims (0 otherwise)."""
    loss = torch.zeros(())
    if case.hybrid_dims is None:
        return loss
    for dim in sorted(case.hybrid_dims, reverse=True) or [None]:
        pooled = [F.normalize(out["sentence_embedding"][:, :dim], dim=-1) for out in outputs]
        cosines = pooled[0] @ torch.cat(pooled[1:]).T
        loss = loss + SINGLE_WEIGHT * F.cross_entropy(cosines * SINGLE_SCALE, torch.arange(n))
    return loss


def _hidden(case: Case, columns, labels: dict | None, n: int, scoring) -> torch.Tensor:
    """[n, n * page columns] the candidates left out of each query's softmax (candidate j: row j mod n's page)."""
    from dist_vdr.kinds.multi_vector.scoring import PAGE, QUERY

    own = torch.arange(n)
    rows = torch.arange(n * case.page_columns) % n
    hidden = torch.zeros(n, n * case.page_columns, dtype=torch.bool)
    if case.mask_ids:  # a candidate carrying one of the query's ids (its own positive kept)
        ids = labels["ids"]
        candidate = ids[:, :case.page_columns].T.reshape(-1)
        query_sets = torch.cat([ids[:, :1], ids[:, case.page_columns:]], dim=1)
        hidden |= torch.tensor([[bool(c != 0 and c in set(query_sets[i].tolist()) - {0}) and j != i
                                 for j, c in enumerate(candidate.tolist())] for i in range(n)])
    if case.mask_guide:  # the guide's scores of the whole batch above the query's positive less the margin
        guide = make_guide()
        with torch.no_grad():
            g = [scoring.represent(represent_output(guide(collate(col), task="query" if c == 0 else "document"),
                                                    QUERY if c == 0 else PAGE)) for c, col in enumerate(columns)]
            sims = torch.cat([scoring.scores(g[0], page) for page in g[1:]], dim=1)
        by_guide = sims > (sims[own, own] - GUIDE_MARGIN)[:, None]
        by_guide[own, own] = False
        hidden |= by_guide
    options = dict(case.dataset)
    if not options.get("in_batch_negatives", True):  # only the query's own row's pages
        hidden |= rows[None, :] != own[:, None]
    if not options.get("cross_device_negatives", True):  # only pages of the query's own rank
        rank_of = own // case.per_rank_batch
        hidden |= rank_of[rows][None, :] != rank_of[:, None]
    return hidden


def worker(rank: int, world: int, init_file: str, cases: list, out_path: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from dist_vdr import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    try:
        for case in cases:
            model = make_model()
            ddp = DistributedDataParallel(model)
            distributed.register_counting_comm_hook(ddp)
            loss_fn = build_loss(model, case, rank, world)
            loss_fn.model = ddp  # as the trainer does: the replay runs through DDP (no_sync handling)
            part = slice(rank * case.per_rank_batch, (rank + 1) * case.per_rank_batch)
            mine = [[collate(col[part]) for col in columns] for columns in global_micro_batches(case, world)]
            labels = [rows_of(lab, part) for lab in global_labels(case, world)]
            out = run_step(model, loss_fn, mine, ddp=ddp, labels=labels)
            losses = [torch.zeros(1) for _ in range(world)]
            dist.all_gather(losses, torch.tensor([out["loss"]]))
            out["rank_losses"] = [float(x) for x in losses]
            out["loss"] = sum(out["rank_losses"]) / world  # the logged loss: the mean over ranks
            results[case.name] = out
    finally:
        if rank == 0:
            torch.save(results, out_path)
        dist.barrier()
        dist.destroy_process_group()


def run_distributed(cases: list, world: int, tmp_dir: str) -> dict:
    import torch.multiprocessing as mp

    init_file = os.path.join(tmp_dir, f"init-{world}")
    out_path = os.path.join(tmp_dir, f"results-{world}.pt")
    mp.start_processes(worker, args=(world, init_file, cases, out_path), nprocs=world, join=True,
                       start_method="spawn")
    return torch.load(out_path, weights_only=False)


def rel_diffs(loss: float, grads: dict, ref_loss: float, ref_grads: dict) -> tuple[float, float]:
    """(relative loss difference, the largest norm-relative gradient difference over the parameters)."""
    assert grads.keys() == ref_grads.keys(), set(grads) ^ set(ref_grads)
    worst = max(float((grads[k] - ref_grads[k]).norm()) / max(float(ref_grads[k].norm()), 1e-12) for k in grads)
    return abs(loss - ref_loss) / abs(ref_loss), worst


def overflow_worker(rank: int, world: int, init_file: str, case: Case, out_dir: str) -> None:
    """One step of ``case`` whose queries exceed ``query_length`` on some ranks only: each rank writes what it
    raised into ``out_dir/rank<r>.txt`` (a rank left waiting in a collective would time out after 30 s instead)."""
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    model = make_model()
    loss_fn = build_loss(model, case, rank, world)
    part = slice(rank * case.per_rank_batch, (rank + 1) * case.per_rank_batch)
    feats = [collate(col[part]) for col in global_micro_batches(case, world)[0]]
    try:
        loss_fn(feats, None).backward()
        outcome = "no error"
    except Exception as exc:  # noqa: BLE001  (what each rank raised is the test's subject)
        outcome = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)
    dist.destroy_process_group()
