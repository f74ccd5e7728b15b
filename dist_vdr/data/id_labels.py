"""Row labels of the loss (false-negative ids, teacher scores): from the row columns to the batch's labels.

The training rows carry, beside their query and page columns, the id of each page (its document or
page id: ``<id_column>`` for the positive, ``<negative column>_<id_column>`` for each negative),
optionally a list of further ids relevant to the query, and for distillation a teacher's scores.
:class:`RowLabelsCollator` takes those columns out of every row before the stock collator sees them
(it would embed them as text) and puts the ids' 64-bit hashes and the scores in the batch's
``label``, which sentence-transformers hands to the loss.
The no-duplicates sampler is told they are label columns, so it leaves them out of its duplicate
check: masking changes the loss, never which rows are batched together.
"""

from __future__ import annotations

import torch
import xxhash
from torch import Tensor

from ..config import Config


def id_hash(value) -> int:
    """A nonzero signed 64-bit hash of an id's string (``None`` or "": 0, no id)."""
    if value is None or value == "":
        return 0
    h = xxhash.xxh64_intdigest(str(value).encode("utf-8"))
    h = h - (1 << 64) if h >= (1 << 63) else h
    return h or 1


def id_labels(rows: list[dict], candidate_columns: list[str], positive_ids_column: str | None) -> Tensor:
    """The ``label`` tensor of a batch (see the module docstring) from its rows' id columns."""
    extra = [list(row.get(positive_ids_column) or []) if positive_ids_column else [] for row in rows]
    width = max((len(e) for e in extra), default=0)
    labels = torch.zeros((len(rows), len(candidate_columns) + width), dtype=torch.int64)
    for i, row in enumerate(rows):
        values = [row[c] for c in candidate_columns] + extra[i]
        labels[i, :len(values)] = torch.tensor([id_hash(v) for v in values], dtype=torch.int64)
    return labels


def id_columns(cfg: Config) -> tuple[list[str], str | None]:
    """(the candidate columns' id columns: positive first, then one per negative column; the positive-ids
    list column or None) of a recipe with masking by id; ([], None) without."""
    fn = cfg.loss.false_negatives
    if fn.id_column is None:
        return [], None
    return [fn.id_column, *(f"{n}_{fn.id_column}" for n in cfg.data.negative_columns)], fn.positive_ids_column


def label_columns(cfg: Config) -> list[str]:
    """Every row column the loss reads through the labels (ids, teacher scores)."""
    candidates, positive_ids = id_columns(cfg)
    scores = cfg.loss.distillation.scores_column
    return [*candidates, *([positive_ids] if positive_ids else []), *([scores] if scores else [])]


class RowLabelsCollator:
    """Wraps the trainer's collator: the label columns out of the rows, into ``batch["label"]`` = a dict with
    ``ids`` (int64 hashes, :func:`id_labels`) and/or ``teacher`` (float32 teacher scores [B, C-1])."""

    def __init__(self, inner, candidate_columns: list[str], positive_ids_column: str | None = None,
                 scores_column: str | None = None) -> None:
        self.inner = inner
        self.candidate_columns = list(candidate_columns)
        self.positive_ids_column = positive_ids_column
        self.scores_column = scores_column
        self.columns = self.candidate_columns + [c for c in (positive_ids_column, scores_column) if c]

    @classmethod
    def of(cls, cfg: Config, inner):
        candidates, positive_ids = id_columns(cfg)
        return cls(inner, candidates, positive_ids, cfg.loss.distillation.scores_column)

    def __getattr__(self, name):  # the trainer reads the stock collator's attributes (tokenize_fn, ...)
        return getattr(self.inner, name)

    @property
    def valid_label_columns(self) -> list[str]:
        # The sampler drops label columns before its duplicate check: they must not change the batches.
        return [*(getattr(self.inner, "valid_label_columns", None) or []), *self.columns]

    def __call__(self, features: list[dict]) -> dict:
        rows = [{c: row[c] for c in self.columns} for row in features]
        batch = self.inner([{k: v for k, v in row.items() if k not in self.columns} for row in features])
        labels = {}
        if self.candidate_columns:
            labels["ids"] = id_labels(rows, self.candidate_columns, self.positive_ids_column)
        if self.scores_column:
            labels["teacher"] = torch.tensor([list(row[self.scores_column]) for row in rows], dtype=torch.float32)
        batch["label"] = labels
        return batch
