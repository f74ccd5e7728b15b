"""Every use of another library's private API, in one place, with the versions it was checked against.

dist-vdr reaches into a few internals of the libraries it builds on: private methods of the Trainer
it overrides or calls, a module-level hook of sentence-transformers it replaces, private attributes
it reads or sets, launcher helpers and a checkpoint converter's layout. Each such use is a
:class:`Seam` in :data:`SEAMS`: the library, the range of versions it was checked against (the
tested set is constraints.txt; setup.cfg's upper bounds end where these ranges end), what it
touches and which dist-vdr module relies on it. The code that touches the internal is here; the
rest of dist-vdr calls the functions below.

Outside its range a use raises :class:`UntestedVersion` -- a ValueError, which the CLI reports as one
``error:`` line -- naming the library, the installed version, the checked range and the fix, instead
of failing deep inside a training step or, worse, silently doing something else. A few uses only
read something optional and work without it (``tolerant``); they are listed too, and :func:`check`
covers them, but using them never raises.

``python -c "import dist_vdr.compat as c; c.check()"`` checks every seam of the installed libraries.
This module imports no library at import time (``import dist_vdr.config`` / ``dist_vdr.cli.commands`` stay light).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CONSTRAINTS = "constraints.txt"


@dataclass(frozen=True)
class Seam:
    """One use of a library internal, checked with versions ``low <= installed < high``."""

    key: str
    library: str
    """The distribution name (what pip installs)."""
    low: str
    high: str
    tested: str
    """The version of constraints.txt: the suite ran with it."""
    what: str
    """The internal, as the library names it."""
    used_by: str
    why: str
    tolerant: bool = False
    """The use works (with less) without the internal: it never raises; :func:`check` still reports it."""

    @property
    def range(self) -> str:
        return f">={self.low},<{self.high}"

    def covers(self, version: str) -> bool:
        return _release(self.low) <= _release(version) < _release(self.high)


_ST = dict(library="sentence-transformers", low="6.2", high="6.3", tested="6.2.0")
_TF = dict(library="transformers", low="5.24", high="5.25", tested="5.24.0")
_ACC = dict(library="accelerate", low="1.15", high="1.16", tested="1.15.0")
_DS = dict(library="deepspeed", low="0.19.8", high="0.20", tested="0.19.8")
_SUBMITIT = dict(library="submitit", low="1.5", high="1.6", tested="1.5.4")
_TORCH = dict(library="torch", low="2.14", high="2.15", tested="2.14.1")
_DATASETS = dict(library="datasets", low="5.2", high="5.3", tested="5.2.0")

SEAMS: tuple[Seam, ...] = (
    Seam("st.gradcache_replay_context", **_ST,
         what="sentence_transformers.base.losses.gradcache._ddp_replay_context",
         used_by="engines.gradient_cache.install_replay_context",
         why="replaced by an FSDP2-aware context (one gradient reduction per step); called by the cached "
             "losses around every mini-batch replay, synchronize=True for the last"),
    Seam("st.sampler_value_hash", **_ST,
         what="sentence_transformers.base.sampler._sample_value_str and _xxhash_int64",
         used_by="data.startup.scan_rows",
         why="the startup pass hashes every value as NoDuplicatesBatchSampler(precompute_hashes=True) does"),
    Seam("st.sampler_row_hashes", **_ST,
         what="NoDuplicatesBatchSampler._row_hashes and sentence_transformers.base.sampler._EXCLUDE_DATASET_COLUMNS",
         used_by="data.sampler.GlobalNoDuplicatesBatchSampler",
         why="the startup pass's hashes are handed to the sampler as its own precomputed ones"),
    Seam("st.create_minibatch", **_ST,
         what="sentence_transformers.base.losses.gradcache._create_minibatch(features, begin, end)",
         used_by="losses.global_batch.GlobalBatchCachedMNRL.embed_minibatch",
         why="the guide of loss.false_negatives embeds exactly the student's mini-batches, sliced as the cached "
             "loss slices padded, flattened and VLM features (pixel_values per image grid)"),
    Seam("st.trainer_save", **_ST,
         what="SentenceTransformerTrainer._save / CrossEncoderTrainer._save(output_dir, state_dict)",
         used_by="engines.trainers._DistVdrTrainerMixin._save",
         why="called for unsharded saves; it ignores state_dict, so gathered (ZeRO-3/FSDP2) saves are written "
             "by dist-vdr"),
    Seam("st.trainer_load_from_checkpoint", **_ST,
         what="SentenceTransformerTrainer._load_from_checkpoint(checkpoint_path)",
         used_by="engines.trainers._DistVdrTrainerMixin._load_from_checkpoint",
         why="takes one argument where transformers passes two (the wrapped model on the FSDP path)"),
    Seam("transformers.trainer_run_epoch", **_TF,
         what="transformers.Trainer._run_epoch",
         used_by="engines.trainers._DistVdrTrainerMixin._run_epoch",
         why="checks max_steps only after a step: a run resumed at its last step would train one step more"),
    Seam("transformers.trainer_log_save_evaluate", **_TF,
         what="transformers.Trainer._maybe_log_save_evaluate (after each optimizer step: log, then evaluate and save)",
         used_by="engines.trainers._DistVdrTrainerMixin._maybe_log_save_evaluate",
         why="the evaluation and checkpoint time after a log is left out of the next log's step_seconds"),
    Seam("transformers.trainer_load_from_checkpoint", **_TF,
         what="transformers.Trainer._load_from_checkpoint(resume_from_checkpoint, model)",
         used_by="engines.trainers._DistVdrTrainerMixin._load_from_checkpoint",
         why="the one loader of sharded FSDP checkpoints (distcp, resharded to the current ranks)"),
    Seam("transformers.trainer_save_hook", **_TF,
         what="transformers.Trainer._save(output_dir, state_dict), called by save_model",
         used_by="engines.trainers._DistVdrTrainerMixin._save",
         why="under ZeRO-3/FSDP2 save_model passes the gathered full state dict to _save"),
    Seam("transformers.trainer_engine_checkpoint_calls", **_TF,
         what="the module globals transformers.trainer.deepspeed_load_checkpoint(engine, path, load_module_strict) "
              "and save_fsdp_model(fsdp_plugin, accelerator, model, output_dir, ...), called by "
              "Trainer._prepare_for_training and Trainer._save_optimizer_and_scheduler(output_dir) (which dist-vdr "
              "wraps to leave the frozen base out of DeepSpeed's save_checkpoint)",
         used_by="engines.adapters.install_loaders, "
                 "engines.trainers._DistVdrTrainerMixin._save_optimizer_and_scheduler, "
                 "engines.trainers._DistVdrTrainerMixin.load_weights_of",
         why="transformers leaves the frozen base out of engine checkpoints for PeftModel instances only; "
             "dist-vdr's adapters live inside a SentenceTransformer"),
    Seam("transformers.zero3_init_switch", **_TF,
         what="the module global transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref (read by "
              "is_deepspeed_zero3_enabled, which makes from_pretrained partition the weights under zero.Init)",
         used_by="kinds.embedding.task.load_guide",
         why="a frozen guide model loaded during a ZeRO-3 run must stay whole: it is no part of the engine"),
    Seam("transformers.no_split_modules", **_TF,
         what="PreTrainedModel._no_split_modules",
         used_by="engines.gradient_cache.adapt_model",
         why="the backbone's layer classes, named as FSDP2's wrap units"),
    Seam("accelerate.launch_env", **_ACC,
         what="accelerate.commands.launch._validate_launch_command, accelerate.utils.launch."
              "prepare_deepspeed_cmd_env / prepare_multi_gpu_env, args.deepspeed_fields_from_accelerate_config",
         used_by="cli.cluster.engine_env",
         why="the environment `accelerate launch --config_file` gives the workers, for SLURM tasks started "
             "without it"),
    Seam("accelerate.partial_state_distributed_type", **_ACC,
         what="PartialState.distributed_type (set)",
         used_by="distributed.init",
         why="a gloo group on CPU is typed NO; FSDP2 runs on it once it is presented as multi-device"),
    Seam("accelerate.fsdp_auto_wrap", **_ACC,
         what="FSDP_TRANSFORMER_CLS_TO_WRAP (read by the FSDP plugin) and the final-norm search among the "
              "children of model.<base_model_prefix>",
         used_by="engines.gradient_cache.adapt_model",
         why="a SentenceTransformer would be one FSDP unit, and its parameterless Normalize cannot be wrapped"),
    Seam("accelerate.deepspeed_engine_wrapper", **_ACC,
         what="Accelerator.deepspeed_engine_wrapped and DeepSpeedEngineWrapper.backward(loss, sync_gradients, "
              "**kwargs) (boundary flag, engine.backward, engine.step at the boundary)",
         used_by="engines.gradient_cache.coalesced_deepspeed_backward",
         why="replaced by the same steps inside engine.coalesce_grad_reduction()"),
    Seam("deepspeed.universal_checkpoint", **_DS,
         what="python -m deepspeed.checkpoint.ds_to_universal (its options and the latest / latest_universal "
              "tag files)",
         used_by="engines.gradient_cache.make_universal, engines.gradient_cache.deepspeed_tag",
         why="resuming a DeepSpeed checkpoint on another number of ranks"),
    Seam("deepspeed.zero3_consolidated_state_dict", **_DS,
         what="DeepSpeedEngine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters)",
         used_by="engines.adapters.gather_adapter",
         why="gathers a ZeRO-3 model's trainable parameters alone (accelerate's get_state_dict gathers all)"),
    Seam("submitit.requeue", **_SUBMITIT,
         what="submitit.JobEnvironment._requeue(countdown)",
         used_by="cli.cluster.TrainJob",
         why="requeue after a preemption checkpoint (slurm: scontrol requeue; local executor: exit code 144)"),
    Seam("torch.private_collectives", **_TORCH, tolerant=True,
         what="torch.distributed._all_gather_base and _reduce_scatter_base",
         used_by="distributed.count_collectives",
         why="counted with the public collectives when they exist (tests and benchmarks)"),
    Seam("torch.elastic_failure_log", **_TORCH, tolerant=True,
         what="the 'failed (exitcode: N)' record of logger torch.distributed.elastic.multiprocessing.api",
         used_by="cli.launcher.main",
         why="dropped for a rank that exited with a user error (it already said what went wrong); "
             "without it the line is printed"),
    Seam("datasets.fingerprint", **_DATASETS, tolerant=True,
         what="Dataset._fingerprint",
         used_by="data.startup.fingerprint",
         why="part of the startup record's key (with the Arrow files' sizes and times, which suffice alone)"),
)

_BY_KEY = {seam.key: seam for seam in SEAMS}


class UntestedVersion(ValueError):
    """An installed library outside the range a seam was checked against (one line: what and the fix)."""


def _release(version: str) -> tuple[int, ...]:
    """The release numbers of a version, padded to 3 (``2.14.1+cu130`` -> (2, 14, 1)); a dev or rc of
    X.Y.Z counts as X.Y.Z."""
    match = re.match(r"\d+(\.\d+)*", version.strip())
    if not match:
        raise ValueError(f"cannot read version {version!r}")
    numbers = tuple(int(p) for p in match.group(0).split("."))
    return numbers + (0,) * (3 - len(numbers))


_versions: dict[str, str | None] = {}


def installed_version(library: str) -> str | None:
    """The installed version of distribution ``library`` (None when not installed); looked up once."""
    if library not in _versions:
        from importlib import metadata

        try:
            _versions[library] = metadata.version(library)
        except metadata.PackageNotFoundError:
            _versions[library] = None
    return _versions[library]


def _fix(seam: Seam) -> str:
    return f"install a tested version: pip install -c {CONSTRAINTS} '{seam.library}{seam.range}'"


def problem(seam: Seam) -> str | None:
    """The one-line error for ``seam`` with the installed version, or None when it is in range."""
    version = installed_version(seam.library)
    if version is None:
        return (f"{seam.library} is not installed; dist-vdr uses its {seam.what} (checked with "
                f"{seam.library}{seam.range}): {_fix(seam)}")
    if seam.covers(version):
        return None
    return (f"{seam.library} {version} is installed; dist-vdr uses its private {seam.what}, checked only with "
            f"{seam.library}{seam.range} (tested: {seam.tested}): {_fix(seam)}")


def require(key: str) -> None:
    """Raise :class:`UntestedVersion` unless the installed library is in the range of seam ``key``."""
    message = problem(_BY_KEY[key])
    if message:
        raise UntestedVersion(message)


def check(libraries: tuple[str, ...] | None = None) -> None:
    """Every seam of the installed libraries (or of ``libraries``) is in its range; else UntestedVersion
    for the first one that is not. Seams of libraries that are not installed (deepspeed, submitit) are
    skipped: their uses need them installed anyway and :func:`require` says so there."""
    for seam in SEAMS:
        if libraries is not None and seam.library not in libraries:
            continue
        if installed_version(seam.library) is None:
            continue
        require(seam.key)


# ----------------------------------------------------------------------------------------------
# sentence-transformers
# ----------------------------------------------------------------------------------------------

def replace_gradcache_replay_context(make: Callable[[Callable], Callable]) -> None:
    """Replace sentence-transformers' GradCache replay context by ``make(stock)``."""
    require("st.gradcache_replay_context")
    from sentence_transformers.base.losses import gradcache

    stock = getattr(gradcache, "_ddp_replay_context", None)
    if stock is None:  # in range, yet gone (a patch release refactored it): fail loudly, not silently slow
        raise RuntimeError("sentence_transformers.base.losses.gradcache._ddp_replay_context is gone; "
                           "dist_vdr.compat needs updating for this sentence-transformers version")
    gradcache._ddp_replay_context = make(stock)


def sampler_value_hash() -> Callable[[Any], int]:
    """The per-value digest of NoDuplicatesBatchSampler(precompute_hashes=True): ``value -> int64``."""
    require("st.sampler_value_hash")
    from sentence_transformers.base.sampler import _sample_value_str, _xxhash_int64

    def value_hash(value) -> int:
        return _xxhash_int64(_sample_value_str(value))

    return value_hash


def sampler_excluded_columns() -> set[str]:
    """Columns the stock sampler leaves out of its hashes (it then hashes the rows itself)."""
    require("st.sampler_row_hashes")
    from sentence_transformers.base.sampler import _EXCLUDE_DATASET_COLUMNS

    return set(_EXCLUDE_DATASET_COLUMNS)


def set_sampler_row_hashes(sampler, row_hashes) -> None:
    """Give NoDuplicatesBatchSampler its precomputed row hashes ([rows, columns] int64)."""
    require("st.sampler_row_hashes")
    sampler._row_hashes = row_hashes


def st_minibatch(features: dict, begin: int, end: int) -> dict:
    """Rows [begin, end) of a column's features, as sentence-transformers' cached losses slice them."""
    require("st.create_minibatch")
    from sentence_transformers.base.losses.gradcache import _create_minibatch

    return _create_minibatch(features, begin, end)


def st_trainer_save(stock: Callable, output_dir: str | None, state_dict) -> None:
    """sentence-transformers' trainer ``_save`` (``stock``: the bound parent method)."""
    require("st.trainer_save")
    return stock(output_dir, state_dict)


def st_load_from_checkpoint(stock: Callable, checkpoint_path: str) -> None:
    """sentence-transformers' trainer ``_load_from_checkpoint`` (``stock``: the bound parent method)."""
    require("st.trainer_load_from_checkpoint")
    return stock(checkpoint_path)


# ----------------------------------------------------------------------------------------------
# transformers
# ----------------------------------------------------------------------------------------------

def run_epoch(stock: Callable, *args, **kwargs):
    """transformers' ``Trainer._run_epoch`` (``stock``: the bound parent method)."""
    require("transformers.trainer_run_epoch")
    return stock(*args, **kwargs)


def log_save_evaluate(stock: Callable, *args, **kwargs):
    """transformers' ``Trainer._maybe_log_save_evaluate`` (``stock``: the bound parent method)."""
    require("transformers.trainer_log_save_evaluate")
    return stock(*args, **kwargs)


def hf_load_from_checkpoint(trainer, resume_from_checkpoint: str, model=None) -> None:
    """transformers' own ``Trainer._load_from_checkpoint`` on ``trainer`` (past sentence-transformers' override)."""
    require("transformers.trainer_load_from_checkpoint")
    from transformers import Trainer as HFTrainer

    return HFTrainer._load_from_checkpoint(trainer, resume_from_checkpoint, model)


def saving_gathered_state_dict() -> None:
    """Called where ``_save`` receives the gathered state dict from transformers' save_model."""
    require("transformers.trainer_save_hook")


_ENGINE_CALLS_WRAPPED = False


def wrap_trainer_engine_checkpointing(deepspeed_load: Callable, fsdp_save_model: Callable) -> None:
    """Route transformers' Trainer calls of ``deepspeed_load_checkpoint`` and ``save_fsdp_model`` through
    ``deepspeed_load(stock, *args, **kwargs)`` and ``fsdp_save_model(stock, *args, **kwargs)`` (once)."""
    global _ENGINE_CALLS_WRAPPED
    if _ENGINE_CALLS_WRAPPED:
        return
    require("transformers.trainer_engine_checkpoint_calls")
    import transformers.trainer as hf_trainer

    for name, wrapper in (("deepspeed_load_checkpoint", deepspeed_load), ("save_fsdp_model", fsdp_save_model)):
        stock = getattr(hf_trainer, name)
        setattr(hf_trainer, name, functools.partial(wrapper, stock))
    _ENGINE_CALLS_WRAPPED = True


def deepspeed_load_engine_checkpoint(engine, checkpoint_path: str) -> None:
    """transformers' ``deepspeed_load_checkpoint`` as the Trainer calls it on resume (the module global,
    with dist-vdr's adapter-aware wrapper when installed): weights and optimizer state of a DeepSpeed
    checkpoint written by the same number of ranks into ``engine``."""
    require("transformers.trainer_engine_checkpoint_calls")
    import transformers.trainer as hf_trainer

    hf_trainer.deepspeed_load_checkpoint(engine, checkpoint_path, load_module_strict=True)


def no_split_modules(module) -> list[str] | None:
    """The layer classes a transformers model says must not be split (FSDP's wrap units), if any."""
    require("transformers.no_split_modules")
    return getattr(module, "_no_split_modules", None)


# ----------------------------------------------------------------------------------------------
# accelerate
# ----------------------------------------------------------------------------------------------

FSDP_WRAP_ENV = "FSDP_TRANSFORMER_CLS_TO_WRAP"


def set_fsdp_wrap_classes(classes: list[str]) -> None:
    """Name the layer classes of FSDP2's auto-wrap policy, unless the launch config named its own."""
    require("accelerate.fsdp_auto_wrap")
    if classes and not os.environ.get(FSDP_WRAP_ENV):
        os.environ[FSDP_WRAP_ENV] = ",".join(sorted(classes))


def point_fsdp_final_norm_search(model, prefix: str = "0") -> None:
    """Make FSDP2's "final norm" search look in ``model.<prefix>`` (when the model names no prefix)."""
    require("accelerate.fsdp_auto_wrap")
    if not getattr(model, "base_model_prefix", ""):
        model.base_model_prefix = prefix


def present_as_multi_device(state) -> None:
    """Type accelerate's ``PartialState`` as multi-device (FSDP2 then runs on a gloo group on CPU)."""
    require("accelerate.partial_state_distributed_type")
    from accelerate.utils import DistributedType

    state.distributed_type = DistributedType.MULTI_GPU


@contextlib.contextmanager
def zero3_init_off():
    """Models loaded inside are whole (transformers' ZeRO-3 switch off, restored after)."""
    require("transformers.zero3_init_switch")
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def zero3_gathered_state_dict(engine, *, exclude_frozen: bool) -> dict:
    """A ZeRO-3 engine's full weights (collective; complete on rank 0), without the frozen ones if asked."""
    require("deepspeed.zero3_consolidated_state_dict")
    return engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=exclude_frozen)


def deepspeed_engine_wrapper(accelerator):
    """accelerate's DeepSpeedEngineWrapper of ``accelerator`` (None when DeepSpeed is not in use)."""
    wrapper = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if wrapper is not None:
        require("accelerate.deepspeed_engine_wrapper")
    return wrapper


def launch_env(launch_config: str, *, deepspeed: bool) -> dict:
    """The environment accelerate's launcher gives the workers for ``launch_config`` (a DeepSpeed or FSDP
    config), computed by its own helpers as ``launch_command`` does before its launchers."""
    require("accelerate.launch_env")
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(launch_config), "-m", "dist_vdr.cli"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if not deepspeed:
        return prepare_multi_gpu_env(args)
    fields = list(defaults.deepspeed_config.keys()) if defaults else []
    if mp_from_config:
        fields.append("mixed_precision")
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    return prepare_deepspeed_cmd_env(args)[1]


# ----------------------------------------------------------------------------------------------
# DeepSpeed, submitit
# ----------------------------------------------------------------------------------------------

DS_LATEST = "latest"
DS_LATEST_UNIVERSAL = "latest_universal"


def ds_to_universal_command(input_folder: str, output_folder: str) -> list[str]:
    """DeepSpeed's universal-checkpoint converter for one tag folder (writes ``latest_universal`` beside)."""
    require("deepspeed.universal_checkpoint")
    return [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", input_folder,
            "--output_folder", output_folder, "--inject_missing_state",
            "--num_extract_workers", "1", "--num_merge_workers", "1"]


def requeue(job_env, countdown: int = 1) -> None:
    """Requeue the running submitit job (slurm: scontrol requeue; local executor: exit code 144)."""
    require("submitit.requeue")
    job_env._requeue(countdown=countdown)


# ----------------------------------------------------------------------------------------------
# Tolerant uses: they work without the internal
# ----------------------------------------------------------------------------------------------

TORCH_PRIVATE_COLLECTIVES = ("_all_gather_base", "_reduce_scatter_base")
"""Counted when torch.distributed has them (torch.private_collectives)."""

TORCH_ELASTIC_LOGGER = "torch.distributed.elastic.multiprocessing.api"


def torch_elastic_failure_text(exitcode: int) -> str:
    """The part of torch elastic's "a worker failed" record that names its exit code (torch.elastic_failure_log)."""
    return f"failed (exitcode: {exitcode})"


def dataset_fingerprint(ds) -> str | None:
    """``datasets``' fingerprint of ``ds`` (None when it has none) (datasets.fingerprint)."""
    return getattr(ds, "_fingerprint", None)
