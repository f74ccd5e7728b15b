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

import torch
import torch.nn.functional as F
from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
from torch import Tensor

from .. import distributed
from . import false_negatives


class GlobalBatchCachedMNRL(CachedMultipleNegativesRankingLoss):
    """MatryoshkaLoss(CachedMultipleNegativesRankingLoss) semantics with cross-rank negatives.

    Args:
        model: the SentenceTransformer (the trainer swaps in its DDP wrapper, as for the parent).
        matryoshka_dims / matryoshka_weights: dims to train (empty: the full embedding only).
        rank / world_size: this process's place; with world_size 1 no collective is issued.
        scale, mini_batch_size, mini_batch_num_tokens: as in CachedMultipleNegativesRankingLoss.
        mask_same_ids: leave out of each query's softmax the candidates carrying one of its positive
            ids (:mod:`.false_negatives`; the batch's ``label`` tensor holds the ids).
    """

    def __init__(self, model, *, matryoshka_dims: Sequence[int] = (), matryoshka_weights: Sequence[float] | None = None,
                 rank: int = 0, world_size: int = 1, scale: float = 20.0, mini_batch_size: int = 1,
                 mini_batch_num_tokens: int | None = None, mask_same_ids: bool = False) -> None:
        super().__init__(model, scale=scale, mini_batch_size=mini_batch_size,
                         mini_batch_num_tokens=mini_batch_num_tokens, gather_across_devices=False)
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

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *,
                       with_backward: bool = False) -> Tensor:
        local = [torch.cat(column) for column in reps]  # [B, D] per column, graph to the mini-batch leaves
        num_columns, batch_size = len(local), local[0].shape[0]
        if num_columns < 2:
            raise ValueError(f"Expected at least 2 inputs (query, positive), got {num_columns}")
        stacked = torch.stack(local)
        ids = None
        if self.mask_same_ids:  # the candidates' ids ride in the same gather (no collective of their own)
            labels = self._id_labels(labels, num_columns, batch_size)
            packed = distributed.all_gather_stacked(false_negatives.pack_ids(stacked, labels[:, :num_columns - 1]),
                                                  self.world_size)
            gathered, ids = false_negatives.unpack_ids(packed, stacked.dtype)
            gathered = gathered.contiguous()  # a leaf of its own for the gradients (the packed copy is freed)
            ids = (false_negatives.candidate_order(ids), false_negatives.query_id_sets(labels, num_columns))
        else:
            gathered = distributed.all_gather_stacked(stacked, self.world_size)  # [W, C, B, D]
        gathered.requires_grad_(with_backward)

        total = torch.zeros((), device=gathered.device)
        for dim, weight in self.dims_weights:
            total = total + weight * self._ranking_loss(gathered, dim, batch_size, with_backward, weight, ids)
        if with_backward:
            grads = self._owner_gradients(gathered.grad)  # [C, B, D]: everyone's contributions to my rows
            torch.autograd.backward(local, list(grads.unbind(0)))
        return total.detach() if with_backward else total

    @staticmethod
    def _id_labels(labels: Tensor | None, num_columns: int, batch_size: int) -> Tensor:
        if labels is None or labels.dim() != 2 or labels.shape[0] != batch_size \
                or labels.shape[1] < num_columns - 1 or labels.dtype != torch.int64:
            got = None if labels is None else (tuple(labels.shape), labels.dtype)
            raise ValueError(f"loss.false_negatives: the batch carries no candidate ids (label {got}, expected "
                             f"int64 [{batch_size}, >= {num_columns - 1}]): train through dist-vdr, whose "
                             f"collator adds them from the id columns")
        return labels

    def _owner_gradients(self, grad: Tensor) -> Tensor:
        return distributed.sum_to_owner(grad, self.rank, self.world_size)

    def _ranking_loss(self, gathered: Tensor, dim: int | None, batch_size: int, with_backward: bool,
                      weight: float, ids: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """InfoNCE of this rank's queries vs all gathered candidates at ``dim``; backward into ``gathered``."""
        world, num_columns = gathered.shape[0], gathered.shape[1]
        # Candidates ordered as the parent (and a single process with the global batch) orders them:
        # all positives of ranks 0..W-1, then all first negatives, ... -> [W*B*(C-1), d]
        columns = gathered[:, 1:] if dim is None else gathered[:, 1:, :, :dim]
        candidates = columns.transpose(0, 1).reshape(world * batch_size * (num_columns - 1), -1)
        queries = gathered[self.rank, 0] if dim is None else gathered[self.rank, 0, :, :dim]
        if dim is not None:  # Matryoshka: truncate, then re-normalise (as MatryoshkaLoss's shrink)
            candidates = F.normalize(candidates, p=2, dim=-1)
            queries = F.normalize(queries, p=2, dim=-1)
        candidates_n = F.normalize(candidates, p=2, dim=-1)
        offset = self.rank * batch_size
        loss = torch.zeros((), device=gathered.device)
        for begin in range(0, batch_size, self.mini_batch_size):
            end = min(begin + self.mini_batch_size, batch_size)
            scores = F.normalize(queries[begin:end], p=2, dim=-1) @ candidates_n.T * self.scale
            targets = torch.arange(offset + begin, offset + end, device=scores.device)
            if ids is not None:  # false negatives out of the softmax (their gradient is then zero too)
                candidate_ids, query_ids = ids
                hidden = false_negatives.mask(query_ids[begin:end].to(scores.device), candidate_ids, targets)
                scores = scores.masked_fill(hidden, float("-inf"))
            chunk = F.cross_entropy(scores, targets, reduction="sum") / batch_size
            if with_backward:
                # Keep the graph of the shared candidates until the last chunk; each chunk's
                # scores are freed right away (memory O(mini_batch x candidates)).
                (weight * chunk).backward(retain_graph=end < batch_size)
                chunk = chunk.detach()
            loss = loss + chunk
        return loss
