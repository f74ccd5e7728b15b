"""The Task interface: what differs between model kinds, in one place per kind.

``dist_vdr.run.training.run_training`` does the parts every run shares (process group, data pass, lock,
resume decision, records, trainer callbacks, checkpoints, final model, results) and asks the task
for the rest, in this order:

1. load time: :meth:`Task.configure` (resolve ``auto`` values, refuse combinations the kind cannot
   train) and :meth:`Task.local_paths` (extra paths that must exist);
2. data: :meth:`Task.hashes_training_rows` (the startup pass hashes rows for the sampler), then
   :meth:`Task.prepare` (the rows it trains on and anything its evaluator needs, e.g. mined
   negatives and first-stage candidates);
3. model: :meth:`Task.build_model`, :meth:`Task.eval_dims`;
4. trainer: :meth:`Task.training_arguments`, :meth:`Task.build_loss`, :meth:`Task.build_evaluator`,
   :attr:`Task.trainer_class`;
5. outputs: :meth:`Task.final_files`, :meth:`Task.write_summary`, :meth:`Task.headline`.

A task is registered by name in :mod:`dist_vdr.kinds`. Subclass :class:`Task` and override what
your kind does differently (docs/tasks.md has a worked example).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from dist_vdr.run.folder import RunDir

if TYPE_CHECKING:  # only for annotations: this module is imported while a Config is being validated
    from dist_vdr.config import Config
    from dist_vdr.data.loading import EvalData
    from dist_vdr.data.prepared import PreparedData
    from dist_vdr.distributed import DistInfo
    from dist_vdr.retrieval.protocol import RunEvaluator
    from dist_vdr.retrieval.scoring import Scoring
    from dist_vdr.run.results import RunResult


@dataclass(frozen=True)
class RunContext:
    """What a task is told about the run: the recipe, this process's place, the output folder and
    the engine the launch config asked for (deepspeed, fsdp or None for DDP). ``ctx.run`` names the
    output folder's files (:class:`dist_vdr.run.folder.RunDir`)."""

    cfg: Config
    info: DistInfo
    out: Path
    engine: str | None

    @property
    def run(self) -> RunDir:
        return RunDir(self.out)


@dataclass
class TaskInputs:
    """What :meth:`Task.prepare` hands the trainer and the evaluator."""

    train: Any
    """The dataset the trainer trains on."""
    row_hashes: Any = None
    """Content hashes of ``train``'s rows for the no-duplicates sampler (None: it hashes them itself)."""
    eval_extra: Any = None
    """Whatever the task's evaluator needs beyond the eval data (the reranker: first-stage candidates)."""


class Task:
    """Base of every task; the defaults are those of a model trained on the recipe's rows as they are."""

    name: str = ""
    """Set by the registry."""
    extends: ClassVar[str | None] = None
    """The registered kind whose declaration (losses, config section, options) a subclass registered by
    ``"module:Class"`` shares (:func:`dist_vdr.kinds.register`)."""
    model_phase: ClassVar[str] = "model build"
    """The name of the startup phase that builds the model (startup_times.json)."""

    # -- load time --------------------------------------------------------------------------
    def configure(self, cfg: Config) -> None:
        """Resolve ``auto`` values and refuse combinations this kind cannot train (ValueError with the fix)."""

    def local_paths(self, cfg: Config) -> list[tuple[str, str]]:
        """(config key, what it names) of the task's own paths that must exist when they look local."""
        return []

    # -- data ---------------------------------------------------------------------------------
    def hashes_training_rows(self, cfg: Config) -> bool:
        """Whether the startup pass hashes the training rows for the no-duplicates sampler."""
        return False

    def extra_columns(self, cfg: Config) -> list[str]:
        """Columns of the training rows the task reads besides the query and page columns (kept by the
        loading, left out of the no-duplicates hashes)."""
        return []

    def wrap_collator(self, ctx: RunContext, collator):
        """The trainer's data collator, or a wrapper around it (e.g. turning extra columns into labels)."""
        return collator

    def prepare(self, ctx: RunContext, data: PreparedData) -> TaskInputs:
        """The rows to train on (collective; may load other models, must free them)."""
        return TaskInputs(train=data.train, row_hashes=data.row_hashes)

    # -- model and trainer ---------------------------------------------------------------------
    def build_model(self, ctx: RunContext):
        raise NotImplementedError

    def eval_dims(self, cfg: Config, model) -> list[int]:
        """The embedding dimensions evaluated (checked against the model); [] when not an embedding."""
        return []

    def scoring(self, cfg: Config) -> Scoring:
        """How this kind represents and scores queries and pages (:class:`dist_vdr.retrieval.scoring.Scoring`:
        the model output it reads, the stored representation, the Matryoshka cut, the scores). The loss,
        the evaluation, mining, the false-negative guide and teacher scoring all use it; the default is one
        L2-normalised vector each, compared by cosine."""
        from dist_vdr.retrieval.scoring import CosineScoring

        return CosineScoring()

    # -- commands: a model folder of this kind in `dist-vdr eval`, `mine-negatives`, `score-rows` ----------------
    # ``cfg`` there is the command's settings (dist_vdr.cli.settings), which carry every kind's own section.
    def load_model(self, model_cfg, cfg, *, device: str, precision: str, flag: str = "--model"):
        """A model folder of this kind loaded for a command (``model_cfg``: its path, dtype and attention)."""
        from dist_vdr.models.build import build_model

        return build_model(model_cfg, device=device, precision=precision)

    def command_evaluator(self, cfg, data: EvalData, model) -> RunEvaluator:
        """What `dist-vdr eval --model M` runs for a model of this kind: sharded retrieval at every dimension
        (``evaluation.dims`` or the model's), scored as :meth:`scoring` says."""
        from dist_vdr.models.build import embedding_dim
        from dist_vdr.retrieval.sharded import ShardedRetrievalEvaluator

        return ShardedRetrievalEvaluator.of(data, cfg.evaluation.dims or [embedding_dim(model)], cfg.evaluation,
                                            cache_dir=cfg.eval.cache, scoring=self.scoring(cfg))

    def teacher(self, model, cfg):
        """A model of this kind as a teacher: a collective ``(queries, pages, cells) -> scores [Q, k]``
        (:func:`dist_vdr.retrieval.mining.mine`, `score-rows`), scored as :meth:`scoring` says."""
        import functools

        from dist_vdr.retrieval import mining

        e = cfg.evaluation
        return functools.partial(mining.teacher_scores, model, batch_size=e.batch_size, num_workers=e.num_workers,
                                 scoring=self.scoring(cfg))

    def teacher_record(self, cfg) -> dict:
        """What rows scored by a teacher of this kind record of how it scored (beside its path and kind)."""
        return {"teacher_prompt": None}

    def rerank_command(self, cfg, info: DistInfo, data: EvalData, retriever, output, write) -> int:
        """`dist-vdr eval --model RETRIEVER --reranker R` for a model ``R`` of this kind (``write(output,
        evaluator)``: the command's writer of an evaluator's outputs)."""
        raise ValueError(f"--reranker {cfg.eval.reranker} is a model of task={self.name}, which reranks nothing: "
                         f"give a reranker's folder (or leave --reranker out)")

    def training_arguments(self, cfg: Config) -> tuple[type, dict]:
        """(TrainingArguments class, the task's own arguments)."""
        raise NotImplementedError

    trainer_class: ClassVar[type]

    def build_loss(self, ctx: RunContext, model):
        raise NotImplementedError

    def build_evaluator(self, ctx: RunContext, eval_data: EvalData, dims: list[int],
                        inputs: TaskInputs) -> RunEvaluator:
        raise NotImplementedError

    # -- outputs ----------------------------------------------------------------------------------
    def final_files(self, cfg: Config) -> dict[str, str]:
        """Files written into ``final/`` beside the model (name -> text)."""
        return {}

    def files_of_model(self, cfg: Config) -> dict[str, str]:
        """Every file a model folder of this kind gets beside its weights: the record of its kind (which the
        commands read, :func:`dist_vdr.kinds.of_folder`) and :meth:`final_files`."""
        from dist_vdr import kinds

        return {kinds.KIND_FILE: kinds.record(self.name), **self.final_files(cfg)}

    def write_summary(self, out: Path, result: RunResult) -> None:
        """``metrics.json``: before and after, by row name."""
        RunDir(out).summary.write_text(json.dumps(before_after(result), indent=2))

    def headline(self, result: RunResult, metric: str) -> str | None:
        """The one line a finished run prints (None: nothing to say, e.g. evaluation off)."""
        return None

    card_model_class: ClassVar[str] = "SentenceTransformer"
    """The model class named by the model card (``final/README.md``)."""

    def card_usage(self, cfg: Config) -> str:
        """The model card's usage snippet: how to load ``final/`` and use it."""
        if cfg.model.adapter.type:
            load = (f'model = SentenceTransformer("{cfg.model.name_or_path}")\n'
                    f'model.load_adapter("path/to/final")  # this folder: a PEFT adapter')
        else:
            load = 'model = SentenceTransformer("path/to/final")  # this folder'
        return ("```python\nfrom PIL import Image\nfrom sentence_transformers import SentenceTransformer\n\n" + load
                + "\n"
                'queries = model.encode_query(["a page with a red header and a bar chart"])\n'
                'pages = model.encode_document([Image.open("page.png")])  # page images\n'
                "print(model.similarity(queries, pages))\n```")


class GlobalBatchTask(Task):
    """What the retriever kinds share (embedding, multi-vector): trained over de-duplicated global batches, by a
    loss that reads the rows' labels (false-negative ids, teacher scores) and takes a guide model and mixtures."""

    def configure(self, cfg: Config) -> None:
        if cfg.training.batch_sampler == "auto":
            # A repeated page in the global batch would be a false in-batch negative.
            cfg.training.batch_sampler = "no_duplicates_hashed"

    def check_rows(self, cfg: Config) -> None:
        """The recipe's rows for the loss: the teacher scores' columns, a mixture's options, the ids' source."""
        from dist_vdr.data import mixture_rows
        from dist_vdr.losses import distillation, false_negatives

        if cfg.loss.distillation.enabled:
            distillation.check_scored_columns(cfg)
        mixture_rows.check_loss_options(cfg)
        false_negatives.check_id_source(cfg)

    def local_paths(self, cfg: Config) -> list[tuple[str, str]]:
        return [("loss.false_negatives.guide", "guide model folder")]

    def extra_columns(self, cfg: Config) -> list[str]:
        from dist_vdr.data import id_labels

        return id_labels.label_columns(cfg)

    def wrap_collator(self, ctx: RunContext, collator):
        from dist_vdr.data import id_labels

        if not id_labels.reads_labels(ctx.cfg):
            return collator
        return id_labels.RowLabelsCollator.of(ctx.cfg, collator)

    def hashes_training_rows(self, cfg: Config) -> bool:
        return cfg.training.batch_sampler == "no_duplicates_hashed"

    def write_summary(self, out: Path, result: RunResult) -> None:
        write_dims_summary(out, result)

    def headline(self, result: RunResult, metric: str) -> str | None:
        return dims_headline(result, metric)

def before_after(result: RunResult) -> dict[str, dict]:
    """The run's metrics rows before and after training ({} for an evaluation not run)."""
    return {which: m.rows if m else {} for which, m in (("before", result.before), ("after", result.after))}


def write_dims_summary(out: Path, result: RunResult) -> None:
    """metrics.json with the dims, and the NDCG-vs-dimension plot (before / after training): the summary of a
    kind evaluated by retrieval at every Matryoshka dim."""
    from dist_vdr.retrieval.sharded import plot_ndcg_vs_dim

    summary = {"dims": result.dims, **before_after(result)}
    RunDir(out).summary.write_text(json.dumps(summary, indent=2))
    curves = {label: {int(d): values for d, values in m.rows.items() if d.isdigit()}  # (macro) dims only
              for label, m in (("before training", result.before), ("after training", result.after)) if m}
    plot_ndcg_vs_dim(curves, RunDir(out).ndcg_plot)


def dims_headline(result: RunResult, metric: str) -> str | None:
    """``NDCG@10 before=... after=...`` at the largest dim (of several eval sets: their macro average, each named)."""
    if result.after is None:
        return None
    d = max(result.dims)

    def fmt(metrics) -> str:
        value = metrics.get(d, metric) if metrics else None
        return "n/a" if value is None else f"{value:.4f}"

    line = f"{metric.upper()} before={fmt(result.before)} after={fmt(result.after)}"
    sets = [row.split("/")[0] for row in result.after.rows if row.endswith(f"/{d}")]
    if sets:  # several eval sets (a mixture's): the figures are their macro average
        each = ", ".join(f"{name} {result.after.get(f'{name}/{d}', metric):.4f}" for name in sets)
        line += f" (macro average of {len(sets)} eval sets; after: {each})"
    return line
