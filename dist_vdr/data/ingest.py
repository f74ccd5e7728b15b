"""`dist-vdr pages build`: a folder of PDFs and page images -> a page corpus dataset on disk.

Every page of every PDF is rendered with pypdfium2 (``dpi``, scaled down to at most ``max_pixels``),
image files are stored as they are (their original bytes; multi-frame TIFFs give one PNG per
frame). The result is a ``datasets.Dataset`` written with ``save_to_disk`` (memory-mapped Arrow
shards) with the columns of :data:`FEATURES`:

- ``page_id`` = ``<document_id>#<page_number>``, ``document_id`` = the file's path relative to the
  input folder (URL-quoted, so ids never hold whitespace and TREC files stay parseable),
  ``page_number`` (1-based), ``width``/``height`` in pixels, ``content_hash`` (SHA-256 of the
  decoded pixels, so the same page stored twice is caught whatever its encoding), ``text`` (the
  PDF text layer, with ``text=True``; empty for images).

The input and output folders must be disjoint (resolved, symlinks included), and ``--overwrite``
deletes only a folder that is a ``pages build`` output. Inputs are found recursively; a symlink is
followed when it points to a file inside the input folder (or anywhere with ``follow_symlinks``),
and every symlink not followed is listed with its reason in ``skipped.jsonl``.

The build runs in worker processes, in two phases: each file's pages are counted, then the work
units, (file, page range) pairs, are packed into shards of at most ``pages_per_shard`` pages and
``files_per_shard`` units. A worker holds one shard's encoded pages, so its memory is bounded by
the shard, not by the length of a document: a long PDF is split over several shards (rendered in
parallel). Pages past ``max_pages_per_document`` are skipped and listed in ``skipped.jsonl``.

Each shard is written beside its final name (with its records, ``dist_vdr_records.json``) and
renamed into place, then its units are appended to ``manifest.jsonl``. An interrupted build
resumes with the page ranges the manifest lacks; a shard renamed into place whose records never
reached the manifest (the build was killed in between) is adopted, never rendered again. SIGINT
and SIGTERM stop a build within a second: queued shards are cancelled, the workers are ended,
every finished shard is recorded, and :class:`BuildInterrupted` says how to resume.

Bad inputs (corrupt or encrypted PDF, zero pages, empty file, undecodable image, decompression
bomb, a file that crashes the renderer process) are skipped and summarised (``bad_files.jsonl``);
a file is kept whole or not at all, and bad files are tried again on resume, so a fixed file
joins. At the end the shards are merged in (document, page) order, pages whose content repeats an
earlier page are dropped and listed in ``duplicates.jsonl`` (qrels naming them are mapped to the
kept page), and ``dist_vdr_pages_build.json`` marks the corpus complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import threading
import time
import zlib
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

PDF_SUFFIXES = (".pdf",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")
SETTINGS_FILE = "dist_vdr_pages_settings.json"
MARKER_FILE = "dist_vdr_pages_build.json"
MANIFEST_FILE = "manifest.jsonl"
SKIPPED_FILE = "skipped.jsonl"
SHARD_RECORDS = "dist_vdr_records.json"
CRASH_ENV = "DIST_VDR_TEST_CRASH_ON_FILE"
COUNT_FILES_PER_TASK = 64  # counting pages is cheap: large tasks keep the process round trips few


@dataclass(kw_only=True)
class PagesBuildConfig:
    """Settings of one corpus build; a resumed build must use the same ones."""

    input_dir: str
    out_dir: str
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


def features(text: bool):
    import datasets

    cols = {"page_id": datasets.Value("string"), "document_id": datasets.Value("string"),
            "page_number": datasets.Value("int32"), "image": datasets.Image(), "width": datasets.Value("int32"),
            "height": datasets.Value("int32"), "content_hash": datasets.Value("string")}
    if text:
        cols["text"] = datasets.Value("string")
    return datasets.Features(cols)


def document_id(rel: str) -> str:
    return quote(rel, safe="/")


# --------------------------------------------------------------------------------------------
# Finding the inputs


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


# --------------------------------------------------------------------------------------------
# Reading one file (in the worker processes)


class BadInput(Exception):
    """A file that cannot become pages; the message is the reason shown in the summary."""


def _pixel_hash(im) -> str:
    h = hashlib.sha256(f"{im.mode}:{im.size[0]}x{im.size[1]}:".encode())
    h.update(im.tobytes())
    return h.hexdigest()


def _encode(im, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        im.convert("RGB").save(buf, format="JPEG", quality=90)
    else:  # level 1: ~3x faster than the default for ~10% more bytes on rendered pages
        im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _check_not_empty(path: Path) -> None:
    if path.stat().st_size == 0:  # the same reason whatever the suffix claims
        raise BadInput("empty file")


_PAGES_NODE = re.compile(rb"<<[^<>]*/Type\s*/Pages\b[^<>]*>>")
_LEAF_PAGE = re.compile(rb"/Type\s*/Page\b")  # \b: not /Pages
_STREAM = re.compile(rb"stream\r?\n(.*?)endstream", re.S)
_NO_PAGES_SCAN_BYTES = 16 << 20


def _has_no_pages(path: Path) -> bool:
    """Whether a PDF that PDFium refused as malformed is a readable PDF without pages.

    PDFium reports a page tree without pages as a format error when it had to rebuild the
    cross-reference table (offsets a little off, as in hand-written and some generated files), and
    as "Success" otherwise. Here: a page tree node (also inside compressed object streams) whose
    count is 0 or whose kids are empty, and no page object anywhere. Truncated files (whose page
    tree still counts pages) stay unreadable.
    """
    if path.stat().st_size > _NO_PAGES_SCAN_BYTES:  # a PDF without pages is small; do not scan a large wreck
        return False
    data = path.read_bytes()
    texts = [data]
    for stream in _STREAM.finditer(data):
        try:
            texts.append(zlib.decompressobj().decompress(stream.group(1), _NO_PAGES_SCAN_BYTES))
        except zlib.error:
            continue
    nodes = [m.group() for t in texts for m in _PAGES_NODE.finditer(t)]
    if not nodes or any(_LEAF_PAGE.search(t) for t in texts):
        return False
    return all(not re.search(rb"/Count\s+[1-9]", n) and re.search(rb"/Count\s+0\b|/Kids\s*\[\s*\]", n)
               for n in nodes)


def _open_pdf(path: Path):
    import pypdfium2 as pdfium

    _check_not_empty(path)
    try:
        return pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as exc:
        code = getattr(exc, "err_code", None)
        # PDFium reports a document without a page tree as "Success" (code 0): it opens no pages.
        if code == 0 or (code == 3 and _has_no_pages(path)):
            raise BadInput("no pages") from None
        if code == 4:
            raise BadInput("encrypted (password required)") from None
        raise BadInput(f"unreadable PDF ({exc})") from None


def _render_scale(page, cfg: PagesBuildConfig) -> float:
    width_pt, height_pt = page.get_size()
    scale = cfg.dpi / 72.0
    pixels = width_pt * height_pt * scale * scale
    if pixels > cfg.max_pixels:  # oversized page boxes render within the budget, not as a bomb
        scale *= (cfg.max_pixels / pixels) ** 0.5
        while math.ceil(width_pt * scale) * math.ceil(height_pt * scale) > cfg.max_pixels:
            scale *= 0.998  # PDFium rounds the bitmap size up
    return scale


def _pdf_pages(path: Path, cfg: PagesBuildConfig, first: int, last: int):
    pdf = _open_pdf(path)
    try:
        if len(pdf) < last:
            raise BadInput("no pages" if len(pdf) == 0 else f"has {len(pdf)} pages, fewer than counted ({last})")
        for i in range(first - 1, last):
            page = pdf[i]
            im = page.render(scale=_render_scale(page, cfg)).to_pil()
            text = page.get_textpage().get_text_range() if cfg.text else ""
            yield i + 1, im, _encode(im, cfg.image_format), text
    finally:
        pdf.close()


def _open_image(path: Path, cfg: PagesBuildConfig, data: bytes | None = None):
    from PIL import Image

    _check_not_empty(path)
    try:
        im = Image.open(io.BytesIO(data) if data is not None else path)
    except Exception as exc:
        raise BadInput(f"unreadable image ({type(exc).__name__}: {exc})") from exc
    width, height = im.size
    if width * height > cfg.max_image_pixels:
        im.close()
        raise BadInput(f"decompression bomb: {width}x{height} = {width * height / 1e6:.1f} MP "
                       f"> --max-image-pixels {cfg.max_image_pixels / 1e6:.1f} MP")
    return im


def _image_pages(path: Path, cfg: PagesBuildConfig, first: int, last: int):
    data = path.read_bytes()
    with _open_image(path, cfg, data) as im:
        try:
            frames = getattr(im, "n_frames", 1)
            if frames == 1:
                frame = im.copy()  # decodes: a corrupt body fails here
                yield 1, frame, data, ""  # stored as it is
                return
            for i in range(first - 1, last):
                im.seek(i)
                frame = im.copy()
                yield i + 1, frame, _encode(frame.convert("RGB"), "png"), ""
        except BadInput:
            raise
        except Exception as exc:
            raise BadInput(f"unreadable image ({type(exc).__name__}: {exc})") from exc


def count_pages(root: str | Path, rel: str, cfg: PagesBuildConfig) -> int:
    """Pages (PDF) or frames (image) of one input file; raises BadInput with the reason when it has none."""
    path = Path(root) / rel
    if path.suffix.lower() in PDF_SUFFIXES:
        pdf = _open_pdf(path)
        try:
            pages = len(pdf)
        finally:
            pdf.close()
        if pages == 0:
            raise BadInput("no pages")
        return pages
    with _open_image(path, cfg) as im:
        return getattr(im, "n_frames", 1)


def render_file(root: str | Path, rel: str, cfg: PagesBuildConfig, first: int = 1,
                last: int | None = None) -> list[dict]:
    """The page rows of pages ``first..last`` of one input file (``last`` None: its last page);
    raises BadInput with the reason when one of them cannot be read."""
    path = Path(root) / rel
    if os.environ.get(CRASH_ENV) == rel:  # fault injection for the tests: native code dying on a file
        os._exit(139)
    last = count_pages(root, rel, cfg) if last is None else last
    pdf = path.suffix.lower() in PDF_SUFFIXES
    pages = _pdf_pages(path, cfg, first, last) if pdf else _image_pages(path, cfg, first, last)
    doc = document_id(rel)
    rows = []
    try:
        for number, im, data, text in pages:
            row = {"page_id": f"{doc}#{number}", "document_id": doc, "page_number": number,
                   "image": {"bytes": data, "path": None}, "width": im.size[0], "height": im.size[1],
                   "content_hash": _pixel_hash(im)}
            if cfg.text:
                row["text"] = text
            rows.append(row)
    except BadInput:
        raise
    except Exception as exc:  # a page that fails to render fails its file: no half documents
        raise BadInput(f"render failed ({type(exc).__name__}: {exc})") from exc
    return rows


def _note_current(cfg: PagesBuildConfig, item) -> None:
    """What this worker works on now: the file to blame when the process dies in native code."""
    status = Path(cfg.out_dir) / "shards" / f".rendering-{os.getpid()}"
    status.write_text("" if item is None else json.dumps(item))


def count_files(cfg: PagesBuildConfig, files: list[str]) -> list[dict]:
    """Phase 1 task: ``{"file", "document_pages"}`` per file, or its bad record."""
    records = []
    for rel in files:
        _note_current(cfg, rel)
        try:
            records.append({"file": rel, "document_pages": count_pages(cfg.input_dir, rel, cfg)})
        except BadInput as exc:
            records.append({"file": rel, "status": "bad", "reason": str(exc)})
    _note_current(cfg, None)
    return records


def shard_name(units: list) -> str:
    keys = [u if isinstance(u, str) else f"{u[0]}#{u[1]}-{u[2]}" for u in units]
    return "shard-" + hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16]


def build_shard(cfg: PagesBuildConfig, units: list) -> list[dict]:
    """Phase 2 task: render ``units`` ((file, first page, last page, document pages)) into one
    shard, written atomically with its records; returns one record per unit."""
    rows, records = [], []
    for unit in units:
        rel, first, last, document_pages = unit
        _note_current(cfg, unit)
        try:
            got = render_file(cfg.input_dir, rel, cfg, first, last)
        except BadInput as exc:
            records.append({"file": rel, "status": "bad", "reason": str(exc)})
            continue
        rows.extend(got)
        records.append({"file": rel, "status": "ok", "first_page": first, "last_page": last,
                        "document_pages": document_pages, "pages": len(got)})
    _note_current(cfg, None)
    if rows:
        name = shard_name(units)
        for record in records:
            record["shard"] = name
        _write_shard(cfg, name, rows, [r for r in records if r["status"] == "ok"])
    return records


def _write_shard(cfg: PagesBuildConfig, name: str, rows: list[dict], records: list[dict]) -> None:
    import datasets
    import pyarrow as pa

    shards = Path(cfg.out_dir) / "shards"
    tmp, final = shards / f".tmp-{name}-{os.getpid()}", shards / name
    feats = features(cfg.text)
    columns = feats.encode_batch({k: [r[k] for r in rows] for k in feats})
    table = pa.Table.from_pydict(columns, schema=feats.arrow_schema)
    # Not Dataset.from_dict: its fingerprint hashes a pickled copy of the whole table, the largest
    # part of a worker's peak memory (~+170 MB on 64 noisy 144-dpi pages); the shard name is unique.
    datasets.Dataset(table, info=datasets.DatasetInfo(features=feats), fingerprint=name).save_to_disk(str(tmp))
    # The records travel inside the shard: one renamed into place is complete and can be adopted
    # even when the build dies before its records reach the manifest.
    (tmp / SHARD_RECORDS).write_text(json.dumps(records))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _init_worker() -> None:
    import datasets
    from PIL import Image
    from tqdm import tqdm

    # Ctrl-C reaches the whole process group; the parent decides what stops and ends the workers.
    # (SIGINT is blocked from birth, see _map; ignored too in case a library unblocks it.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    Image.MAX_IMAGE_PIXELS = None  # the bomb check is ours (BadInput with the size), not a warning
    datasets.disable_progress_bars()  # one bar per shard save would bury the build's own bar
    # tqdm's default lock is a multiprocessing one, registered with the resource tracker: a worker
    # ended by a Ctrl-C would leave it behind, and the tracker warns of a leak at exit.
    tqdm.set_lock(threading.RLock())


# --------------------------------------------------------------------------------------------
# The manifest: which page ranges are done


def _read_manifest(out: Path) -> list[dict]:
    """The ok records whose shard is on disk, each with its page range (older builds recorded whole files)."""
    path = out / MANIFEST_FILE
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():  # a line cut by a kill is the last one; its shard is adopted or redone
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if (out / "shards" / record["shard"]).is_dir():
                    record.setdefault("first_page", 1)
                    record.setdefault("last_page", record["pages"])
                    record.setdefault("document_pages", record["pages"])
                    records.append(record)
    return records


def _unrecorded_shards(out: Path, records: list[dict]) -> list[dict]:
    """Records of shards renamed into place that the manifest lacks (the build died in between)."""
    known = {r["shard"] for r in records}
    adopted = []
    for shard in sorted((out / "shards").glob("shard-*")):
        if shard.name not in known and (shard / SHARD_RECORDS).is_file():
            adopted += json.loads((shard / SHARD_RECORDS).read_text())
    return adopted


def _close_cut_line(manifest: Path) -> None:
    """End a line cut by a kill, so that the next record is not glued to it (and lost with it)."""
    if manifest.is_file() and manifest.stat().st_size:
        with open(manifest, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def _remove_leftovers(out: Path) -> None:
    """Half-written shards and status notes of workers that were killed (none run now)."""
    for path in (out / "shards").glob(".tmp-*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in (out / "shards").glob(".rendering-*"):
        path.unlink()


def _kept_pages(document_pages: int, cfg: PagesBuildConfig) -> int:
    return min(document_pages, cfg.max_pages_per_document)


def _coverage(records: list[dict]) -> dict[str, tuple[int, set[int]]]:
    """file -> (its page count, the pages done)."""
    done: dict[str, tuple[int, set[int]]] = {}
    for r in records:
        done.setdefault(r["file"], (r["document_pages"], set()))[1].update(range(r["first_page"], r["last_page"] + 1))
    return done


def _complete_files(coverage: dict[str, tuple[int, set[int]]], cfg: PagesBuildConfig) -> dict[str, int]:
    """file -> page count, for the files whose kept pages are all done."""
    return {f: n for f, (n, pages) in coverage.items() if pages.issuperset(range(1, _kept_pages(n, cfg) + 1))}


def _missing_ranges(kept: int, done: set[int], size: int) -> list[tuple[int, int]]:
    """The pages 1..kept not in ``done`` as ranges of at most ``size`` pages."""
    ranges: list[tuple[int, int]] = []
    for page in range(1, kept + 1):
        if page in done:
            continue
        if ranges and ranges[-1][1] == page - 1 and ranges[-1][1] - ranges[-1][0] + 1 < size:
            ranges[-1] = (ranges[-1][0], page)
        else:
            ranges.append((page, page))
    return ranges


def plan_shards(page_counts: dict[str, int], coverage: dict[str, tuple[int, set[int]]],
                cfg: PagesBuildConfig) -> list[list[tuple]]:
    """The missing page ranges, in file order, packed into shards of at most ``pages_per_shard``
    pages and ``files_per_shard`` units; a unit is (file, first page, last page, document pages)."""
    shards, shard, pages = [], [], 0
    for rel, document_pages in page_counts.items():
        done = coverage.get(rel, (0, set()))[1]
        for first, last in _missing_ranges(_kept_pages(document_pages, cfg), done, cfg.pages_per_shard):
            n = last - first + 1
            if shard and (pages + n > cfg.pages_per_shard or len(shard) == cfg.files_per_shard):
                shards.append(shard)
                shard, pages = [], 0
            shard.append((rel, first, last, document_pages))
            pages += n
    if shard:
        shards.append(shard)
    return shards


# --------------------------------------------------------------------------------------------
# Running tasks in worker processes, interruptibly


class _StopSignals:
    """SIGINT/SIGTERM during a build: noted, and acted on at the next safe point (``check``), so
    finished shards are recorded before the build exits; with ``immediate``, or at a second signal
    (a user who does not want to wait), acted on at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.immediate = False
        self._previous: dict = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        again = self.signum is not None
        self.signum = signum
        if self.immediate or again:
            self.check()

    def check(self) -> None:
        if self.signum is not None:
            raise BuildInterrupted(self.signum)


class _Workers:
    """A process pool kept across the build's phases; replaced after a worker dies."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._pool: ProcessPoolExecutor | None = None

    def pool(self) -> ProcessPoolExecutor:
        import multiprocessing

        if self._pool is None:
            # Always processes, even for one worker: a file that crashes native code must not take
            # the build (and its manifest) down. spawn: PDFium and the parent's threads are not
            # forked half-set.
            self._pool = ProcessPoolExecutor(self.size, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker)
        return self._pool

    def close(self, kill: bool = False) -> None:
        """Shut the pool down; with ``kill``, end the workers now instead of after their tasks."""
        if self._pool is None:
            return
        if kill:
            # ProcessPoolExecutor has no public way to end running tasks before Python 3.14.
            for process in list((self._pool._processes or {}).values()):
                process.kill()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None


def _map(workers: _Workers, fn, cfg: PagesBuildConfig, tasks: list, on_result, stop: _StopSignals) -> None:
    """``on_result(i, fn(cfg, tasks[i]))`` for every task as it finishes.

    On a signal or a dead worker the pool is ended, and results that came back before it are still
    passed on (their shards are on disk), then the exception goes on.
    """
    pool = workers.pool()
    # submit() starts the worker processes. They are born with SIGINT blocked (the mask is inherited
    # through fork and exec): a Ctrl-C to the process group must not kill one still importing, nor
    # make one drop its task; the parent gets it (pending until unblocked here) and ends them.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        futures = {pool.submit(fn, cfg, task): i for i, task in enumerate(tasks)}
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    consumed = set()

    def consume(future) -> None:
        consumed.add(future)
        on_result(futures[future], future.result())

    try:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)  # a timeout: check() runs
            for future in sorted(done, key=futures.get):
                consume(future)
            stop.check()
    except BaseException:
        workers.close(kill=True)  # after this every future is settled
        for future in futures:
            if future not in consumed and future.done() and not future.cancelled() and future.exception() is None:
                consume(future)
        raise


def _item_file(item) -> str:
    return item if isinstance(item, str) else item[0]


def _run_isolated(workers: _Workers, fn, cfg: PagesBuildConfig, tasks: list, on_result, on_crash,
                  stop: _StopSignals, write) -> None:
    """Run every task; a file that crashes its process is found and given to ``on_crash``.

    When a worker dies, the pool is broken and the items its processes were on are unknown among
    the in-flight ones: each worker notes its current item, those items are retried one per
    process (the one that crashes again is bad, with the rest of its file), and the other tasks go
    on in a fresh pool.
    """
    status_dir = Path(cfg.out_dir) / "shards"
    while tasks:
        _remove_leftovers(Path(cfg.out_dir))  # notes of an earlier pool must not name suspects
        finished: set[int] = set()

        def take(i, result) -> None:
            finished.add(i)
            on_result(result)

        try:
            _map(workers, fn, cfg, tasks, take, stop)
            return
        except BrokenProcessPool:
            stop.check()  # workers ended by a signal to the process group did not crash
            suspects = [json.loads(t) for t in {f.read_text() for f in status_dir.glob(".rendering-*")} - {""}]
            if not suspects:
                raise
            _remove_leftovers(Path(cfg.out_dir))  # the notes are read; the dead worker's half shard goes
            write(f"a renderer process crashed on one of {sorted(map(_item_file, suspects))}: "
                  "retrying those one per process")
            crashed = set()
            for item in suspects:
                alone = _Workers(1)
                try:
                    _map(alone, fn, cfg, [[item]], lambda i, result: on_result(result), stop)
                except BrokenProcessPool:
                    stop.check()
                    crashed.add(_item_file(item))
                    on_crash(item)
                finally:
                    alone.close()
            suspect_keys = {json.dumps(item) for item in suspects}
            tasks = [[item for item in task if json.dumps(item) not in suspect_keys and _item_file(item) not in crashed]
                     for i, task in enumerate(tasks) if i not in finished]
            tasks = [task for task in tasks if task]


# --------------------------------------------------------------------------------------------
# The build


def _prepare_output(cfg: PagesBuildConfig, overwrite: bool) -> bool:
    """Create or check the output folder; True when a finished build is already there."""
    out = Path(cfg.out_dir)
    settings_file = out / SETTINGS_FILE
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; choose a folder")
    is_build = any((out / name).exists() for name in (SETTINGS_FILE, MARKER_FILE, MANIFEST_FILE))
    if out.exists() and not is_build and any(out.iterdir()):
        what = "--overwrite would delete" if overwrite else "--out"
        raise ValueError(f"{what} {out}, a non-empty folder that is not a `pages build` output (no {SETTINGS_FILE}, "
                         f"{MANIFEST_FILE} or {MARKER_FILE}); choose a new or empty --out")
    if overwrite and out.exists():
        for child in out.iterdir():  # the contents, not the folder: --out may be a symlink to it
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    if settings_file.is_file():
        # Settings added since a build was started take this run's values: its pages did not depend on them.
        before = {**cfg.settings(), **json.loads(settings_file.read_text())}
        if before != cfg.settings():
            changed = sorted(k for k in cfg.settings() if before.get(k) != cfg.settings()[k])
            raise ValueError(f"--out {out} was built with other settings ({', '.join(changed)}: {before}); "
                             "use the same ones to resume, or --overwrite to rebuild")
        (out / "shards").mkdir(exist_ok=True)
        return (out / MARKER_FILE).is_file()
    (out / "shards").mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(cfg.settings(), indent=2))
    return False


class _Recorder:
    """Appends finished units to the manifest (flushed to disk) and collects the bad files."""

    def __init__(self, manifest, bar) -> None:
        self.manifest, self.bar = manifest, bar
        self.bad: dict[str, str] = {}
        self.page_counts: dict[str, int] = {}
        self.new_pages = 0

    def write_ok(self, records: list[dict]) -> None:
        self.manifest.writelines(json.dumps(r) + "\n" for r in records if r["status"] == "ok")
        self.manifest.flush()
        os.fsync(self.manifest.fileno())

    def rendered(self, records: list[dict]) -> None:
        self.write_ok(records)
        for r in records:
            if r["status"] == "ok":
                self.new_pages += r["pages"]
                self.bar.update(r["pages"])
            else:
                self.bad.setdefault(r["file"], r["reason"])
        self.bar.set_postfix(bad=len(self.bad))

    def counted(self, records: list[dict]) -> None:
        self.bar.update(len(records))
        for r in records:
            if r.get("status") == "bad":
                self.bad.setdefault(r["file"], r["reason"])
            else:
                self.page_counts[r["file"]] = r["document_pages"]

    def crashed(self, item) -> None:
        self.bad.setdefault(_item_file(item), "crashed the renderer process")


def _render(cfg: PagesBuildConfig, files: list[str], stop: _StopSignals, show_progress: bool) -> _Recorder:
    """Count and render every page the manifest lacks; returns the recorder (bad files, pages rendered)."""
    from tqdm.auto import tqdm

    out = Path(cfg.out_dir)
    _remove_leftovers(out)
    _close_cut_line(out / MANIFEST_FILE)
    bar = tqdm(total=0, unit="file", desc="counting pages", disable=not show_progress)
    with open(out / MANIFEST_FILE, "a") as manifest:
        recorder = _Recorder(manifest, bar)
        recorder.write_ok(_unrecorded_shards(out, _read_manifest(out)))  # finished before a kill: adopted
        coverage = _coverage(_read_manifest(out))
        complete = _complete_files(coverage, cfg)
        if complete:
            bar.write(f"resuming: {len(complete)} of {len(files)} files already in {out}")
        pending = [f for f in files if f not in complete]
        workers = _Workers(min(cfg.num_workers or os.cpu_count() or 1, max(len(pending), 1)))
        try:
            page_counts = _count_phase(cfg, pending, coverage, workers, recorder, stop)
            tasks = plan_shards(page_counts, coverage, cfg)
            bar.set_description("rendering pages")
            bar.unit = "page"
            bar.reset(total=sum(u[2] - u[1] + 1 for task in tasks for u in task))
            _run_isolated(workers, build_shard, cfg, tasks, recorder.rendered, recorder.crashed, stop, bar.write)
        except BuildInterrupted as exc:
            workers.close(kill=True)
            raise _record_interrupted(cfg, recorder, len(files), exc.signum) from None
        finally:
            workers.close()
            bar.close()
    return recorder


def _count_phase(cfg: PagesBuildConfig, pending: list[str], coverage: dict, workers: _Workers,
                 recorder: _Recorder, stop: _StopSignals) -> dict[str, int]:
    """file -> page count for the pending files that have pages (a partly done file's is in the manifest)."""
    unknown = [f for f in pending if f not in coverage]
    tasks = [unknown[i:i + COUNT_FILES_PER_TASK] for i in range(0, len(unknown), COUNT_FILES_PER_TASK)]
    recorder.bar.reset(total=len(unknown))
    _run_isolated(workers, count_files, cfg, tasks, recorder.counted, recorder.crashed, stop, recorder.bar.write)
    counts = {f: coverage[f][0] if f in coverage else recorder.page_counts.get(f) for f in pending}
    return {f: n for f, n in counts.items() if n}  # None: a bad file


def _record_interrupted(cfg: PagesBuildConfig, recorder: _Recorder, num_files: int, signum: int) -> BuildInterrupted:
    """After the workers are ended: record the shards they renamed into place before their results
    came back, drop their half-written ones, and say what is done."""
    out = Path(cfg.out_dir)
    recorder.write_ok(_unrecorded_shards(out, _read_manifest(out)))
    _remove_leftovers(out)
    done = len(_complete_files(_coverage(_read_manifest(out)), cfg))
    return BuildInterrupted(signum, f"interrupted by {signal.Signals(signum).name}: {done} of {num_files} files "
                            f"done, every finished shard recorded in {out / MANIFEST_FILE}; rerun the same command "
                            "to resume")


def build_pages(cfg: PagesBuildConfig, *, overwrite: bool = False, show_progress: bool = True) -> dict:
    """Build (or resume) the corpus; returns the summary also written to the marker file.

    Raises :class:`BuildInterrupted` on SIGINT/SIGTERM, after recording every finished shard.
    """
    out = Path(cfg.out_dir)
    if _prepare_output(cfg, overwrite):
        return {**json.loads((out / MARKER_FILE).read_text()), "already_built": True}
    started = time.perf_counter()
    inputs = find_inputs(cfg.input_dir, cfg.follow_symlinks)
    if not inputs.files:
        raise ValueError(f"--input {cfg.input_dir} holds no PDF or image files ({', '.join(IMAGE_SUFFIXES)})")
    with _StopSignals() as stop:
        recorder = _render(cfg, inputs.files, stop, show_progress)
        stop.immediate = True  # merging has no safe points: a signal now stops it at once
        try:
            stop.check()
            summary = finalize(cfg, inputs, [{"file": f, "reason": r} for f, r in recorder.bad.items()],
                               show_progress=show_progress)
            seconds = time.perf_counter() - started
            summary.update(seconds=round(seconds, 2), pages_rendered_now=recorder.new_pages,
                           pages_per_s=round(recorder.new_pages / seconds, 2) if seconds > 0 else None)
            (out / MARKER_FILE).write_text(json.dumps(summary, indent=2))
        except BuildInterrupted as exc:
            raise BuildInterrupted(exc.signum, f"interrupted by {signal.Signals(exc.signum).name} while merging "
                                   "the shards (every page is rendered); rerun the same command to finish") from None
        stop.immediate = False  # the corpus is complete: what is left is tidying up
    shutil.rmtree(out / "shards", ignore_errors=True)  # merged into the corpus; only a resume needed them
    return summary


def finalize(cfg: PagesBuildConfig, inputs: Inputs, bad: list[dict], show_progress: bool = True) -> dict:
    """Merge the shards in (document, page) order, drop repeated pages, save the corpus."""
    import datasets

    out = Path(cfg.out_dir)
    records = _read_manifest(out)
    complete = _complete_files(_coverage(records), cfg)
    truncated = [{"file": f, "reason": f"{n} pages: pages {cfg.max_pages_per_document + 1}-{n} skipped "
                  f"(--max-pages-per-document {cfg.max_pages_per_document})",
                  "pages_skipped": n - cfg.max_pages_per_document}
                 for f, n in sorted(complete.items()) if n > cfg.max_pages_per_document]
    _write_jsonl(out / SKIPPED_FILE, inputs.skipped + truncated)
    _write_jsonl(out / "bad_files.jsonl", bad)
    shard_names = sorted({r["shard"] for r in records if r["file"] in complete})
    if not shard_names:
        raise ValueError(f"no page could be read from {cfg.input_dir}: {len(bad)} bad files "
                         f"(see {out / 'bad_files.jsonl'})")
    merged = datasets.concatenate_datasets([datasets.load_from_disk(str(out / "shards" / n)) for n in shard_names])
    keep, duplicates = _select_pages(merged, {document_id(f) for f in complete}, cfg.max_pages_per_document)
    corpus = merged.select(keep)
    # Arrow files of at most ~500 MB: a rank maps only the shards its pages are in.
    corpus.save_to_disk(str(out), max_shard_size="500MB")
    _write_jsonl(out / "duplicates.jsonl", duplicates)
    reasons: dict[str, int] = {}
    for b in bad:
        kind = b["reason"].split(" (")[0].split(":")[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    return {"settings": cfg.settings(), "files": len(inputs.files), "pages": len(corpus),
            "documents": len(complete), "duplicate_pages": len(duplicates), "bad_files": len(bad),
            "bad_reasons": reasons, "ignored_files": len(inputs.ignored), "ignored_examples": inputs.ignored[:5],
            "skipped_symlinks": len(inputs.skipped), "truncated_documents": len(truncated),
            "truncated_pages": sum(t["pages_skipped"] for t in truncated)}


def _select_pages(merged, complete_docs: set[str], max_pages: int) -> tuple[list[int], list[dict]]:
    """Rows to keep, in (document, page) order: pages of complete documents, each page once, the
    first of each content; and the dropped duplicates."""
    # Plain lists: indexing a datasets Column one row at a time costs a table slice per row.
    columns = merged.select_columns(["document_id", "page_number", "content_hash"]).to_dict()
    docs, numbers, hashes = columns["document_id"], columns["page_number"], columns["content_hash"]
    order = sorted(range(len(merged)), key=lambda i: (docs[i], numbers[i]))
    first: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()
    keep, duplicates = [], []
    for i in order:
        # A file that failed on some pages is left out whole; a page range rendered twice (shards of
        # two runs) counts once.
        if docs[i] not in complete_docs or numbers[i] > max_pages or (docs[i], numbers[i]) in seen:
            continue
        seen.add((docs[i], numbers[i]))
        j = first.setdefault(hashes[i], i)
        if j == i:
            keep.append(i)
        else:
            duplicates.append({"page_id": f"{docs[i]}#{numbers[i]}", "duplicate_of": f"{docs[j]}#{numbers[j]}"})
    return keep, duplicates


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def check_complete(path: str | Path) -> None:
    """ValueError with the fix when ``path`` is an unfinished ``pages build`` output."""
    path = Path(path)
    if (path / SETTINGS_FILE).is_file() and not (path / MARKER_FILE).is_file():
        raise ValueError(f"{path} is an unfinished `dist-vdr pages build`: rerun the same command to resume it")


def format_summary(summary: dict, out: str) -> str:
    lines = [f"{summary['pages']} pages from {summary['documents']} documents in {out}"
             + (" (already built; --overwrite to rebuild)" if summary.get("already_built") else "")]
    if summary.get("pages_per_s") is not None and summary.get("pages_rendered_now"):
        lines.append(f"rendered {summary['pages_rendered_now']} pages in {summary['seconds']:.1f} s "
                     f"({summary['pages_per_s']:.1f} pages/s)")
    if summary["duplicate_pages"]:
        lines.append(f"{summary['duplicate_pages']} duplicate pages dropped (listed in {out}/duplicates.jsonl)")
    if summary["bad_files"]:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(summary["bad_reasons"].items()))
        lines.append(f"{summary['bad_files']} bad files skipped ({kinds}; see {out}/bad_files.jsonl)")
    if summary.get("truncated_documents"):
        lines.append(f"{summary['truncated_documents']} documents cut at --max-pages-per-document "
                     f"{summary['settings']['max_pages_per_document']}: {summary['truncated_pages']} pages skipped "
                     f"(see {out}/{SKIPPED_FILE})")
    if summary.get("skipped_symlinks"):
        lines.append(f"{summary['skipped_symlinks']} symlinks not followed (see {out}/{SKIPPED_FILE}; "
                     "--follow-symlinks reads those pointing outside --input)")
    if summary["ignored_files"]:
        lines.append(f"{summary['ignored_files']} files of other types ignored, e.g. {summary['ignored_examples']}")
    return "\n".join(lines)
