"""`dist-vdr pages build`: PDFs (made here with PIL and pypdf) and images, broken inputs, duplicates,
the text layer, oversized pages, parallel == serial, and exact resume after a SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, kill_tree, launch_env, log_tail, run_cli
from PIL import Image

from dist_vdr.data.ingest import PagesBuildConfig, build_pages, check_complete

# One page with a text layer, written by hand: PIL writes image-only PDFs.
_TEXT_PDF_OBJECTS = [
    "<< /Type /Catalog /Pages 2 0 R >>",
    "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
    "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 100] /Contents 4 0 R "
    "/Resources << /Font << /F1 5 0 R >> >> >>",
    None,  # content stream, below
    "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
]


def _text_pdf(path: Path, text: str) -> None:
    stream = f"BT /F1 12 Tf 10 50 Td ({text}) Tj ET".encode()
    objects = [o.encode() if o else b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream"
               for o in _TEXT_PDF_OBJECTS]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))


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
    (root / "broken" / "truncated.pdf").write_bytes((root / "reports" / "q3.pdf").read_bytes()[:200])
    (root / "broken" / "garbage.png").write_bytes(os.urandom(2000))
    (root / "broken" / "zero.jpg").write_bytes(b"")
    Image.new("1", (10_000, 10_000)).save(root / "broken" / "bomb.png")  # 100 MP: a few KB on disk
    return root


def _rows(out: Path) -> list[tuple]:
    import datasets

    ds = datasets.load_from_disk(str(out))
    return list(zip(ds["page_id"], ds["content_hash"], ds["width"], ds["height"]))


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
    assert set(bad) == {f"broken/{n}" for n in ("encrypted.pdf", "empty-doc.pdf", "truncated.pdf", "garbage.png",
                                                  "zero.jpg", "bomb.png")}
    assert bad["broken/encrypted.pdf"].startswith("encrypted")
    assert bad["broken/empty-doc.pdf"] == "no pages"
    assert bad["broken/truncated.pdf"].startswith("unreadable PDF")
    assert bad["broken/garbage.png"].startswith("unreadable image")
    assert bad["broken/zero.jpg"] == "empty file"
    assert bad["broken/bomb.png"].startswith("decompression bomb: 10000x10000")
    assert summary["pages"] == 10 and summary["duplicate_pages"] == 2 and summary["bad_files"] == 6
    assert summary["ignored_files"] == 1 and summary["files"] == 14
    assert not (out / "shards").exists()
    # A finished build is not redone; other settings are refused with the fix.
    assert build_pages(cfg, show_progress=False)["already_built"]
    with pytest.raises(ValueError, match="other settings .*dpi"):
        build_pages(PagesBuildConfig(input_dir=str(documents), out_dir=str(out), dpi=72), show_progress=False)


def test_killed_build_resumes_to_the_same_corpus(tmp_path):
    """SIGKILL mid-build; the rerun keeps every shard already written and ends with the corpus an
    uninterrupted (and differently parallel) build makes."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for d in range(48):
        _pdf(docs / f"doc-{d:03d}.pdf", [((d * 5) % 256, p * 60, 90) for p in range(4)], resolution=10.0)
    whole = run_cli(["pages", "build", "--input", str(docs), "--out", str(tmp_path / "whole"), "--num-workers", "2",
                     "--files-per-shard", "5", "--dpi", "30", "--quiet"])
    assert whole.returncode == 0, log_tail(whole.stdout + whole.stderr)
    assert "192 pages from 48 documents" in whole.stdout

    out = tmp_path / "resumed"
    args = [sys.executable, "-m", "dist_vdr.cli", "pages", "build", "--input", str(docs), "--out", str(out),
            "--num-workers", "1", "--files-per-shard", "1", "--dpi", "30", "--quiet"]
    victim = subprocess.Popen(args, cwd=REPO, env=launch_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    manifest = out / "manifest.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (manifest.is_file() and manifest.read_text().count("\n") >= 3):
        assert victim.poll() is None, "the build ended before it could be interrupted"
        time.sleep(0.01)
    kill_tree(victim)
    done_before = manifest.read_text().count("\n")
    assert 3 <= done_before < 48
    with pytest.raises(ValueError, match="unfinished .*rerun"):
        check_complete(out)  # the loaders refuse a half-built corpus with the fix

    again = run_cli(args[3:])
    assert again.returncode == 0, log_tail(again.stdout + again.stderr)
    assert f"resuming: {done_before} of 48 files" in again.stdout + again.stderr
    assert _rows(out) == _rows(tmp_path / "whole")
    files = [json.loads(line)["file"] for line in manifest.read_text().splitlines()]
    assert len(files) == len(set(files)) == 48  # every file recorded once


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
