"""Finding the inputs of a `dist-vdr pages build`: the PDF and image files under the input folder,
and the symlinks not followed (with their reasons)."""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

PDF_SUFFIXES = (".pdf",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")


@dataclass
class Inputs:
    files: list[str] = field(default_factory=list)
    """Supported files, as POSIX paths relative to the input folder, in path order."""
    ignored: list[str] = field(default_factory=list)
    """Files of other types."""
    skipped: list[dict] = field(default_factory=list)
    """Symlinks not followed: ``{"file", "reason"}``."""


def find_inputs(input_dir: str | Path, follow_symlinks: bool = False) -> Inputs:
    """Every file under ``input_dir`` (recursively; hidden files left out), sorted by path parts."""
    root = Path(input_dir)
    real_root = root.resolve()
    found = Inputs()
    visited = {real_root}  # real folders already walked: a symlink loop ends here
    folders = deque([(root, "")])  # breadth first, by name: a folder reached twice is read at its shortest path
    while folders:
        folder, prefix = folders.popleft()
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda e: e.name)
        for entry in entries:
            rel = prefix + entry.name
            if entry.is_symlink():
                reason = _symlink_refusal(Path(entry.path), real_root, follow_symlinks)
                if reason:
                    found.skipped.append({"file": rel, "reason": reason})
                    continue
            if entry.is_dir():
                real = Path(entry.path).resolve()
                if real in visited:
                    found.skipped.append({"file": rel, "reason": f"{real}: a folder already read (a symlink loop)"})
                else:
                    visited.add(real)
                    folders.append((Path(entry.path), rel + "/"))
            elif entry.is_file() and not entry.name.startswith("."):
                is_page = Path(rel).suffix.lower() in PDF_SUFFIXES + IMAGE_SUFFIXES
                (found.files if is_page else found.ignored).append(rel)
    by_parts = lambda rel: rel.split("/")  # noqa: E731 - the order of Path objects, as before
    found.files.sort(key=by_parts)
    found.ignored.sort(key=by_parts)
    found.skipped.sort(key=lambda s: by_parts(s["file"]))
    return found


def _symlink_refusal(link: Path, real_root: Path, follow: bool) -> str | None:
    """Why ``link`` is not followed, or None to follow it."""
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return "broken symlink"
    inside = target == real_root or real_root in target.parents
    if inside and target.is_dir():  # its files are read under their own path: no second copy, no loop
        return f"symlink to {target}, a folder inside --input (read there)"
    if not inside and not follow:
        return f"symlink to {target}, outside --input: not followed (pass --follow-symlinks to read it)"
    return None
