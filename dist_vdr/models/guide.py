"""The frozen guide model of false-negative masking (``loss.false_negatives.guide``), loaded for any kind."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from dist_vdr import compat


def load_guide(cfg, model, build: Callable):
    """The guide of ``cfg.loss.false_negatives.guide`` built by ``build(model config)`` (the kind's loader, on this
    rank's device), loaded as the recipe loads its model (dtype, attention) without the adapter. It embeds the
    model's own features: its processor must be the same (tokenizer vocabulary and image preprocessing)."""
    from dist_vdr.config import AdapterConfig

    path = cfg.loss.false_negatives.guide
    guide_cfg = dataclasses.replace(cfg.model, name_or_path=path, adapter=AdapterConfig(), gradient_checkpointing=False,
                                    compile=False)
    # Under ZeRO-3 from_pretrained would partition it (zero.Init): it is no part of the engine, keep it whole.
    with compat.zero3_init_off():
        guide = build(guide_cfg)
    mine, theirs = getattr(model[0], "processor", None), getattr(guide[0], "processor", None)
    if type(mine) is not type(theirs) or model.tokenizer.get_vocab() != guide.tokenizer.get_vocab():
        raise ValueError(f"loss.false_negatives.guide={path!r} does not share the model's processor (tokenizer and "
                         f"image preprocessing): it embeds the model's own inputs; use a model of the same family, "
                         f"e.g. the base model {cfg.model.name_or_path!r}")
    return guide
