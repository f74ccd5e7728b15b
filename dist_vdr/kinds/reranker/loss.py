"""Reranker losses over (query, positive page, hard negative pages...) rows, with gradient caching.

Both build on sentence-transformers' cross-encoder ``CachedMultipleNegativesRankingLoss``: it turns a
row into (query, page) pairs (the positive first, then one pair per negative column), scores them
``mini_batch_size`` pairs at a time without a graph, computes the loss on the scores, and replays
the mini-batches with gradients in the backward pass (DDP synchronises once, and dist-vdr's engine
hooks make the replay one reduction per step under DeepSpeed and FSDP2 too). Memory is one
mini-batch of page activations, whatever the number of negatives.

- ``listwise``: softmax cross-entropy over each query's positive and hard negatives, the stock loss
  on the raw scores, the convention of LLM rerankers (stock's default squashes them with a sigmoid
  and scales by 10, which bounds every logit difference by 10). Stock rejects ``num_negatives=0``
  (torch.multinomial of 0 samples): allowed here, meaning "hard negatives only", which keeps the
  loss of a row independent of the batch.
- ``bce``: ``BinaryCrossEntropyLoss``'s objective (BCE-with-logits, label 1 for the positive pair,
  0 for each negative pair, optional ``pos_weight``) on the same cached pairs; stock BCE takes
  labelled 2-column pairs and one forward for the whole batch.

Each rank's loss is a mean over its own rows (with the same number of rows per rank), so the
gradient DDP averages equals the one-process gradient of the global batch: rerankers need no
cross-device exchange (with ``num_in_batch_negatives=0``).
"""

from __future__ import annotations

import torch
from sentence_transformers.cross_encoder.losses import CachedMultipleNegativesRankingLoss

from dist_vdr.config import LossConfig


class ListwiseLoss(CachedMultipleNegativesRankingLoss):
    """The cached listwise loss; with ``retrieval_score_weight`` > 0, over the reranker's scores plus
    that weight x the retriever's scores of the same pairs (the rows' ``scores`` label column:
    positive first, then each hard negative), so the reranker learns a residual on top of retrieval."""

    def __init__(self, model, *, retrieval_score_weight: float = 0.0, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.retrieval_score_weight = retrieval_score_weight
        self._prior: torch.Tensor | None = None

    def get_in_batch_negatives(self, anchors, candidates):
        if self.num_negatives == 0:
            return iter(())
        return super().get_in_batch_negatives(anchors, candidates)

    def forward(self, inputs, labels=None, prompt=None, task=None):
        self._prior = None
        if self.retrieval_score_weight:
            if labels is None:
                raise ValueError("reranker.retrieval_score_weight > 0 needs the retriever's scores of every row "
                                 "(the mined rows' retriever_scores); train on mined rows or set the weight to 0")
            scores = torch.stack(list(labels)) if isinstance(labels, (list, tuple)) else labels
            if scores.shape != (len(inputs[0]), len(inputs) - 1):
                raise ValueError(f"retriever scores of shape {tuple(scores.shape)} for {len(inputs[0])} rows of "
                                 f"{len(inputs) - 1} pages: mine again (the mined rows predate this setting)")
            self._prior = self.retrieval_score_weight * scores.float()
        return super().forward(inputs, labels, prompt=prompt, task=task)

    def calculate_loss(self, logits, batch_size: int) -> torch.Tensor:
        if self._prior is None:
            return super().calculate_loss(logits, batch_size)
        # Pairs are column-major (the positives, then one block per negative column): [rows, 1 + negatives].
        combined = torch.cat(logits).reshape(-1, batch_size).T + self._prior.to(logits[0].device)
        return self.cross_entropy_loss(combined, torch.zeros(batch_size, dtype=torch.long, device=combined.device))

    def get_config_dict(self):
        return {**super().get_config_dict(), "retrieval_score_weight": self.retrieval_score_weight}


class CachedBCELoss(ListwiseLoss):
    def __init__(self, model, *, mini_batch_size: int, pos_weight: float | None = None) -> None:
        super().__init__(model, num_negatives=0, mini_batch_size=mini_batch_size, activation_fn=None, scale=1.0)
        self.pos_weight = pos_weight
        self.bce = torch.nn.BCEWithLogitsLoss(
            pos_weight=None if pos_weight is None else torch.tensor(float(pos_weight)))

    def calculate_loss(self, logits: list[torch.Tensor], batch_size: int) -> torch.Tensor:
        # Pairs are column-major: the batch's positives first, then one block per negative column.
        scores = torch.cat(logits)
        labels = torch.zeros_like(scores)
        labels[:batch_size] = 1.0
        return self.bce(scores, labels)

    def get_config_dict(self):
        return {"mini_batch_size": self.mini_batch_size, "pos_weight": self.pos_weight}


def build_reranker_loss(model, cfg: LossConfig, retrieval_score_weight: float = 0.0):
    if cfg.name == "bce":
        return CachedBCELoss(model, mini_batch_size=cfg.mini_batch_size, pos_weight=cfg.pos_weight)
    if cfg.name == "listwise":
        return ListwiseLoss(model, num_negatives=cfg.num_in_batch_negatives, mini_batch_size=cfg.mini_batch_size,
                            activation_fn=None, scale=1.0, retrieval_score_weight=retrieval_score_weight)
    raise ValueError(f"loss.name={cfg.name!r} is not a reranker loss; use bce or listwise")
