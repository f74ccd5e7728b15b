"""`dist-vdr pages build`: PDFs (made here with PIL and pypdf) and images, broken inputs, duplicates,
the text layer, oversized pages, parallel == serial, exact resume after a SIGKILL, SIGINT/SIGTERM
that stop at once and lose no finished shard, long documents split over shards, the page cap,
symlinks, and input/output folders that --overwrite must not delete."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, kill_tree, launch_env, log_tail, run_cli
from dist_vdr.data.ingest import PagesBuildConfig, build_pages, check_complete, find_inputs, format_summary

# One page with a text layer, written by hand: PIL writes image-only PDFs.
_TEXT_PDF_OBJECTS = [
    "<< /Type /Catalog /Pages 2 0 R >>",
    "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
    "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 100] /Contents 4 0 R "
    "/Resources << /Font << /F1 5 0 R >> >> >>",
    None,  # content stream, below
    "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
]


def _write_pdf(path: Path, objects: list[bytes], xref_shift: int = 0) -> None:
    """A PDF of ``objects`` (object 1 the catalog); ``xref_shift`` puts the cross-reference offsets
    off by that much, as in many hand-written files (readers rebuild the table)."""
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % (o + xref_shift) for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref + xref_shift)
    path.write_bytes(bytes(out))


def _text_pdf(path: Path, text: str) -> None:
    stream = f"BT /F1 12 Tf 10 50 Td ({text}) Tj ET".encode()
    _write_pdf(path, [o.encode() if o else b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream"
                      for o in _TEXT_PDF_OBJECTS])


def _page(colour, size=(170, 220)) -> Image.Image:
    im = Image.new("RGB", size, (250, 250, 250))
    im.paste(colour, (0, 0, size[0], 30))
    return im


def _pdf(path: Path, colours, resolution: float = 20.0) -> None:
    pages = [_page(c) for c in colours]
    pages[0].save(path, save_all=True, append_images=pages[1:], resolution=resolution)


@pytest.fixture()
def documents(tmp_path) -> Path:
    import pypdf

    root = tmp_path / "docs"
    (root / "reports").mkdir(parents=True)
    (root / "scans").mkdir()
    (root / "broken").mkdir()
    _pdf(root / "reports" / "annual 2024.pdf", [(200, 0, 0), (0, 200, 0), (0, 0, 200)])
    _pdf(root / "reports" / "q3.pdf", [(200, 200, 0), (0, 200, 0)])  # page 2 repeats annual 2024.pdf page 2
    _pdf(root / "reports" / "poster.pdf", [(90, 90, 90)], resolution=1.0)  # a 170 x 220 inch page
    _text_pdf(root / "reports" / "memo.pdf", "Quarterly revenue grew")
    _page((10, 120, 200)).save(root / "scans" / "a.png")
    _page((120, 10, 200)).save(root / "scans" / "b.jpg", quality=95)
    shutil.copy(root / "scans" / "a.png", root / "scans" / "copy-of-a.png")  # same content, other file
    frames = [_page((30, 30, 30)), _page((60, 160, 60))]
    frames[0].save(root / "scans" / "fax.tiff", save_all=True, append_images=frames[1:])
    (root / "notes.txt").write_text("not a page")
    # Broken inputs: each must be reported with its reason and skipped.
    writer = pypdf.PdfWriter()
    writer.add_blank_page(100, 100)
    writer.encrypt("secret", algorithm="RC4-128")
    with open(root / "broken" / "encrypted.pdf", "wb") as f:
        writer.write(f)
    with open(root / "broken" / "empty-doc.pdf", "wb") as f:
        pypdf.PdfWriter().write(f)
    # A valid PDF without pages whose offsets are off: PDFium calls it a format error.
    _write_pdf(root / "broken" / "no-pages-rebuilt.pdf",
               [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>"], xref_shift=7)
    (root / "broken" / "zero.pdf").write_bytes(b"")
    (root / "broken" / "truncated.pdf").write_bytes((root / "reports" / "q3.pdf").read_bytes()[:200])
    (root / "broken" / "garbage.png").write_bytes(os.urandom(2000))
    (root / "broken" / "zero.jpg").write_bytes(b"")
    Image.new("1", (10_000, 10_000)).save(root / "broken" / "bomb.png")  # 100 MP: a few KB on disk
    return root


def _rows(out: Path) -> list[tuple]:
    import datasets

    ds = datasets.load_from_disk(str(out))
    return list(zip(ds["page_id"], ds["content_hash"], ds["width"], ds["height"], strict=True))


def test_build_renders_pages_and_reports_bad_inputs(documents, tmp_path):
    import datasets

    out = tmp_path / "corpus"
    cfg = PagesBuildConfig(input_dir=str(documents), out_dir=str(out), dpi=40, max_pixels=500_000, text=True,
                           files_per_shard=3, num_workers=2)
    summary = build_pages(cfg, show_progress=False)
    ds = datasets.load_from_disk(str(out))
    ids = ds["page_id"]
    assert ids == ["reports/annual%202024.pdf#1", "reports/annual%202024.pdf#2", "reports/annual%202024.pdf#3",
                   "reports/memo.pdf#1", "reports/poster.pdf#1", "reports/q3.pdf#1",
                   "scans/a.png#1", "scans/b.jpg#1", "scans/fax.tiff#1", "scans/fax.tiff#2"]
    assert isinstance(ds.features["image"], datasets.Image)
    for row in ds:
        assert row["image"].size == (row["width"], row["height"])
        assert row["page_id"] == f"{row['document_id']}#{row['page_number']}"
    # 20 ppi pages rendered at 40 dpi: twice the pixels per side; the 170 x 220 inch poster is scaled
    # down to the pixel budget instead of rendering 6800 x 8800 px.
    annual = ds[0]
    assert (annual["width"], annual["height"]) == (340, 440)
    poster = ds[ids.index("reports/poster.pdf#1")]
    assert poster["width"] * poster["height"] <= 500_000 and poster["width"] > 500
    assert "Quarterly revenue grew" in ds[ids.index("reports/memo.pdf#1")]["text"]
    assert ds[ids.index("scans/a.png#1")]["text"] == ""
    # Image files are stored as they are (the original bytes).
    raw = ds.cast_column("image", datasets.Image(decode=False))
    assert raw[ids.index("scans/b.jpg#1")]["image"]["bytes"] == (documents / "scans" / "b.jpg").read_bytes()

    dups = [json.loads(line) for line in (out / "duplicates.jsonl").read_text().splitlines()]
    assert dups == [{"page_id": "reports/q3.pdf#2", "duplicate_of": "reports/annual%202024.pdf#2"},
                    {"page_id": "scans/copy-of-a.png#1", "duplicate_of": "scans/a.png#1"}]
    bad = {json.loads(line)["file"]: json.loads(line)["reason"] for line in (out / "bad_files.jsonl").open()}
    assert set(bad) == {f"broken/{n}" for n in ("encrypted.pdf", "empty-doc.pdf", "no-pages-rebuilt.pdf", "zero.pdf",
                                                  "truncated.pdf", "garbage.png", "zero.jpg", "bomb.png")}
    assert bad["broken/encrypted.pdf"].startswith("encrypted")
    assert bad["broken/empty-doc.pdf"] == bad["broken/no-pages-rebuilt.pdf"] == "no pages"
    assert bad["broken/truncated.pdf"].startswith("unreadable PDF")
    assert bad["broken/garbage.png"].startswith("unreadable image")
    assert bad["broken/zero.jpg"] == bad["broken/zero.pdf"] == "empty file"
    assert bad["broken/bomb.png"].startswith("decompression bomb: 10000x10000")
    assert summary["pages"] == 10 and summary["duplicate_pages"] == 2 and summary["bad_files"] == 8
    assert summary["ignored_files"] == 1 and summary["files"] == 16
    assert not (out / "shards").exists()
    # A finished build is not redone; other settings are refused with the fix.
    assert build_pages(cfg, show_progress=False)["already_built"]
    with pytest.raises(ValueError, match="other settings .*dpi"):
        build_pages(PagesBuildConfig(input_dir=str(documents), out_dir=str(out), dpi=72), show_progress=False)


@pytest.fixture(scope="module")
def many_docs(tmp_path_factory) -> Path:
    """48 PDFs of 4 pages: enough work for a build to be interrupted midway."""
    docs = tmp_path_factory.mktemp("many") / "docs"
    docs.mkdir()
    for d in range(48):
        _pdf(docs / f"doc-{d:03d}.pdf", [((d * 5) % 256, p * 60, 90) for p in range(4)], resolution=10.0)
    return docs


@pytest.fixture(scope="module")
def whole(many_docs) -> Path:
    """The uninterrupted build of ``many_docs`` (2 workers, whole files per shard)."""
    out = many_docs.parent / "whole"
    built = run_cli(["pages", "build", "--input", str(many_docs), "--out", str(out), "--num-workers", "2",
                     "--files-per-shard", "5", "--dpi", "30", "--quiet"])
    assert built.returncode == 0, log_tail(built.stdout + built.stderr)
    assert "192 pages from 48 documents" in built.stdout
    return out


def _build_args(docs: Path, out: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "dist_vdr.cli", "pages", "build", "--input", str(docs), "--out", str(out),
            "--dpi", "30", "--quiet", *more]


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait_until(victim: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert victim.poll() is None, "the build ended before it could be interrupted"
        assert time.time() < deadline, "the build never got far enough to be interrupted"
        time.sleep(0.01)


def _partial(out: Path) -> Path:
    """Where an unfinished build of ``out`` lives (the output guard's resumable scratch folder beside it)."""
    return out.parent / f".{out.name}.pages-build-partial"


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _recorded_on_disk(out: Path) -> list[dict]:
    """The records of every shard renamed into place (written with it, whether or not the build
    lived to append them to the manifest)."""
    return [r for shard in sorted((out / "shards").glob("shard-*"))
            for r in json.loads((shard / "dist_vdr_records.json").read_text())]


def test_killed_build_resumes_to_the_same_corpus(many_docs, whole):
    """SIGKILL mid-build; the rerun keeps every shard already written (recorded or not) and ends with
    the corpus an uninterrupted (and differently parallel) build makes."""
    out = many_docs.parent / "killed"
    args = _build_args(many_docs, out, "--num-workers", "1", "--files-per-shard", "1")
    victim = subprocess.Popen(args, cwd=REPO, env=launch_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    manifest = _partial(out) / "manifest.jsonl"
    _wait_until(victim, lambda: manifest.is_file() and manifest.read_text().count("\n") >= 3)
    kill_tree(victim)
    # A shard may have been renamed into place after the last manifest line: the resume adopts it.
    done_before = len({r["file"] for r in _recorded_on_disk(_partial(out))})
    assert 3 <= done_before < 48
    assert not out.exists()  # the unfinished build is beside --out, hidden, never in its place
    with pytest.raises(ValueError, match="unfinished .*rerun"):
        check_complete(_partial(out))  # the loaders refuse a half-built corpus with the fix

    again = run_cli(args[3:])
    assert again.returncode == 0, log_tail(again.stdout + again.stderr)
    assert f"resuming: {done_before} of 48 files" in again.stdout + again.stderr
    assert json.loads((out / "dist_vdr_pages_build.json").read_text())["pages_rendered_now"] == 192 - 4 * done_before
    assert _rows(out) == _rows(whole)
    files = [r["file"] for r in _manifest(out)]
    assert len(files) == len(set(files)) == 48  # every file recorded once


@pytest.mark.parametrize("signum,to_group", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c-to-the-process-group", "sigterm-to-the-builder"])
def test_a_signal_stops_the_build_at_once_and_loses_no_finished_shard(many_docs, whole, signum, to_group):
    """SIGINT (Ctrl-C: the whole process group) or SIGTERM (the builder only) after the first shard:
    the build exits within seconds with the signal's status and a message saying how to resume, its
    workers are gone, every shard on disk is in the manifest, and the rerun renders only the pages
    the manifest lacks (3-page shards of 4-page documents: documents half done too) and ends with
    the uninterrupted build's corpus."""
    import psutil

    out = many_docs.parent / f"stopped-{signum.name}"
    args = _build_args(many_docs, out, "--num-workers", "2", "--files-per-shard", "2", "--pages-per-shard", "3")
    victim = _start(args)
    try:
        _wait_until(victim, lambda: any((_partial(out) / "shards").glob("shard-*")))
        workers = psutil.Process(victim.pid).children(recursive=True)
        sent = time.time()
        if to_group:
            os.killpg(victim.pid, signum)
        else:
            victim.send_signal(signum)
        stdout, stderr = victim.communicate(timeout=60)
        took = time.time() - sent
    finally:
        if victim.poll() is None:
            kill_tree(victim)
    assert victim.returncode == 128 + signum, log_tail(stdout + stderr)
    assert took < 3, f"took {took:.1f} s to stop"
    assert f"interrupted by {signum.name}" in stderr and "rerun the same command to resume" in stderr, stderr
    assert "Traceback" not in stderr, log_tail(stderr)
    gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, f"workers left running: {alive}"

    assert not out.exists()
    recorded = _manifest(_partial(out))
    on_disk = {p.name for p in (_partial(out) / "shards").iterdir()}
    assert on_disk == {r["shard"] for r in recorded}  # no half-written shard, none unrecorded
    assert sorted(map(json.dumps, recorded)) == sorted(map(json.dumps, _recorded_on_disk(_partial(out))))
    pages_done = sum(r["pages"] for r in recorded)
    assert 0 < pages_done < 192, "the signal came too late to test anything"

    again = run_cli(args[3:])
    assert again.returncode == 0, log_tail(again.stdout + again.stderr)
    pages_of = {}
    for r in recorded:
        pages_of[r["file"]] = pages_of.get(r["file"], 0) + r["pages"]
    files_done = sum(n == 4 for n in pages_of.values())
    if files_done:
        assert f"resuming: {files_done} of 48 files" in again.stdout + again.stderr
    summary = json.loads((out / "dist_vdr_pages_build.json").read_text())
    assert summary["pages_rendered_now"] == 192 - pages_done  # nothing rendered twice
    assert _rows(out) == _rows(whole)
    assert (out / "duplicates.jsonl").read_text() == (whole / "duplicates.jsonl").read_text()
    units = [(r["file"], r["first_page"], r["last_page"]) for r in _manifest(out)]
    assert len(units) == len(set(units)) == 96  # every page range recorded once


def test_a_file_that_crashes_its_renderer_is_isolated(tmp_path, monkeypatch):
    """Native code dying on one file (here: injected) costs that file only, not the build."""
    from dist_vdr.data import ingest

    docs = tmp_path / "docs"
    docs.mkdir()
    for d in range(6):
        _pdf(docs / f"doc-{d}.pdf", [(d * 40, 90, 90), (90, d * 40, 90)])
    monkeypatch.setenv(ingest.CRASH_ENV, "doc-3.pdf")
    summary = build_pages(PagesBuildConfig(input_dir=str(docs), out_dir=str(tmp_path / "out"), dpi=20,
                                           files_per_shard=3, num_workers=2), show_progress=False)
    assert summary["pages"] == 10 and summary["bad_files"] == 1
    bad = [json.loads(line) for line in (tmp_path / "out" / "bad_files.jsonl").open()]
    assert bad == [{"file": "doc-3.pdf", "reason": "crashed the renderer process"}]
    assert "doc-3.pdf#1" not in _rows(tmp_path / "out")[0] and len(_rows(tmp_path / "out")) == 10


def test_overwrite_never_deletes_the_input_or_a_folder_that_is_not_a_build(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    _pdf(docs / "a.pdf", [(200, 0, 0)])
    # --out = --input with --overwrite: refused by the command (exit 2, one error line with the fix).
    same = run_cli(["pages", "build", "--input", str(docs), "--out", str(docs), "--overwrite", "--quiet"])
    assert same.returncode == 2, log_tail(same.stdout + same.stderr)
    assert re.fullmatch(r"error: --out .* is --input .* or inside it .*choose an --out outside the input folder\n",
                        same.stderr), same.stderr
    assert sorted(p.name for p in docs.iterdir()) == ["a.pdf"]
    # Inside each other, also through a symlink.
    (tmp_path / "link").symlink_to(docs)
    for out in (docs / "corpus", tmp_path / "link", tmp_path / "link" / "corpus", tmp_path):
        with pytest.raises(ValueError, match="choose an --out outside the input folder"):
            PagesBuildConfig(input_dir=str(docs), out_dir=str(out))
    # --overwrite of a folder that is not a build output: refused, nothing deleted.
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "chapter1.tex").write_text("precious")
    cfg = PagesBuildConfig(input_dir=str(docs), out_dir=str(other), dpi=20, num_workers=1)
    with pytest.raises(ValueError, match="--out .* is a folder that is not an output of `pages build`.*choose a new"):
        build_pages(cfg, overwrite=True, show_progress=False)
    assert (other / "chapter1.tex").read_text() == "precious"
    # A build output is rebuilt by --overwrite.
    cfg = PagesBuildConfig(input_dir=str(docs), out_dir=str(tmp_path / "corpus"), dpi=20, num_workers=1)
    assert build_pages(cfg, show_progress=False)["pages"] == 1
    (tmp_path / "corpus" / "stale.txt").write_text("from an earlier build")
    assert build_pages(cfg, overwrite=True, show_progress=False)["pages"] == 1
    assert not (tmp_path / "corpus" / "stale.txt").exists()


def test_long_documents_span_shards_and_the_page_cap(tmp_path):
    """A document longer than a shard is split into page ranges over several shards (a worker holds
    at most --pages-per-shard pages) with the same corpus as whole-file shards; pages past
    --max-pages-per-document are skipped and listed."""
    docs = tmp_path / "docs"
    docs.mkdir()
    _pdf(docs / "long.pdf", [(p * 10, 90, 200 - p * 5) for p in range(23)])
    _pdf(docs / "short.pdf", [(1, 2, 3), (20, 90, 190)])  # page 2 repeats long.pdf page 3
    _page((9, 9, 9)).save(docs / "scan.png")

    def build(name: str, **settings) -> dict:
        cfg = PagesBuildConfig(input_dir=str(docs), out_dir=str(tmp_path / name), dpi=20, num_workers=2, **settings)
        return build_pages(cfg, show_progress=False)

    build("whole-files", pages_per_shard=1000)
    summary = build("split", pages_per_shard=5)
    assert summary["pages"] == 25 and summary["duplicate_pages"] == 1
    assert _rows(tmp_path / "split") == _rows(tmp_path / "whole-files")
    for name in ("duplicates.jsonl", "bad_files.jsonl"):
        assert (tmp_path / "split" / name).read_text() == (tmp_path / "whole-files" / name).read_text()
    units = _manifest(tmp_path / "split")
    assert sorted((r["first_page"], r["last_page"]) for r in units if r["file"] == "long.pdf") == [
        (1, 5), (6, 10), (11, 15), (16, 20), (21, 23)]
    per_shard = {}
    for r in units:
        per_shard[r["shard"]] = per_shard.get(r["shard"], 0) + r["pages"]
    assert max(per_shard.values()) <= 5 and sum(per_shard.values()) == 26

    capped = build("capped", pages_per_shard=5, max_pages_per_document=20)
    assert capped["pages"] == 22 and capped["truncated_documents"] == 1 and capped["truncated_pages"] == 3
    assert [r[0] for r in _rows(tmp_path / "capped")] == [f"long.pdf#{p}" for p in range(1, 21)] + [
        "scan.png#1", "short.pdf#1"]
    skipped = [json.loads(line) for line in (tmp_path / "capped" / "skipped.jsonl").open()]
    assert skipped == [{"file": "long.pdf", "reason": "23 pages: pages 21-23 skipped (--max-pages-per-document 20)",
                        "pages_skipped": 3}]
    assert "1 documents cut at --max-pages-per-document 20: 3 pages skipped" in format_summary(capped, "capped")


def test_symlinks_outside_the_input_are_listed_and_followed_only_when_asked(tmp_path):
    docs, elsewhere = tmp_path / "docs", tmp_path / "elsewhere"
    (docs / "sub").mkdir(parents=True)
    (elsewhere / "more").mkdir(parents=True)
    _pdf(docs / "sub" / "a.pdf", [(200, 0, 0)])
    _pdf(elsewhere / "secret.pdf", [(0, 200, 0)])
    _pdf(elsewhere / "more" / "b.pdf", [(0, 0, 200)])
    (docs / "secret.pdf").symlink_to(elsewhere / "secret.pdf")  # a file outside
    (docs / "more").symlink_to(elsewhere / "more")  # a folder outside
    (docs / "alias.pdf").symlink_to(docs / "sub" / "a.pdf")  # a file inside: read (a duplicate)
    (docs / "sub-again").symlink_to(docs / "sub")  # a folder inside: read at its own path
    (docs / "dangling.pdf").symlink_to(tmp_path / "gone.pdf")
    (elsewhere / "more" / "loop").symlink_to(elsewhere)  # followed, it would come back here

    found = find_inputs(docs)
    assert found.files == ["alias.pdf", "sub/a.pdf"]
    reasons = {s["file"]: s["reason"] for s in found.skipped}
    assert set(reasons) == {"dangling.pdf", "more", "secret.pdf", "sub-again"}
    assert reasons["dangling.pdf"] == "broken symlink"
    assert reasons["secret.pdf"].endswith("outside --input: not followed (pass --follow-symlinks to read it)")
    assert "a folder inside --input (read there)" in reasons["sub-again"]
    followed = find_inputs(docs, follow_symlinks=True)
    # A loop ends at the first folder read twice.
    assert followed.files == ["alias.pdf", "more/b.pdf", "more/loop/secret.pdf", "secret.pdf", "sub/a.pdf"]
    assert [s["file"] for s in followed.skipped] == ["dangling.pdf", "more/loop/more", "sub-again"]

    summary = build_pages(PagesBuildConfig(input_dir=str(docs), out_dir=str(tmp_path / "corpus"), dpi=20,
                                           num_workers=1), show_progress=False)
    assert summary["pages"] == 1 and summary["skipped_symlinks"] == 4
    listed = [json.loads(line) for line in (tmp_path / "corpus" / "skipped.jsonl").open()]
    assert [s["file"] for s in listed] == ["dangling.pdf", "more", "secret.pdf", "sub-again"]
    assert "4 symlinks not followed" in format_summary(summary, "corpus")

