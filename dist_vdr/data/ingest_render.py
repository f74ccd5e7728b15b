"""The worker side of a `dist-vdr pages build`: counting a file's pages, rendering PDF pages and
reading images into page rows (bad files as :class:`BadInput` with the reason), and writing one
shard atomically with its records. These functions run in the build's worker processes."""

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
import zlib
from pathlib import Path
from urllib.parse import quote

from dist_vdr.data.ingest_config import PagesBuildConfig
from dist_vdr.data.ingest_inputs import PDF_SUFFIXES

SHARD_RECORDS = "dist_vdr_records.json"
CRASH_ENV = "DIST_VDR_TEST_CRASH_ON_FILE"


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
    # (SIGINT is blocked from birth, see ingest_workers._map; ignored too in case a library unblocks it.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    Image.MAX_IMAGE_PIXELS = None  # the bomb check is ours (BadInput with the size), not a warning
    datasets.disable_progress_bars()  # one bar per shard save would bury the build's own bar
    # tqdm's default lock is a multiprocessing one, registered with the resource tracker: a worker
    # ended by a Ctrl-C would leave it behind, and the tracker warns of a leak at exit.
    tqdm.set_lock(threading.RLock())
