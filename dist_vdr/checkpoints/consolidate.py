"""A model folder from a checkpoint whose weights are engine shards: ``dist-vdr consolidate CKPT OUT``.

DDP, ZeRO-2 and ZeRO-3 checkpoints already hold the whole model (``model.safetensors``: DeepSpeed gathers
the 16-bit weights at save, see :func:`dist_vdr.engines.configure_deepspeed`), and a LoRA run's hold its
gathered adapter. An FSDP2 checkpoint holds the model as DCP shards (``pytorch_model_fsdp_0/``, one file per
rank) and none of the model's other files. Consolidating reads the shards in one process (no process
group, any number of writing ranks), builds the model of the recipe recorded in the checkpoint (its task,
its base model: config, tokenizer, processor, modules) and writes the shards' tensors into it, as
``final/`` would hold them at that step (the same weights bit for bit, same dtypes, same layout).

The files besides the weights come from the base model as the recorded path names it *now* (a relative path
from the current folder, a hub id from the local cache): they must be those the run trained from. Names
and shapes of the weights are checked; a changed config of the same shapes (e.g. another ``rope_theta``)
cannot be told apart.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

from dist_vdr import distributed, log
from dist_vdr.checkpoints import store as checkpoint

logger = log.get(__name__)

FSDP_MODEL_DIR = "pytorch_model_fsdp_0"  # accelerate's folder for the first model's sharded state dict
_DCP_MODEL_KEY = "model"  # accelerate saves {"model": state_dict}


def is_sharded(folder: str | Path) -> bool:
    """Whether ``folder`` keeps its model only as FSDP2 shards (no ``*.safetensors``)."""
    folder = Path(folder)
    return (folder / FSDP_MODEL_DIR).is_dir() and not list(folder.glob("*.safetensors"))


def check_intact(folder: Path) -> None:
    """Refuse a checkpoint that may be corrupted or half written: a marked one whose files fail verification,
    one with an unreadable marker, and FSDP2 shards without a marker (an interrupted save: training sets such
    folders aside). A model folder of another tool (no marker) has nothing to check against."""
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    if not checkpoint.is_complete(folder):
        if (folder / checkpoint.MARKER_FILE).exists():
            raise ValueError(f"{folder}: its {checkpoint.MARKER_FILE} is unreadable, so its files cannot be "
                             f"verified: use another checkpoint of the run")
        if is_sharded(folder):
            raise ValueError(f"{folder} has no {checkpoint.MARKER_FILE}: an interrupted save (its shards may be "
                             f"incomplete); use another checkpoint of the run")
        return
    problems = checkpoint.verify(folder, distributed.DistInfo())
    if problems:
        raise ValueError(f"{folder} fails verification ({'; '.join(problems[:3])}): it is corrupted; use another "
                         f"checkpoint of the run")


def read_shards(folder: Path) -> dict:
    """The model's full state dict (ST keys, e.g. ``0.model.…``) from the DCP shards, in the stored dtypes."""
    import torch
    import torch.distributed.checkpoint as dcp

    shards = folder / FSDP_MODEL_DIR
    metadata = dcp.FileSystemReader(str(shards)).read_metadata()
    prefix = _DCP_MODEL_KEY + "."
    state = {}
    for key, meta in metadata.state_dict_metadata.items():
        if not key.startswith(prefix) or not hasattr(meta, "size"):
            raise ValueError(f"{shards} holds {key!r}, not a tensor of the model: not a checkpoint dist-vdr wrote")
        state[key[len(prefix):]] = torch.empty(meta.size, dtype=meta.properties.dtype)
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({_DCP_MODEL_KEY: state}, checkpoint_id=str(shards), no_dist=True)  # in place
    return state


def _read_shards_or_explain(folder: Path) -> dict:
    try:
        return read_shards(folder)
    except (OSError, RuntimeError) as exc:  # verified files that still do not read: say which, not a traceback
        raise ValueError(f"{folder / FSDP_MODEL_DIR} does not read as DCP shards "
                         f"({str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}): use another "
                         f"checkpoint of the run") from None


def recorded_recipe(folder: Path):
    """The recipe the checkpoint records (``dist_vdr_config.yaml``), loaded without checking data paths."""
    from dist_vdr.config import load_config

    text = checkpoint.saved_config(folder)
    if text is None:
        raise ValueError(f"{folder} records no recipe ({checkpoint.CONFIG_FILE}): it cannot be consolidated")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        try:
            return load_config(f.name, check_paths=False)
        except ValueError as exc:  # named after the checkpoint's file, not the temporary copy
            raise ValueError(str(exc).replace(f.name, str(folder / checkpoint.CONFIG_FILE))) from None


def consolidate(folder: str | Path, out: str | Path) -> Path:
    """Write the model of the FSDP2 checkpoint ``folder`` as a plain model folder ``out`` (new or empty),
    marked like a checkpoint; returns ``out``."""
    from dist_vdr.outputs import Output

    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    if not is_sharded(folder):
        raise ValueError(f"{folder} holds no FSDP2 model shards ({FSDP_MODEL_DIR}/ without *.safetensors): it is "
                         f"already a model folder (DDP, ZeRO and LoRA checkpoints hold the whole model)")
    Output("consolidate", "OUT", out, {"CHECKPOINT": folder}).check()
    check_intact(folder)
    return write_model(folder, out)


def write_model(folder: Path, out: Path) -> Path:
    """:func:`consolidate` once ``folder`` is known to be intact FSDP2 shards and ``out`` a new folder apart
    (``average`` checks all its inputs first: a checkpoint's files are read for their hashes once)."""
    from dist_vdr import kinds as tasks
    from dist_vdr.engines import gradient_cache as engines
    from dist_vdr.kinds.base import RunContext
    from dist_vdr.models.build import check_model_path
    from dist_vdr.outputs import Output

    cfg = recorded_recipe(folder)
    task = tasks.get(cfg.task)
    try:  # the base model's files (config, tokenizer, processor, modules): a relative path is the training's
        check_model_path(cfg.model.name_or_path)
        model = task.build_model(RunContext(cfg=cfg, info=distributed.DistInfo(), out=out, engine=None))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder}'s recipe names the base model {cfg.model.name_or_path!r}, which does not load "
                         f"from here ({str(exc).splitlines()[0][:300]}): run from the folder the training ran in "
                         f"(or with the hub model in the local cache)") from None
    state = _read_shards_or_explain(folder)
    _check_same_weights(folder, state, model.state_dict())
    record = {"step": checkpoint.checkpoint_step(folder), "consolidated_from": str(folder.resolve())}
    with checkpoint.writing_marked(Output("consolidate", "OUT", out, {"CHECKPOINT": folder}), record) as tmp:
        with engines.saving_state_dict(model, state):  # the shards' tensors, not the freshly built ones
            model.save_pretrained(str(tmp), create_model_card=False)
        for name, text in task.files_of_model(cfg).items():
            (tmp / name).write_text(text)
    logger.info(f"{folder}: {len(state)} tensors from the FSDP2 shards written as a model folder in {out}")
    return out


def _check_same_weights(folder: Path, state: dict, built: dict) -> None:
    """The shards hold exactly the built model's weights (a tied weight may be stored once)."""
    extra = sorted(set(state) - set(built))
    stored = {built[k].data_ptr() for k in state if k in built}
    missing = sorted(k for k in set(built) - set(state) if built[k].data_ptr() not in stored)
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(built[k].shape)}" for k in state
              if k in built and state[k].shape != built[k].shape]
    if extra or missing or shapes:
        raise ValueError(f"{folder}'s shards do not match the model its recorded recipe builds (only in the shards: "
                         f"{extra[:3]}, only in the model: {missing[:3]}, other shapes: {shapes[:3]}): consolidate "
                         f"with the dist-vdr version and base model the run trained with")
