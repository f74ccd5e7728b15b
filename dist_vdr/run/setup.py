"""Trainer arguments, callbacks and checks that are the same for every task."""

from __future__ import annotations

from pathlib import Path

from dist_vdr import distributed, log
from dist_vdr.checkpoints import store as checkpoint
from dist_vdr.config import Config
from dist_vdr.data import mixture_rows, page_refs
from dist_vdr.data.mixture import mixture_sampler
from dist_vdr.data.sampler import global_no_duplicates
from dist_vdr.engines import gradient_cache as engines
from dist_vdr.run import tracking
from dist_vdr.run.folder import RunDir
from dist_vdr.storage import no_space_message

logger = log.get(__name__)


def build_training_args(cfg: Config, info: distributed.DistInfo, per_device: int, *, args_class, task_kwargs: dict,
                        has_eval: bool, run: RunDir, row_hashes=None, mixture=None, run_name: str | None = None):
    """The task's TrainingArguments class with the recipe's values (``task_kwargs``: the task's own; ``run``: the
    run folder, whose root is the trainer's output_dir; ``run_name``: the trackers' run)."""
    t = cfg.training
    eval_every = t.eval_steps if (has_eval and t.eval_steps) else None
    kwargs = dict(
        output_dir=str(run.root),
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=cfg.evaluation.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float < 1 is a fraction of the total steps
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler_type,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        seed=t.seed,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every,
        save_strategy="steps",
        save_steps=t.save_steps,
        # dist-vdr rotates (checkpoint.rotate) once the new checkpoint is marked; the Trainer's own
        # rotation runs before the marker exists, so a kill between the two left no complete checkpoint.
        save_total_limit=None,
        # A non-finite loss stops the run (preemption.StepHealth); the filter would log an average instead.
        logging_nan_inf_filter=False,
        batch_sampler=batch_sampler(cfg, info.world_size, row_hashes, mixture),
        dataloader_num_workers=t.dataloader_num_workers,
        # In-batch negatives want full batches, and DDP ranks must run the same number of steps.
        dataloader_drop_last=True,
        # The HF Trainer turns this on for non-PreTrainedModel models (SentenceTransformer included):
        # an extra graph traversal per step and a broken gradient cache.
        ddp_find_unused_parameters=False,
        # use_cpu selects accelerate's CPU state, which has no DeepSpeed/FSDP path (the engines get a
        # gloo group from distributed.init instead).
        use_cpu=info.device == "cpu" and distributed.requested_engine() is None,
        ddp_timeout=cfg.launch.collective_timeout_s,
        accelerator_config={"use_configured_state": True},
        report_to=list(t.report_to) or "none",
        run_name=run_name,  # the trackers' run (tracking.run_name)
        project=tracking.PROJECT,
    )
    kwargs.update(task_kwargs)
    kwargs.update(t.trainer_args)
    try:
        return args_class(**kwargs)
    except TypeError as exc:
        raise ValueError(f"training.trainer_args: {exc}") from exc


def batch_sampler(cfg: Config, world_size: int, row_hashes=None, mixture=None):
    """no_duplicates*: de-duplicated over the global batch (all ranks), by content hash (``row_hashes``:
    computed by the startup pass, so the sampler does not hash every row again on every rank). A mixture
    (``mixture``: its MixtureRows) draws every optimizer step from one dataset (data/mixture.py)."""
    name = cfg.training.batch_sampler
    hashed = name == "no_duplicates_hashed"
    if mixture is not None and cfg.data.mixture != "mixed":  # (the sampler name is checked at load: the task)
        return mixture_sampler(mixture.sizes, mixture_rows.weights(cfg.data, mixture.sizes), cfg.data.mixture,
                               world_size, cfg.training.gradient_accumulation_steps, precompute_hashes=hashed,
                               row_hashes=row_hashes)
    if name.startswith("no_duplicates"):
        return global_no_duplicates(world_size, precompute_hashes=hashed, row_hashes=row_hashes)
    return name


def check_engine(trainer, info: distributed.DistInfo) -> None:
    """Refuse to train when the launch config asked for DeepSpeed/FSDP but the trainer did not set it up.

    Seen: launch/fsdp2.yaml with 2 CPU processes trains with plain DDP, silently (accelerate's CPU
    state never takes the FSDP path). Better an error than a run that is not what was asked for.
    """
    requested = distributed.requested_engine()
    active = "deepspeed" if trainer.is_deepspeed_enabled else "fsdp" if trainer.is_fsdp_enabled else None
    if requested and requested != active:
        raise ValueError(f"the launch config asks for {requested} but the trainer set up "
                         f"{active or 'DDP'} on {info.device}; use a DDP launch config (launch/cpu.yaml, "
                         f"launch/ddp.yaml) here")


def resolve_page_ids(trainer, cfg: Config, train_ds, mixture=None) -> None:
    """Rows naming pages by id (data.pages_path): the collator decodes each batch's pages from the corpus
    (of a mixture: each dataset's own)."""
    columns = page_refs.id_columns(train_ds, [cfg.data.positive_column, *cfg.data.negative_columns])
    if not columns:
        return
    if mixture is not None:
        logger.info(f"pages of {columns} resolved batch by batch from "
                    f"{', '.join(f'{n}: {c.pages_path}' for n, c in zip(mixture.names, mixture.configs, strict=True))}")
        table = [page_refs.load_table(c) for c in mixture.configs]
    else:
        logger.info(f"pages of {columns} resolved batch by batch from {cfg.data.pages_path}")
        table = page_refs.load_table(cfg.data)
    trainer.data_collator = page_refs.ResolvingCollator(
        trainer.data_collator, table, columns, key_columns=[cfg.data.query_column, cfg.data.positive_column],
        dataset_column=mixture_rows.DATASET_COLUMN if mixture is not None else None)


def describe_loss(loss) -> str:
    inner = getattr(loss, "loss", None)
    if inner is not None and hasattr(loss, "matryoshka_dims"):
        return f"{type(loss).__name__}({type(inner).__name__}, dims={list(loss.matryoshka_dims)})"
    dims = [d for d, _ in getattr(loss, "dims_weights", []) if d is not None]
    if getattr(loss, "retrieval_score_weight", 0):
        return f"{type(loss).__name__}(reranker score + {loss.retrieval_score_weight:g} x retrieval score)"
    by = [w for w, on in (("id", getattr(loss, "mask_same_ids", False)),
                          ("guide", getattr(loss, "guide", None) is not None)) if on]
    masked = f", false negatives masked by {' and '.join(by)}" if by else ""
    distilled = getattr(loss, "distillation", None)
    if distilled is not None:
        masked += f", + {distilled.weight:g} x {distilled.kind} distillation from {distilled.scores_column}"
    return f"{type(loss).__name__}(dims={dims}{masked})" if dims or masked else type(loss).__name__


def prepare_resharded_resume(resume_from: str | None, cfg: Config, info: distributed.DistInfo, per_device: int,
                             engine: str | None) -> bool:
    """A checkpoint written by another number of ranks: keep the global batch, reshard the states.

    The global batch (and so the contrastive task and the data order, see data/sampler.py) stays
    what the recipe says; only the per-device batch changes. FSDP2 checkpoints (torch distributed
    checkpoint) reshard on load; DeepSpeed ones are converted to a universal checkpoint first (rank 0,
    once). Returns whether DeepSpeed must load the universal checkpoint.
    """
    saved = checkpoint.saved_world_size(resume_from) if resume_from else None
    if not saved or saved == info.world_size:
        return False
    logger.info(f"checkpoint written by {saved} rank(s), resuming on {info.world_size}: global batch "
                f"{cfg.training.global_batch_size} kept (per-device batch {per_device})")
    if engine != "deepspeed":
        return False
    logger.info("converting the DeepSpeed checkpoint to a universal checkpoint (ds_to_universal)")
    distributed.main_then_share(info.is_main, lambda: engines.make_universal(resume_from),
                                timeout_s=cfg.launch.startup_timeout_s, waiting_for="rank 0's ds_to_universal",
                                log=lambda msg: logger.info(msg, extra=log.ALL_RANKS))
    return True


def train(trainer, resume_from: str | None, out: Path) -> None:
    """trainer.train, with a full disk reported in one line (the checkpoints already marked stay)."""
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except (OSError, RuntimeError) as exc:
        message = no_space_message(out, exc)
        if message is None:
            raise
        raise ValueError(message) from exc
