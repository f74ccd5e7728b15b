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

from dist_vdr.config import Config


def id_hash(value) -> int:
    """A nonzero signed 64-bit hash of an id's string (``None`` or "": 0, no id)."""
    if value is None or value == "":
        return 0
    h = xxhash.xxh64_intdigest(str(value).encode("utf-8"))
    h = h - (1 << 64) if h >= (1 << 63) else h
    return h or 1


def id_labels(rows: list[dict], candidate_columns: list[str], positive_ids_column: str | None,
              lookup: dict | None = None) -> Tensor:
    """The ``label`` tensor of a batch (see the module docstring) from its rows' id columns; with
    ``lookup`` the candidate columns hold page ids, mapped to their ids by it, and so are the listed
    positive ids that are page ids (e.g. relevant_page_ids -> those pages' documents)."""
    extra = [list(row.get(positive_ids_column) or []) if positive_ids_column else [] for row in rows]
    if lookup is not None:
        extra = [[lookup.get(v, v) for v in e] for e in extra]
    width = max((len(e) for e in extra), default=0)
    labels = torch.zeros((len(rows), len(candidate_columns) + width), dtype=torch.int64)
    for i, row in enumerate(rows):
        values = [row[c] if lookup is None else lookup[row[c]] for c in candidate_columns] + extra[i]
        labels[i, :len(values)] = torch.tensor([id_hash(v) for v in values], dtype=torch.int64)
    return labels


def id_columns(cfg: Config) -> tuple[list[str], str | None]:
    """(the columns whose values give the candidates' ids: positive first, then one per negative column;
    the positive-ids list column or None) of a recipe with masking by id; ([], None) without. With
    id_source=pages they are the page columns themselves (page ids, mapped through the corpus)."""
    fn = cfg.loss.false_negatives
    if fn.id_column is None:
        return [], None
    if fn.id_source == "pages":
        return [cfg.data.positive_column, *cfg.data.negative_columns], fn.positive_ids_column
    return [fn.id_column, *(f"{n}_{fn.id_column}" for n in cfg.data.negative_columns)], fn.positive_ids_column


def label_columns(cfg: Config) -> list[str]:
    """Every row column the loss alone reads (ids, teacher scores): kept by loading, taken out of the rows
    by the collator, and no part of the sampler's duplicate check (page columns never are)."""
    candidates, positive_ids = id_columns(cfg)
    if cfg.loss.false_negatives.id_source == "pages":
        candidates = []  # the page columns: the model's inputs too
    scores = cfg.loss.distillation.scores_column
    return [*candidates, *([positive_ids] if positive_ids else []), *([scores] if scores else [])]


def reads_labels(cfg: Config) -> bool:
    """Whether the loss reads anything of the rows through the labels (ids or teacher scores)."""
    return cfg.loss.false_negatives.id_column is not None or cfg.loss.distillation.scores_column is not None


class RowLabelsCollator:
    """Wraps the trainer's collator: the label columns out of the rows, into ``batch["label"]`` = a dict with
    ``ids`` (int64 hashes, :func:`id_labels`) and/or ``teacher`` (float32 teacher scores [B, C-1]).
    ``from_pages``: the candidate columns are the rows' page columns holding page ids (they stay in the
    rows: the wrapped collator resolves them to images), mapped to ids by ``lookup`` (None: the page id)."""

    def __init__(self, inner, candidate_columns: list[str], positive_ids_column: str | None = None,
                 scores_column: str | None = None, *, from_pages: bool = False, lookup: dict | None = None) -> None:
        self.inner = inner
        self.candidate_columns = list(candidate_columns)
        self.positive_ids_column = positive_ids_column
        self.scores_column = scores_column
        self.from_pages, self.lookup = from_pages, lookup
        self.columns = [*([] if from_pages else self.candidate_columns),
                        *(c for c in (positive_ids_column, scores_column) if c)]

    @classmethod
    def of(cls, cfg: Config, inner):
        candidates, positive_ids = id_columns(cfg)
        fn, lookup = cfg.loss.false_negatives, None
        from_pages = fn.id_column is not None and fn.id_source == "pages"
        if from_pages and fn.id_column != cfg.data.pages_id_column:
            from dist_vdr.data import page_refs

            lookup = page_refs.page_values(cfg.data, fn.id_column)
        return cls(inner, candidates, positive_ids, cfg.loss.distillation.scores_column, from_pages=from_pages,
                   lookup=lookup)

    def __getattr__(self, name):  # the trainer reads the stock collator's attributes (tokenize_fn, ...)
        return getattr(self.inner, name)

    @property
    def valid_label_columns(self) -> list[str]:
        # The sampler drops label columns before its duplicate check: they must not change the batches.
        return [*(getattr(self.inner, "valid_label_columns", None) or []), *self.columns]

    def __call__(self, features: list[dict]) -> dict:
        read = [*self.candidate_columns, *(c for c in (self.positive_ids_column, self.scores_column) if c)]
        rows = [{c: row[c] for c in read} for row in features]
        if self.from_pages:
            self._check_page_ids(rows)
        batch = self.inner([{k: v for k, v in row.items() if k not in self.columns} for row in features])
        inner_labels = batch.get("label")  # e.g. a mixture's dataset index
        labels = dict(inner_labels) if isinstance(inner_labels, dict) else {}
        if self.candidate_columns:
            labels["ids"] = id_labels(rows, self.candidate_columns, self.positive_ids_column,
                                      self.lookup if self.from_pages else None)
        if self.scores_column:
            labels["teacher"] = torch.tensor([list(row[self.scores_column]) for row in rows], dtype=torch.float32)
        batch["label"] = labels
        return batch

    def _check_page_ids(self, rows: list[dict]) -> None:
        for column in self.candidate_columns:
            if not isinstance(rows[0][column], str):
                raise ValueError(f"loss.false_negatives.id_source=pages: column {column!r} holds images, not page "
                                 f"ids; use it with rows that name pages by id (data.pages_path), or id_source=rows")
