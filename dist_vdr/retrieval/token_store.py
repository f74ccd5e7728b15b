"""A rank's page representations on disk, for representations too large to hold in memory (token embeddings).

A multi-vector page is hundreds of vectors (a ColPali page: 1,030 x 128); a rank's shard of a 50k-page corpus
is then gigabytes. The sharded evaluator therefore writes each encoded batch's items to a :class:`TokenStore`
(half precision by default) and searches by reading it back in bounded chunks: a rank's memory holds one chunk,
the queries and a top-k per query, whatever the size of its shard.

Layout of a store folder (one rank's shard):

- ``tokens.bin``: the items' rows, ``[rows, dim]`` of ``dtype``, item after item in the order they were encoded;
- ``records.bin``: int64 triples ``(position in the shard, first row, number of rows)``, one per item, written
  after the item's rows (one write per batch): an item is stored when its record is;
- ``layout.json``: ``dim`` and ``dtype``, written with the first batch.

An interrupted encoding leaves complete records and perhaps rows without one: :meth:`TokenStore.open` keeps the
items whose rows are all there and cuts the rest, and the encoding goes on with the missing batches (an item
stored twice is read from its last record). Reads use ``pread`` into a buffer, not a memory map: mapped pages
of the file would count as the process's resident memory as they are read.

An item is ``[T_i, dim]`` with its own ``T_i`` (no padding on disk): the reader gets a list of float32 tensors,
and the scoring pads them (:meth:`~dist_vdr.retrieval.scoring.Scoring.stack`). Nothing here imports a kind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

DTYPES = {"float16": np.float16, "float32": np.float32}
"""The dtypes a store holds (the name is what configurations give)."""

_RECORD = 3  # int64 values per record


class TokenStore:
    """One shard's items (``[T_i, dim]`` each) in a folder; see the module. Build with :meth:`open`."""

    def __init__(self, folder: Path, dtype: str, size: int) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"a token store holds {sorted(DTYPES)}, not {dtype!r}")
        self.folder, self.dtype, self.size = Path(folder), dtype, size
        self.np_dtype = np.dtype(DTYPES[dtype])
        self.dim = 0
        self.starts = np.full(size, -1, dtype=np.int64)  # first row of each position (-1: not stored)
        self.counts = np.zeros(size, dtype=np.int64)
        self.rows = 0  # rows written (the end of tokens.bin)
        self._tokens = self.folder / "tokens.bin"
        self._records = self.folder / "records.bin"
        self._layout = self.folder / "layout.json"

    @classmethod
    def open(cls, folder: str | os.PathLike, *, size: int, dtype: str = "float16") -> TokenStore:
        """The store in ``folder`` (created if missing) for a shard of ``size`` items; what an earlier, perhaps
        interrupted, encoding stored there is kept (:attr:`stored`)."""
        store = cls(Path(folder), dtype, size)
        store.folder.mkdir(parents=True, exist_ok=True)
        store._recover()
        store._tokens.touch()  # a shard without pages (a small corpus over many ranks) reads as empty
        store._records.touch()
        return store

    def _recover(self) -> None:
        layout = json.loads(self._layout.read_text()) if self._layout.is_file() else None
        if layout is None or layout.get("dtype") != self.dtype:
            for f in (self._tokens, self._records, self._layout):
                f.unlink(missing_ok=True)
            return
        self.dim = int(layout["dim"])
        row_bytes = self.dim * self.np_dtype.itemsize
        rows_on_disk = self._tokens.stat().st_size // row_bytes if self._tokens.is_file() else 0
        raw = np.fromfile(self._records, dtype=np.int64) if self._records.is_file() else np.zeros(0, np.int64)
        records = raw[:len(raw) // _RECORD * _RECORD].reshape(-1, _RECORD)
        whole = records[(records[:, 1] + records[:, 2] <= rows_on_disk) & (records[:, 0] < self.size)]
        self.starts[whole[:, 0]], self.counts[whole[:, 0]] = whole[:, 1], whole[:, 2]  # the last record wins
        self.rows = int((whole[:, 1] + whole[:, 2]).max()) if len(whole) else 0
        # Cut what has no record (a batch cut off mid-write), so that the next rows follow the last record's.
        with open(self._tokens, "ab") as f:
            f.truncate(self.rows * row_bytes)
        with open(self._records, "ab") as f:
            f.truncate(len(whole) * _RECORD * 8)
        if len(whole) != len(records):
            whole.tofile(self._records)

    @property
    def stored(self) -> set[int]:
        """The positions whose items are stored."""
        return set(np.flatnonzero(self.starts >= 0).tolist())

    @property
    def complete(self) -> bool:
        return bool((self.starts >= 0).all())

    @property
    def nbytes(self) -> int:
        """Bytes of the stored rows."""
        return self.rows * self.dim * self.np_dtype.itemsize

    # ------------------------------------------------------------------ writing
    def append(self, positions: Sequence[int], items: Sequence[torch.Tensor]) -> None:
        """Store one batch: ``items[i]`` (``[T_i, dim]``) is the item at shard position ``positions[i]``."""
        if not items:
            return
        dim = int(items[0].shape[-1])
        if not self.dim:
            self.dim = dim
            tmp = self._layout.with_name(self._layout.name + ".tmp")
            tmp.write_text(json.dumps({"dim": dim, "dtype": self.dtype}))
            os.replace(tmp, self._layout)
        if dim != self.dim:
            raise ValueError(f"token store {self.folder} holds {self.dim}-d rows, not {dim}-d")
        counts = np.array([len(t) for t in items], dtype=np.int64)
        starts = self.rows + np.concatenate([[0], np.cumsum(counts)[:-1]])
        rows = torch.cat([t.detach().reshape(-1, dim) for t in items]).to(torch.float32).numpy()
        with open(self._tokens, "ab") as f:
            f.write(rows.astype(self.np_dtype, copy=False).tobytes())
        records = np.stack([np.asarray(positions, dtype=np.int64), starts, counts], axis=1)
        with open(self._records, "ab") as f:
            f.write(records.tobytes())
        self.starts[records[:, 0]], self.counts[records[:, 0]] = starts, counts
        self.rows += int(counts.sum())

    # ------------------------------------------------------------------ reading
    def read(self, positions: Sequence[int]) -> tuple[torch.Tensor, np.ndarray]:
        """The items at ``positions``, as one float32 ``[rows, dim]`` of their rows one item after another, and the
        items' numbers of rows (``torch.split(rows, counts)`` gives the items). One ``pread`` per run of items that lie
        one after another in the file (a chunk in file order: one read)."""
        positions = np.asarray(positions, dtype=np.int64)
        counts, starts = self.counts[positions], self.starts[positions]
        row_bytes = self.dim * self.np_dtype.itemsize
        buffer = np.empty((int(counts.sum()), self.dim), dtype=self.np_dtype)
        view = memoryview(buffer.reshape(-1).view(np.uint8))
        breaks = np.flatnonzero(starts[1:] != starts[:-1] + counts[:-1]) + 1  # where a run of adjacent items ends
        run_starts = np.concatenate([[0], breaks]).astype(np.int64)
        run_rows = np.add.reduceat(counts, run_starts) if len(counts) else counts
        with open(self._tokens, "rb") as f:
            fd, at = f.fileno(), 0
            for start, rows in zip(starts[run_starts].tolist() if len(counts) else [], run_rows.tolist(), strict=True):
                size = rows * row_bytes
                if os.preadv(fd, [view[at:at + size]], start * row_bytes) != size:
                    raise OSError(f"token store {self.folder}: tokens.bin is shorter than its records say")
                at += size
        return torch.from_numpy(buffer).float(), counts  # torch converts float16 with the CPU's vector unit

    def take(self, positions: Sequence[int]) -> list[torch.Tensor]:
        """The float32 items at ``positions`` (each ``[T_i, dim]``)."""
        rows, counts = self.read(positions)
        return list(torch.split(rows, counts.tolist()))

    def chunks(self, max_rows: int, positions: Sequence[int] | None = None
               ) -> Iterator[tuple[np.ndarray, torch.Tensor, np.ndarray]]:
        """The stored items (or those at ``positions``, each once) in file order (sequential reads), a chunk of whole
        items of at most ``max_rows`` rows at a time (an item longer than that alone): ``(positions [n], float32
        rows, counts [n])`` as :meth:`read` gives them."""
        order = np.flatnonzero(self.starts >= 0) if positions is None else np.unique(np.asarray(positions, np.int64))
        order = order[np.argsort(self.starts[order], kind="stable")]
        ends = np.cumsum(self.counts[order])
        i = 0
        while i < len(order):
            j = max(i + 1, int(np.searchsorted(ends, (ends[i - 1] if i else 0) + max_rows, side="right")))
            rows, counts = self.read(order[i:j])
            yield order[i:j], rows, counts
            i = j
