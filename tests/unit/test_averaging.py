"""`dist-vdr average`: the mean of identical checkpoints is the checkpoint, of different ones their exact mean;
refusals say the fix; the CLI evaluates the result when asked."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import perturbed_copy


def test_identical_checkpoints_average_to_themselves_and_different_ones_to_their_mean(tiny_model, tmp_path):
    from dist_vdr import distributed
    from dist_vdr.checkpoints import store as checkpoint
    from dist_vdr.checkpoints.averaging import average

    same = average([tiny_model, tiny_model], tmp_path / "same")
    a, b = load_file(str(tiny_model / "model.safetensors")), load_file(str(same / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert checkpoint.verify(same, distributed.DistInfo()) == []
    assert (same / "config.json").is_file() and not (same / "optimizer.pt").exists()

    other = perturbed_copy(tiny_model, tmp_path / "other", 0.01)
    mean = load_file(str(average([tiny_model, other], tmp_path / "mean") / "model.safetensors"))
    o = load_file(str(other / "model.safetensors"))
    for k in a:
        assert torch.equal(mean[k], ((a[k].double() + o[k].double()) / 2).to(a[k].dtype)), k
    weighted = load_file(str(average([tiny_model, other], tmp_path / "w", weights=[3, 1]) / "model.safetensors"))
    k = next(k for k in a if a[k].is_floating_point() and a[k].numel() > 1)
    assert torch.equal(weighted[k], (0.75 * a[k].double() + 0.25 * o[k].double()).to(a[k].dtype))

    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(str(tmp_path / "mean"), device="cpu").encode(["a page"]).shape[0] == 1


def test_inputs_that_cannot_be_averaged_are_refused(tiny_model, tmp_path):
    from dist_vdr.checkpoints.averaging import average

    with pytest.raises(ValueError, match="at least two"):
        average([tiny_model], tmp_path / "x")
    for weights in ([1.0], [float("inf"), 1.0], [1e308, 1e308]):  # the last two: NaN / zero shares once
        with pytest.raises(ValueError, match="one finite weight >= 0 per folder"):
            average([tiny_model, tiny_model], tmp_path / "x", weights=weights)
    with pytest.raises(ValueError, match="lies inside the input CHECKPOINT"):
        average([tiny_model, tiny_model], tiny_model / "avg")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        average([tiny_model, tiny_model], tmp_path / "afile")
    engine_state_only = tmp_path / "checkpoint-4"
    (engine_state_only / "global_step4").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no \\*.safetensors weights"):
        average([tiny_model, engine_state_only], tmp_path / "x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(ValueError, match="not an output of `(average|consolidate)`"):
        average([tiny_model, tiny_model], tmp_path / "busy")
    small = tmp_path / "small"
    small.mkdir()
    save_file({"w": torch.zeros(2)}, str(small / "model.safetensors"))
    with pytest.raises(ValueError, match="different models cannot be averaged"):
        average([tiny_model, small], tmp_path / "x")
    assert not list(tmp_path.glob(".x.averaging-*")) and not (tmp_path / "x").exists()  # nothing left behind
    extra = tmp_path / "extra"  # one more weight file (a Dense module) than the other: refused, not dropped
    shutil.copytree(tiny_model, extra)
    (extra / "3_Dense").mkdir()
    save_file({"w": torch.zeros(2)}, str(extra / "3_Dense" / "model.safetensors"))
    with pytest.raises(ValueError, match="other weight files"):
        average([tiny_model, extra], tmp_path / "x")
    # a user's folder named like a scratch folder is never touched
    (tmp_path / "x.averaging").mkdir()
    average([tiny_model, tiny_model], tmp_path / "x")
    assert (tmp_path / "x.averaging").is_dir()




def test_consolidate_refuses_what_it_cannot_build(tiny_model, tmp_path):
    from dist_vdr.checkpoints.consolidate import consolidate

    with pytest.raises(ValueError, match="already a model folder"):
        consolidate(tiny_model, tmp_path / "c")
    from dist_vdr import distributed
    from dist_vdr.checkpoints import store as checkpoint

    shards = tmp_path / "checkpoint-2"  # marked (a complete save) FSDP2 shards
    (shards / "pytorch_model_fsdp_0").mkdir(parents=True)
    checkpoint.mark_complete(shards, distributed.DistInfo(), {"step": 2})
    with pytest.raises(ValueError, match="records no recipe"):
        consolidate(shards, tmp_path / "c")
    (shards / "dist_vdr_config.yaml").write_text("model:\n  name_or_path: ./no-such-model\n")
    checkpoint.mark_complete(shards, distributed.DistInfo(), {"step": 2})
    with pytest.raises(ValueError, match="run from the folder the training ran in"):
        consolidate(shards, tmp_path / "c")
    (shards / "dist_vdr_config.yaml").write_text("model: [not, a, section]\n")
    checkpoint.mark_complete(shards, distributed.DistInfo(), {"step": 2})
    with pytest.raises(ValueError, match="checkpoint-2/dist_vdr_config.yaml"):  # not a temporary copy's name
        consolidate(shards, tmp_path / "c")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(ValueError, match="not an output of `(average|consolidate)`"):
        consolidate(shards, tmp_path / "busy")
    assert not (tmp_path / "c").exists()


def test_half_written_or_unverifiable_inputs_and_unwritable_outputs_are_refused(tiny_model, tmp_path):
    import os
    from pathlib import Path

    from dist_vdr.checkpoints.averaging import average
    from dist_vdr.checkpoints.consolidate import consolidate

    shards = tmp_path / "checkpoint-2"  # FSDP2 shards without the completion marker: an interrupted save
    (shards / "pytorch_model_fsdp_0").mkdir(parents=True)
    (shards / "dist_vdr_config.yaml").write_text("model:\n  name_or_path: ./x\n")
    for call in (lambda: consolidate(shards, tmp_path / "c"), lambda: average([shards, tiny_model], tmp_path / "a")):
        with pytest.raises(ValueError, match="no dist_vdr_complete.json: an interrupted save"):
            call()
    (shards / "dist_vdr_complete.json").write_text("{not json")
    with pytest.raises(ValueError, match="is unreadable, so its files cannot be verified"):
        consolidate(shards, tmp_path / "c")
    with pytest.raises(ValueError, match="is not a folder"):
        consolidate(tmp_path / "nowhere", tmp_path / "c")
    with pytest.raises(ValueError, match="cannot write beside"):
        average([tiny_model, tiny_model], Path("/dev/null/avg"))
    # the model folder gets mkdir's permissions (a temporary folder's 0700 would lock a team out)
    umask = os.umask(0)
    os.umask(umask)
    out = average([tiny_model, tiny_model], tmp_path / "shared")
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
