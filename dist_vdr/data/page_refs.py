"""Training rows that name their pages by id, resolved batch by batch from a memory-mapped corpus.

At tens of thousands to millions of pages, a training set that stores a copy of every positive and
negative page per row is several times the corpus and must be rewritten whenever negatives are
re-mined. Here training rows hold page ids (strings) and ``data.pages_path`` names the page corpus
(a ``dist-vdr pages build`` folder, or the training data itself in the published VDR layout, whose
``negatives`` column lists ids of other rows). The corpus stays memory-mapped Arrow; the collator
decodes only the pages of the batch in hand. Rows are still a map-style dataset, so the trainer's
samplers shard them across ranks and a resumed run restores the data position exactly (the
sampler's epoch seed plus the number of batches already consumed).

Set ``DIST_VDR_TRACE_ROWS=<folder>`` to record, per rank and optimizer micro-step, which rows were
trained on (the resume tests check that nothing is repeated or skipped across an interruption).
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path

from dist_vdr.data.arrow import column_values
from dist_vdr.data.splits import load_pages

TRACE_ENV = "DIST_VDR_TRACE_ROWS"
TRACE_KEY = "dist_vdr_rows"


def id_columns(ds, page_columns: list[str]) -> list[str]:
    """The page columns of ``ds`` that hold page ids (strings) rather than images."""
    import datasets

    return [c for c in page_columns if isinstance(ds.features.get(c), datasets.Value)
            and ds.features[c].dtype in ("string", "large_string")]


class PageTable:
    """page id -> image, over a corpus dataset that stays on disk."""

    def __init__(self, pages, id_column: str = "page_id", where: str = "page corpus") -> None:
        for column in (id_column, "image"):
            if column not in pages.column_names:
                raise ValueError(f"{where} has no column {column!r}; it has {pages.column_names} "
                                 f"(set data.pages_id_column)")
        self.pages = pages.select_columns(["image"])
        ids = column_values(pages, id_column)
        self.index = {str(pid): i for i, pid in enumerate(ids)}
        if len(self.index) != len(ids):
            raise ValueError(f"{where} has repeated {id_column} values: page ids must be unique")

    def __contains__(self, page_id: str) -> bool:
        return page_id in self.index

    def images(self, page_ids: list[str]) -> list:
        rows = [self.index[p] for p in page_ids]
        return self.pages[rows]["image"]


def load_table(cfg) -> PageTable:
    """The page table of ``cfg.pages_path`` (a DataConfig), built once per process: loading the
    training data and setting up the collator both need it, and its id index spans the corpus."""
    return _table(cfg.pages_path, cfg.train_name, cfg.train_split, cfg.pages_id_column)


@functools.lru_cache(maxsize=8)  # a mixture has a corpus per dataset
def _table(path: str, name: str | None, split: str, id_column: str) -> PageTable:
    return PageTable(load_pages(path, name, split), id_column, where=f"data.pages_path {path}")


def page_values(cfg, column: str) -> dict[str, object]:
    """page id -> the value of ``column`` (e.g. document_id) for every page of ``cfg.pages_path`` (a DataConfig)."""
    pages = load_pages(cfg.pages_path, cfg.train_name, cfg.train_split)
    if column not in pages.column_names:
        raise ValueError(f"data.pages_path {cfg.pages_path} has no column {column!r} (it has {pages.column_names}): "
                         f"set loss.false_negatives.id_column to one of them, e.g. document_id, or "
                         f"{cfg.pages_id_column} for the page itself")
    ids = column_values(pages, cfg.pages_id_column)
    return dict(zip((str(p) for p in ids), column_values(pages, column), strict=True))


def expand_negative_ids(ds, list_column: str, names: list[str], table: PageTable, where: str):
    """``negative_k`` id columns from the first entries of a list-of-ids column (the VDR layout).

    Rows with fewer usable ids than ``names`` are dropped and counted; the image columns are not
    copied (the new columns are joined to the memory-mapped table).
    """
    import datasets

    lists = ds[list_column]
    keep, columns = [], {n: [] for n in names}
    for row, ids in enumerate(lists):
        usable = [str(i) for i in (ids or []) if i is not None and str(i) in table][:len(names)]
        if len(usable) == len(names):
            keep.append(row)
        for k, name in enumerate(names):
            columns[name].append(usable[k] if k < len(usable) else None)
    if not keep:
        raise ValueError(f"{where}: no row has {len(names)} negatives in {list_column!r} that name pages of "
                         f"data.pages_path; check data.pages_id_column")
    extra = datasets.Dataset.from_dict(columns, features=datasets.Features(
        {n: datasets.Value("string") for n in names}))
    out = datasets.concatenate_datasets([ds.remove_columns([list_column]), extra], axis=1)
    if len(keep) < len(ds):
        warnings.warn(f"{where}: {len(ds) - len(keep)} of {len(ds)} rows dropped: fewer than {len(names)} "
                      f"of their {list_column!r} ids name a page", stacklevel=2)
        out = out.select(keep)  # an indices mapping: the pages are not copied
    return out


def check_ids(ds, columns: list[str], table: PageTable, where: str) -> None:
    for column in columns:
        missing = [p for p in column_values(ds, column) if p not in table]
        if missing:
            raise ValueError(f"{where}, column {column!r}: {len(missing)} page ids are not in data.pages_path, "
                             f"e.g. {missing[:3]}; rebuild the rows against this corpus (dist-vdr mine-negatives)")


class ResolvingCollator:
    """Replace page ids by their images, then collate as the wrapped (stock) collator does.

    ``table``: the corpus, or one per dataset of a mixture (each row's ``dataset_column`` picks it)."""

    def __init__(self, inner, table: PageTable | list[PageTable], columns: list[str], key_columns: list[str],
                 dataset_column: str | None = None) -> None:
        self.inner, self.table, self.columns, self.key_columns = inner, table, columns, key_columns
        self.dataset_column = dataset_column
        self.trace = bool(os.environ.get(TRACE_ENV))

    def __getattr__(self, name):  # the trainer reads the stock collator's attributes (tokenize_fn, ...)
        if name == "inner":  # unpickling (spawned DataLoader workers) looks attributes up before __init__
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, features: list[dict]) -> dict:
        keys = ["|".join(str(f[c]) for c in self.key_columns) for f in features] if self.trace else None
        rows = [dict(f) for f in features]
        for table, group in self._by_table(rows):
            for column in self.columns:
                for row, image in zip(group, table.images([r[column] for r in group]), strict=True):
                    row[column] = image
        batch = self.inner(rows)
        if keys is not None and TRACE_KEY not in batch:  # a mixture's collator names its rows itself
            batch[TRACE_KEY] = keys
        return batch


    def _by_table(self, rows: list[dict]) -> list[tuple[PageTable, list[dict]]]:
        if not isinstance(self.table, list):
            return [(self.table, rows)]
        groups: dict[int, list[dict]] = {}
        for row in rows:
            groups.setdefault(int(row[self.dataset_column]), []).append(row)
        return [(self.table[k], group) for k, group in groups.items()]


def record_trace(inputs: dict, rank: int, step: int) -> None:
    """Called by the trainer for the batch it is about to train on (not the one prefetched)."""
    keys = inputs.pop(TRACE_KEY, None)
    folder = os.environ.get(TRACE_ENV)
    if keys is None or not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(Path(folder) / f"rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "rows": keys}) + "\n")
