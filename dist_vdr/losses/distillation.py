"""Distillation from teacher scores of each row's own candidates, beside the global-batch contrastive loss.

Rows carry a teacher's scores of their positive and of each hard negative (``dist-vdr mine-negatives
--teacher`` writes them). The term compares the model's scores of the same candidates (its kind's
scoring: cosine for an embedding model) with them: ``kl`` -- KL(teacher softmax || model softmax) over
the row's candidates, scaled by the temperature squared (sentence-transformers' DistillKLDivLoss, batch
mean); ``margin_mse`` -- the MSE of the positive-minus-negative score margins (MarginMSELoss). It only
reads a row's own candidates, so it needs no communication: each rank computes it on its rows and the
engines' gradient averaging makes it the global batch's mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dist_vdr.retrieval import scoring as scorings


def student_scores(columns: list[Tensor], dim: int | None, scoring: scorings.Scoring | None = None) -> Tensor:
    """[B, C-1] scores of each row's query with its own candidates (truncated to ``dim``), by ``scoring``'s
    rule (None: cosine)."""
    scoring = scorings.resolve(scoring)
    cut = scoring.represent if dim is None else (lambda t: scoring.truncate(t, dim))
    query = cut(columns[0])
    return torch.stack([scoring.pair_scores(query, cut(c)) for c in columns[1:]], dim=1)


def term(scores: Tensor, teacher: Tensor, kind: str, temperature: float, teacher_temperature: float | None) -> Tensor:
    """The distillation loss of a batch: ``scores`` (the model's) and ``teacher`` [B, C-1]."""
    teacher = teacher.detach().to(scores.dtype)
    if kind == "kl":
        log_probs = torch.log_softmax(scores / temperature, dim=1)
        target = torch.softmax(teacher / (teacher_temperature or temperature), dim=1)
        return F.kl_div(log_probs, target, reduction="batchmean") * temperature ** 2
    margins = scores[:, :1] - scores[:, 1:]
    return F.mse_loss(margins, teacher[:, :1] - teacher[:, 1:])


def check_teacher(teacher: Tensor | None, batch_size: int, num_candidates: int) -> Tensor:
    if teacher is None or tuple(teacher.shape) != (batch_size, num_candidates):
        got = None if teacher is None else tuple(teacher.shape)
        raise ValueError(f"loss.distillation: the batch carries no teacher scores of shape [{batch_size}, "
                         f"{num_candidates}] (got {got}): each row needs one score for its positive and one per "
                         f"negative column in loss.distillation.scores_column")
    return teacher


def check_scored_columns(cfg) -> None:
    """ValueError unless the rows' teacher scores are of the pages the recipe trains on, in its order:
    the scores hold one value per page column, so a different order would pair them silently wrong.
    (Rows written by score-rows or mine-negatives --teacher record their columns.)"""
    from dist_vdr.retrieval.mining import MARKER_FILE

    if not cfg.data.negative_columns:
        raise ValueError("loss.distillation compares the teacher's and the model's scores of each row's positive "
                         "and hard negatives: set data.negative_columns (rows without negatives teach nothing)")
    from dist_vdr.data.mixture_rows import entry_config

    for d in [entry_config(cfg.data, e) for e in cfg.data.datasets] or [cfg.data]:
        _check_scored(d, MARKER_FILE)


def _check_scored(d, marker_file: str) -> None:
    import json
    from pathlib import Path

    marker = Path(d.path) / marker_file
    scored = json.loads(marker.read_text()).get("columns") if marker.is_file() else None
    if scored is not None and scored != [d.positive_column, *d.negative_columns]:
        raise ValueError(f"loss.distillation: the teacher scores of {d.path} are of the columns {scored}, the recipe "
                         f"trains on {[d.positive_column, *d.negative_columns]}: set data.positive_column and "
                         f"data.negative_columns to match, or score the rows again with these columns")
