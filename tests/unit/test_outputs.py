"""The output guard (dist_vdr.outputs) on its own: the checks, the scratch folder and the one-line errors.
Every command through it against real hostile outputs: tests/integration/test_output_guard.py."""

from __future__ import annotations

import errno
import json

import pytest

from dist_vdr.outputs import MARKER, Output, explain, replacing_file


def _inputs(tmp_path):
    data = tmp_path / "data"
    (data / "split").mkdir(parents=True)
    (data / "split" / "rows.arrow").write_text("rows")
    queries = tmp_path / "userq" / "queries.jsonl"
    queries.parent.mkdir()
    queries.write_text('{"_id": "q1", "text": "a"}\n')
    return data, queries


@pytest.mark.parametrize("where,how", [("data", "is"), ("data/split", "lies inside"), ("data/split/out", "lies inside"),
                                       ("userq", "contains"), (".", "contains"), ("userq/queries.jsonl", "is")])
def test_an_output_apart_from_every_input(tmp_path, where, how):
    data, queries = _inputs(tmp_path)
    out = tmp_path / where
    with pytest.raises(ValueError, match=f"{how} the input"):
        Output("eval", "--output", out, {"--data": data, "data.eval_path": data / "split", "--queries": queries,
                                         "--model": "org/hub-model"}).check()


def test_a_folder_of_the_user_a_file_a_link_and_a_missing_input_are_refused(tmp_path):
    data, _ = _inputs(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not an output of `average`"):
        Output("average", "--out", mine, {"CKPT": data}).check()
    with pytest.raises(ValueError, match="is a file"):
        Output("average", "--out", mine / "notes.txt", {}).check()
    (tmp_path / "link").symlink_to(mine)
    with pytest.raises(ValueError, match="symbolic link"):
        Output("average", "--out", tmp_path / "link", {}).check()
    with pytest.raises(ValueError, match="--data ./nowhere does not exist"):
        Output("eval", "--output", tmp_path / "o", {"--data": "./nowhere"}).check()
    for fine in (tmp_path / "new", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        Output("average", "--out", fine, {"CKPT": data}).check()


def test_the_output_is_written_whole_or_not_at_all(tmp_path):
    out = Output("average", "--out", tmp_path / "out", {}).check()
    with out.writing() as scratch:
        (scratch / "model.safetensors").write_text("first")
    assert (tmp_path / "out" / "model.safetensors").read_text() == "first"
    assert json.loads((tmp_path / "out" / MARKER).read_text())["command"] == "average"
    # an earlier output of the command is replaced, and only at the end; an error leaves it as it was
    again = Output("average", "--out", tmp_path / "out", {}).check()
    with pytest.raises(RuntimeError), again.writing() as scratch:
        (scratch / "model.safetensors").write_text("half")
        raise RuntimeError("killed midway")
    assert (tmp_path / "out" / "model.safetensors").read_text() == "first"
    with again.writing() as scratch:
        (scratch / "model.safetensors").write_text("second")
    assert (tmp_path / "out" / "model.safetensors").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no scratch, no set-aside copy left
    # another command's output is not this one's to replace
    with pytest.raises(ValueError, match="is the output of `average`: it would be replaced"):
        Output("consolidate", "OUT", tmp_path / "out", {}).check()


def test_a_named_file_is_replaced_whole(tmp_path):
    (tmp_path / "report.md").write_text("old")
    with pytest.raises(KeyboardInterrupt), replacing_file(tmp_path / "report.md") as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert (tmp_path / "report.md").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_late_write_errors_name_the_outputs_folder(tmp_path):
    out = Output("eval", "--output", tmp_path / "results", {}).check()
    assert out is not None
    full = explain(OSError(errno.ENOSPC, "No space left on device"))
    assert full.startswith(f"no space left on the device of {tmp_path}"), full
    ro = explain(OSError(errno.EROFS, "Read-only file system"))
    assert ro.startswith(f"cannot write {tmp_path / 'results'}") and "a read-only file system" in ro, ro
    assert explain(ValueError("a bug")) is None


def test_the_current_folder_a_cache_and_other_outputs(tmp_path, monkeypatch):
    """From the hostile-input campaign on the guard: `--output .` (a traceback, `.` renamed), a cache inside
    the output (replaced with it), an output inside another command's output or unfinished scratch folder (moved
    or deleted with it), and the refusal naming the command whose output a folder is."""
    here = tmp_path / "results"
    here.mkdir()
    monkeypatch.chdir(here)
    out = Output("eval", "--output", ".", {}).check()
    with out.writing() as scratch:
        (scratch / "retrieval_metrics.json").write_text("{}")
    assert (here / "retrieval_metrics.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    with pytest.raises(ValueError, match="--cache .* overlaps --output"):
        Output("eval", "--output", tmp_path / "o", {}).check().check_apart("--cache", tmp_path / "o" / "cache")
    Output("eval", "--output", tmp_path / "o", {}).check().check_apart("--cache", tmp_path / "cache")
    scratch = Output("pages build", "--out", tmp_path / "corpus", {}, resumable=True).check().scratch_folder()
    from dist_vdr.outputs import _write_marker

    _write_marker(scratch, "pages build", {})
    for inside in (scratch / "ev", here / "sub"):
        with pytest.raises(ValueError, match="lies inside .*an output of `(pages build|eval)`"):
            Output("eval", "--output", inside, {}).check()
    with pytest.raises(ValueError, match="is the output of `eval`: it would be replaced"):
        Output("mine-negatives", "--out", here, {}).check()


def test_a_tilde_in_the_run_folder_is_the_home_folder(monkeypatch, tmp_path):
    from dist_vdr.config import load_config

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config("configs/tiny.yaml", ["training.output_dir=~/runs/x"], check_paths=False)
    assert cfg.training.output_dir == str(tmp_path / "runs" / "x")
