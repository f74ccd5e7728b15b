"""Checkpoint validation and the resume decision (no process group: rank 0 alone)."""

from __future__ import annotations

import pytest

from dist_vdr import checkpoint as ckpt


def _make(out, step, complete=True):
    d = out / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x")
    if complete:
        ckpt.write_marker(d, {"step": step})
    return d


def test_latest_complete_skips_unmarked(tmp_path):
    _make(tmp_path, 2)
    four = _make(tmp_path, 4)
    _make(tmp_path, 6, complete=False)
    assert ckpt.latest_complete(tmp_path) == four
    assert [(s, ok) for s, _, ok in ckpt.list_checkpoints(tmp_path)] == [(2, True), (4, True), (6, False)]


def test_corrupt_marker_is_incomplete(tmp_path):
    d = _make(tmp_path, 2)
    (d / ckpt.MARKER_FILE).write_text("{trunc")
    assert not ckpt.is_complete(d)


def test_auto_resume_sets_incomplete_aside_without_deleting(tmp_path):
    _make(tmp_path, 2)
    _make(tmp_path, 4, complete=False)
    chosen = ckpt.decide_resume(tmp_path, resume=None, no_resume=False, is_main=True)
    assert chosen == str(tmp_path / "checkpoint-2")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("incomplete-checkpoint-4-")]
    assert len(aside) == 1 and (aside[0] / "model.safetensors").read_bytes() == b"x"
    assert not (tmp_path / "checkpoint-4").exists()


def test_fresh_output_dir_starts_from_scratch(tmp_path):
    assert ckpt.decide_resume(tmp_path / "new", resume=None, no_resume=False, is_main=True) is None


def test_explicit_resume(tmp_path):
    two = _make(tmp_path, 2)
    bad = _make(tmp_path, 4, complete=False)
    assert ckpt.decide_resume(tmp_path, resume=str(two), no_resume=False, is_main=True) == str(two)
    with pytest.raises(ValueError, match="incomplete"):
        ckpt.decide_resume(tmp_path, resume=str(bad), no_resume=False, is_main=True)
    with pytest.raises(ValueError, match="no such checkpoint"):
        ckpt.decide_resume(tmp_path, resume=str(tmp_path / "checkpoint-9"), no_resume=False, is_main=True)


def test_no_resume_refuses_to_overwrite(tmp_path):
    _make(tmp_path, 2)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        ckpt.decide_resume(tmp_path, resume=None, no_resume=True, is_main=True)
    assert ckpt.decide_resume(tmp_path / "other", resume=None, no_resume=True, is_main=True) is None
