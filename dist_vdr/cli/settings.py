"""The settings of the `dist-vdr` commands other than `train`: one dataclass per command, loaded
like a recipe (``load_config(path, overrides, schema=EvalCommand)``: YAML file < options < ``key=value``).

A command reuses the recipe sections it shares with training (``model``, ``data``, ``evaluation``,
``reranker``, ``mining``, ``launch``: a recipe file can be given to it, its other sections are
ignored) and adds a section of its own (``eval``, ``mine``, ``build``, ``submit``) for what only the
command has. Where a command's behaviour differs from a recipe default, the difference is a field
of the command's own section (``mine.page_columns`` vs ``data.negative_columns``) or a different
default of the section as the command uses it (``model.name_or_path`` is required), never a copy of
a recipe default. The command-line options are generated from these fields (:mod:`dist_vdr.cli.options`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from dist_vdr import kinds
from dist_vdr.cli.cluster import SlurmResources
from dist_vdr.config import (
    REQUIRED,
    DataConfig,
    EvaluationConfig,
    LaunchConfig,
    MiningConfig,
    ModelConfig,
    check_choice,
)
from dist_vdr.data.ingest_config import PagesBuildConfig


def _required_model() -> ModelConfig:
    return ModelConfig(name_or_path=REQUIRED)


@dataclass(kw_only=True)
class EvalOptions:
    """`dist-vdr eval`'s own settings."""

    output: str | None = None
    """Folder for metrics JSON/CSV, TREC runs, qrels and the plot (none: the metrics are printed as JSON)."""
    cache: str | None = None
    """Per-shard embedding cache folder (resumable)."""
    reranker: str | None = None
    """Also rerank the model's top pages with this CrossEncoder (folder or hub id)."""
    retrieval_score_weight: float | None = None
    """With a reranker: rank by reranker score + this x retrieval score (none: the weight a residual
    reranker was trained with, from its folder; 0 for others)."""


@dataclass(kw_only=True)
class _ModelOverData:
    """The recipe sections of a command that runs a model (or a reranker) over a dataset."""

    model: ModelConfig = field(default_factory=_required_model)
    data: DataConfig = field(default_factory=lambda: DataConfig(path=REQUIRED))
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    # The kinds' own sections (reranker: how a reranker is loaded and prompted) are added when loaded.
    kind_sections: ClassVar[bool] = True

    def __post_init__(self) -> None:
        one_dataset(self.data)


def one_dataset(d: DataConfig) -> None:
    """The commands run over one dataset: a recipe's mixture (data.datasets) is not theirs to guess from."""
    if d.datasets:
        raise ValueError(f"data.datasets: this command runs over one dataset, the recipe names {len(d.datasets)}; "
                         f"give that dataset's own path (--data), once per dataset")


@dataclass(kw_only=True)
class EvalCommand(_ModelOverData):
    """`dist-vdr eval`: sharded retrieval evaluation (and reranking) of a model on a page corpus."""

    eval: EvalOptions = field(default_factory=EvalOptions)

    def resolve_sources(self) -> None:
        from dist_vdr import sources

        self.model.name_or_path = sources.resolve(self.model.name_or_path, "model.name_or_path", "model folder")
        _resolve_eval_data(self.data)
        if self.eval.reranker:
            self.eval.reranker = sources.resolve(self.eval.reranker, "eval.reranker", "reranker folder")


def _resolve_eval_data(d: DataConfig) -> None:
    from dist_vdr import sources

    d.path = sources.resolve(d.path, "data.path", "dataset or page corpus folder")
    if d.eval_path:
        d.eval_path = sources.resolve(d.eval_path, "data.eval_path", "eval data folder")
    for key in ("eval_queries_file", "eval_qrels_file"):
        if getattr(d, key):
            setattr(d, key, sources.resolve_file(getattr(d, key), f"data.{key}"))


@dataclass(kw_only=True)
class MineOptions:
    """`dist-vdr mine-negatives`' own settings."""

    out: str = REQUIRED
    """Output dataset folder: query, positive, negative_0..n-1."""
    corpus: str | None = None
    """Page corpus (`pages build` output) to mine from, for queries and qrels: writes rows naming pages
    by id (instead of mining a training split's own pages, data.path)."""
    queries: str | None = None
    """With corpus: the training queries (JSONL/CSV/TSV)."""
    qrels: str | None = None
    """With corpus: their qrels (TREC/JSONL/CSV/TSV); the highest-graded page is the positive, no
    relevant page a negative."""
    exclude_same_document: bool = False
    """With corpus: never pick a page of the positive's document."""
    page_columns: list[str] = field(default_factory=list)
    """With data.path: more page columns whose pages join the corpus (not data.negative_columns: a
    training split to mine for usually has no negatives yet)."""
    cache: str | None = None
    """Per-shard embedding cache folder (resumable)."""
    teacher: str | None = None
    """A model (folder or hub id) whose scores of each row's positive and negatives are written as the
    column teacher_scores, for loss.distillation: an embedding model's cosine scores (e.g. one trained
    longer) or a reranker's scores (loaded as the reranker: section says, e.g. its prompt)."""
    teacher_type: str = "auto"
    """auto, or a kind's name (embedding, reranker, ...). auto: the kind the folder records (every dist-vdr
    final/ does), else a local sentence-transformers CrossEncoder folder is a reranker and anything else an
    embedding model; a reranker given by hub id (e.g. Qwen/Qwen3-VL-Reranker-2B) needs reranker."""

    def __post_init__(self) -> None:
        check_choice("mine", "teacher_type", self.teacher_type, ("auto", *kinds.names()))


@dataclass(kw_only=True)
class ScoreOptions:
    """`dist-vdr score-rows`' own settings."""

    out: str = REQUIRED
    """Output dataset folder: the rows of data.path with every column, plus teacher_scores."""
    teacher_type: str = "auto"
    """auto (the kind its folder records or looks like) or a kind's name (embedding, reranker, ...): what
    model.name_or_path (the teacher) is (as mine.teacher_type)."""

    def __post_init__(self) -> None:
        check_choice("score", "teacher_type", self.teacher_type, ("auto", *kinds.names()))


@dataclass(kw_only=True)
class ScoreRowsCommand(_ModelOverData):
    """`dist-vdr score-rows`: a teacher's scores of each training row's positive and negative columns
    (data.positive_column, data.negative_columns), for loss.distillation, without mining anew. The
    model section is the teacher: an embedding model or a reranker (score.teacher_type)."""

    score: ScoreOptions = field(default_factory=ScoreOptions)

    def resolve_sources(self) -> None:
        from dist_vdr import sources

        self.model.name_or_path = sources.resolve(self.model.name_or_path, "model.name_or_path", "teacher folder")
        self.data.path = sources.resolve(self.data.path, "data.path", "dataset folder")


@dataclass(kw_only=True)
class MineCommand:
    """`dist-vdr mine-negatives`: hard negatives with an embedding model (encoding as evaluation.*)."""

    mine: MineOptions = field(default_factory=MineOptions)
    model: ModelConfig = field(default_factory=_required_model)
    data: DataConfig = field(default_factory=DataConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    # The kinds' own sections (reranker: how a reranker teacher is loaded and prompted) are added when loaded.
    kind_sections: ClassVar[bool] = True

    @property
    def corpus_mode(self) -> bool:
        return self.mine.corpus is not None

    def resolve_sources(self) -> None:
        from dist_vdr import sources

        self.model.name_or_path = sources.resolve(self.model.name_or_path, "model.name_or_path", "model folder")
        m = self.mine
        if self.corpus_mode:
            m.corpus = sources.resolve(m.corpus, "mine.corpus", "page corpus folder")
            m.queries, m.qrels = (sources.resolve_file(getattr(m, k), f"mine.{k}") for k in ("queries", "qrels"))
        else:
            self.data.path = sources.resolve(self.data.path, "data.path", "dataset folder")

    def __post_init__(self) -> None:
        one_dataset(self.data)
        m = self.mine
        if self.corpus_mode and not (m.queries and m.qrels):
            raise ValueError("mine.corpus (--corpus) needs mine.queries and mine.qrels (--queries and --qrels, e.g. "
                             "train_queries.jsonl, train_qrels.trec)")


@dataclass(kw_only=True)
class BuildOptions:
    """`dist-vdr pages build`'s own settings (how to run it, not what it builds)."""

    overwrite: bool = False
    """Delete the output folder first and rebuild (only a `pages build` output)."""
    quiet: bool = False
    """No progress bar."""


@dataclass(kw_only=True)
class IngestCommand:
    """`dist-vdr pages build`: PDFs and images -> a page corpus dataset. Imports no model library."""

    ingest: PagesBuildConfig
    build: BuildOptions = field(default_factory=BuildOptions)


@dataclass(kw_only=True)
class SubmitOptions:
    """`dist-vdr submit`'s own settings (the recipe it trains, how it is launched)."""

    recipe: str = REQUIRED
    """The training recipe (YAML); the command line's key=value overrides of other sections apply to it."""
    launch: str | None = None
    """accelerate config naming the engine (none: DDP)."""
    log_dir: str | None = None
    """Folder of the job logs (none: <training.output_dir>/slurm-logs)."""
    wait: bool = False
    """Wait for the job and print its result."""


@dataclass(kw_only=True)
class SubmitCommand:
    """`dist-vdr submit`: training as a SLURM job (submitit); ``slurm`` is what the job asks for."""

    slurm: SlurmResources
    submit: SubmitOptions = field(default_factory=SubmitOptions)

