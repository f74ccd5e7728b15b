"""SentenceTransformerTrainer with evaluators that run on every rank.

sentence-transformers 6.2 runs an evaluator on rank 0 only (the other ranks serve its encode calls,
pickled through scatter) and disables that under FSDP/DeepSpeed. dist-vdr's sharded evaluator
instead runs on all ranks at once, each with its own corpus shard; evaluators that say so with
``all_ranks = True`` are called that way here. Everything else is the stock trainer.
"""

from __future__ import annotations

import os


def _base():
    from sentence_transformers import SentenceTransformerTrainer

    return SentenceTransformerTrainer


class Trainer(_base()):
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
        output_path = os.path.join(self.args.output_dir, "eval") if self.is_world_process_zero() else None
        metrics = evaluator(self.model, output_path=output_path, epoch=self.state.epoch, steps=self.state.global_step)
        output.metrics.update({k if k.startswith(f"{metric_key_prefix}_") else f"{metric_key_prefix}_{k}": v
                               for k, v in metrics.items()})
        return output
