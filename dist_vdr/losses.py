"""The training loss a recipe describes, on sentence-transformers' own losses.

MatryoshkaLoss(CachedMultipleNegativesRankingLoss) is the published recipe: gradient caching with
small mini-batches (or a token budget), Matryoshka over several dims. With several ranks,
``gather_across_devices`` scores every query against the pages of all ranks, so the contrastive
batch is the global batch.
"""

from __future__ import annotations

from .config import LossConfig


def build_loss(model, cfg: LossConfig, *, world_size: int):
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MatryoshkaLoss,
        MultipleNegativesRankingLoss,
    )

    gather = cfg.cross_device_negatives and world_size > 1
    if cfg.name == "cmnrl":
        kwargs = {"mini_batch_size": cfg.mini_batch_size, "scale": cfg.scale, "gather_across_devices": gather}
        if cfg.mini_batch_num_tokens is not None:
            kwargs["mini_batch_num_tokens"] = cfg.mini_batch_num_tokens
        inner = CachedMultipleNegativesRankingLoss(model, **kwargs)
    else:
        inner = MultipleNegativesRankingLoss(model, scale=cfg.scale, gather_across_devices=gather)
    if not cfg.matryoshka_dims:
        return inner
    return MatryoshkaLoss(model, inner, matryoshka_dims=list(cfg.matryoshka_dims),
                          matryoshka_weights=list(cfg.matryoshka_weights) if cfg.matryoshka_weights else None)
