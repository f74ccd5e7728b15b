"""The embedding kind's training loss, as a recipe describes it.

MatryoshkaLoss(CachedMultipleNegativesRankingLoss) is the published recipe: gradient caching with
small mini-batches (or a token budget), Matryoshka over several dims. With several ranks the
contrastive batch is the global batch (every query scores the pages of all ranks):
- ``implementation: global_batch`` (the default whenever world size > 1 with cmnrl):
  :class:`~dist_vdr.losses.global_batch.GlobalBatchCachedMNRL`, two embedding collectives per step;
- ``implementation: stock``: sentence-transformers' own ``gather_across_devices=True``, whose
  collectives grow with dims x mini-batches x columns (kept for comparison and benchmarks).
"""

from __future__ import annotations

from dist_vdr.config import LossConfig


def uses_global_batch_loss(cfg: LossConfig, world_size: int) -> bool:
    if cfg.name != "cmnrl" or world_size == 1 or not cfg.cross_device_negatives:
        return False
    return cfg.implementation in ("auto", "global_batch")


def build_loss(model, cfg: LossConfig, *, rank: int = 0, world_size: int = 1, guide=None, datasets=(),
               scoring=None):
    """The recipe's loss (``guide``: the loaded model of loss.false_negatives.guide, if any; ``datasets``: a
    mixture's per-dataset options, :class:`~dist_vdr.losses.global_batch.DatasetOptions`; ``scoring``: the
    kind's :class:`~dist_vdr.retrieval.scoring.Scoring`, None: cosine). A scoring other than cosine is
    trained by the global-batch loss only (sentence-transformers' losses score by cosine)."""
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MatryoshkaLoss,
        MultipleNegativesRankingLoss,
    )

    from dist_vdr.retrieval.scoring import is_cosine

    own_scoring = not is_cosine(scoring)
    if own_scoring and (cfg.name != "cmnrl" or cfg.implementation == "stock"):
        raise ValueError(f"this kind scores by {type(scoring).__name__}, which only the global-batch loss trains: "
                         f"use loss.name=cmnrl with loss.implementation auto or global_batch (not "
                         f"{cfg.name}/{cfg.implementation})")
    if uses_global_batch_loss(cfg, world_size) or cfg.implementation == "global_batch" or own_scoring \
            or cfg.false_negatives.enabled or cfg.distillation.enabled \
            or (datasets and cfg.name == "cmnrl" and cfg.implementation != "stock"):
        from dist_vdr.losses.global_batch import GlobalBatchCachedMNRL

        # Negatives kept on their rank: a world of one (this rank its only member). A mixture's datasets say
        # it per step (each DatasetOptions carries the resolved value), so the loss knows the real world.
        local = not cfg.cross_device_negatives and not datasets
        return GlobalBatchCachedMNRL(
            model, matryoshka_dims=cfg.matryoshka_dims, matryoshka_weights=cfg.matryoshka_weights,
            rank=0 if local else rank, world_size=1 if local else world_size, scale=cfg.scale,
            mini_batch_size=cfg.mini_batch_size, mini_batch_num_tokens=cfg.mini_batch_num_tokens,
            mask_same_ids=cfg.false_negatives.id_column is not None, guide=guide,
            guide_margin=cfg.false_negatives.margin, guide_margin_strategy=cfg.false_negatives.margin_strategy,
            distillation=cfg.distillation, datasets=datasets, scoring=scoring)

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
