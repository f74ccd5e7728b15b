"""Assemble and run a training job: SentenceTransformerTrainer + the recipe's loss, data, evaluator.

The order matters for users: everything a user can get wrong (config, world size, data, dims) is
checked before the output folder is touched; rank 0 alone decides the resume point and writes the
run's records; every rank announces itself so a log shows who trained.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import checkpoint, distributed, engines, preemption, resume_guard
from .config import Config, to_yaml
from .data.loading import EvalData, load_eval, load_train
from .evaluation import stock
from .losses import build_loss
from .model import build_model, check_dims, compile_blocks, embedding_dim
from .phases import Phases
from .phases import make_callback as make_first_step_callback
from .run_lock import RunLock


def say(info: distributed.DistInfo, msg: str, all_ranks: bool = False) -> None:
    """One log line; by default from rank 0 only."""
    if all_ranks or info.is_main:
        print(f"[dist-vdr rank {info.rank}/{info.world_size}] {msg}", flush=True)


def git_revision() -> str:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if rev.returncode != 0:
        return "unknown"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def write_run_records(out: Path, cfg: Config, info: distributed.DistInfo, resume_from: str | None) -> None:
    """Resolved config + run info. An earlier, different config is kept under a timestamped name."""
    out.mkdir(parents=True, exist_ok=True)
    text = to_yaml(cfg)
    resolved = out / "resolved_config.yaml"
    if resolved.is_file() and resolved.read_text() != text:
        os.replace(resolved, out / f"resolved_config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    resolved.write_text(text)
    import accelerate
    import sentence_transformers
    import torch
    import transformers

    run = {
        "git_revision": git_revision(),
        "command": sys.argv,
        "world_size": info.world_size,
        "device": info.device,
        "resumed_from": resume_from,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "sentence_transformers": sentence_transformers.__version__, "accelerate": accelerate.__version__},
    }
    with open(out / "run_info.jsonl", "a") as f:  # one line per (re)start: the run's history
        f.write(json.dumps(run) + "\n")


def build_training_args(cfg: Config, info: distributed.DistInfo, per_device: int, has_eval: bool, row_hashes=None):
    from sentence_transformers import CrossEncoderTrainingArguments, SentenceTransformerTrainingArguments

    t = cfg.training
    eval_every = t.eval_steps if (has_eval and t.eval_steps) else None
    kwargs = dict(
        output_dir=t.output_dir,
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
        batch_sampler=_batch_sampler(t.batch_sampler, info.world_size, row_hashes),
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
        report_to="none",
    )
    if cfg.task == "reranker" and cfg.reranker.prompt:
        kwargs["prompts"] = cfg.reranker.prompt  # one instruction for every (query, page) pair
    kwargs.update(t.trainer_args)
    args_cls = CrossEncoderTrainingArguments if cfg.task == "reranker" else SentenceTransformerTrainingArguments
    try:
        return args_cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"training.trainer_args: {exc}") from exc


def _batch_sampler(name: str, world_size: int, row_hashes=None):
    """no_duplicates*: de-duplicated over the global batch (all ranks), by content hash (``row_hashes``:
    computed by the startup pass, so the sampler does not hash every row again on every rank)."""
    if name.startswith("no_duplicates"):
        from .data.sampler import global_no_duplicates

        return global_no_duplicates(world_size, precompute_hashes=name == "no_duplicates_hashed",
                                    row_hashes=row_hashes)
    return name


def make_rank_logger(info: distributed.DistInfo):
    from transformers import TrainerCallback

    class RankLogger(TrainerCallback):
        """Every rank says when it starts and ends, so the log proves all of them trained."""

        def on_train_begin(self, args, state, control, **kwargs):
            say(info, f"training: {state.max_steps} steps, per-device batch {args.per_device_train_batch_size}, "
                      f"global batch {args.per_device_train_batch_size * info.world_size * args.gradient_accumulation_steps}, "
                      f"starting at step {state.global_step}", all_ranks=True)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1 or state.global_step % max(1, state.max_steps // 4) == 0:
                say(info, f"step {state.global_step}/{state.max_steps} done", all_ranks=True)

        def on_train_end(self, args, state, control, **kwargs):
            say(info, f"training finished at step {state.global_step}", all_ranks=True)

    return RankLogger()


def _metrics_file(out: Path, which: str) -> Path:
    return out / f"metrics_{which}.json"


def build_evaluator(cfg: Config, eval_data: EvalData, dim: int, info: distributed.DistInfo, candidates=None):
    e = cfg.evaluation
    if cfg.task == "reranker":
        from .reranker.evaluation import RerankEvaluator

        return RerankEvaluator(eval_data, candidates, depth=cfg.reranker.rerank_depth, ks=e.ks,
                               batch_size=e.batch_size, prompt=cfg.reranker.prompt,
                               retrieval_score_weight=cfg.reranker.retrieval_score_weight)
    if e.implementation == "stock":
        return stock.build_evaluator(eval_data, cfg.eval_dims(dim), batch_size=e.batch_size, ks=e.ks,
                                     show_progress_bar=info.is_main)
    from .evaluation.sharded import ShardedRetrievalEvaluator

    return ShardedRetrievalEvaluator(eval_data, cfg.eval_dims(dim), ks=e.ks, batch_size=e.batch_size,
                                     num_workers=e.num_workers, backend=e.search_backend, show_progress=True)


def evaluate(trainer, info: distributed.DistInfo, out: Path, which: str, step: int) -> dict[int, dict[str, float]]:
    """Evaluate and store {dim: metrics} as JSON on rank 0 (full outputs of the sharded evaluator in eval_<which>/)."""
    evaluator = trainer.evaluator
    if getattr(evaluator, "all_ranks", False):
        raw = evaluator(trainer.model, output_path=str(out / f"eval_{which}") if info.is_main else None, steps=step)
    else:
        raw = trainer.evaluate()  # stock: the trainer drives rank 0 + DDP encode serving
    # {dim: metrics} for embedding evaluators, {"retrieval"/"rerank": metrics} for the rerank evaluator.
    per_dim = getattr(evaluator, "summarise", stock.summarise)(raw)
    if info.is_main:
        payload = {"step": step, "metrics": {str(d): m for d, m in sorted(per_dim.items(), key=str, reverse=True)}}
        tmp = _metrics_file(out, which).with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        os.replace(tmp, _metrics_file(out, which))
    return per_dim


def _load_metrics(out: Path, which: str, step: int | None = None) -> dict[int, dict[str, float]] | None:
    """Stored metrics (of ``step``, when given: a finished run rerun reuses its final evaluation)."""
    path = _metrics_file(out, which)
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    if step is not None and payload.get("step") != step:
        return None
    return {int(d) if d.isdigit() else d: m for d, m in payload["metrics"].items()}


def run_training(cfg: Config, *, resume: str | None = None, no_resume: bool = False,
                 allow_config_change: bool = False) -> dict:
    """Train as ``cfg`` says. Returns {"before": ..., "after": ...} metrics per dim ({} when eval is off).

    ``allow_config_change``: resume even when the schedule length differs from the checkpoint's
    recipe (see :mod:`dist_vdr.resume_guard`).
    """
    info = distributed.init(cfg.launch.device, cfg.launch.expected_world_size, cfg.launch.num_threads_per_process,
                            timeout_s=cfg.launch.collective_timeout_s)
    phases = Phases()
    phases.mark("imports + process group")
    if cfg.launch.handle_preemption:
        preemption.install()
    if not info.is_main:
        import transformers

        transformers.logging.set_verbosity_warning()
    say(info, f"joined: world size {info.world_size}, device {info.device}", all_ranks=True)
    per_device = cfg.resolve_batch(info.world_size)
    out = Path(cfg.training.output_dir)
    engine = distributed.requested_engine()
    if engine and cfg.training.gradient_accumulation_steps != 1:
        raise ValueError(f"training.gradient_accumulation_steps={cfg.training.gradient_accumulation_steps} under "
                         f"{engine}: with gradient caching the batch costs no extra memory, so raise "
                         f"training.global_batch_size instead and keep accumulation at 1")

    # Data first: a bad row fails here, before anything is written. Every rank decodes its share once
    # (or finds the record of an earlier pass over the same data).
    data = _prepare_data(cfg, info, out)
    phases.mark("data: load, validation, hashing")
    phases.notes["startup_pass_s"] = sum(r.seconds for r in data.passes if r.reused_from is None)
    lock = RunLock(out, log=lambda msg: say(info, msg))
    distributed.main_then_share(info.is_main, lock.acquire)  # one writer per run folder
    try:
        return _run_locked(cfg, info, out, per_device, engine, resume, no_resume, allow_config_change, data, phases)
    finally:
        if info.is_main:
            lock.release()


@dataclass
class PreparedData:
    """The loaded data and what the startup passes established about it (dist_vdr.data.startup)."""

    train: object  # datasets.Dataset with the recipe's training columns
    eval: EvalData | None
    passes: list = field(default_factory=list)  # StartupResult of the training rows (first), eval corpus

    @property
    def row_hashes(self):
        return self.passes[0].hashes if self.passes else None

    def write_records(self, out: Path | None) -> list[Path]:
        """Records of the passes run now, or found only elsewhere, into ``out`` and the user cache."""
        from .data import startup

        written = []
        for result in self.passes:
            if result.reused_from is None or out is None or not Path(result.reused_from).is_relative_to(out):
                written += startup.write_record(result, out)
        return written


def check_data(cfg: Config) -> PreparedData:
    """`dist-vdr data check`: the training start's data pass ahead of time (1 process or under a
    launcher), its record written to the user cache, where the training runs of this data find it."""
    info = distributed.init(cfg.launch.device, 0, cfg.launch.num_threads_per_process,
                            timeout_s=cfg.launch.collective_timeout_s)
    data = _prepare_data(cfg, info, None)
    if info.is_main:
        for folder in data.write_records(None):
            say(info, f"record written: {folder}")
    return data


def _prepare_data(cfg: Config, info: distributed.DistInfo, out: Path | None) -> PreparedData:
    """Every rank loads the data (memory-mapped; cheap checks: columns, queries, ids); the pages are
    decoded (validation) and the rows hashed (no-duplicates sampler) once, sharded over the ranks."""
    from .data import startup
    from .data.loading import image_columns

    train_ds = load_train(_without_image_check(cfg.data))
    if len(train_ds) < cfg.training.global_batch_size:
        raise ValueError(f"only {len(train_ds)} training rows for a global batch of {cfg.training.global_batch_size}; "
                         f"lower training.global_batch_size or add data")
    eval_data: EvalData | None = load_eval(_without_image_check(cfg.data)) if cfg.evaluation.enabled else None
    # The reranker's sampler sees the mined rows, not these: it hashes them itself.
    hashed = cfg.training.batch_sampler == "no_duplicates_hashed" and cfg.task == "embedding"
    log = lambda msg: say(info, msg)  # noqa: E731
    kwargs = dict(info=info, output_dir=out, workers=cfg.launch.startup_workers,
                  timeout_s=cfg.launch.startup_timeout_s, log=log)
    data = PreparedData(train_ds, eval_data)
    if cfg.data.validate_images or hashed:
        where = f"training data {cfg.data.path}[{cfg.data.train_split}]"
        data.passes.append(startup.prepare(train_ds, image_columns(train_ds, cfg.data.train_columns), where,
                                           hashed=hashed, **kwargs))
        _say_pass(info, data.passes[-1], "training rows", hashed)
    if eval_data is not None and cfg.data.validate_images:
        corpus_path = cfg.data.eval_path or cfg.data.path
        if _built_corpus(corpus_path):
            say(info, f"eval corpus {corpus_path}: a `pages build` corpus, validated when it was built")
        else:
            data.passes.append(startup.prepare(eval_data.corpus, ["image"], f"eval corpus {corpus_path}",
                                               hashed=False, **kwargs))
            _say_pass(info, data.passes[-1], "eval pages", False)
    return data


def _built_corpus(path: str) -> bool:
    from .data import ingest

    return (Path(path) / ingest.MARKER_FILE).is_file()


def _say_pass(info: distributed.DistInfo, result, what: str, hashed: bool) -> None:
    done = "validated and hashed" if hashed else "validated"
    if result.reused_from:
        say(info, f"startup: {result.rows} {what} {done} before (record {result.reused_from}): no page decoded")
    else:
        say(info, f"startup: {result.rows} {what} {done} on {info.world_size} rank(s) in {result.seconds:.1f} s "
                  f"({result.decoded_pages} pages decoded)")


def _run_locked(cfg: Config, info: distributed.DistInfo, out: Path, per_device: int, engine: str | None,
                resume: str | None, no_resume: bool, allow_config_change: bool, data: PreparedData,
                phases: Phases) -> dict:
    config_text = to_yaml(cfg)
    resume_from = checkpoint.decide_resume(out, resume=resume, no_resume=no_resume, info=info,
                                           log=lambda msg: say(info, msg))
    if resume_from:
        recorded = checkpoint.saved_config(resume_from)
        notes = distributed.main_then_share(info.is_main, lambda: resume_guard.check(
            recorded, config_text, resume_from, allow_config_change))
        for note in notes:
            say(info, note)
        if not resume_guard.schedule_changed(recorded, config_text):
            finished = _finished_run(cfg, info, out, resume_from)
            if finished is not None:
                return finished

    phases.mark("lock + resume decision")
    train_ds, eval_data, row_hashes = data.train, data.eval, data.row_hashes
    candidates = None
    if cfg.task == "reranker" and cfg.data.pages_path:
        raise ValueError("data.pages_path (rows naming pages by id) is not supported for task: reranker yet; "
                         "train it on rows with page images (dist-vdr mine-negatives --data writes them)")
    if cfg.task == "reranker":
        from .reranker import training as reranker_training

        # Mining and first-stage retrieval with the retriever (collective, cached in the output folder).
        train_ds, candidates = reranker_training.prepare(cfg, info, out, train_ds, eval_data)
        row_hashes = None  # the sampler sees the mined rows now
        model = _build_reranker(cfg, info)
        dim = 0
    else:
        model = build_model(cfg.model, precision=cfg.training.precision, device=info.device)
        dim = embedding_dim(model)
        check_dims(cfg.loss.matryoshka_dims, dim, "loss.matryoshka_dims")
        check_dims(cfg.eval_dims(dim), dim, "evaluation.dims")
    engines.adapt_model(model, engine)
    if cfg.model.compile:
        say(info, f"model.compile: {compile_blocks(model)} transformer blocks compiled (the first steps compile them)")
    phases.mark("model build" if cfg.task == "embedding" else "negatives (mined or cached) + model build")

    load_universal = _prepare_resharded_resume(resume_from, cfg, info, per_device, engine)
    # Built (and so validated: trainer_args, scheduler name, ...) before the run's records are written.
    args = build_training_args(cfg, info, per_device, has_eval=eval_data is not None, row_hashes=row_hashes)
    engines.configure_deepspeed(args, load_universal=load_universal)
    if info.is_main:  # everything checked: the run's first writes
        data.write_records(out)
        write_run_records(out, cfg, info, resume_from)
    distributed.barrier()
    say(info, f"resuming from {resume_from}" if resume_from else f"starting a new run in {out}")

    from .step_stats import StepStatsCallback
    from .trainer import RerankerTrainer, Trainer

    health = preemption.StepHealth()
    stopper = preemption.make_callback(health)
    evaluator = build_evaluator(cfg, eval_data, dim, info, candidates) if eval_data is not None else None
    if cfg.task == "reranker":
        from .losses.reranker import build_reranker_loss

        loss = build_reranker_loss(model, cfg.loss, cfg.reranker.retrieval_score_weight)
    else:
        loss = build_loss(model, cfg.loss, rank=info.rank, world_size=info.world_size)
    say(info, f"loss: {_describe_loss(loss)}; global batch {cfg.training.global_batch_size} "
              f"= {info.world_size} rank(s) x {per_device} x {cfg.training.gradient_accumulation_steps} accumulation")
    trainer_cls = RerankerTrainer if cfg.task == "reranker" else Trainer
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_ds,
        loss=loss,
        evaluator=evaluator,
        callbacks=[checkpoint.make_marker_callback(info, config_text, cfg.training.save_total_limit),
                   make_rank_logger(info), stopper, make_first_step_callback(phases, _first_step_report(info, out))]
        + ([engines.make_collective_logger(str(out), info.rank)] if cfg.launch.log_collectives else [])
        + ([StepStatsCallback(out / "step_stats.json", is_main=info.is_main)] if cfg.training.record_step_stats else []),
    )
    trainer.keep_parameters_gathered = cfg.launch.keep_parameters_gathered
    trainer.step_health = health
    _resolve_page_ids(trainer, cfg, train_ds, info)

    _check_engine(trainer, info)
    phases.mark("trainer setup")
    results: dict = {}
    if evaluator is not None and cfg.evaluation.before_training:
        before = _load_metrics(out, "before")
        if before is None:
            say(info, "evaluating the untrained model")
            before = evaluate(trainer, info, out, "before", step=0)
        results["before"] = before
        phases.mark("evaluation before training")

    _train(trainer, resume_from, out)
    if stopper.stopped_at is not None:
        # Which rank saw which signal differs; a USR2 anywhere means preemption (requeue wanted).
        signals = distributed.all_gather_objects(preemption.first_signal())
        reason = "SIGUSR2" if "SIGUSR2" in signals else next((s for s in signals if s), "a stop signal")
        why = "for preemption" if reason == "SIGUSR2" else f"by {reason}"
        say(info, f"stopped {why} at step {stopper.stopped_at}: checkpoint-{stopper.stopped_at} saved; "
                  f"rerun (or requeue) to resume", all_ranks=True)
        return {"preempted": True, "signal": reason, "global_step": stopper.stopped_at,
                "final_loss": _last_logged_loss(trainer)}
    fusion = None
    if cfg.task == "reranker":
        from .reranker.model import fusion_record

        fusion = fusion_record(cfg.reranker)
    _save_final(trainer, info, out, fusion)

    if evaluator is not None:
        after = _load_metrics(out, "after", step=trainer.state.global_step)
        if after is None:
            say(info, "evaluating the trained model")
            after = evaluate(trainer, info, out, "after", step=trainer.state.global_step)
        results["after"] = after
        if info.is_main:
            _write_summary(out, results, cfg.eval_dims(dim) if cfg.task == "embedding" else None)
    results["final_loss"] = _last_logged_loss(trainer)
    results["global_step"] = trainer.state.global_step
    results["dims"] = cfg.eval_dims(dim) if cfg.task == "embedding" else []
    results["task"] = cfg.task
    return results


def _train(trainer, resume_from: str | None, out: Path) -> None:
    """trainer.train, with a full disk reported in one line (the checkpoints already marked stay)."""
    from .storage import no_space_message

    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except (OSError, RuntimeError) as exc:
        message = no_space_message(out, exc)
        if message is None:
            raise
        raise ValueError(message) from exc


def _finished_run(cfg: Config, info: distributed.DistInfo, out: Path, resume_from: str) -> dict | None:
    """A rerun of a finished run (``final/`` intact and of the newest checkpoint's step): its results,
    without training another step or writing another model. None when the run is not finished."""
    step = checkpoint.checkpoint_step(resume_from)
    final = out / "final"
    if not _final_holds(final, step, info):
        return None
    say(info, f"this run finished at step {step}: {final} holds its model (a new training.output_dir starts "
              f"another run)")
    results: dict = {"global_step": step, "task": cfg.task}
    for which in ("before", "after"):
        metrics = _load_metrics(out, which, step=step if which == "after" else None)
        if metrics is not None:
            results[which] = metrics
    state = json.loads((Path(resume_from) / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state.get("log_history", []) if "loss" in h]
    results["final_loss"] = losses[-1] if losses else None
    results["dims"] = sorted((d for d in results.get("after", {}) if isinstance(d, int)), reverse=True)
    return results


def _first_step_report(info: distributed.DistInfo, out: Path):
    def report(phases: Phases) -> None:
        say(info, phases.line())
        if info.is_main:
            phases.write(out / "startup_times.json")

    return report


def _build_reranker(cfg: Config, info: distributed.DistInfo):
    from .reranker.model import build_reranker

    return build_reranker(cfg.model, cfg.reranker, precision=cfg.training.precision, device=info.device)


def _prepare_resharded_resume(resume_from: str | None, cfg: Config, info: distributed.DistInfo, per_device: int,
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
    say(info, f"checkpoint written by {saved} rank(s), resuming on {info.world_size}: global batch "
              f"{cfg.training.global_batch_size} kept (per-device batch {per_device})")
    if engine != "deepspeed":
        return False
    say(info, "converting the DeepSpeed checkpoint to a universal checkpoint (ds_to_universal)")
    distributed.main_then_share(info.is_main, lambda: engines.make_universal(resume_from),
                                timeout_s=cfg.launch.startup_timeout_s, waiting_for="rank 0's ds_to_universal",
                                log=lambda msg: say(info, msg, all_ranks=True))
    return True


def _describe_loss(loss) -> str:
    inner = getattr(loss, "loss", None)
    if inner is not None and hasattr(loss, "matryoshka_dims"):
        return f"{type(loss).__name__}({type(inner).__name__}, dims={list(loss.matryoshka_dims)})"
    dims = [d for d, _ in getattr(loss, "dims_weights", []) if d is not None]
    if getattr(loss, "retrieval_score_weight", 0):
        return f"{type(loss).__name__}(reranker score + {loss.retrieval_score_weight:g} x retrieval score)"
    return f"{type(loss).__name__}(dims={dims})" if dims else type(loss).__name__


def _check_engine(trainer, info: distributed.DistInfo) -> None:
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


def _resolve_page_ids(trainer, cfg: Config, train_ds, info: distributed.DistInfo) -> None:
    """Rows naming pages by id (data.pages_path): the collator decodes each batch's pages from the corpus."""
    from .data import page_refs

    columns = page_refs.id_columns(train_ds, [cfg.data.positive_column, *cfg.data.negative_columns])
    if not columns:
        return
    say(info, f"pages of {columns} resolved batch by batch from {cfg.data.pages_path}")
    trainer.data_collator = page_refs.ResolvingCollator(
        trainer.data_collator, page_refs.load_table(cfg.data), columns,
        key_columns=[cfg.data.query_column, cfg.data.positive_column])


def _without_image_check(data_cfg):
    import dataclasses

    return dataclasses.replace(data_cfg, validate_images=False)


def _save_final(trainer, info: distributed.DistInfo, out: Path, fusion: dict | None = None) -> None:
    """The trained model in ``out/final`` (written beside, marked with its file hashes, then renamed:
    never half a model there), with a residual reranker's ``fusion`` record
    (``reranker.model.fusion_record``) in it. A rerun of a finished run finds ``final/`` already
    holding this step and leaves it; a final of another step is kept as ``final.previous``."""
    tmp, final = out / "final.tmp", out / "final"
    step = trainer.state.global_step
    if _final_holds(final, step, info):
        say(info, f"{final} already holds the model of step {step}")
        return
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier()
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        # Gather the full weights (collective), rank 0 writes a plain SentenceTransformer folder.
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        if info.is_main:
            trainer._save(str(tmp), state_dict=state_dict)
    else:
        trainer.save_model(str(tmp))
    distributed.barrier()
    if info.is_main and fusion:
        from .reranker.model import FUSION_FILE

        (tmp / FUSION_FILE).write_text(json.dumps(fusion, indent=2))
    checkpoint.mark_complete(tmp, info, {"step": step})
    if info.is_main:
        if final.exists():
            previous = out / "final.previous"
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(final, previous)
        os.replace(tmp, final)
    distributed.barrier()


def _final_holds(final: Path, step: int, info: distributed.DistInfo) -> bool:
    """Whether ``final/`` is marked with ``step`` and its files verify (collective)."""
    def marked_step() -> int | None:
        return json.loads((final / checkpoint.MARKER_FILE).read_text()).get("step") if checkpoint.is_complete(final) \
            else None

    return distributed.main_then_share(info.is_main, marked_step) == step and not checkpoint.verify(final, info)


def _last_logged_loss(trainer) -> float | None:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses[-1] if losses else None


def headline(results: dict, dims: list[int], metric: str = "ndcg@10") -> str | None:
    if results.get("task") == "reranker":
        from .reranker.training import headline as rerank_headline

        return rerank_headline(results, metric)
    if "after" not in results:
        return None
    d = max(dims)
    after = results["after"].get(d, {}).get(metric)
    before = results.get("before", {}).get(d, {}).get(metric)

    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    return f"{metric.upper()} before={fmt(before)} after={fmt(after)}"


def _write_summary(out: Path, results: dict, dims: list[int] | None) -> None:
    from .evaluation.sharded import plot_ndcg_vs_dim

    if dims is None:  # reranker: retrieval vs reranked, before and after training
        summary = {key: {str(k): m for k, m in results.get(key, {}).items()} for key in ("before", "after")}
        (out / "metrics.json").write_text(json.dumps(summary, indent=2))
        return
    summary = {
        "dims": dims,
        "before": {str(d): m for d, m in results.get("before", {}).items()},
        "after": {str(d): m for d, m in results.get("after", {}).items()},
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    curves = {label: results[key] for key, label in (("before", "before training"), ("after", "after training"))
              if results.get(key)}
    plot_ndcg_vs_dim(curves, out / "ndcg_vs_dim.png")
