"""Marker-validated, verifiable checkpoints and the choice of where to resume.

The HF Trainer writes ``checkpoint-N`` folders file by file (every rank adds its RNG state, sharded
engines add their shards). A folder counts as a checkpoint only once :func:`mark_saved`
has written ``dist_vdr_complete.json`` into it, after a barrier that guarantees all ranks finished
writing. The marker lists every file of the checkpoint with its size and xxh3-128 hash (the ranks
hash a share of the files each, so a large checkpoint costs its size / world size in reads per
rank), and the recipe the run was started with (``dist_vdr_config.yaml``, for the resume guard of
:mod:`dist_vdr.run.resume_guard`). The marker itself is written to a temporary name and renamed, so it
is all-or-nothing.

Resume verifies the newest complete checkpoint against its marker (again a share per rank). A
folder without the marker (a run killed mid-save) or one that fails verification (a truncated,
overwritten or deleted file) is set aside -- renamed, never deleted -- and the next older complete
checkpoint is tried. Old checkpoints are rotated away only after a newer one is marked, so a kill
at any moment leaves at least one complete checkpoint (the Trainer's own rotation runs before the
marker exists and is switched off, see :func:`rotate`).

Only rank 0 looks at the file system to pick the resume point; the others receive its decision.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from dist_vdr import distributed

MARKER_FILE = "dist_vdr_complete.json"
CONFIG_FILE = "dist_vdr_config.yaml"
HASH_NAME = "xxh3_128"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_CHUNK = 8 << 20


def _read_marker(path: str | os.PathLike) -> dict | None:
    try:
        marker = json.loads((Path(path) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_complete(path: str | os.PathLike) -> bool:
    """The folder holds a readable completion marker (its files are checked by :func:`verify`)."""
    return _read_marker(path) is not None


def checkpoint_step(path: str | os.PathLike) -> int | None:
    m = _CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path, bool]]:
    """(step, folder, complete) for every ``checkpoint-N`` folder, by step."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        step = checkpoint_step(p)
        if step is not None and p.is_dir():
            found.append((step, p, is_complete(p)))
    return sorted(found)


def latest_complete(output_dir: str | os.PathLike) -> Path | None:
    complete = [p for _, p, ok in list_checkpoints(output_dir) if ok]
    return complete[-1] if complete else None


def set_aside(path: Path, why: str) -> Path:
    """Rename ``path`` to ``<why>-<name>-<time>`` beside it (never deleted: a user may want it back)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{why}-{path.name}-{stamp}")
    n = 1
    while target.exists():  # two set-asides within a second must not collide
        target = path.with_name(f"{why}-{path.name}-{stamp}.{n}")
        n += 1
    os.replace(path, target)
    return target


def set_aside_incomplete(output_dir: str | os.PathLike) -> list[Path]:
    """Rename checkpoint folders without a marker to ``incomplete-checkpoint-N-<time>``; returns new names."""
    return [set_aside(path, "incomplete") for _, path, ok in list_checkpoints(output_dir) if not ok]


# ----------------------------------------------------------------------------------------------
# File hashes: written into the marker, checked on resume.
# ----------------------------------------------------------------------------------------------

def file_digest(path: str | os.PathLike) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_files(folder: str | os.PathLike) -> dict[str, int]:
    """Relative path -> size of every file in ``folder`` (the marker and temporary files excluded)."""
    folder = Path(folder)
    files = {}
    for p in folder.rglob("*"):
        if p.is_file() and p.name not in (MARKER_FILE, MARKER_FILE + ".tmp"):
            files[p.relative_to(folder).as_posix()] = p.stat().st_size
    return dict(sorted(files.items()))


def share(sizes: dict[str, int], rank: int, world_size: int) -> list[str]:
    """This rank's files: largest first to the least-loaded rank, the same split on every rank."""
    load = [0] * world_size
    owner: dict[str, int] = {}
    for name, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        r = min(range(world_size), key=lambda i: (load[i], i))
        owner[name] = r
        load[r] += size
    return [name for name, r in owner.items() if r == rank]


def _hash_share(folder: Path, sizes: dict[str, int], info: distributed.DistInfo) -> dict[str, dict]:
    """Every rank hashes its share of ``sizes``; all ranks get the merged {name: {size, hash}}."""
    mine = {name: {"size": sizes[name], HASH_NAME: file_digest(folder / name)}
            for name in share(sizes, info.rank, info.world_size)}
    merged: dict[str, dict] = {}
    for part in distributed.all_gather_objects(mine):
        merged.update(part)
    return dict(sorted(merged.items()))


def _problems_in_share(folder: Path, files: dict[str, dict], info: distributed.DistInfo) -> list[str]:
    problems = []
    for name in share({n: int(e["size"]) for n, e in files.items()}, info.rank, info.world_size):
        path, expected = folder / name, files[name]
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != int(expected["size"]):
            problems.append(f"{name} has {path.stat().st_size} bytes, the marker says {expected['size']}")
        elif file_digest(path) != expected.get(HASH_NAME):
            problems.append(f"{name} does not match its {HASH_NAME} hash (changed or corrupted after the save)")
    return problems


def verify(folder: str | os.PathLike, info: distributed.DistInfo | None = None) -> list[str]:
    """What is wrong with a marked checkpoint ([] when every recorded file is intact). Collective.

    A marker written before file hashes were recorded (no ``files``) verifies as intact: there is
    nothing to check it against.
    """
    info = info or distributed.current()
    folder = Path(folder)
    marker = distributed.main_then_share(info.is_main, lambda: _read_marker(folder))
    if marker is None:
        return [f"no readable {MARKER_FILE}"]
    files = marker.get("files")
    if not isinstance(files, dict):
        return []
    problems: list[str] = []
    for part in distributed.all_gather_objects(_problems_in_share(folder, files, info)):
        problems.extend(part)
    return sorted(problems)


def write_marker(path: str | os.PathLike, info: dict) -> None:
    path = Path(path)
    tmp = path / (MARKER_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, path / MARKER_FILE)


def mark_complete(folder: str | os.PathLike, info: distributed.DistInfo, record: dict) -> None:
    """Collective: hash the folder's files (a share per rank) and write the marker on rank 0.

    Every rank must have finished writing its files before this is called (a barrier).
    """
    folder = Path(folder)
    sizes = distributed.main_then_share(info.is_main, lambda: checkpoint_files(folder))
    files = _hash_share(folder, sizes, info)
    if info.is_main:
        write_marker(folder, {**record, "world_size": info.world_size, "time": time.time(), "hash": HASH_NAME,
                              "files": files})
    distributed.barrier()  # nobody races ahead and reads an unmarked folder


def add_file(folder: str | os.PathLike, name: str, text: str) -> None:
    """Write (or replace) one small file in a marked folder and record it in the marker, which stays valid
    for every other file (rank 0 alone; e.g. final/README.md, written once the evaluation is in)."""
    folder = Path(folder)
    marker = _read_marker(folder)
    if marker is None:
        raise RuntimeError(f"{folder} is not a marked folder")
    tmp = folder / (name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, folder / name)
    files = marker.get("files")
    if isinstance(files, dict):
        files[name] = {"size": (folder / name).stat().st_size, HASH_NAME: file_digest(folder / name)}
        marker["files"] = dict(sorted(files.items()))
    write_marker(folder, marker)


def hidden_folder(beside: Path, what: str) -> Path:
    """A new hidden folder next to ``beside`` (``.<name>.<what>-XXXX``; no fixed name: it could be a user's
    folder), with the permissions of a folder made by ``mkdir`` (mkdtemp's are 0700: a team could not read it)."""
    try:
        beside.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{beside.name}.{what}-", dir=beside.parent))
    except OSError as exc:
        raise ValueError(f"cannot write beside {beside} ({exc.strerror or exc}): choose a folder you can write to") \
            from None
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    return folder


@contextlib.contextmanager
def writing_marked(output, record: dict):
    """The scratch folder of ``output`` (a checked :class:`dist_vdr.outputs.Output`) to write a model folder
    into (one process); once the block ends it is marked (file hashes + ``record``) and renamed into place; on
    any error it is removed and the output stays as it was."""
    with output.writing(record) as tmp:
        yield tmp
        mark_complete(tmp, distributed.DistInfo(), record)


def saved_world_size(path: str | os.PathLike) -> int | None:
    """Number of ranks that wrote a complete checkpoint (from its marker), None when unknown."""
    try:
        return int((_read_marker(path) or {})["world_size"])
    except (KeyError, TypeError, ValueError):
        return None


def saved_config(path: str | os.PathLike) -> str | None:
    """The recipe (resolved YAML) recorded in a checkpoint, None for checkpoints that predate it."""
    try:
        return (Path(path) / CONFIG_FILE).read_text()
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------
# Where to resume
# ----------------------------------------------------------------------------------------------

def decide_resume(output_dir: str | os.PathLike, *, resume: str | None, no_resume: bool,
                  info: distributed.DistInfo | None = None, log=print) -> str | None:
    """The checkpoint to resume from (explicit, newest intact complete one, or none). Collective.

    ``resume``: an explicit checkpoint folder (must be complete and intact). ``no_resume``: start
    from scratch, refused when the output folder already holds checkpoints (nothing written is
    overwritten). Unmarked folders and marked ones that fail verification are set aside (renamed)
    and the next older one is tried; ``log`` says so (rank 0).
    """
    info = info or distributed.current()
    out = Path(output_dir)
    candidates = distributed.main_then_share(info.is_main, lambda: _candidates(out, resume, no_resume, log))
    for path in candidates:
        problems = verify(path, info)
        if not problems:
            return path
        if resume:
            raise ValueError(f"--resume {resume}: the checkpoint fails verification ({'; '.join(problems[:3])}); "
                             f"pick another checkpoint")
        if info.is_main:
            moved = set_aside(Path(path), "corrupt")
            log(f"checkpoint {path} fails verification ({'; '.join(problems[:3])}"
                f"{f'; {len(problems) - 3} more' if len(problems) > 3 else ''}): set aside as {moved.name}; "
                f"trying the next older one")
        distributed.barrier()
    return None


def _candidates(out: Path, resume: str | None, no_resume: bool, log) -> list[str]:
    """Rank 0: explicit checkpoint, or every complete checkpoint newest first (after setting aside unmarked ones)."""
    if resume and no_resume:
        raise ValueError("--resume and --no-resume exclude each other")
    if resume:
        if not Path(resume).is_dir():
            raise ValueError(f"--resume {resume}: no such checkpoint folder")
        if not is_complete(resume):
            raise ValueError(f"--resume {resume}: checkpoint is incomplete (no {MARKER_FILE}); pick another")
        return [str(resume)]
    existing = list_checkpoints(out)
    if no_resume:
        if existing:
            raise ValueError(f"--no-resume but {out} already holds checkpoints; choose a new training.output_dir")
        return []
    for moved in set_aside_incomplete(out):
        log(f"an unfinished checkpoint (no {MARKER_FILE}: the run stopped while saving it) was set aside as "
            f"{moved.name}")
    return [str(p) for _, p, ok in reversed(list_checkpoints(out)) if ok]


def best_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint whose marker records the highest ``metric`` (the earliest of equals), or None."""
    scored = []
    for step, path, ok in list_checkpoints(output_dir):
        value = (_read_marker(path) or {}).get("metric") if ok else None
        if isinstance(value, (int, float)) and math.isfinite(value):
            scored.append((-float(value), step, path))
    return min(scored)[2] if scored else None


def rotate(output_dir: str | os.PathLike, keep: int | None, keep_best: bool = False) -> list[Path]:
    """Delete the oldest complete checkpoints beyond the newest ``keep`` ones (and, with ``keep_best``,
    beside the best one: :func:`best_checkpoint`); returns what was deleted.

    Called only right after a new checkpoint was marked: a deleted checkpoint always has a newer
    complete one. Unmarked folders are never touched here (resume sets them aside).
    """
    if not keep:
        return []
    complete = [p for _, p, ok in list_checkpoints(output_dir) if ok]
    best = best_checkpoint(output_dir) if keep_best else None
    doomed = [p for p in (complete[:-keep] if len(complete) > keep else []) if p != best]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def mark_saved(folder: Path, info: distributed.DistInfo, config_text: str, save_total_limit: int | None,
               metric: float | None = None, keep_best: bool = False) -> None:
    """After the Trainer saved ``folder`` (collective): record the recipe, mark the checkpoint once every
    rank has written its part (with the main ``metric`` of its step's evaluation), then rotate old ones away."""
    distributed.barrier()  # every rank's files (RNG state, shards) are on disk
    if info.is_main:
        (folder / CONFIG_FILE).write_text(config_text)
    record = {"step": checkpoint_step(folder), **({"metric": metric} if metric is not None else {})}
    mark_complete(folder, info, record)
    if info.is_main:
        rotate(folder.parent, save_total_limit, keep_best)
