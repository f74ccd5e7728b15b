"""task: reranker -- a multimodal cross-encoder trained on negatives mined by a retriever.

Everything of the reranker's lives in this package: the model and its head (``model.py``), the
losses (``loss.py``), the mined rows and first-stage candidates (``prepare.py``), the
retrieve-and-rerank evaluation (``evaluation.py``) and the fusion weight of a residual reranker
(``model.fusion_record`` / ``model.fusion_weight``).
"""

from __future__ import annotations

import json

from sentence_transformers import CrossEncoderTrainingArguments

from dist_vdr.config import Config
from dist_vdr.engines.trainers import RerankerTrainer
from dist_vdr.kinds.base import RunContext, Task, TaskInputs
from dist_vdr.kinds.reranker import commands
from dist_vdr.kinds.reranker.evaluation import RerankEvaluator
from dist_vdr.kinds.reranker.loss import build_reranker_loss
from dist_vdr.kinds.reranker.model import FUSION_FILE, build_reranker, fusion_record
from dist_vdr.kinds.reranker.prepare import prepare
from dist_vdr.run.results import RunResult


class RerankerTask(Task):
    trainer_class = RerankerTrainer
    model_phase = "negatives (mined or cached) + model build"

    extends = "reranker"

    def configure(self, cfg: Config) -> None:
        if cfg.training.batch_sampler == "auto":
            # Mined negatives are shared between queries, which no-duplicates batching cannot fill
            # batches with; in-batch negatives of the listwise loss do want distinct rows.
            in_batch = cfg.loss.num_in_batch_negatives > 0
            cfg.training.batch_sampler = "no_duplicates_hashed" if in_batch else "batch_sampler"
        if cfg.reranker.retrieval_score_weight > 0 and (
                cfg.loss.name != "listwise" or cfg.loss.num_in_batch_negatives or not cfg.mining.enabled):
            raise ValueError("reranker.retrieval_score_weight > 0 trains on the retriever's scores of each row's "
                             "pages, which mining records: use loss.name=listwise, "
                             "loss.num_in_batch_negatives=0 and mining.enabled=true (or set the weight to 0)")
        check_retriever(cfg.reranker.retriever, cfg, "reranker.retriever")

    def local_paths(self, cfg: Config) -> list[tuple[str, str]]:
        return [("reranker.retriever", "retriever folder")]

    def prepare(self, ctx: RunContext, data) -> TaskInputs:
        if ctx.cfg.data.pages_path:
            raise ValueError("data.pages_path (rows naming pages by id) is not supported for task: reranker yet; "
                             "train it on rows with page images (dist-vdr mine-negatives --data writes them)")
        # Mining and first-stage retrieval with the retriever (collective, cached in the output folder);
        # the sampler sees the mined rows, which it hashes itself.
        train, candidates = prepare(ctx.cfg, ctx.info, ctx.out, data.train, data.eval)
        return TaskInputs(train=train, eval_extra=candidates)

    def build_model(self, ctx: RunContext):
        cfg = ctx.cfg
        return build_reranker(cfg.model, cfg.reranker, precision=cfg.training.precision, device=ctx.info.device)

    def training_arguments(self, cfg: Config) -> tuple[type, dict]:
        # One instruction for every (query, page) pair.
        return CrossEncoderTrainingArguments, ({"prompts": cfg.reranker.prompt} if cfg.reranker.prompt else {})

    def build_loss(self, ctx: RunContext, model):
        return build_reranker_loss(model, ctx.cfg.loss, ctx.cfg.reranker.retrieval_score_weight)

    def build_evaluator(self, ctx: RunContext, eval_data, dims: list[int], inputs: TaskInputs):
        e, r = ctx.cfg.evaluation, ctx.cfg.reranker
        return RerankEvaluator(eval_data, inputs.eval_extra, depth=r.rerank_depth, ks=e.ks, batch_size=e.batch_size,
                               prompt=r.prompt, retrieval_score_weight=r.retrieval_score_weight)

    def final_files(self, cfg: Config) -> dict[str, str]:
        fusion = fusion_record(cfg.reranker)
        return {FUSION_FILE: json.dumps(fusion, indent=2)} if fusion else {}

    card_model_class = "CrossEncoder"

    def card_usage(self, cfg: Config) -> str:
        return ("```python\nfrom PIL import Image\nfrom sentence_transformers import CrossEncoder\n\n"
                'model = CrossEncoder("path/to/final")  # this folder\n'
                'scores = model.predict([("a page with a red header", Image.open("page.png"))])\n```'
                + (f"\n\nThe run fused the reranker's score with the retriever's (`{FUSION_FILE}`)."
                   if fusion_record(cfg.reranker) else ""))

    def headline(self, result: RunResult, metric: str) -> str | None:
        """Retrieval vs reranked, before and after training (and the reranker's score alone when fused)."""
        if result.after is None:
            return None

        def get(which: str, stage: str) -> str:
            metrics = result.before if which == "before" else result.after
            value = metrics.get(stage, metric) if metrics else None
            return "n/a" if value is None else f"{value:.4f}"

        line = (f"{metric.upper()} retrieval={get('after', 'retrieval')} reranked: "
                f"before training={get('before', 'rerank')} after={get('after', 'rerank')}")
        if "rerankonly" in result.after.rows:  # retrieval_score_weight > 0: the reranker's score alone too
            line += f" (reranker score alone: before={get('before', 'rerankonly')} after={get('after', 'rerankonly')})"
        return line

    # -- commands ---------------------------------------------------------------------------------------------
    def load_model(self, model_cfg, cfg, *, device: str, precision: str, flag: str = "--model"):
        return commands.load(model_cfg, cfg, device=device, precision=precision, flag=flag)

    def scoring(self, cfg):
        raise ValueError("a reranker scores (query, page) pairs and retrieves nothing: give a retriever (an "
                         "embedding model) as --model, and the reranker as --reranker (eval) or --teacher (mining)")

    def command_evaluator(self, cfg, data, model):
        raise ValueError(f"--model {cfg.model.name_or_path} is a reranker: it reranks a retriever's pages; give the "
                         f"retriever as --model and this folder as --reranker")

    def teacher(self, model, cfg):
        return commands.teacher(model, cfg)

    def teacher_record(self, cfg) -> dict:
        return {"teacher_prompt": cfg.reranker.prompt}

    def rerank_command(self, cfg, info, data, retriever, output, write) -> int:
        return commands.rerank(cfg, info, data, retriever, output, write)


def check_retriever(path: str, cfg, key: str) -> None:
    """ValueError unless the model folder ``path`` retrieves by cosine of one vector (the reranker's first stage
    and mining score so): a model of another kind (e.g. token vectors by MaxSim) would be loaded as something else."""
    from pathlib import Path

    from dist_vdr import kinds
    from dist_vdr.retrieval.scoring import is_cosine

    if not Path(path).is_dir():
        return
    kind = kinds.of_folder(path, key)
    if not is_cosine(kinds.get(kind).scoring(cfg)):
        raise ValueError(f"{key}={path!r} is a model of task={kind}: the reranker's retrieval and mining score one "
                         f"vector per page by cosine; give a single-vector embedding model")
