"""Run a training job: the steps every task shares, with the task (dist_vdr.kinds) asked for the rest.

The order matters for users: everything a user can get wrong (config, world size, data, dims) is
checked before the output folder is touched; rank 0 alone decides the resume point and writes the
run's records; every rank announces itself so a log shows who trained. docs/architecture.md walks
through one run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import transformers

from dist_vdr import distributed, log
from dist_vdr import kinds as tasks
from dist_vdr.checkpoints import store as checkpoint
from dist_vdr.config import Config, to_yaml
from dist_vdr.data import mixture, mixture_rows
from dist_vdr.data.prepared import PreparedData
from dist_vdr.engines import gradient_cache as engines
from dist_vdr.kinds.base import RunContext, Task, TaskInputs
from dist_vdr.models.build import compile_blocks, resolve_dtype
from dist_vdr.run import callbacks, card, final, preemption, records, resume_guard, setup, tracking
from dist_vdr.run import evaluate as run_eval
from dist_vdr.run import folder as run_dir
from dist_vdr.run.data import prepare_data
from dist_vdr.run.lock import LOCK_FILE as RUN_LOCK_FILE
from dist_vdr.run.lock import RunLock
from dist_vdr.run.results import RunResult
from dist_vdr.run.startup_timer import Phases
from dist_vdr.run.step_stats import StepStatsCallback

logger = log.get(__name__)


def run_training(cfg: Config, task: Task | None = None, *, resume: str | None = None, no_resume: bool = False,
                 allow_config_change: bool = False) -> RunResult:
    """Train as ``cfg`` says, as ``task`` (default: the recipe's ``task:``) trains its model kind.

    ``allow_config_change``: resume even when the schedule length differs from the checkpoint's
    recipe (see :mod:`dist_vdr.run.resume_guard`).
    """
    task = task or tasks.get(cfg.task)
    info = distributed.init(cfg.launch.device, cfg.launch.expected_world_size, cfg.launch.num_threads_per_process,
                            timeout_s=cfg.launch.collective_timeout_s)
    phases = Phases()
    phases.mark("imports + process group")
    distributed.main_then_share(info.is_main, lambda: run_output(cfg).check() and None)  # rank 0 decides
    if cfg.launch.handle_preemption:
        preemption.install()
    if not info.is_main:
        transformers.logging.set_verbosity_warning()
    logger.info(f"joined: world size {info.world_size}, device {info.device}", extra=log.ALL_RANKS)
    per_device = cfg.resolve_batch(info.world_size)
    ctx = RunContext(cfg=cfg, info=info, out=Path(cfg.training.output_dir), engine=distributed.requested_engine())
    if ctx.engine and cfg.training.gradient_accumulation_steps != 1:
        raise ValueError(f"training.gradient_accumulation_steps={cfg.training.gradient_accumulation_steps} under "
                         f"{ctx.engine}: with gradient caching the batch costs no extra memory, so raise "
                         f"training.global_batch_size instead and keep accumulation at 1")

    # Data first: a bad row fails here, before anything is written. Every rank decodes its share once
    # (or finds the record of an earlier pass over the same data).
    data = prepare_data(cfg, info, ctx.out, hash_rows=task.hashes_training_rows(cfg),
                        extra_columns=task.extra_columns(cfg))
    phases.mark("data: load, validation, hashing")
    phases.notes["startup_pass_s"] = sum(r.seconds for r in data.passes if r.reused_from is None)
    lock = RunLock(ctx.out, log=logger.info)
    distributed.main_then_share(info.is_main, lock.acquire)  # one writer per run folder
    try:
        run = _Run(ctx, task, per_device, phases)
        return run.execute(data, resume, no_resume, allow_config_change)
    finally:
        if info.is_main:
            lock.release()


_DATA_PATHS = ("path", "eval_path", "pages_path", "eval_queries_file", "eval_qrels_file")
RUN_FILES = (run_dir.RESOLVED_CONFIG, run_dir.RUN_INFO, RUN_LOCK_FILE, run_dir.STARTUP, run_dir.FINAL,
             run_dir.CHECKPOINT_PREFIX + "*", run_dir.SLURM_LOGS)
"""Files and folders of a run folder: one holding any of them is an earlier run (resumed, or refused by the
resume rules), not a user's folder."""


def run_output(cfg: Config):
    """The run folder as the output guard sees it: apart from every input path of the recipe (datasets, eval
    sets, page corpora, queries/qrels files, the model, an adapter to start from, a guide)."""
    from dist_vdr.outputs import Output

    inputs: dict[str, object] = {"model.name_or_path": cfg.model.name_or_path,
                                 "model.adapter.init_from": cfg.model.adapter.init_from,
                                 "loss.false_negatives.guide": getattr(cfg.loss.false_negatives, "guide", None)}
    for key in _DATA_PATHS:
        inputs[f"data.{key}"] = getattr(cfg.data, key, None)
    for i, entry in enumerate(cfg.data.datasets or []):
        for key in _DATA_PATHS:
            inputs[f"data.datasets[{i}].{key}"] = getattr(entry, key, None)
    return Output("train", "training.output_dir", cfg.training.output_dir, inputs, earlier=RUN_FILES)


def check_data(cfg: Config) -> PreparedData:
    """`dist-vdr data check`: the training start's data pass ahead of time (1 process or under a
    launcher), its record written to the user cache, where the training runs of this data find it."""
    info = distributed.init(cfg.launch.device, 0, cfg.launch.num_threads_per_process,
                            timeout_s=cfg.launch.collective_timeout_s)
    task = tasks.get(cfg.task)
    data = prepare_data(cfg, info, None, hash_rows=task.hashes_training_rows(cfg),
                        extra_columns=task.extra_columns(cfg))
    if info.is_main:
        for folder in data.write_records(None):
            logger.info(f"record written: {folder}")
    return data


def headline(result: RunResult, metric: str = "ndcg@10") -> str | None:
    """The line a finished run prints (its task's headline)."""
    return tasks.get(result.task).headline(result, metric)


@dataclass
class _Run:
    """One training run, holding the lock of its output folder."""

    ctx: RunContext
    task: Task
    per_device: int
    phases: Phases
    stopper: object = None  # preemption's callback: where a stop signal stopped the run
    data_rows: dict = dataclasses.field(default_factory=dict)  # training rows per dataset (the model card)
    weights_of_step: int | None = None  # training.final=best: the step whose weights final/ holds

    def execute(self, data: PreparedData, resume: str | None, no_resume: bool,
                allow_config_change: bool) -> RunResult:
        ctx = self.ctx
        m = data.mixture
        self.data_rows = dict(zip(m.names, m.sizes, strict=True)) if m else {ctx.cfg.data.path: len(data.train)}
        config_text = to_yaml(ctx.cfg)
        resume_from = checkpoint.decide_resume(ctx.out, resume=resume, no_resume=no_resume, info=ctx.info,
                                               log=logger.info)
        if resume_from:
            recorded = checkpoint.saved_config(resume_from)
            notes = distributed.main_then_share(ctx.info.is_main, lambda: resume_guard.check(
                recorded, config_text, resume_from, allow_config_change))
            for note in notes:
                logger.info(note)
            if not resume_guard.schedule_changed(recorded, config_text):
                finished = self._finished(resume_from)
                if finished is not None:
                    return finished
        self.phases.mark("lock + resume decision")
        inputs = self.task.prepare(ctx, data)
        model = self.task.build_model(ctx)
        dims = self.task.eval_dims(ctx.cfg, model)
        engines.adapt_model(model, ctx.engine)
        if ctx.cfg.model.compile:
            logger.info(f"model.compile: {compile_blocks(model)} transformer blocks compiled "
                        f"(the first steps compile them)")
        self.phases.mark(self.task.model_phase)
        trainer, health = self._trainer(model, data, inputs, dims, resume_from, config_text)
        return self._train_and_evaluate(trainer, health, dims, resume_from)

    def _trainer(self, model, data: PreparedData, inputs: TaskInputs, dims: list[int], resume_from: str | None,
                 config_text: str):
        ctx, cfg, info = self.ctx, self.ctx.cfg, self.ctx.info
        load_universal = setup.prepare_resharded_resume(resume_from, cfg, info, self.per_device, ctx.engine)
        # Built (and so validated: trainer_args, scheduler name, ...) before the run's records are written.
        args_class, task_kwargs = self.task.training_arguments(cfg)
        tracker_run = distributed.main_then_share(info.is_main, lambda: tracking.run_name(ctx.out, bool(resume_from)))
        args = setup.build_training_args(cfg, info, self.per_device, args_class=args_class, task_kwargs=task_kwargs,
                                         has_eval=data.has_eval, run=ctx.run, row_hashes=inputs.row_hashes,
                                         mixture=data.mixture, run_name=tracker_run)
        engines.configure_deepspeed(args, load_universal=load_universal)
        if info.is_main:  # everything checked: the run's first writes
            data.write_records(ctx.out)
            records.write_run_records(ctx.out, cfg, info, resume_from, datasets=self._mixture_plan(data),
                                      tracker_run=args.run_name)
        distributed.barrier()
        logger.info(f"resuming from {resume_from}" if resume_from else f"starting a new run in {ctx.out}")
        health = preemption.StepHealth()
        evaluator = self._evaluator(data, dims, inputs)
        loss = self.task.build_loss(ctx, model)
        logger.info(f"loss: {setup.describe_loss(loss)}; global batch {cfg.training.global_batch_size} "
                    f"= {info.world_size} rank(s) x {self.per_device} x {cfg.training.gradient_accumulation_steps} "
                    f"accumulation")
        trainer = self.task.trainer_class(model=model, args=args, train_dataset=inputs.train, loss=loss,
                                          evaluator=evaluator,
                                          callbacks=self._callbacks(health, config_text, evaluator))
        trainer.keep_parameters_gathered = cfg.launch.keep_parameters_gathered
        trainer.step_health = health
        tracking.configure(trainer, ctx.out, config_text)
        trainer.dataset_names = data.mixture.names if data.mixture is not None and cfg.data.mixture != "mixed" else []
        if data.mixture is not None:
            trainer.data_collator = mixture_rows.DatasetLabelCollator(
                trainer.data_collator, [e.max_pixels for e in cfg.data.datasets],
                [cfg.data.positive_column, *cfg.data.negative_columns])
        setup.resolve_page_ids(trainer, cfg, inputs.train, data.mixture)
        trainer.data_collator = self.task.wrap_collator(ctx, trainer.data_collator)
        setup.check_engine(trainer, info)
        self.phases.mark("trainer setup")
        return trainer, health

    def _evaluator(self, data: PreparedData, dims: list[int], inputs: TaskInputs):
        """The task's evaluator of the eval data; of several eval sets (a mixture's), one per set and their
        macro average (:class:`~dist_vdr.retrieval.multi.MultiSetEvaluator`)."""
        build = lambda eval_data: self.task.build_evaluator(self.ctx, eval_data, dims, inputs)  # noqa: E731
        if data.eval_sets:
            from dist_vdr.retrieval.multi import MultiSetEvaluator

            return MultiSetEvaluator({name: build(sets) for name, sets in data.eval_sets.items()})
        return build(data.eval) if data.eval is not None else None

    def _mixture_plan(self, data: PreparedData) -> list[dict] | None:
        m, cfg = data.mixture, self.ctx.cfg
        if m is None:
            return None
        plan = mixture.plan_summary(m.names, m.sizes, mixture_rows.weights(cfg.data, m.sizes), cfg.data.mixture,
                                    cfg.training.global_batch_size)
        for entry in plan:
            logger.info(f"dataset {entry['name']}: {entry['rows']} rows, weight {entry['weight']:g}, "
                        f"~{entry['steps_per_epoch']:g} steps and {entry['epochs_per_epoch']:g} epochs of its rows "
                        f"per epoch")
        return plan

    def _callbacks(self, health: preemption.StepHealth, config_text: str, evaluator=None) -> list:
        ctx, cfg = self.ctx, self.ctx.cfg
        self.stopper = callbacks.PreemptionCallback(health)
        primary = getattr(evaluator, "primary_metric", None)  # e.g. dim64_cosine_ndcg@10, rerank_ndcg@10
        main = f"eval_{primary.rsplit('_', 1)[0]}_{cfg.evaluation.main_metric}" if primary else None
        hooks = [callbacks.CheckpointMarker(ctx.info, config_text, cfg.training.save_total_limit, main,
                                            cfg.training.keep_best),
                 callbacks.RankLogger(ctx.info), self.stopper,
                 callbacks.FirstStepTimer(self.phases, records.first_step_report(ctx.info, ctx.out))]
        if cfg.launch.log_collectives:
            hooks.append(callbacks.CollectiveLogger(str(ctx.out), ctx.info.rank))
        if cfg.training.record_step_stats:
            hooks.append(StepStatsCallback(ctx.run.step_stats, is_main=ctx.info.is_main))
        return hooks

    def _train_and_evaluate(self, trainer, health, dims: list[int], resume_from: str | None) -> RunResult:
        ctx, cfg = self.ctx, self.ctx.cfg
        result = RunResult(task=self.task.name or self.ctx.cfg.task, global_step=0, dims=dims)
        if trainer.evaluator is not None and cfg.evaluation.before_training:
            result.before = run_eval.stored(ctx.out, "before")
            if result.before is None:
                logger.info("evaluating the untrained model")
                result.before = run_eval.evaluate(trainer, ctx.info, ctx.out, "before", step=0)
            self.phases.mark("evaluation before training")
        setup.train(trainer, resume_from, ctx.out)
        result.global_step = trainer.state.global_step
        result.final_loss = final.logged_losses(trainer.state.log_history)
        if self.stopper.stopped_at is not None:
            return self._stopped(result)
        best = self._load_best(trainer) if cfg.training.final == "best" else None
        final.save_final(trainer, ctx.info, ctx.out, self.task.files_of_model(cfg), merge_with=self._merge_with(),
                         record={"weights_of_step": checkpoint.checkpoint_step(best)} if best else None)
        result.weights_of_step = self.weights_of_step
        self._write_card(result)  # a card at once, whatever becomes of the evaluation
        if trainer.evaluator is not None:
            step = self.weights_of_step or result.global_step  # the step of final/'s weights (final=best)
            result.after = run_eval.stored(ctx.out, "after", step=step)
            if result.after is None:
                logger.info("evaluating the trained model" + (f" (final/: the weights of step {step}, training.final="
                                                                f"best)" if self.weights_of_step else ""))
                result.after = run_eval.evaluate(trainer, ctx.info, ctx.out, "after", step=step)
            if ctx.info.is_main:
                self.task.write_summary(ctx.out, result)
            self._write_card(result)
        return result

    def _load_best(self, trainer) -> Path | None:
        """training.final=best: the kept best checkpoint's weights into the model (rank 0 picks it, every rank
        loads it); None when the last step is the best or no checkpoint carries an evaluation."""
        ctx = self.ctx
        best = distributed.main_then_share(ctx.info.is_main, lambda: (
            str(b) if (b := checkpoint.best_checkpoint(ctx.out)) else None))
        if best is None:
            logger.warning("training.final=best: no checkpoint carries an evaluation; final/ holds the last step")
            return None
        if checkpoint.checkpoint_step(best) == trainer.state.global_step:
            logger.info(f"training.final=best: the last step ({Path(best).name}) is the best")
            return None
        why_not = trainer.cannot_load_weights_of(best, ctx.info.world_size)
        if why_not:
            logger.warning(f"training.final=best: {Path(best).name} does not load into this run's engine ({why_not}): "
                           f"final/ holds the last step; {best} holds the best model (gathered at save): use that "
                           f"folder")
            return None
        logger.info(f"training.final=best: final/ takes the weights of {Path(best).name}")
        trainer.load_weights_of(best)  # as a resume loads it: adapters, plain models and engine shards alike
        self.weights_of_step = checkpoint.checkpoint_step(best)
        return Path(best)

    def _write_card(self, result: RunResult) -> None:
        """``final/README.md`` from the records (rank 0; no model run: the same under every engine)."""
        if not self.ctx.info.is_main:
            return
        cfg = self.ctx.cfg
        text = card.build_card(cfg, result, usage=self.task.card_usage(cfg), model_class=self.task.card_model_class,
                               run_info=card.last_run_info(self.ctx.out), data_rows=self.data_rows,
                               weights_of_step=self.weights_of_step)
        final.write_card(self.ctx.out, text)

    def _merge_with(self):
        """The model section to rebuild the base for ``final/merged`` (model.adapter.merge_on_save), with the
        weights' dtype of this run (auto resolves to float32 on the CPU where the merge runs)."""
        cfg, ctx = self.ctx.cfg, self.ctx
        if not (cfg.model.adapter.type and cfg.model.adapter.merge_on_save):
            return None
        dtype = resolve_dtype(cfg.model.dtype, cfg.training.precision, on_cuda=ctx.info.device.startswith("cuda"))
        return dataclasses.replace(cfg.model, dtype=dtype)

    def _stopped(self, result: RunResult) -> RunResult:
        """A stop signal: the step is saved; which rank saw which signal differs, and a USR2 anywhere
        means preemption (requeue wanted)."""
        signals = distributed.all_gather_objects(preemption.first_signal())
        reason = "SIGUSR2" if "SIGUSR2" in signals else next((s for s in signals if s), "a stop signal")
        why = "for preemption" if reason == "SIGUSR2" else f"by {reason}"
        step = self.stopper.stopped_at
        logger.info(f"stopped {why} at step {step}: checkpoint-{step} saved; rerun (or requeue) to resume",
                    extra=log.ALL_RANKS)
        result.global_step, result.preempted, result.signal = step, True, reason
        result.before, result.dims = None, []
        return result

    def _finished(self, resume_from: str) -> RunResult | None:
        """A rerun of a finished run (``final/`` intact and of the newest checkpoint's step): its results,
        without training another step or writing another model. None when the run is not finished."""
        step = checkpoint.checkpoint_step(resume_from)
        folder = self.ctx.run.final
        if not final.final_holds(folder, step, self.ctx.info):
            return None
        logger.info(f"this run finished at step {step}: {folder} holds its model (a new training.output_dir "
                    f"starts another run)")
        state = json.loads((Path(resume_from) / "trainer_state.json").read_text())
        best = json.loads((folder / checkpoint.MARKER_FILE).read_text()).get("weights_of_step")  # final=best
        after = run_eval.stored(self.ctx.out, "after", step=best or step)
        result = RunResult(task=self.task.name or self.ctx.cfg.task, global_step=step,
                           final_loss=final.logged_losses(state.get("log_history", [])),
                           before=run_eval.stored(self.ctx.out, "before"), after=after,
                           dims=after.dims if after else [], weights_of_step=best)
        self.weights_of_step = best
        if not (folder / card.CARD_FILE).is_file():  # a run stopped between its final model and its card
            self._write_card(result)
        return result

