"""sentence-transformers' trainers with evaluators that run on every rank, and engine-aware gradient caching.

sentence-transformers 6.2 runs an evaluator on rank 0 only (the other ranks serve its encode calls,
pickled through scatter) and disables that under FSDP/DeepSpeed. dist-vdr's sharded evaluator
instead runs on all ranks at once, each with its own corpus shard; evaluators that say so with
``all_ranks = True`` are called that way here. On the first training step the engine hooks of
:mod:`dist_vdr.engines.gradient_cache` are installed (one gradient reduction per step under DeepSpeed and FSDP2).
Everything else is the stock trainer: ``Trainer`` for embedding models (SentenceTransformerTrainer),
``RerankerTrainer`` for cross-encoders (CrossEncoderTrainer), ``MultiVectorTrainer`` for multi-vector models
(MultiVectorEncoderTrainer), with the same additions.
"""

from __future__ import annotations

import os
import time

import torch
from sentence_transformers import CrossEncoderTrainer, MultiVectorEncoderTrainer, SentenceTransformerTrainer

from dist_vdr import compat, distributed, log
from dist_vdr.checkpoints import store as checkpoint
from dist_vdr.data import page_refs
from dist_vdr.engines import adapters as adapter_engines
from dist_vdr.engines import gradient_cache as engines
from dist_vdr.models import adapters
from dist_vdr.run.folder import RunDir

logger = log.get(__name__)
# Masking that leaves out more than this fraction of a query's negatives is warned about (once).
MASKED_TOO_MANY = 0.5


class _DistVdrTrainerMixin:
    keep_parameters_gathered: bool = False
    step_health = None  # preemption.StepHealth: told every micro-step's loss, checked at the step end
    _engine_ready: bool = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        adapter_engines.install_loaders()  # before train(): a resume loads the engine state first

    _since_log: tuple[float, int] | None = None  # (time, global step) of the last training log
    _paused_s: float = 0.0  # evaluation and checkpointing since the last log: not training time

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._since_log is None:
            self._since_log = (time.perf_counter(), self.state.global_step)
        if not self._engine_ready:  # the engine exists only once train() has prepared the model
            engines.prepare_trainer(self, keep_parameters_gathered=self.keep_parameters_gathered)
            self._engine_ready = True
        if page_refs.TRACE_KEY in inputs:
            page_refs.record_trace(inputs, self.args.process_index, self.state.global_step + 1)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.step_health is not None:
            self.step_health.observe(loss)
        if self.keep_parameters_gathered:
            engines.release_parameters(self)
        return loss

    _warned_masking = False

    def log(self, logs: dict, *args, **kwargs) -> None:
        # Masking false negatives: how many candidates left each query's softmax (rank 0's queries, mean
        # since the last log; no collective for it).
        take = getattr(getattr(self, "loss", None), "take_masked_stats", None)
        stats = take() if take is not None and "loss" in logs else None
        if stats is not None:
            logs["masked_per_query"] = round(stats[0], 4)
            if stats[1] > MASKED_TOO_MANY and not self._warned_masking and self.args.process_index == 0:
                self._warned_masking = True
                logger.warning(f"loss.false_negatives masks {stats[1]:.0%} of each query's negatives: little is left "
                               f"to learn from. A guide that cannot tell the pages apart (e.g. an untrained "
                               f"model) masks almost everything: lower loss.false_negatives.margin, use "
                               f"margin_strategy=relative, or a trained guide")
        if "loss" in logs:
            self._log_dataset_losses(logs)
            self._log_speed(logs)
        super().log(logs, *args, **kwargs)

    def _log_speed(self, logs: dict) -> None:
        """``step_seconds`` and ``samples_per_second`` (global batch rows) since the last log, wall clock on
        rank 0's view (no device sync: a mean over the steps logged), without the evaluations and checkpoints
        in between (data loading stays in: it is part of training)."""
        if self._since_log is None:
            return
        now, step = time.perf_counter(), self.state.global_step
        then, before = self._since_log
        training_s = now - then - self._paused_s
        self._since_log, self._paused_s = (now, step), 0.0
        if step > before and training_s > 0:
            seconds = training_s / (step - before)
            rows = self.args.per_device_train_batch_size * self.args.world_size * self.args.gradient_accumulation_steps
            logs["step_seconds"] = round(seconds, 4)
            logs["samples_per_second"] = round(rows / seconds, 3)

    dataset_names: list[str] = []  # a mixture's datasets (data.datasets), named in the logs

    def _log_dataset_losses(self, logs: dict) -> None:
        """``loss/<dataset>``: each mixture dataset's mean step loss over all ranks since the last log.
        Every rank logs at the same steps, so the one all-gather here is issued by all."""
        take = getattr(getattr(self, "loss", None), "take_dataset_losses", None)
        sums = take() if take is not None and self.dataset_names else None
        if sums is None:
            return
        total = distributed.all_gather_same(sums).sum(0)
        for name, (loss, steps) in zip(self.dataset_names, total.tolist(), strict=True):
            if steps:
                logs[f"loss/{name}"] = round(loss / steps, 6)

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        # After each optimizer step: the log (first), then evaluation and checkpointing. Their time, from the
        # log on (or from the call's start when it logged nothing), is left out of the next step_seconds.
        start = time.perf_counter()
        result = compat.log_save_evaluate(super()._maybe_log_save_evaluate, *args, **kwargs)
        logged_at = self._since_log[0] if self._since_log is not None else start
        self._paused_s += time.perf_counter() - max(start, logged_at)
        return result

    def _run_epoch(self, *args, **kwargs):
        # transformers' private _run_epoch (compat: transformers.trainer_run_epoch) checks max_steps only
        # after a step: resumed from the checkpoint of the last step, it would train one step past the recipe.
        if self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return compat.run_epoch(super()._run_epoch, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # transformers passes the wrapped model on the FSDP path; sentence-transformers' override
        # takes one argument (TypeError). FSDP checkpoints hold sharded weights (distcp), which only
        # the transformers loader reads, with resharding to the current number of ranks.
        if adapters.is_adapted(self.model):  # a LoRA run's checkpoint holds the adapter alone
            return adapter_engines.load_adapter(self.model, resume_from_checkpoint, key="resume checkpoint")
        if self.is_fsdp_enabled:
            return compat.hf_load_from_checkpoint(self, resume_from_checkpoint, model)
        return compat.st_load_from_checkpoint(super()._load_from_checkpoint, resume_from_checkpoint)

    def load_weights_of(self, checkpoint_dir: str) -> None:
        """A checkpoint of this run (written by as many ranks) into the live model, as a resume loads it
        (collective under DeepSpeed and FSDP2: each rank its shards; training.final=best)."""
        if self.is_deepspeed_enabled:
            return compat.deepspeed_load_engine_checkpoint(self.model_wrapped, checkpoint_dir)
        if self.is_fsdp_enabled:
            return self._load_from_checkpoint(checkpoint_dir, self.model_wrapped)
        return self._load_from_checkpoint(checkpoint_dir)

    def cannot_load_weights_of(self, checkpoint_dir: str, world_size: int) -> str | None:
        """Why :meth:`load_weights_of` cannot load ``checkpoint_dir`` (None: it can). DDP reads whole weights and
        FSDP2's DCP reshards; DeepSpeed's optimizer partitions load on as many ranks only, and an engine set up
        to resume from a universal checkpoint (another number of ranks) reads universal checkpoints only."""
        if not self.is_deepspeed_enabled:
            return None
        written_by = checkpoint.saved_world_size(checkpoint_dir)
        if written_by not in (None, world_size):
            return f"written by {written_by} rank(s), this run has {world_size}"
        if self.model_wrapped.load_universal_checkpoint():
            return "this run resumed on another number of ranks: its DeepSpeed engine loads universal checkpoints only"
        return None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # An adapter under DeepSpeed/FSDP2: gather the adapter alone (collective), never the frozen base
        # (transformers would gather all of it under ZeRO-3, and write nothing under FSDP2's sharded state).
        if adapters.is_adapted(self.model) and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            state_dict = adapter_engines.gather_adapter(self)
            return self._save(output_dir, state_dict=state_dict)
        return super().save_model(output_dir, _internal_call)

    def save_final_model(self, output_dir: str) -> None:
        """The trained model, complete, into ``output_dir`` (collective: every rank calls it)."""
        if adapters.is_adapted(self.model) or not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            return self.save_model(output_dir)
        # Gather the full weights (collective), rank 0 writes a plain SentenceTransformer folder.
        state_dict = self.accelerator.get_state_dict(self.model_wrapped)
        return self._save(output_dir, state_dict=state_dict)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        compat.require("transformers.trainer_engine_checkpoint_calls")  # a private Trainer step, wrapped
        with adapter_engines.checkpoint_without_base(self):
            return super()._save_optimizer_and_scheduler(output_dir)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # sentence-transformers' _save ignores ``state_dict``; under ZeRO-3/FSDP2 the module's own
        # parameters are shards, so the gathered full state dict must be what gets written.
        if not self.args.should_save:
            return None
        if adapters.is_adapted(self.model):  # the adapter alone: the frozen base is the base model's files
            output_dir = output_dir or self.args.output_dir
            adapters.save(self.model, output_dir, state_dict)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
            return None
        if not state_dict:
            return compat.st_trainer_save(super()._save, output_dir, state_dict)
        compat.saving_gathered_state_dict()
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        with engines.saving_state_dict(self.model, state_dict):
            # No model card: writing it runs an encode on this rank alone, and a forward of a
            # sharded model is a collective (the other ranks would never join: hang).
            self.model.save_pretrained(output_dir, create_model_card=False)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        return None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        evaluator = self.evaluator
        if not getattr(evaluator, "all_ranks", False):
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                           metric_key_prefix)
        self.evaluator = None  # the stock loop then only does what the HF trainer does (eval loss, if any)
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
        finally:
            self.evaluator = evaluator
        output_path = str(RunDir(self.args.output_dir).eval_during_training) if self.is_world_process_zero() else None
        metrics = evaluator(self.model, output_path=output_path, epoch=self.state.epoch, steps=self.state.global_step)
        output.metrics.update({k if k.startswith(f"{metric_key_prefix}_") else f"{metric_key_prefix}_{k}": v
                               for k, v in metrics.items()})
        return output


class Trainer(_DistVdrTrainerMixin, SentenceTransformerTrainer):
    """SentenceTransformerTrainer + dist-vdr's engine hooks, all-rank evaluators and sharded saves."""


class RerankerTrainer(_DistVdrTrainerMixin, CrossEncoderTrainer):
    """CrossEncoderTrainer + the same additions."""


class MultiVectorTrainer(_DistVdrTrainerMixin, MultiVectorEncoderTrainer):
    """MultiVectorEncoderTrainer (its collator tells each column's ``task``) + the same additions."""
