"""Reading whole columns of a ``datasets.Dataset`` fast."""

from __future__ import annotations


def column_values(ds, column: str) -> list:
    """A text/id column as a Python list, read as one Arrow column: ``ds[column]`` in datasets 5.x
    formats row by row (measured: 8 s for 3 columns of 100,000 rows, the resume's largest cost)."""
    return ds.with_format("arrow")[column].to_pylist()
