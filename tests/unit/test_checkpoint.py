"""Checkpoint validation, verification and the resume decision (no process group: rank 0 alone)."""

from __future__ import annotations

import json

import pytest

from dist_vdr.checkpoints import store as ckpt
from dist_vdr.distributed import DistInfo

ONE = DistInfo()


def _make(out, step, complete=True, payload=b"x" * 1000):
    d = out / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(payload)
    (d / "optimizer.pt").write_bytes(b"o" * 300)
    (d / "sub").mkdir()
    (d / "sub" / "shard.bin").write_bytes(b"s" * 50)
    if complete:
        ckpt.mark_complete(d, ONE, {"step": step})
    return d


def _decide(out, resume=None, no_resume=False, log=None):
    return ckpt.decide_resume(out, resume=resume, no_resume=no_resume, info=ONE, log=log or (lambda m: None))


def test_latest_complete_skips_unmarked(tmp_path):
    _make(tmp_path, 2)
    four = _make(tmp_path, 4)
    _make(tmp_path, 6, complete=False)
    assert ckpt.latest_complete(tmp_path) == four
    assert [(s, ok) for s, _, ok in ckpt.list_checkpoints(tmp_path)] == [(2, True), (4, True), (6, False)]


def test_marker_records_every_file_with_size_and_hash(tmp_path):
    d = _make(tmp_path, 2)
    marker = json.loads((d / ckpt.MARKER_FILE).read_text())
    assert marker["hash"] == "xxh3_128" and marker["step"] == 2 and marker["world_size"] == 1
    assert sorted(marker["files"]) == ["model.safetensors", "optimizer.pt", "sub/shard.bin"]
    assert marker["files"]["optimizer.pt"]["size"] == 300
    assert marker["files"]["model.safetensors"]["xxh3_128"] == ckpt.file_digest(d / "model.safetensors")
    assert ckpt.verify(d, ONE) == []


def test_corrupt_marker_is_incomplete(tmp_path):
    d = _make(tmp_path, 2)
    (d / ckpt.MARKER_FILE).write_text("{trunc")
    assert not ckpt.is_complete(d)


@pytest.mark.parametrize("damage", ["overwrite", "truncate", "delete"])
def test_verification_finds_damage(tmp_path, damage):
    d = _make(tmp_path, 2)
    target = d / "model.safetensors"
    if damage == "overwrite":  # same size, other bytes: only the hash can tell
        with open(target, "r+b") as f:
            f.seek(100)
            f.write(b"\xff" * 64)
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:500])
    else:
        (d / "optimizer.pt").unlink()
    problems = ckpt.verify(d, ONE)
    assert len(problems) == 1
    assert {"overwrite": "does not match", "truncate": "has 500 bytes", "delete": "optimizer.pt is missing"}[
        damage] in problems[0]


def test_damaged_newest_checkpoint_is_set_aside_and_the_older_one_used(tmp_path):
    _make(tmp_path, 2)
    four = _make(tmp_path, 4)
    (four / "optimizer.pt").write_bytes(b"random")
    said = []
    chosen = _decide(tmp_path, log=said.append)
    assert chosen == str(tmp_path / "checkpoint-2")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("corrupt-checkpoint-4-")]
    assert len(aside) == 1 and (aside[0] / "optimizer.pt").read_bytes() == b"random"  # kept, not deleted
    assert "fails verification (optimizer.pt has 6 bytes" in said[0] and "set aside" in said[0]
    # Everything damaged: start from scratch (nothing deleted).
    (tmp_path / "checkpoint-2" / "model.safetensors").unlink()
    assert _decide(tmp_path) is None
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("corrupt-")]) == 2


def test_marker_without_file_list_is_accepted(tmp_path):
    """Checkpoints written before file hashes were recorded still resume (nothing to check them against)."""
    d = tmp_path / "checkpoint-2"
    d.mkdir()
    ckpt.write_marker(d, {"step": 2, "world_size": 1})
    assert ckpt.verify(d, ONE) == [] and _decide(tmp_path) == str(d)


def test_auto_resume_sets_incomplete_aside_without_deleting(tmp_path):
    _make(tmp_path, 2)
    _make(tmp_path, 4, complete=False)
    said = []
    chosen = _decide(tmp_path, log=said.append)
    assert chosen == str(tmp_path / "checkpoint-2")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("incomplete-checkpoint-4-")]
    assert len(aside) == 1 and (aside[0] / "model.safetensors").read_bytes() == b"x" * 1000
    assert not (tmp_path / "checkpoint-4").exists()
    assert "set aside as incomplete-checkpoint-4-" in said[0]


def test_fresh_output_dir_starts_from_scratch(tmp_path):
    assert _decide(tmp_path / "new") is None


def test_explicit_resume(tmp_path):
    two = _make(tmp_path, 2)
    bad = _make(tmp_path, 4, complete=False)
    assert _decide(tmp_path, resume=str(two)) == str(two)
    with pytest.raises(ValueError, match="incomplete"):
        _decide(tmp_path, resume=str(bad))
    with pytest.raises(ValueError, match="no such checkpoint"):
        _decide(tmp_path, resume=str(tmp_path / "checkpoint-9"))
    (two / "sub" / "shard.bin").write_bytes(b"t" * 50)
    with pytest.raises(ValueError, match="fails verification .*sub/shard.bin does not match"):
        _decide(tmp_path, resume=str(two))
    assert two.is_dir()  # an explicit choice is refused, not moved


def test_no_resume_refuses_to_overwrite(tmp_path):
    _make(tmp_path, 2)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        _decide(tmp_path, no_resume=True)
    assert _decide(tmp_path / "other", no_resume=True) is None


def test_rotation_keeps_the_newest_complete_and_never_touches_unmarked(tmp_path):
    for step in (2, 4, 6):
        _make(tmp_path, step)
    _make(tmp_path, 8, complete=False)
    deleted = ckpt.rotate(tmp_path, keep=1)
    assert [p.name for p in deleted] == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6", "checkpoint-8"]
    assert ckpt.rotate(tmp_path, keep=None) == []


def test_share_splits_every_file_once_by_size():
    sizes = {"a": 100, "b": 90, "c": 10, "d": 5, "e": 1}
    parts = [ckpt.share(sizes, r, 2) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(sizes)
    assert parts == [["a", "d"], ["b", "c", "e"]]  # greedy: each file to the least-loaded rank
    assert ckpt.share(sizes, 0, 1) == sorted(sizes, key=lambda n: -sizes[n])
