"""The one input check of ids and per-row numbers, applied where a source is loaded (before a model loads or
anything is written): every error names the source, the row and the column, and says the fix.

- :func:`unique_ids`: query, page and judgement ids are unique in every source (BEIR folders, hub
  configurations, splits, files). A repeated query id counts its query twice in every mean; a repeated
  page id makes two corpus rows one ranking entry.
- :func:`score_lists`: a per-row list of numbers (teacher scores) has one value per page of its row, each
  finite, none missing -- checked over the whole column at once (Arrow), not when its row's step comes.
- Recipe and command numbers are checked finite by ``dist_vdr.config`` (a NaN passes every ``<``/``>`` bound).
"""

from __future__ import annotations

from collections.abc import Sequence


def unique_ids(ids: Sequence, where: str, column: str, what: str = "id") -> None:
    """ValueError naming the first repeated value of ``column`` and the two rows holding it."""
    first: dict[str, int] = {}
    for row, value in enumerate(ids):
        key = str(value)
        if key in first:
            raise ValueError(f"{where}: {what} {key!r} repeats in column {column!r} (rows {first[key]} and {row}): "
                             f"give every {what.split()[0]} a unique id (a repeat counts twice in every metric)")
        first[key] = row


def grades(values: Sequence, where: str, column: str) -> list[int]:
    """The judgement grades of ``column`` as ints; ValueError naming the row of one that is none."""
    out = []
    for row, given in enumerate(values):
        value = given
        if isinstance(value, str):  # a text table (TSV): the grade as written
            try:
                value = float(value.strip())
            except ValueError:
                value = None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or \
                (isinstance(value, float) and not value.is_integer()):
            value = given
            raise ValueError(f"{where}: row {row} of column {column!r} holds {value!r}, not an integer grade: judge "
                             f"each (query, page) pair with an integer (0 = not relevant)")
        out.append(int(value))
    return out


def score_lists(ds, column: str, width: int, where: str) -> None:
    """Every row of ``ds[column]`` a list of ``width`` finite numbers; ValueError naming the first row that is
    not (one check over the column's Arrow array, however many rows)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if column not in ds.column_names:
        raise ValueError(f"{where}: no column {column!r} (it has {ds.column_names}): give the column of the teacher "
                         f"scores (loss.distillation.scores_column)")
    array = ds.select_columns([column]).with_format("arrow")[:].column(column).combine_chunks()
    fix = (f"give each row {width} finite scores (its positive's, then one per negative column), e.g. from "
           f"`dist-vdr score-rows`")
    if not pa.types.is_list(array.type) and not pa.types.is_large_list(array.type) and \
            not pa.types.is_fixed_size_list(array.type):
        raise ValueError(f"{where}: column {column!r} holds {array.type}, not lists of scores: {fix}")
    nulls = np.flatnonzero(np.asarray(array.is_null()))
    if nulls.size:
        raise ValueError(f"{where}: row {nulls[0]} of column {column!r} has no scores (null): {fix}")
    lengths = np.asarray(pc.list_value_length(array))
    wrong = np.flatnonzero(lengths != width)
    if wrong.size:
        raise ValueError(f"{where}: row {wrong[0]} of column {column!r} holds {lengths[wrong[0]]} scores, not {width}: "
                         f"{fix}")
    values = pc.list_flatten(array)
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        raise ValueError(f"{where}: column {column!r} holds lists of {values.type}, not numbers: {fix}")
    flat = np.asarray(values.fill_null(np.nan).cast(pa.float64()))
    bad = np.flatnonzero(~np.isfinite(flat))
    if bad.size:
        row = int(bad[0] // width)
        raise ValueError(f"{where}: row {row} of column {column!r} holds {flat[bad[0]]} (score {bad[0] % width}): "
                         f"{fix}")
