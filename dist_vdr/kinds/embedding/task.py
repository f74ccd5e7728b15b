"""task: embedding -- a SentenceTransformer (bi-encoder) trained with in-batch and hard negatives.

The loss is the recipe's contrastive loss (cached MNRL with cross-device negatives, wrapped in
MatryoshkaLoss when dims are given); evaluation is retrieval at every Matryoshka dimension.
"""

from __future__ import annotations

from sentence_transformers import SentenceTransformerTrainingArguments

from dist_vdr.config import Config
from dist_vdr.engines.trainers import Trainer
from dist_vdr.kinds.base import GlobalBatchTask, RunContext, TaskInputs
from dist_vdr.kinds.embedding.loss import build_loss
from dist_vdr.losses.global_batch import dataset_options
from dist_vdr.models import guide as guide_models
from dist_vdr.models.build import build_model, check_dims, embedding_dim
from dist_vdr.retrieval import stock
from dist_vdr.retrieval.scoring import is_cosine
from dist_vdr.retrieval.sharded import ShardedRetrievalEvaluator


class EmbeddingTask(GlobalBatchTask):
    trainer_class = Trainer

    extends = "embedding"

    def configure(self, cfg: Config) -> None:
        super().configure(cfg)
        if cfg.evaluation.implementation == "stock" and not is_cosine(self.scoring(cfg)):
            raise ValueError(f"evaluation.implementation=stock (sentence-transformers' evaluator) scores by cosine; "
                             f"task={self.name} scores by {type(self.scoring(cfg)).__name__}: use "
                             f"evaluation.implementation=sharded")
        loss = cfg.loss
        if loss.implementation == "global_batch" and loss.name != "cmnrl":
            raise ValueError("loss.implementation=global_batch needs loss.name=cmnrl")
        for key in ("false_negatives", "distillation"):
            if getattr(loss, key).enabled and (loss.name != "cmnrl" or loss.implementation == "stock"):
                raise ValueError(f"loss.{key} needs the global-batch loss: loss.name=cmnrl with "
                                 f"loss.implementation auto or global_batch")
        check_mixture_options(cfg)
        self.check_rows(cfg)

    def build_model(self, ctx: RunContext):
        return build_model(ctx.cfg.model, precision=ctx.cfg.training.precision, device=ctx.info.device,
                           seed=ctx.cfg.training.seed)

    def eval_dims(self, cfg: Config, model) -> list[int]:
        dim = embedding_dim(model)
        check_dims(cfg.loss.matryoshka_dims, dim, "loss.matryoshka_dims")
        dims = cfg.eval_dims(dim)
        check_dims(dims, dim, "evaluation.dims")
        return dims

    def training_arguments(self, cfg: Config) -> tuple[type, dict]:
        return SentenceTransformerTrainingArguments, {}

    def build_loss(self, ctx: RunContext, model):
        guide = load_guide(ctx, model) if ctx.cfg.loss.false_negatives.guide else None
        return build_loss(model, ctx.cfg.loss, rank=ctx.info.rank, world_size=ctx.info.world_size, guide=guide,
                          datasets=dataset_options(ctx.cfg), scoring=self.scoring(ctx.cfg))

    def build_evaluator(self, ctx: RunContext, eval_data, dims: list[int], inputs: TaskInputs):
        e = ctx.cfg.evaluation
        if e.implementation == "stock":
            return stock.build_evaluator(eval_data, dims, batch_size=e.batch_size, ks=e.ks,
                                         show_progress_bar=ctx.info.is_main)
        return ShardedRetrievalEvaluator.of(eval_data, dims, e, show_progress=True, scoring=self.scoring(ctx.cfg))


def check_mixture_options(cfg: Config) -> None:
    """Per-dataset loss options need the global-batch loss (it reads each step's dataset)."""
    asked = [e.name for e in cfg.data.datasets if e.cross_device_negatives is not None or not e.in_batch_negatives
             or e.mini_batch_size or e.mini_batch_num_tokens]
    if asked and (cfg.loss.name != "cmnrl" or cfg.loss.implementation == "stock"):
        raise ValueError(f"data.datasets {asked} set loss options of their own (cross_device_negatives, "
                         f"in_batch_negatives, mini_batch_size, mini_batch_num_tokens): they need loss.name=cmnrl "
                         f"with loss.implementation auto or global_batch")


def load_guide(ctx: RunContext, model):
    """The frozen guide of loss.false_negatives, an embedding model (:func:`dist_vdr.models.guide.load_guide`)."""
    return guide_models.load_guide(ctx.cfg, model, lambda guide_cfg: build_model(
        guide_cfg, precision=ctx.cfg.training.precision, device=ctx.info.device))
