"""task: multi_vector -- a MultiVectorEncoder trained by MaxSim InfoNCE over the global batch.

The loss is the shared score-exchange loss (queries and scores travel between ranks, pages stay; Matryoshka on
the token dimension); evaluation, mining and teacher scoring are the shared sharded retrieval with this kind's
:class:`~dist_vdr.kinds.multi_vector.scoring.MaxSimScoring`, at every token dim.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sentence_transformers import MultiVectorEncoderTrainingArguments

from dist_vdr.config import Config
from dist_vdr.engines.trainers import MultiVectorTrainer
from dist_vdr.kinds.base import GlobalBatchTask, RunContext, TaskInputs, dims_headline
from dist_vdr.kinds.multi_vector.evaluation import SINGLE, HybridEvaluator
from dist_vdr.kinds.multi_vector.loss import HybridCachedLoss
from dist_vdr.kinds.multi_vector.model import build_multi_vector, is_hybrid, is_multi_vector_model, token_dim
from dist_vdr.kinds.multi_vector.scoring import MaxSimScoring, PooledScoring, from_masked
from dist_vdr.losses.global_batch import dataset_options
from dist_vdr.models import guide as guide_models
from dist_vdr.models.build import check_dims
from dist_vdr.retrieval.sharded import ShardedRetrievalEvaluator
from dist_vdr.run.results import RunResult


def read_tokens(output: dict, side: str):
    """The loss's reading of a forward: the token embeddings in the mask-free layout (scoring.py)."""
    return from_masked(output["token_embeddings"], output["attention_mask"].bool(), side)


class MultiVectorTask(GlobalBatchTask):
    trainer_class = MultiVectorTrainer
    card_model_class = "MultiVectorEncoder"

    extends = "multi_vector"

    def configure(self, cfg: Config) -> None:
        super().configure(cfg)
        if cfg.evaluation.implementation == "stock":
            raise ValueError("evaluation.implementation=stock (sentence-transformers' single-vector evaluator) "
                             "cannot score token vectors: use evaluation.implementation=sharded (exact MaxSim)")
        if cfg.loss.implementation == "stock":
            raise ValueError("loss.implementation=stock is not available for task=multi_vector: the loss is the "
                             "score-exchange MaxSim InfoNCE (loss.implementation auto or global_batch)")
        guide = cfg.loss.false_negatives.guide
        if guide and Path(guide).is_dir() and not is_multi_vector_model(guide):
            raise ValueError(f"loss.false_negatives.guide={guide!r} is no multi-vector model (no saved "
                             f"MultiVectorEncoder): its token projection would be untrained; give a multi-vector "
                             f"model of the same backbone, e.g. an earlier run's final/")
        self.check_rows(cfg)

    def scoring(self, cfg) -> MaxSimScoring:
        mv = cfg.multi_vector
        return MaxSimScoring(divide_by_query_length=mv.divide_by_query_length, chunk_elements=mv.chunk_elements,
                             pool_factor=mv.pool_factor, store_dtype=mv.store_dtype,
                             first_stage_candidates=mv.first_stage_candidates)

    def build_model(self, ctx: RunContext):
        cfg = ctx.cfg
        model = build_multi_vector(cfg.model, precision=cfg.training.precision, device=ctx.info.device,
                                   seed=cfg.training.seed, token_dim=cfg.multi_vector.token_dim,
                                   image_tokens_only=cfg.multi_vector.image_tokens_only, hybrid=cfg.multi_vector.hybrid)
        # final/ records the score convention it is trained for: sentence-transformers' similarity and dist-vdr's
        # commands then score it so (MeanMaxSim: the sum divided by the query's number of tokens).
        model.similarity_fn_name = "meanmaxsim" if cfg.multi_vector.divide_by_query_length else "maxsim"
        return model

    def eval_dims(self, cfg: Config, model) -> list[int]:
        dim = token_dim(model)
        check_dims(cfg.loss.matryoshka_dims, dim, "loss.matryoshka_dims")
        dims = cfg.eval_dims(dim)
        check_dims(dims, dim, "evaluation.dims")
        if cfg.multi_vector.hybrid:  # the single vector's dims, evaluated beside (build_evaluator)
            width = model[0].get_embedding_dimension()
            check_dims(cfg.multi_vector.single_vector_dims, width, "multi_vector.single_vector_dims")
            self.single_dims = list(cfg.multi_vector.single_vector_dims or [width])
        return dims

    def training_arguments(self, cfg: Config) -> tuple[type, dict]:
        return MultiVectorEncoderTrainingArguments, {}

    def build_loss(self, ctx: RunContext, model):
        from dist_vdr.losses.score_exchange import ScoreExchangeCachedLoss

        cfg, loss = ctx.cfg, ctx.cfg.loss
        local = not loss.cross_device_negatives  # negatives kept on their rank: a world of one
        fn = loss.false_negatives
        # The guide: a multi-vector model of the same processor (e.g. the base), scored by the same rule.
        if fn.guide and not is_multi_vector_model(fn.guide):
            raise ValueError(f"loss.false_negatives.guide={fn.guide!r} is no multi-vector model (no saved "
                             f"MultiVectorEncoder): its token projection would be untrained; give a multi-vector "
                             f"model of the same backbone, e.g. an earlier run's final/")
        guide = guide_models.load_guide(cfg, model, lambda guide_cfg: build_multi_vector(
            guide_cfg, precision=cfg.training.precision, device=ctx.info.device)) if fn.guide else None
        mv = cfg.multi_vector
        cls, hybrid = (ScoreExchangeCachedLoss, {}) if not mv.hybrid else (HybridCachedLoss, dict(
            single_dims=mv.single_vector_dims, single_weight=mv.single_vector_weight,
            single_scale=mv.single_vector_scale))
        return cls(
            model, self.scoring(cfg), matryoshka_dims=loss.matryoshka_dims, matryoshka_weights=loss.matryoshka_weights,
            rank=0 if local else ctx.info.rank, world_size=1 if local else ctx.info.world_size, scale=loss.scale,
            mini_batch_size=loss.mini_batch_size, mini_batch_num_tokens=loss.mini_batch_num_tokens,
            query_length=cfg.multi_vector.query_length, represent_output=read_tokens,
            mask_same_ids=fn.id_column is not None, guide=guide, guide_margin=fn.margin,
            guide_margin_strategy=fn.margin_strategy, distillation=loss.distillation, datasets=dataset_options(cfg),
            **hybrid)

    def build_evaluator(self, ctx: RunContext, eval_data, dims: list[int], inputs: TaskInputs):
        # The pages' token vectors are stored on disk during each evaluation, in the run's folder (removed after).
        tokens = ShardedRetrievalEvaluator.of(eval_data, dims, ctx.cfg.evaluation, show_progress=True,
                                              scoring=self.scoring(ctx.cfg), scratch_dir=str(ctx.out / PAGE_STORE))
        if not ctx.cfg.multi_vector.hybrid:
            return tokens
        return HybridEvaluator(tokens, ShardedRetrievalEvaluator.of(eval_data, self.single_dims, ctx.cfg.evaluation,
                                                                    show_progress=True, scoring=PooledScoring()))

    def headline(self, result: RunResult, metric: str) -> str | None:
        """The token vectors' line; a hybrid's single vector (largest dim) after it."""
        tokens = dataclasses.replace(result, before=_rows(result.before, False), after=_rows(result.after, False))
        line = dims_headline(tokens, metric)
        single = _rows(result.after, True)
        if line is None or single is None or not single.rows:
            return line
        dim = max(int(row.split("/")[1]) for row in single.rows)
        before = _rows(result.before, True)
        value = lambda m: "n/a" if m is None or m.get(f"{SINGLE}/{dim}", metric) is None \
            else f"{m.get(f'{SINGLE}/{dim}', metric):.4f}"  # noqa: E731
        return f"{line} (single vector, dim {dim}: before={value(before)} after={value(single)})"

    def card_usage(self, cfg: Config) -> str:
        if cfg.model.adapter.type:
            load = ('model = MultiVectorEncoder("path/to/final/merged")  # the merged model (model.adapter.'
                    'merge_on_save;\n# else: dist-vdr merge-adapter path/to/final path/to/merged)')
        else:
            load = 'model = MultiVectorEncoder("path/to/final")  # this folder'
        return ("```python\nfrom PIL import Image\nfrom sentence_transformers import MultiVectorEncoder\n\n" + load
                + "\n"
                'queries = model.encode_query(["a page with a red header and a bar chart"])  # [tokens, dim] each\n'
                'pages = model.encode_document([Image.open("page.png")])  # page images\n'
                "print(model.similarity(queries, pages))  # MaxSim\n```")

    # -- commands ---------------------------------------------------------------------------------------------
    def load_model(self, model_cfg, cfg, *, device: str, precision: str, flag: str = "--model"):
        """A saved multi-vector model (or a multi-vector run's adapter folder) for a command; anything else would
        score by an untrained projection. The folder's score convention (meanmaxsim) becomes the command's."""
        from dist_vdr.models import adapters

        path = model_cfg.name_or_path
        if not adapters.is_adapter_folder(path) and not is_multi_vector_model(path):
            raise ValueError(f"{flag} {path} is no multi-vector model (no saved MultiVectorEncoder): a new token "
                             f"projection would be untrained; give a multi-vector run's final/ (or leave the "
                             f"kind to the folder: --teacher-type auto)")
        model = build_multi_vector(model_cfg, precision=precision, device=device)
        if cfg is not None and getattr(model, "similarity_fn_name", None) == "meanmaxsim":
            cfg.multi_vector.divide_by_query_length = True  # scored as the model was trained
        return model

    def command_evaluator(self, cfg, data, model):
        tokens = ShardedRetrievalEvaluator.of(data, cfg.evaluation.dims or [token_dim(model)], cfg.evaluation,
                                              cache_dir=cfg.eval.cache, scoring=self.scoring(cfg))
        if not is_hybrid(model):
            return tokens
        return HybridEvaluator(tokens, ShardedRetrievalEvaluator.of(
            data, [model[0].get_embedding_dimension()], cfg.evaluation, cache_dir=cfg.eval.cache,
            scoring=PooledScoring()))


PAGE_STORE = ".page-store"
"""The run folder's sub-folder where an evaluation during training stores its pages (emptied after each)."""


def _rows(metrics, single: bool):
    """``metrics`` with only the single vector's rows (``single``) or only the others."""
    if metrics is None:
        return None
    keep = {row: values for row, values in metrics.rows.items() if row.startswith(f"{SINGLE}/") == single}
    return dataclasses.replace(metrics, rows=keep)
