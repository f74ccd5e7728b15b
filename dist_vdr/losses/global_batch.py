"""Cached MNRL + Matryoshka over the global batch with two embedding collectives per step.

Stock sentence-transformers (``gather_across_devices=True``) all-gathers each column with autograd
for every Matryoshka dim, and sends every loss chunk's gradient back through that gather: backward
collectives per step = dims x chunks x columns. This loss keeps the stock gradient cache (mini-batch
ranges, token budgets, RNG replay, DDP ``no_sync``: :class:`CachedLossMixin` via the parent class)
and replaces only the step between the two embedding passes (``calculate_loss``):

1. the local embeddings of all columns, stacked ``[C, B, D]``, are all-gathered ONCE, without
   autograd, into a leaf ``G`` of shape ``[W, C, B, D]``;
2. for every Matryoshka dim, the loss of this rank's B queries against the W·B(C-1) gathered
   candidates is computed from ``G`` (truncated and re-normalised) and back-propagated into ``G``,
   chunk by chunk, so no [W·B x W·B] matrix is ever alive;
3. ``G.grad`` holds this rank's contributions to the gradients of every rank's embeddings: ONE
   reduce-scatter (all-reduce on gloo) sums them at their owners;
4. the owners' gradients seed the parent's replay of the mini-batches (step 3 of GradCache).

The loss value is this rank's mean over its queries; DDP averages gradients over ranks, so the
update equals that of one process holding the global batch (tests compare against exactly that).
Communication per step: one all-gather + one reduce-scatter, whatever the number of mini-batches
and dims.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
from torch import Tensor

from dist_vdr import compat, distributed
from dist_vdr.losses import distillation, false_negatives
from dist_vdr.retrieval import scoring as scorings


@dataclass(frozen=True)
class DatasetOptions:
    """A mixture dataset's loss options (data.datasets[]); None: the loss's own value."""

    index: int | None = None
    cross_device_negatives: bool = True
    in_batch_negatives: bool = True
    mini_batch_size: int | None = None
    mini_batch_num_tokens: int | None = None


def dataset_options(cfg) -> list[DatasetOptions]:
    """The loss options of each dataset of a mixture (data.datasets; ``cfg`` a recipe), [] without one."""
    if cfg.data.mixture == "mixed":  # the batches mix datasets: no per-step options
        return []
    return [DatasetOptions(index=k, cross_device_negatives=cfg.loss.cross_device_negatives
                           if e.cross_device_negatives is None else e.cross_device_negatives,
                           in_batch_negatives=e.in_batch_negatives, mini_batch_size=e.mini_batch_size,
                           mini_batch_num_tokens=e.mini_batch_num_tokens) for k, e in enumerate(cfg.data.datasets)]


class GlobalBatchCachedMNRL(CachedMultipleNegativesRankingLoss):
    """MatryoshkaLoss(CachedMultipleNegativesRankingLoss) semantics with cross-rank negatives.

    Args:
        model: the SentenceTransformer (the trainer swaps in its DDP wrapper, as for the parent).
        matryoshka_dims / matryoshka_weights: dims to train (empty: the full embedding only).
        rank / world_size: this process's place; with world_size 1 no collective is issued.
        scale, mini_batch_size, mini_batch_num_tokens: as in CachedMultipleNegativesRankingLoss.
        mask_same_ids: leave out of each query's softmax the candidates carrying one of its positive
            ids (:mod:`.false_negatives`; the batch's ``label`` tensor holds the ids).
        guide / guide_margin / guide_margin_strategy: a frozen model sharing the student's inputs (e.g. the
            base model); candidates it scores above the query's positive less the margin are left out of
            the softmax (GIST's rule, over the global batch).
        distillation: a :class:`~dist_vdr.config.DistillationConfig` (enabled): a term learning from the
            teacher scores of each row's candidates (:mod:`.distillation`), added at every dim.
        scoring: how queries and pages are represented and scored (:class:`~dist_vdr.retrieval.scoring.Scoring`:
            the model output read, the representation, the Matryoshka cut, the scores); None: cosine of the
            ``sentence_embedding`` (the guide is scored by the same rule).

    ``labels``: None, the candidate ids (a tensor), or a dict with ``ids`` and ``teacher`` (scores).
    """

    # long: the documented arguments of the stock loss plus the false-negative options, checked here
    def __init__(self, model, *, matryoshka_dims: Sequence[int] = (), matryoshka_weights: Sequence[float] | None = None,
                 rank: int = 0, world_size: int = 1, scale: float = 20.0, mini_batch_size: int = 1,
                 mini_batch_num_tokens: int | None = None, mask_same_ids: bool = False, guide=None,
                 guide_margin: float = 0.0, guide_margin_strategy: str = "absolute", distillation=None,
                 datasets: Sequence[DatasetOptions] = (), scoring: scorings.Scoring | None = None) -> None:
        super().__init__(model, scale=scale, mini_batch_size=mini_batch_size,
                         mini_batch_num_tokens=mini_batch_num_tokens, gather_across_devices=False)
        self.scoring = scorings.resolve(scoring)
        dims = list(matryoshka_dims)
        weights = list(matryoshka_weights) if matryoshka_weights is not None else [1.0] * len(dims)
        if len(weights) != len(dims):
            raise ValueError("matryoshka_weights must have one weight per matryoshka dim")
        # Largest first, like MatryoshkaLoss (the order of the summed terms then matches it too).
        self.dims_weights = sorted(zip(dims, weights, strict=True), key=lambda dw: dw[0], reverse=True) or [(None, 1.0)]
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.rank, self.world_size = rank, world_size
        self.mask_same_ids = mask_same_ids
        if guide is not None:
            guide.eval()
            guide.requires_grad_(False)
        self.guide, self.guide_margin, self.guide_margin_strategy = guide, guide_margin, guide_margin_strategy
        self._guide_columns: list[list[Tensor]] | None = None
        # Masked candidates, queries and their negatives since take_masked_stats() (logged by the trainer).
        self._masked_since: Tensor | int = 0
        self._queries_since = self._negatives_since = 0
        self.distillation = distillation if distillation is not None and distillation.enabled else None
        # A mixture: each step's dataset (label["dataset"]) picks its options; its losses are summed per dataset.
        self.datasets = list(datasets)
        self._defaults = DatasetOptions(mini_batch_size=mini_batch_size, mini_batch_num_tokens=mini_batch_num_tokens)
        self._step = self._defaults
        self._dataset_losses = torch.zeros((len(self.datasets), 2), dtype=torch.float64)

    def take_masked_stats(self) -> tuple[float, float] | None:
        """(mean candidates masked per query, the fraction of its negatives they are) over this rank's
        queries since the last call; None when no masking ran. One device sync, at a logging step."""
        if not self._queries_since:
            return None
        masked = float(self._masked_since)
        stats = masked / self._queries_since, masked / max(self._negatives_since, 1)
        self._masked_since, self._queries_since, self._negatives_since = 0, 0, 0
        return stats

    def take_dataset_losses(self) -> Tensor | None:
        """[datasets, 2]: this rank's (sum of step losses, steps) per dataset since the last call; None
        without a mixture."""
        if not self.datasets:
            return None
        taken, self._dataset_losses = self._dataset_losses, torch.zeros_like(self._dataset_losses)
        return taken

    def _place(self) -> tuple[int, int]:
        """(rank, world size) of this step's contrastive batch: the global batch, or this rank's own rows
        when the step's dataset keeps its negatives local (every rank holds the same dataset at a step)."""
        if self._step.cross_device_negatives and self._step.in_batch_negatives:
            return self.rank, self.world_size
        return 0, 1

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *,
                       with_backward: bool = False) -> Tensor:
        local = [torch.cat(column) for column in reps]  # [B, D] per column, graph to the mini-batch leaves
        num_columns, batch_size = len(local), local[0].shape[0]
        if num_columns < 2:
            raise ValueError(f"Expected at least 2 inputs (query, positive), got {num_columns}")
        ids, teacher = (labels.get("ids"), labels.get("teacher")) if isinstance(labels, dict) else (labels, None)
        rank, world = self._place()
        gathered, masking = self._gather(torch.stack(local), ids, num_columns, batch_size, rank, world)  # [W, C, B, D]
        gathered.requires_grad_(with_backward)

        total = torch.zeros((), device=gathered.device)
        for dim, weight in self.dims_weights:
            total = total + weight * self._ranking_loss(gathered, dim, batch_size, with_backward, weight, masking,
                                                        rank)
        if masking is not None:
            self._masked_since = self._masked_since + masking.masked
            self._queries_since += batch_size
            self._negatives_since += batch_size * (gathered.shape[0] * batch_size * (num_columns - 1) - 1)
        if self.distillation is not None:  # the rows' own candidates: local, no communication
            total = total + self._distillation(reps, teacher, with_backward)
        if with_backward:
            grads = self._owner_gradients(gathered.grad, rank, world)  # [C, B, D]: everyone's contributions to my rows
            torch.autograd.backward(local, list(grads.unbind(0)))
        self._record_dataset_loss(total)
        return total.detach() if with_backward else total

    def _record_dataset_loss(self, total: Tensor) -> None:
        """A mixture: add this step's loss to its dataset's (take_dataset_losses)."""
        if self._step.index is not None:
            self._dataset_losses[self._step.index] += torch.tensor([float(total.detach()), 1.0], dtype=torch.float64)

    def _gather(self, stacked: Tensor, labels: Tensor | None, num_columns: int, batch_size: int, rank: int,
                world: int) -> tuple[Tensor, false_negatives.Masking | None]:
        """All-gather the embeddings -- ONE collective; the candidates' ids and the guide's embeddings,
        when false negatives are masked, ride in it as bytes (:func:`false_negatives.pack`)."""
        extras = []
        if self.mask_same_ids:
            labels = self._id_labels(labels, num_columns, batch_size)
            extras.append(false_negatives.column_ids(labels[:, :num_columns - 1]))
        if self.guide is not None:
            extras.append(self._guide_stack(num_columns, batch_size))
        if not extras:
            return distributed.all_gather_stacked(stacked, world), None
        packed, layout = false_negatives.pack(stacked, extras)
        gathered, unpacked = false_negatives.unpack(distributed.all_gather_stacked(packed, world),
                                                    stacked.shape[-1], layout)
        ids = guide = None
        if self.mask_same_ids:
            ids = (false_negatives.candidate_order(unpacked.pop(0).squeeze(-1)),
                   false_negatives.query_id_sets(labels, num_columns))
        if self.guide is not None:
            guide_all = unpacked.pop(0)  # [W, C, B, Dg]
            guide = (guide_all[rank, 0], false_negatives.candidate_order(guide_all))
        masking = false_negatives.Masking(ids, guide, self.guide_margin, self.guide_margin_strategy, self.scoring)
        return gathered.contiguous(), masking  # a leaf of its own for the gradients (the packed copy is freed)

    def _guide_stack(self, num_columns: int, batch_size: int) -> Tensor:
        columns = self._guide_columns or []
        if len(columns) != num_columns:
            raise RuntimeError("the guide's embeddings are missing: the loss was called without forward_cached")
        stacked = torch.stack([torch.cat(column) for column in columns])
        if stacked.shape[1] != batch_size:
            raise RuntimeError(f"the guide embedded {stacked.shape[1]} rows, the model {batch_size}")
        return stacked

    # -- the guide's embeddings, taken in step (1) of gradient caching, mini-batch by mini-batch -------
    def forward_cached(self, sentence_features, labels: Tensor | None = None) -> Tensor:
        self._guide_columns = [] if self.guide is not None else None
        self._select_dataset(labels)
        return super().forward_cached(sentence_features, labels)

    def _select_dataset(self, labels) -> None:
        """This step's options: those of its dataset (a mixture), else the loss's own."""
        index = labels.get("dataset") if isinstance(labels, dict) and self.datasets else None
        self._step = self.datasets[int(index[0])] if index is not None else self._defaults
        if index is not None and bool((index != index[0]).any()):
            raise RuntimeError("a mixture's batch holds rows of several datasets: the sampler keeps one per step")
        self.mini_batch_size = self._step.mini_batch_size or self._defaults.mini_batch_size
        self.mini_batch_num_tokens = self._step.mini_batch_num_tokens or self._defaults.mini_batch_num_tokens

    def embed_minibatch_iter(self, sentence_feature, with_grad, copy_random_state, random_states=None, ranges=None):
        if self._guide_columns is not None and not with_grad:
            self._guide_columns.append([])  # a new column begins
        yield from super().embed_minibatch_iter(sentence_feature, with_grad, copy_random_state,
                                                random_states=random_states, ranges=ranges)

    def embed_minibatch(self, sentence_feature, begin, end, with_grad, copy_random_state, random_state=None):
        if self.scoring.output_key == "sentence_embedding":
            out = super().embed_minibatch(sentence_feature, begin, end, with_grad, copy_random_state, random_state)
        else:
            out = self._embed_output(sentence_feature, begin, end, with_grad, copy_random_state, random_state)
        if self._guide_columns is not None and not with_grad:  # step (1) only: the replay needs no guide
            with torch.no_grad():
                features = compat.st_minibatch(sentence_feature, begin, end)
                self._guide_columns[-1].append(self.guide(features)[self.scoring.output_key].detach())
        return out

    def _embed_output(self, sentence_feature, begin, end, with_grad, copy_random_state, random_state=None):
        """The parent's embed_minibatch reading the scoring's output key instead of ``sentence_embedding``."""
        from contextlib import nullcontext

        from sentence_transformers.sentence_transformer.losses.cached_multiple_negatives_ranking import RandContext

        features = compat.st_minibatch(sentence_feature, begin, end)
        with random_state if random_state is not None else nullcontext(), \
                nullcontext() if with_grad else torch.no_grad():
            random_state = RandContext(*features.values()) if copy_random_state else None
            reps = self._read_output(features)
        return reps, random_state

    def _read_output(self, features: dict) -> Tensor:
        """The embeddings of one mini-batch's features: the model's output at the scoring's key."""
        return self.model(features)[self.scoring.output_key]

    @staticmethod
    def _id_labels(labels: Tensor | None, num_columns: int, batch_size: int) -> Tensor:
        if labels is None or labels.dim() != 2 or labels.shape[0] != batch_size \
                or labels.shape[1] < num_columns - 1 or labels.dtype != torch.int64:
            got = None if labels is None else (tuple(labels.shape), labels.dtype)
            raise ValueError(f"loss.false_negatives: the batch carries no candidate ids (label {got}, expected "
                             f"int64 [{batch_size}, >= {num_columns - 1}]): train through dist-vdr, whose "
                             f"collator adds them from the id columns")
        return labels

    def _distillation(self, reps: list[list[Tensor]], teacher: Tensor | None, with_backward: bool) -> Tensor:
        """weight x the distillation term at every dim (with the dims' weights), back-propagated into ``reps``."""
        d = self.distillation
        columns = self._join_columns(reps)  # a graph of its own (the contrastive one is spent)
        teacher = distillation.check_teacher(teacher, columns[0].shape[0], len(columns) - 1)
        total = torch.zeros((), device=columns[0].device)
        for dim, weight in self.dims_weights:
            scores = distillation.student_scores(columns, dim, self.scoring)
            total = total + d.weight * weight * distillation.term(scores, teacher.to(scores.device), d.kind,
                                                                   d.temperature, d.teacher_temperature)
        if with_backward:
            total.backward()
            total = total.detach()
        return total

    def _join_columns(self, reps: list[list[Tensor]]) -> list[Tensor]:
        """Each column's mini-batch representations as one tensor."""
        return [torch.cat(column) for column in reps]

    def _owner_gradients(self, grad: Tensor, rank: int, world: int) -> Tensor:
        return distributed.sum_to_owner(grad, rank, world)

    # long: the chunked InfoNCE with its three masks (false negatives, no in-batch negatives), one loop
    def _ranking_loss(self, gathered: Tensor, dim: int | None, batch_size: int, with_backward: bool,
                      weight: float, masking: false_negatives.Masking | None = None, rank: int = 0) -> Tensor:
        """InfoNCE of this rank's queries vs all gathered candidates at ``dim``; backward into ``gathered``.
        Scores are the scoring's (cosine: normalised inner products) times ``scale``."""
        world, num_columns = gathered.shape[0], gathered.shape[1]
        scoring = self.scoring
        # Candidates ordered as the parent (and a single process with the global batch) orders them:
        # all positives of ranks 0..W-1, then all first negatives, ... -> [W*B*(C-1), *representation]
        columns = gathered[:, 1:] if dim is None else gathered[:, 1:, ..., :dim]
        candidates = columns.transpose(0, 1).reshape(world * batch_size * (num_columns - 1), *columns.shape[3:])
        queries = gathered[rank, 0] if dim is None else gathered[rank, 0, ..., :dim]
        if dim is not None:  # Matryoshka: the scoring's cut (cosine: truncate, then re-normalise, as MatryoshkaLoss)
            candidates = scoring.truncate(candidates, dim)
            queries = scoring.truncate(queries, dim)
        candidates_n = scoring.represent(candidates)
        offset = rank * batch_size
        # No in-batch negatives: a query's softmax holds its own row's pages only (candidate j is row j mod W*B).
        other_rows = None if self._step.in_batch_negatives else \
            torch.arange(candidates.shape[0], device=gathered.device) % (world * batch_size)
        loss = torch.zeros((), device=gathered.device)
        for begin in range(0, batch_size, self.mini_batch_size):
            end = min(begin + self.mini_batch_size, batch_size)
            scores = scoring.scores(scoring.represent(queries[begin:end]), candidates_n) * self.scale
            targets = torch.arange(offset + begin, offset + end, device=scores.device)
            if masking is not None:  # false negatives out of the softmax (their gradient is then zero too)
                scores = scores.masked_fill(masking.chunk(begin, end, targets), float("-inf"))
            if other_rows is not None:
                scores = scores.masked_fill(other_rows[None, :] != targets[:, None], float("-inf"))
            chunk = F.cross_entropy(scores, targets, reduction="sum") / batch_size
            if with_backward:
                # Keep the graph of the shared candidates until the last chunk; each chunk's
                # scores are freed right away (memory O(mini_batch x candidates)).
                (weight * chunk).backward(retain_graph=end < batch_size)
                chunk = chunk.detach()
            loss = loss + chunk
        return loss
