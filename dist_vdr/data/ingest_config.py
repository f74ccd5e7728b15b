"""The settings of a `dist-vdr pages build` (:class:`PagesBuildConfig`), the check that its input and
output folders are apart, and :class:`BuildInterrupted`; shared by the build and its worker processes."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path


@dataclass(kw_only=True)
class PagesBuildConfig:
    """Settings of one corpus build; a resumed build must use the same ones."""

    input_dir: str
    """Folder of PDFs and page images (searched recursively)."""
    out_dir: str
    """Output dataset folder (resumed when it holds an unfinished build)."""
    dpi: float = 144.0
    """PDF render resolution (pixels per inch)."""
    max_pixels: int = 4_000_000
    """PDF pages rendering larger than this (width x height) are scaled down to fit."""
    max_image_pixels: int = 89_478_485
    """Image files larger than this are refused as decompression bombs (PIL's own default limit)."""
    text: bool = False
    """Also extract the PDF text layer into a ``text`` column."""
    image_format: str = "png"
    """Encoding of rendered PDF pages: png (lossless, fast level) or jpeg (quality 90, smaller)."""
    files_per_shard: int = 32
    """At most this many files (or page ranges of files) per shard."""
    pages_per_shard: int = 64
    """At most this many pages per shard: a worker holds one shard's pages, so this bounds its memory."""
    max_pages_per_document: int = 10_000
    """Pages of a document past this one are skipped (and listed in ``skipped.jsonl``)."""
    follow_symlinks: bool = False
    """Also follow symlinks that point outside the input folder."""
    num_workers: int = 0
    """Rendering processes (0: one per CPU core)."""

    def __post_init__(self) -> None:
        if not Path(self.input_dir).is_dir():
            raise ValueError(f"--input {self.input_dir} is not a folder of PDFs/images")
        if self.dpi <= 0 or min(self.max_pixels, self.max_image_pixels, self.files_per_shard,
                                self.pages_per_shard, self.max_pages_per_document) < 1:
            raise ValueError("--dpi, --max-pixels, --max-image-pixels, --files-per-shard, --pages-per-shard and "
                             "--max-pages-per-document must be positive")
        if self.image_format not in ("png", "jpeg"):
            raise ValueError(f"--image-format must be png or jpeg, got {self.image_format!r}")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0 (0: one per core), got {self.num_workers}")
        check_disjoint(self.input_dir, self.out_dir)

    def settings(self) -> dict:
        """What decides the pages' content: a resume with other settings would mix two corpora."""
        keep = ("dpi", "max_pixels", "max_image_pixels", "text", "image_format", "max_pages_per_document",
                "follow_symlinks")
        return {"input_dir": str(Path(self.input_dir).resolve()), **{k: getattr(self, k) for k in keep}}


def check_disjoint(input_dir: str | Path, out_dir: str | Path) -> None:
    """ValueError unless the folders are apart: --overwrite would delete the documents, and a build
    inside its input would read its own output."""
    src, out = Path(input_dir).resolve(), Path(out_dir).resolve()
    if out == src or src in out.parents:
        raise ValueError(f"--out {out_dir} is --input {input_dir} or inside it (resolved: {out} in {src}); "
                         "choose an --out outside the input folder")
    if out in src.parents:
        raise ValueError(f"--input {input_dir} is inside --out {out_dir} (resolved: {src} in {out}); "
                         "choose an --out outside the input folder")


class BuildInterrupted(Exception):
    """SIGINT/SIGTERM stopped the build; the message says what was kept and how to resume."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum  # the shell's convention for a process ended by a signal
