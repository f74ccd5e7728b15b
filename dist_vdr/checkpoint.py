"""Marker-validated checkpoints and the choice of where to resume.

The HF Trainer writes ``checkpoint-N`` folders file by file (every rank adds its RNG state, sharded
engines add their shards). A folder counts as a checkpoint only once :class:`CheckpointMarker`
has written ``dist_vdr_complete.json`` into it, after a barrier that guarantees all ranks finished
writing; the marker itself is written to a temporary name and renamed, so it is all-or-nothing.
A run killed mid-save leaves a folder without the marker: resume skips it and moves it aside
(renamed, never deleted) so the Trainer does not write into or rotate it.

Only rank 0 looks at the file system to pick the resume point; the others receive its decision.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from . import distributed

MARKER_FILE = "dist_vdr_complete.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def is_complete(path: str | os.PathLike) -> bool:
    marker = Path(path) / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return True


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


def set_aside_incomplete(output_dir: str | os.PathLike) -> list[Path]:
    """Rename checkpoint folders without a marker to ``incomplete-checkpoint-N-<time>``; returns new names."""
    moved = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for step, path, ok in list_checkpoints(output_dir):
        if not ok:
            target = path.with_name(f"incomplete-{path.name}-{stamp}")
            os.replace(path, target)
            moved.append(target)
    return moved


def write_marker(path: str | os.PathLike, info: dict) -> None:
    path = Path(path)
    tmp = path / (MARKER_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, path / MARKER_FILE)


def decide_resume(output_dir: str | os.PathLike, *, resume: str | None, no_resume: bool, is_main: bool) -> str | None:
    """Rank 0: the checkpoint to resume from (explicit, newest complete, or none); broadcast to all ranks.

    ``resume``: an explicit checkpoint folder (must be complete). ``no_resume``: start from scratch,
    refused when the output folder already holds checkpoints (nothing written is overwritten).
    """
    return distributed.main_then_share(is_main, lambda: _decide(Path(output_dir), resume, no_resume))


def _decide(out: Path, resume: str | None, no_resume: bool) -> str | None:
    if resume and no_resume:
        raise ValueError("--resume and --no-resume exclude each other")
    if resume:
        if not Path(resume).is_dir():
            raise ValueError(f"--resume {resume}: no such checkpoint folder")
        if not is_complete(resume):
            raise ValueError(f"--resume {resume}: checkpoint is incomplete (no {MARKER_FILE}); pick another")
        return str(resume)
    existing = list_checkpoints(out)
    if no_resume:
        if existing:
            raise ValueError(f"--no-resume but {out} already holds checkpoints; choose a new training.output_dir")
        return None
    set_aside_incomplete(out)
    latest = latest_complete(out)
    return str(latest) if latest else None


def make_marker_callback():
    """A TrainerCallback that validates each checkpoint once every rank has written its part."""
    from transformers import TrainerCallback

    class CheckpointMarker(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            distributed.barrier()  # every rank's files (RNG state, shards) are on disk
            if state.is_world_process_zero and folder.is_dir():
                write_marker(folder, {"step": state.global_step, "world_size": distributed.current().world_size,
                                      "time": time.time()})
            distributed.barrier()  # nobody races ahead and reads an unmarked folder
            return control

    return CheckpointMarker()


def saved_world_size(path: str | os.PathLike) -> int | None:
    """Number of ranks that wrote a complete checkpoint (from its marker), None when unknown."""
    try:
        return int(json.loads((Path(path) / MARKER_FILE).read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
