"""The startup pass over the training data: done once, sharded over ranks, remembered.

Before step 1 every page of the training rows must be shown to decode (within the page pixel
limit), and the no-duplicates sampler needs a content hash of every value of every row. Both need
each page decoded, so one pass does both. Rank r takes the r-th contiguous slice of the rows and
splits it again over worker processes; one all-gather (on a group whose timeout is
``launch.startup_timeout_s``, not the step-sized ``collective_timeout_s``) combines the slices.
Nobody waits for another rank's serial work: before, rank 0 decoded every page alone while the
others sat in a broadcast with a 600 s timeout, which the published data sizes exceed.

The result is remembered in a record keyed by what it depends on: the data's fingerprint
(``datasets``' own, plus the sizes and modification times of its Arrow files), the columns, the
pixel limit and whether hashes are wanted. It is written atomically into
``<output_dir>/startup/<key>/`` and the user's cache (``$DIST_VDR_CACHE``, default
``~/.cache/dist-vdr/startup``), so a resume, a SLURM requeue or another run over the same data skip
the pass; other data has another key. The hashes are those sentence-transformers' sampler computes
itself (same decode, same per-value digest), handed to it instead of recomputed on every rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_vdr import compat, distributed
from dist_vdr.run.folder import STARTUP, RunDir

STARTUP_VERSION = 1  # bump when what the pass checks or how it hashes changes
RECORD_FILE = "startup_record.json"
HASHES_FILE = "row_hashes.npy"
_CHUNK_ROWS = 256


@dataclass
class StartupResult:
    """What the pass established: the rows were validated; their hashes (None unless asked for)."""

    key: str
    rows: int
    columns: list[str]
    hashes: np.ndarray | None
    reused_from: str | None = None  # the record's folder when nothing was decoded
    decoded_pages: int = 0
    seconds: float = 0.0


def user_cache_dir() -> Path:
    root = os.environ.get("DIST_VDR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dist-vdr")
    return Path(root) / STARTUP  # the same layout as a run folder's


def fingerprint(ds) -> str:
    """What identifies a dataset's content: ``datasets``' fingerprint (deterministic over transforms
    such as select), its length and columns, and its Arrow files' sizes and modification times (a
    folder rewritten in place gets a new key even when its state file was copied along)."""
    parts: list = [compat.dataset_fingerprint(ds), len(ds), list(ds.column_names)]
    for entry in getattr(ds, "cache_files", None) or []:
        try:
            stat = os.stat(entry["filename"])
        except OSError:
            continue
        parts.append([entry["filename"], stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def record_key(ds, image_columns: list[str], hashed: bool, extra: dict | None = None) -> str:
    from dist_vdr.data.loading import MAX_PAGE_PIXELS

    payload = {"version": STARTUP_VERSION, "data": fingerprint(ds), "columns": list(ds.column_names),
               "images": image_columns, "hashed": hashed, "max_pixels": MAX_PAGE_PIXELS, **(extra or {})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


# ----------------------------------------------------------------------------------------------
# The pass over one slice of rows (a worker process, or the rank itself)
# ----------------------------------------------------------------------------------------------

def scan_rows(ds, image_columns: list[str], lo: int, hi: int, where: str, hashed: bool):
    """Rows [lo, hi) of ``ds``: (hashes [hi-lo, columns] int64 or None, first problem or None, pages decoded).

    A problem is (row, column, message), the message as :func:`loading.check_images` words it.
    """
    from dist_vdr.data.loading import decode_page, undecoded

    columns = list(ds.column_names)
    features = {c: ds.features[c] for c in image_columns}
    hashes = np.zeros((hi - lo, len(columns)), dtype=np.int64) if hashed else None
    # The per-value digest of sentence-transformers' NoDuplicatesBatchSampler(precompute_hashes=True)
    # (compat: st.sampler_value_hash): the sampler then finds the same duplicates as when it hashes
    # the rows itself.
    value_hash = compat.sampler_value_hash() if hashed else None
    decoded = 0
    # Whole Arrow columns per batch: iterating rows formats each one (seconds per 100,000 rows).
    part = undecoded(ds.select(range(lo, hi)), image_columns).with_format("arrow")
    i = 0
    for table in part.iter(batch_size=_CHUNK_ROWS):
        values = [table.column(c).to_pylist() for c in columns]
        for k in range(table.num_rows):
            for j, column in enumerate(columns):
                value = values[j][k]
                if column in features:
                    image, problem = decode_page(value, f"{where} row {lo + i}, column {column!r}", features[column])
                    if problem:
                        return hashes, (lo + i, column, problem), decoded
                    decoded += 1
                    value = image
                if hashed:
                    hashes[i, j] = value_hash(value)
            i += 1
    return hashes, None, decoded


def _scan_chunk(args):
    ds, image_columns, lo, hi, where, hashed = args
    return scan_rows(ds, image_columns, lo, hi, where, hashed)


def _scan_slice(ds, image_columns, lo, hi, where, hashed, workers: int):
    """This rank's rows [lo, hi), split over ``workers`` processes (forked: the memory-mapped data is shared)."""
    chunks = [(ds, image_columns, a, min(a + _CHUNK_ROWS, hi), where, hashed) for a in range(lo, hi, _CHUNK_ROWS)]
    if workers <= 1 or len(chunks) <= 1:
        results = [_scan_chunk(c) for c in chunks]
    else:
        import multiprocessing

        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_scan_chunk, chunks))
    problem = next((r[1] for r in results if r[1] is not None), None)
    decoded = sum(r[2] for r in results)
    parts = [r[0] for r in results if r[0] is not None]
    hashes = np.concatenate(parts) if hashed and parts else (np.zeros((0, len(ds.column_names)), np.int64)
                                                             if hashed else None)
    return hashes, problem, decoded


def default_workers(local_world_size: int) -> int:
    """Processes per rank: the cores this process may use, shared by the ranks of the node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------

def _record_dirs(key: str, output_dir: str | os.PathLike | None) -> list[Path]:
    dirs = [RunDir(output_dir).startup / key] if output_dir else []
    return dirs + [user_cache_dir() / key]


def find_record(key: str, output_dir, rows: int, columns: list[str], hashed: bool) -> Path | None:
    """The first folder holding a complete record of ``key`` that matches the data's shape."""
    for folder in _record_dirs(key, output_dir):
        try:
            record = json.loads((folder / RECORD_FILE).read_text())
        except (OSError, ValueError):
            continue
        if record.get("key") != key or record.get("rows") != rows or record.get("columns") != columns:
            continue
        if hashed and not (folder / HASHES_FILE).is_file():
            continue
        return folder
    return None


def write_record(result: StartupResult, output_dir) -> list[Path]:
    """Atomically (temporary names, then rename; the JSON last) into the run folder and the user cache."""
    written = []
    for folder in _record_dirs(result.key, output_dir):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if result.hashes is not None:
                tmp = folder / f"{HASHES_FILE}.{os.getpid()}.tmp"
                with open(tmp, "wb") as f:
                    np.save(f, result.hashes)
                os.replace(tmp, folder / HASHES_FILE)
            tmp = folder / f"{RECORD_FILE}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps({"key": result.key, "rows": result.rows, "columns": result.columns,
                                       "validated": True, "hashed": result.hashes is not None,
                                       "written": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
            os.replace(tmp, folder / RECORD_FILE)
            written.append(folder)
        except OSError:  # a read-only or full cache folder only costs the next start the pass
            continue
    return written


def load_record(folder: Path, key: str, rows: int, columns: list[str], hashed: bool) -> StartupResult:
    hashes = np.load(folder / HASHES_FILE) if hashed else None
    if hashes is not None and hashes.shape != (rows, len(columns)):
        raise ValueError(f"startup record {folder} holds hashes of shape {hashes.shape}, expected "
                         f"{(rows, len(columns))}; delete the folder")
    return StartupResult(key, rows, columns, hashes, reused_from=str(folder))


# ----------------------------------------------------------------------------------------------
# The collective entry point
# ----------------------------------------------------------------------------------------------

def prepare(ds, image_columns: list[str], where: str, *, hashed: bool, info: distributed.DistInfo,
            output_dir=None, workers: int = 0, timeout_s: int = 6 * 3600, key_extra: dict | None = None,
            log=print) -> StartupResult:
    """Validate (and hash) ``ds`` once, all ranks in parallel; or reuse its record. Collective.

    Raises an :class:`~dist_vdr.distributed.AllRanksError` naming the first bad row (the same one
    whatever the number of ranks) on every rank.
    """
    if hashed:
        compat.sampler_value_hash()  # imports sentence-transformers (seconds) before the pass is timed
    start = time.perf_counter()
    columns = list(ds.column_names)
    key = record_key(ds, image_columns, hashed, key_extra)
    found = distributed.main_then_share(info.is_main, lambda: (
        str(f) if (f := find_record(key, output_dir, len(ds), columns, hashed)) else None))
    if found:
        result = load_record(Path(found), key, len(ds), columns, hashed)
        result.seconds = time.perf_counter() - start
        return result
    lo, hi = distributed.shard_range(len(ds), info.rank, info.world_size)
    workers = workers or default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    hashes, problem, decoded = _scan_slice(ds, image_columns, lo, hi, where, hashed, workers)
    parts = distributed.all_gather_objects((hashes, problem, decoded), timeout_s=timeout_s,
                                           waiting_for=f"the other ranks' share of {where}", log=log)
    problems = [p[1] for p in parts if p[1] is not None]
    if problems:
        raise distributed.AllRanksError(min(problems)[2])
    all_hashes = np.concatenate([p[0] for p in parts]) if hashed else None
    return StartupResult(key, len(ds), columns, all_hashes, decoded_pages=sum(p[2] for p in parts),
                         seconds=time.perf_counter() - start)
