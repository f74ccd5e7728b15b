"""Reading one split of a dataset folder or hub dataset, and page corpora (with their build checked)."""

from __future__ import annotations

from pathlib import Path

import datasets

from dist_vdr.data import ingest


def load_split(path: str, name: str | None, split: str):
    if Path(path).is_dir():
        try:
            ds = datasets.load_from_disk(path)
        except FileNotFoundError as exc:
            raise ValueError(f"{path} is a folder but not a dataset written by save_to_disk: {exc}") from exc
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"dataset {path} has no split {split!r}; it has {sorted(ds)}")
            return ds[split]
        return ds
    if path.startswith((".", "/", "~")):
        raise ValueError(f"data.path={path!r} does not exist; generate pages with "
                         f"`dist-vdr make-synthetic-pages {path}`")
    return datasets.load_dataset(path, name, split=split)


def load_pages(path: str, name: str | None = None, split: str = "train"):
    """A page corpus (e.g. a `dist-vdr pages build` folder); an unfinished build is refused with the fix."""
    ingest.check_complete(path)
    return load_split(path, name, split)
