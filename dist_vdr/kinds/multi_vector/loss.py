"""The hybrid model's loss: token vectors and a pooled single vector trained together, from one encode per
mini-batch (jina-embeddings-v4's design; ``multi_vector.hybrid``).

The gradient cache embeds each mini-batch once without gradients, computes the loss on the cached
representations, then replays each mini-batch with gradients against the cached gradient of its representation.
A hybrid representation is one flat tensor per mini-batch, ``[n, T*D + H]``: the token vectors (the mask-free
layout of :mod:`~dist_vdr.kinds.multi_vector.scoring`) then the pooled vector. Both parts are views of that one
leaf, so both terms' gradients land in its one cached gradient and the replay runs one forward per mini-batch,
as for a single-output model:

- the token term: :class:`~dist_vdr.losses.score_exchange.ScoreExchangeCachedLoss` (queries and scores travel,
  pages stay; MaxSim; Matryoshka on the token dim; masking, distillation, mixtures);
- the single-vector term: :class:`~dist_vdr.losses.global_batch.GlobalBatchCachedMNRL` (cosine InfoNCE over the
  global batch, Matryoshka on ``single_vector_dims``, masking by id), times ``single_vector_weight``.

Collectives per step: the token term's 3 (4 with an agreed query length) + the single-vector term's 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dist_vdr.losses.global_batch import GlobalBatchCachedMNRL
from dist_vdr.losses.score_exchange import ScoreExchangeCachedLoss
from dist_vdr.retrieval.scoring import PAGE, QUERY


class HybridCachedLoss(ScoreExchangeCachedLoss):
    """ScoreExchangeCachedLoss on the token vectors + ``single_weight`` x GlobalBatchCachedMNRL on the pooled vector
    (the model's ``sentence_embedding``), one encode per mini-batch. ``represent_output`` is required (the token
    layout); the other arguments are the parent's."""

    def __init__(self, model, scoring, *, single_dims: Sequence[int] = (), single_weight: float = 1.0,
                 single_scale: float = 20.0, **kwargs) -> None:
        super().__init__(model, scoring, **kwargs)
        if self.represent_output is None:
            raise ValueError("the hybrid loss reads the token layout through represent_output")
        self.single = GlobalBatchCachedMNRL(model, matryoshka_dims=single_dims, rank=self.rank,
                                            world_size=self.world_size, scale=single_scale,
                                            mini_batch_size=self.mini_batch_size, mask_same_ids=self.mask_same_ids,
                                            datasets=self.datasets)
        self.single.dims_weights = [(d, w * single_weight) for d, w in self.single.dims_weights]
        self._widths: tuple[int, int] | None = None  # (token dim D, pooled width H) of the flat layout
        self._recording = True

    def _read_output(self, features: dict, model=None) -> Tensor:
        if model is not None:  # the guide: its token vectors only
            return super()._read_output(features, model)
        task = features.get("task")
        output = self.model(features, task=task)
        tokens = self.represent_output(output, QUERY if task == QUERY else PAGE)
        pooled = output["sentence_embedding"].to(tokens.dtype)
        self._widths = (tokens.shape[-1], pooled.shape[-1])
        return torch.cat([tokens.flatten(1), pooled], dim=1)

    def split(self, reps: list[list[Tensor]]) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
        """(token representations ``[n, T, D]``, pooled ``[n, H]``) of the flat mini-batches, as views."""
        if self._widths is None:
            raise RuntimeError("the hybrid loss was called without forward_cached")
        dim, width = self._widths
        tokens = [[mb[:, :-width].view(len(mb), -1, dim) for mb in column] for column in reps]
        pooled = [[mb[:, -width:] for mb in column] for column in reps]
        return tokens, pooled

    def calculate_loss(self, reps: list[list[Tensor]], labels=None, *, with_backward: bool = False) -> Tensor:
        tokens, pooled = self.split(reps)
        self._recording = False  # the step's loss is recorded once, both terms together
        try:
            total = super().calculate_loss(tokens, labels, with_backward=with_backward)
        finally:
            self._recording = True
        self.single._step = self._step  # the step's dataset options (a mixture's)
        total = total + self.single.calculate_loss(pooled, labels, with_backward=with_backward)
        self._record_dataset_loss(total)
        return total

    def _record_dataset_loss(self, total: Tensor) -> None:
        if self._recording:
            super()._record_dataset_loss(total)
