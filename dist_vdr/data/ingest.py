"""`dist-vdr pages build`: a folder of PDFs and page images -> a page corpus dataset on disk.

Every page of every PDF is rendered with pypdfium2 (``dpi``, scaled down to at most ``max_pixels``),
image files are stored as they are (their original bytes; multi-frame TIFFs give one PNG per
frame). The result is a ``datasets.Dataset`` written with ``save_to_disk`` (memory-mapped Arrow
shards) with the columns of :func:`features`:

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

This module runs the build: the output folder and its settings, the manifest, the two phases and
the merge. The parts it drives live beside it: the settings in :mod:`.ingest_config`, finding the
inputs in :mod:`.ingest_inputs`, planning the shards in :mod:`.ingest_plan`, the worker pool and
signal handling in :mod:`.ingest_workers`, and the work done in the workers (counting, rendering,
writing a shard) in :mod:`.ingest_render`; their public names are importable from here too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from pathlib import Path

from dist_vdr.data.ingest_config import BuildInterrupted as BuildInterrupted
from dist_vdr.data.ingest_config import PagesBuildConfig as PagesBuildConfig
from dist_vdr.data.ingest_config import check_disjoint as check_disjoint
from dist_vdr.data.ingest_inputs import IMAGE_SUFFIXES as IMAGE_SUFFIXES
from dist_vdr.data.ingest_inputs import PDF_SUFFIXES as PDF_SUFFIXES
from dist_vdr.data.ingest_inputs import Inputs as Inputs
from dist_vdr.data.ingest_inputs import find_inputs as find_inputs
from dist_vdr.data.ingest_plan import _complete_files, _coverage
from dist_vdr.data.ingest_plan import plan_shards as plan_shards
from dist_vdr.data.ingest_render import CRASH_ENV as CRASH_ENV
from dist_vdr.data.ingest_render import SHARD_RECORDS as SHARD_RECORDS
from dist_vdr.data.ingest_render import BadInput as BadInput
from dist_vdr.data.ingest_render import build_shard as build_shard
from dist_vdr.data.ingest_render import count_files as count_files
from dist_vdr.data.ingest_render import count_pages as count_pages
from dist_vdr.data.ingest_render import document_id as document_id
from dist_vdr.data.ingest_render import features as features
from dist_vdr.data.ingest_render import render_file as render_file
from dist_vdr.data.ingest_render import shard_name as shard_name
from dist_vdr.data.ingest_workers import _item_file, _remove_leftovers, _run_isolated, _StopSignals, _Workers

SETTINGS_FILE = "dist_vdr_pages_settings.json"
MARKER_FILE = "dist_vdr_pages_build.json"
MANIFEST_FILE = "manifest.jsonl"
SKIPPED_FILE = "skipped.jsonl"
COUNT_FILES_PER_TASK = 64  # counting pages is cheap: large tasks keep the process round trips few


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


# --------------------------------------------------------------------------------------------
# The build


def _prepare_output(cfg: PagesBuildConfig, overwrite: bool, keep: tuple[str, ...] = ()) -> None:
    """Start or check the build folder (``keep``: files of the output guard, left as they are)."""
    out = Path(cfg.out_dir)
    if overwrite:
        for child in out.iterdir():
            if child.name in keep:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    if (out / SETTINGS_FILE).is_file():
        _check_settings(out, cfg)
        (out / "shards").mkdir(exist_ok=True)
        return
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / SETTINGS_FILE).write_text(json.dumps(cfg.settings(), indent=2))


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

    The build goes into a hidden folder beside ``--out`` (the output guard's resumable scratch folder: a
    killed build goes on from it) and is renamed to ``--out`` once the corpus is complete.
    Raises :class:`BuildInterrupted` on SIGINT/SIGTERM, after recording every finished shard.
    """
    from dist_vdr.outputs import MARKER as OUTPUT_MARKER
    from dist_vdr.outputs import Output

    final = Path(cfg.out_dir)
    output = Output("pages build", "--out", final, {"--input": cfg.input_dir}, resumable=True,
                    earlier=(MARKER_FILE, SETTINGS_FILE, MANIFEST_FILE)).check()
    if (final / MARKER_FILE).is_file() and not overwrite:
        _check_settings(final, cfg)
        return {**json.loads((final / MARKER_FILE).read_text()), "already_built": True}
    started = time.perf_counter()
    inputs = find_inputs(cfg.input_dir, cfg.follow_symlinks)
    if not inputs.files:
        raise ValueError(f"--input {cfg.input_dir} holds no PDF or image files ({', '.join(IMAGE_SUFFIXES)})")
    with output.writing() as scratch:
        cfg = dataclasses.replace(cfg, out_dir=str(scratch))
        _prepare_output(cfg, overwrite, keep=(OUTPUT_MARKER,))
        with _StopSignals() as stop:
            recorder = _render(cfg, inputs.files, stop, show_progress)
            stop.immediate = True  # merging has no safe points: a signal now stops it at once
            try:
                stop.check()
                summary = finalize(cfg, inputs, [{"file": f, "reason": r} for f, r in recorder.bad.items()])
                seconds = time.perf_counter() - started
                summary.update(seconds=round(seconds, 2), pages_rendered_now=recorder.new_pages,
                               pages_per_s=round(recorder.new_pages / seconds, 2) if seconds > 0 else None)
                (scratch / MARKER_FILE).write_text(json.dumps(summary, indent=2))
            except BuildInterrupted as exc:
                raise BuildInterrupted(exc.signum, f"interrupted by {signal.Signals(exc.signum).name} while "
                                       "merging the shards (every page is rendered); rerun the same command to "
                                       "finish") from None
            stop.immediate = False  # the corpus is complete: what is left is tidying up
        shutil.rmtree(scratch / "shards", ignore_errors=True)  # merged into the corpus; only a resume needed them
    return summary


def _check_settings(out: Path, cfg: PagesBuildConfig) -> None:
    settings_file = out / SETTINGS_FILE
    if settings_file.is_file():
        # Settings added since a build was started take this run's values: its pages did not depend on them.
        before = {**cfg.settings(), **json.loads(settings_file.read_text())}
        if before != cfg.settings():
            changed = sorted(k for k in cfg.settings() if before.get(k) != cfg.settings()[k])
            raise ValueError(f"--out {cfg.out_dir} was built with other settings ({', '.join(changed)}: {before}); "
                             "use the same ones to resume, or --overwrite to rebuild")


def finalize(cfg: PagesBuildConfig, inputs: Inputs, bad: list[dict]) -> dict:
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
