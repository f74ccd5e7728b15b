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

Work is split into shards of ``files_per_shard`` files rendered in parallel processes; each shard
is written beside its final name and renamed into place, then its files are appended to
``manifest.jsonl``. An interrupted build therefore resumes with the files the manifest lacks and
loses nothing already written. Bad inputs (corrupt or encrypted PDF, zero pages, undecodable
image, decompression bomb, a file that crashes the renderer process) are skipped and summarised
(``bad_files.jsonl``); they are tried again on resume, so a fixed file joins. At the end the
shards are merged in (document, page) order, pages whose content repeats an earlier page are
dropped and listed in ``duplicates.jsonl`` (qrels naming them are mapped to the kept page), and
``dist_vdr_pages_build.json`` marks the corpus complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

PDF_SUFFIXES = (".pdf",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")
SETTINGS_FILE = "dist_vdr_pages_settings.json"
MARKER_FILE = "dist_vdr_pages_build.json"
MANIFEST_FILE = "manifest.jsonl"
CRASH_ENV = "DIST_VDR_TEST_CRASH_ON_FILE"


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
    num_workers: int = 0
    """Rendering processes (0: one per CPU core)."""

    def __post_init__(self) -> None:
        if not Path(self.input_dir).is_dir():
            raise ValueError(f"--input {self.input_dir} is not a folder of PDFs/images")
        if self.dpi <= 0 or self.max_pixels < 1 or self.max_image_pixels < 1 or self.files_per_shard < 1:
            raise ValueError("--dpi, --max-pixels, --max-image-pixels and --files-per-shard must be positive")
        if self.image_format not in ("png", "jpeg"):
            raise ValueError(f"--image-format must be png or jpeg, got {self.image_format!r}")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0 (0: one per core), got {self.num_workers}")

    def settings(self) -> dict:
        """What decides the pages' content: a resume with other settings would mix two corpora."""
        keep = ("dpi", "max_pixels", "max_image_pixels", "text", "image_format")
        return {"input_dir": str(Path(self.input_dir).resolve()), **{k: getattr(self, k) for k in keep}}


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


def find_inputs(input_dir: str | Path) -> tuple[list[str], list[str]]:
    """(supported files, ignored files) as sorted POSIX paths relative to ``input_dir``."""
    root = Path(input_dir)
    found, ignored = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = path.relative_to(root).as_posix()
        (found if path.suffix.lower() in PDF_SUFFIXES + IMAGE_SUFFIXES else ignored).append(rel)
    return found, ignored


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


def _pdf_pages(path: Path, cfg: PagesBuildConfig):
    import pypdfium2 as pdfium

    try:
        pdf = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as exc:
        code = getattr(exc, "err_code", None)
        # PDFium reports a document without a page tree as "Success" (code 0): it opens no pages.
        reason = {0: "no pages", 4: "encrypted (password required)"}.get(code, f"unreadable PDF ({exc})")
        raise BadInput(reason) from None
    try:
        if len(pdf) == 0:
            raise BadInput("no pages")
        for i in range(len(pdf)):
            page = pdf[i]
            width_pt, height_pt = page.get_size()
            scale = cfg.dpi / 72.0
            pixels = width_pt * height_pt * scale * scale
            if pixels > cfg.max_pixels:  # oversized page boxes render within the budget, not as a bomb
                scale *= (cfg.max_pixels / pixels) ** 0.5
                while math.ceil(width_pt * scale) * math.ceil(height_pt * scale) > cfg.max_pixels:
                    scale *= 0.998  # PDFium rounds the bitmap size up
            im = page.render(scale=scale).to_pil()
            text = page.get_textpage().get_text_range() if cfg.text else ""
            yield i + 1, im, _encode(im, cfg.image_format), text
    finally:
        pdf.close()


def _image_pages(path: Path, cfg: PagesBuildConfig):
    from PIL import Image, ImageSequence

    data = path.read_bytes()
    if not data:
        raise BadInput("empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > cfg.max_image_pixels:
                raise BadInput(f"decompression bomb: {width}x{height} = {width * height / 1e6:.1f} MP "
                               f"> --max-image-pixels {cfg.max_image_pixels / 1e6:.1f} MP")
            frames = [frame.copy() for frame in ImageSequence.Iterator(im)]
    except BadInput:
        raise
    except Exception as exc:
        raise BadInput(f"unreadable image ({type(exc).__name__}: {exc})") from exc
    if len(frames) == 1:
        yield 1, frames[0], data, ""  # stored as it is
        return
    for i, frame in enumerate(frames):
        yield i + 1, frame, _encode(frame.convert("RGB"), "png"), ""


def render_file(root: str | Path, rel: str, cfg: PagesBuildConfig) -> list[dict]:
    """All page rows of one input file; raises BadInput with the reason when it has none."""
    path = Path(root) / rel
    if os.environ.get(CRASH_ENV) == rel:  # fault injection for the tests: native code dying on a file
        os._exit(139)
    pages = _pdf_pages(path, cfg) if path.suffix.lower() in PDF_SUFFIXES else _image_pages(path, cfg)
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


def shard_name(files: list[str]) -> str:
    return "shard-" + hashlib.sha1("\n".join(files).encode()).hexdigest()[:16]


def build_shard(cfg: PagesBuildConfig, files: list[str]) -> tuple[str, list[dict]]:
    """Render ``files`` into one shard (written atomically); returns (shard, per-file records)."""
    import datasets
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # the bomb check is ours (BadInput with the size), not a warning
    datasets.disable_progress_bars()  # one bar per shard save would bury the build's own bar
    rows, records = [], []
    status = Path(cfg.out_dir) / "shards" / f".rendering-{os.getpid()}"  # what this process renders now
    for rel in files:
        status.write_text(rel)
        try:
            got = render_file(cfg.input_dir, rel, cfg)
        except BadInput as exc:
            records.append({"file": rel, "status": "bad", "reason": str(exc)})
            continue
        rows.extend(got)
        records.append({"file": rel, "status": "ok", "pages": len(got)})
    status.write_text("")
    name = shard_name(files)
    shards = Path(cfg.out_dir) / "shards"
    tmp, final = shards / f".tmp-{name}-{os.getpid()}", shards / name
    columns = {k: [r[k] for r in rows] for k in features(cfg.text)}
    datasets.Dataset.from_dict(columns, features=features(cfg.text)).save_to_disk(str(tmp))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for record in records:
        record["shard"] = name
    return name, records


def _read_manifest(out: Path) -> dict[str, dict]:
    path = out / MANIFEST_FILE
    done: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():  # a line cut by a kill is the last one; its shard is simply redone
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if (out / "shards" / record["shard"]).is_dir():
                    done[record["file"]] = record
    return done


def _prepare_output(cfg: PagesBuildConfig, overwrite: bool) -> bool:
    """Create or check the output folder; True when a finished build is already there."""
    out = Path(cfg.out_dir)
    settings_file = out / SETTINGS_FILE
    if overwrite and out.exists():
        shutil.rmtree(out)
    if out.exists() and not settings_file.is_file() and any(out.iterdir()):
        raise ValueError(f"--out {out} exists and is not a page corpus build; choose an empty folder")
    if settings_file.is_file():
        before = json.loads(settings_file.read_text())
        if before != cfg.settings():
            changed = sorted(k for k in cfg.settings() if before.get(k) != cfg.settings()[k])
            raise ValueError(f"--out {out} was built with other settings ({', '.join(changed)}: {before}); "
                             "use the same ones to resume, or --overwrite to rebuild")
        return (out / MARKER_FILE).is_file()
    (out / "shards").mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(cfg.settings(), indent=2))
    return False


def build_pages(cfg: PagesBuildConfig, *, overwrite: bool = False, show_progress: bool = True) -> dict:
    """Build (or resume) the corpus; returns the summary also written to the marker file."""
    from tqdm.auto import tqdm

    out = Path(cfg.out_dir)
    if _prepare_output(cfg, overwrite):
        return {**json.loads((out / MARKER_FILE).read_text()), "already_built": True}
    started = time.perf_counter()
    files, ignored = find_inputs(cfg.input_dir)
    if not files:
        raise ValueError(f"--input {cfg.input_dir} holds no PDF or image files ({', '.join(IMAGE_SUFFIXES)})")
    done = _read_manifest(out)
    pending = [f for f in files if f not in done]
    tasks = [pending[i:i + cfg.files_per_shard] for i in range(0, len(pending), cfg.files_per_shard)]
    workers = min(cfg.num_workers or os.cpu_count() or 1, max(len(tasks), 1))
    bad: list[dict] = []
    new_pages = 0
    bar = tqdm(total=len(pending), unit="file", desc="rendering pages", disable=not show_progress)
    if done:
        bar.write(f"resuming: {len(done)} of {len(files)} files already in {out}")
    with open(out / MANIFEST_FILE, "a") as manifest:
        def record(records: list[dict]) -> None:
            nonlocal new_pages
            for r in records:
                if r["status"] == "ok":
                    manifest.write(json.dumps(r) + "\n")
                    new_pages += r["pages"]
                else:
                    bad.append(r)
            manifest.flush()
            os.fsync(manifest.fileno())
            bar.update(len(records))
            bar.set_postfix(pages=new_pages, bad=len(bad))

        _render_all(cfg, tasks, workers, record, bar)
    bar.close()
    summary = finalize(cfg, files, bad, ignored, show_progress=show_progress)
    seconds = time.perf_counter() - started
    summary.update(seconds=round(seconds, 2), pages_rendered_now=new_pages,
                   pages_per_s=round(new_pages / seconds, 2) if seconds > 0 else None)
    (out / MARKER_FILE).write_text(json.dumps(summary, indent=2))
    shutil.rmtree(out / "shards", ignore_errors=True)  # merged into the corpus; only a resume needed them
    return summary


def _render_all(cfg: PagesBuildConfig, tasks: list[list[str]], workers: int, record, bar) -> None:
    """Run every task in worker processes; a file that crashes its process is found and reported bad.

    When a worker dies, the pool is broken and the files its processes were rendering are unknown
    among the in-flight ones: each worker notes its current file, those files are retried one per
    process (the one that crashes again is bad), and the other tasks go on in a fresh pool.
    """
    status_dir = Path(cfg.out_dir) / "shards"
    while tasks:
        for f in status_dir.glob(".rendering-*"):
            f.unlink()
        finished: set[int] = set()
        try:
            with _pool(workers) as pool:
                futures = {pool.submit(build_shard, cfg, task): i for i, task in enumerate(tasks)}
                for future in as_completed(futures):
                    record(future.result()[1])
                    finished.add(futures[future])
            return
        except BrokenProcessPool:
            suspects = {f.read_text() for f in status_dir.glob(".rendering-*")} - {""}
            if not suspects:
                raise
            bar.write(f"a renderer process crashed while rendering one of {sorted(suspects)}: "
                      "retrying those one per process")
            for rel in sorted(suspects):
                try:
                    with _pool(1) as pool:
                        record(pool.submit(build_shard, cfg, [rel]).result()[1])
                except BrokenProcessPool:
                    record([{"file": rel, "status": "bad", "reason": "crashed the renderer process"}])
            tasks = [[rel for rel in task if rel not in suspects] for i, task in enumerate(tasks) if i not in finished]
            tasks = [task for task in tasks if task]


def _pool(workers: int) -> ProcessPoolExecutor:
    import multiprocessing

    # Always processes, even for one worker: a file that crashes native code must not take the
    # build (and its manifest) down. spawn: PDFium and the parent's threads are not forked half-set.
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def finalize(cfg: PagesBuildConfig, files: list[str], bad: list[dict], ignored: list[str],
             show_progress: bool = True) -> dict:
    """Merge the shards in (document, page) order, drop repeated pages, save the corpus."""
    import datasets

    out = Path(cfg.out_dir)
    done = _read_manifest(out)
    shard_names = sorted({r["shard"] for r in done.values()})
    if not shard_names:
        _write_bad(out, bad)
        raise ValueError(f"no page could be read from {cfg.input_dir}: {len(bad)} bad files "
                         f"(see {out / 'bad_files.jsonl'})")
    parts = [datasets.load_from_disk(str(out / "shards" / name)) for name in shard_names]
    merged = datasets.concatenate_datasets(parts)
    docs, numbers, hashes = merged["document_id"], merged["page_number"], merged["content_hash"]
    order = sorted(range(len(merged)), key=lambda i: (docs[i], numbers[i]))
    first: dict[str, int] = {}
    keep, duplicates = [], []
    for i in order:
        j = first.setdefault(hashes[i], i)
        if j == i:
            keep.append(i)
        else:
            duplicates.append({"page_id": f"{docs[i]}#{numbers[i]}", "duplicate_of": f"{docs[j]}#{numbers[j]}"})
    corpus = merged.select(keep)
    # Arrow files of at most ~500 MB: a rank maps only the shards its pages are in.
    corpus.save_to_disk(str(out), max_shard_size="500MB")
    with open(out / "duplicates.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in duplicates)
    _write_bad(out, bad)
    unused = {p.name for p in (out / "shards").iterdir()} - set(shard_names)
    for name in unused:  # shards of a grouping an interrupted run never recorded
        shutil.rmtree(out / "shards" / name, ignore_errors=True)
    reasons: dict[str, int] = {}
    for b in bad:
        kind = b["reason"].split(" (")[0].split(":")[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    return {"settings": cfg.settings(), "files": len(files), "pages": len(corpus), "documents": len(set(docs)),
            "duplicate_pages": len(duplicates), "bad_files": len(bad), "bad_reasons": reasons,
            "ignored_files": len(ignored), "ignored_examples": ignored[:5]}


def _write_bad(out: Path, bad: list[dict]) -> None:
    with open(out / "bad_files.jsonl", "w") as f:
        f.writelines(json.dumps({"file": b["file"], "reason": b["reason"]}) + "\n" for b in bad)


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
    if summary["ignored_files"]:
        lines.append(f"{summary['ignored_files']} files of other types ignored, e.g. {summary['ignored_examples']}")
    return "\n".join(lines)

