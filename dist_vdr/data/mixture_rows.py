"""The training rows of a mixture (``data.datasets``): each dataset loaded as a ``data`` section of its
own, renamed to ``data``'s column names and concatenated, with the dataset's index in a column.

The concatenation is one table for the trainer (its samplers and the resume position work on it as on
one dataset); :class:`~dist_vdr.data.mixture.MixtureBatchSampler` keeps every optimizer step within
one dataset. The index column (:data:`DATASET_COLUMN`) is a label column: the sampler leaves it out
of its duplicate check, the collator hands it to the loss (``label["dataset"]``) for the per-dataset
options, and the page-id resolver picks that dataset's page corpus with it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dist_vdr.config import DataConfig, DatasetEntry

DATASET_COLUMN = "dist_vdr_dataset"
ROW_COLUMN = "dist_vdr_row"  # the row's index within its dataset: names it in the row trace (DIST_VDR_TRACE_ROWS)
_INHERITED_KEYS = ("path", "train_name", "train_split", "query_column", "positive_column", "negative_columns",
                   "pages_path", "pages_id_column", "negative_ids_column", "eval_path", "eval_name", "eval_format",
                   "eval_split", "eval_negative_columns", "eval_queries_file", "eval_qrels_file")


def entry_config(data: DataConfig, entry: DatasetEntry) -> DataConfig:
    """``data`` with the entry's own keys (null keys: data's), as one dataset (no mixture)."""
    own = {k: getattr(entry, k) for k in _INHERITED_KEYS if getattr(entry, k) is not None}
    if entry.max_rows is not None:
        own["max_train_samples"] = entry.max_rows
    if not entry.has_eval:  # its eval set is data's (the shared one), or none
        own = {k: v for k, v in own.items() if not k.startswith("eval_")}
    return dataclasses.replace(data, datasets=[], **own)


@dataclass
class MixtureRows:
    """The concatenated rows and, per dataset, its name, size, section and loaded part."""

    train: object  # datasets.Dataset: data.train_columns (+ extra columns) + DATASET_COLUMN
    names: list[str]
    sizes: list[int]
    configs: list[DataConfig]
    parts: list  # each dataset's rows before renaming (what its startup pass scans)

    @property
    def offsets(self) -> list[int]:
        return [sum(self.sizes[:k]) for k in range(len(self.sizes))]


def load_mixture(data: DataConfig, extra_columns: list[str] = ()) -> MixtureRows:
    """Every dataset of ``data.datasets`` loaded (:func:`~dist_vdr.data.loading.load_train`) and joined."""
    import datasets

    from dist_vdr.data.loading import load_train

    parts, renamed, configs = [], [], []
    for k, entry in enumerate(data.datasets):
        section = entry_config(data, entry)
        try:
            part = load_train(section, extra_columns=list(extra_columns))
        except ValueError as exc:
            raise ValueError(f"data.datasets[{entry.name}]: {exc}") from exc
        mapping = {a: b for a, b in zip(section.train_columns, data.train_columns, strict=True) if a != b}
        named = part.rename_columns(mapping) if mapping else part
        renamed.append(named.add_column(DATASET_COLUMN, [k] * len(named)).add_column(ROW_COLUMN, range(len(named))))
        parts.append(part)
        configs.append(section)
    _check_same_features(renamed, [e.name for e in data.datasets])
    train = datasets.concatenate_datasets(renamed) if len(renamed) > 1 else renamed[0]
    return MixtureRows(train, [e.name for e in data.datasets], [len(p) for p in parts], configs, parts)


def _check_same_features(parts: list, names: list[str]) -> None:
    """The datasets meet in one table: each column must hold the same kind of value in all of them."""
    first = parts[0].features
    for name, part in zip(names[1:], parts[1:], strict=True):
        for column, feature in part.features.items():
            if column in (DATASET_COLUMN, ROW_COLUMN):
                continue
            if type(feature) is not type(first[column]) or getattr(feature, "dtype", None) != \
                    getattr(first[column], "dtype", None):
                pages = "Image" in (type(feature).__name__, type(first[column]).__name__)
                fix = ("page images in all, or page ids with a pages_path in all" if pages else
                       "store the column with the same type in every dataset")
                raise ValueError(f"data.datasets: column {column!r} of {name!r} holds {_kind(feature)}, of "
                                 f"{names[0]!r} {_kind(first[column])}; give every dataset the same kind of column "
                                 f"({fix})")


def _kind(feature) -> str:
    dtype = getattr(feature, "dtype", None)
    return f"{type(feature).__name__}({dtype})" if dtype else type(feature).__name__


def weights(data: DataConfig, sizes: list[int]) -> list[float]:
    """Each dataset's sampling weight (null: its number of rows)."""
    return [float(e.weight) if e.weight is not None else float(n) for e, n in zip(data.datasets, sizes, strict=True)]


class DatasetLabelCollator:
    """Takes the dataset index out of the rows (the stock collator would tokenize it) into
    ``batch["label"]["dataset"]`` (an int64 tensor, one value per row), for the loss's per-dataset options;
    with ``DIST_VDR_TRACE_ROWS`` set, the rows as ``dataset:row`` into the trace (:mod:`.page_refs`)."""

    def __init__(self, inner, max_pixels: list[int | None] = (), page_columns: list[str] = ()) -> None:
        import os

        from dist_vdr.data.page_refs import TRACE_ENV

        self.inner = inner
        self.max_pixels, self.page_columns = list(max_pixels), list(page_columns)
        self.trace = bool(os.environ.get(TRACE_ENV))

    def __getattr__(self, name):  # the trainer reads the stock collator's attributes (tokenize_fn, ...)
        if name == "inner":  # unpickling (spawned DataLoader workers) looks attributes up before __init__
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def valid_label_columns(self) -> list[str]:
        # The sampler drops label columns before its duplicate check: the index must not change the batches.
        return [*(getattr(self.inner, "valid_label_columns", None) or []), DATASET_COLUMN, ROW_COLUMN]

    def __call__(self, features: list[dict]) -> dict:
        import torch

        from dist_vdr.data.page_refs import TRACE_KEY

        index = torch.tensor([int(f[DATASET_COLUMN]) for f in features], dtype=torch.int64)
        rows = [{k: self._page(v, f[DATASET_COLUMN]) if k in self.page_columns else v
                 for k, v in f.items() if k not in (DATASET_COLUMN, ROW_COLUMN)} for f in features]
        batch = self.inner(rows)
        label = batch.get("label")
        batch["label"] = {**(label if isinstance(label, dict) else {}), "dataset": index}
        if self.trace:
            batch[TRACE_KEY] = [f"{int(f[DATASET_COLUMN])}:{int(f[ROW_COLUMN])}" for f in features]
        return batch

    def _page(self, image, dataset: int):
        """The page, downscaled to the dataset's max_pixels (aspect kept) when it is larger."""
        cap = self.max_pixels[int(dataset)] if int(dataset) < len(self.max_pixels) else None
        if cap is None or not hasattr(image, "resize") or image.width * image.height <= cap:
            return image
        scale = (cap / (image.width * image.height)) ** 0.5
        return image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))))


def check_loss_options(cfg) -> None:
    """What a mixture (data.datasets) asks of a recipe (``cfg``) whatever its kind: de-duplicated global batches
    (the sampler builds them per dataset), and id columns named after data's page columns."""
    d = cfg.data
    if d.datasets and not cfg.training.batch_sampler.startswith("no_duplicates"):
        raise ValueError(f"data.datasets needs training.batch_sampler no_duplicates_hashed or no_duplicates (the "
                         f"mixture builds de-duplicated global batches), not {cfg.training.batch_sampler!r}")
    renamed = [e.name for e in d.datasets if (e.positive_column or d.positive_column, e.negative_columns
                                              or d.negative_columns) != (d.positive_column, d.negative_columns)]
    if renamed and cfg.loss.false_negatives.id_column is not None:
        raise ValueError(f"loss.false_negatives.id_column with data.datasets {renamed}, which name their page columns "
                         f"otherwise than data: the id columns (<page column>_{cfg.loss.false_negatives.id_column}) "
                         f"would pair with the wrong pages; give those datasets data's page column names")
