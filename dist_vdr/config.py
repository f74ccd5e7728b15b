"""Typed recipe configuration: YAML files + ``key=value`` overrides, validated when loaded.

OmegaConf does the parsing and merging against the dataclass schema below (unknown keys and wrong
types are rejected there); ``__post_init__`` checks the values; :func:`load_config` turns every
failure into a ``ValueError`` that names the key and the fix. Checks that need the launch (world
size) or the model (embedding dimension) or the data (columns) live in :meth:`Config.resolve_batch`,
:func:`dist_vdr.model.check_dims` and :mod:`dist_vdr.data.loading`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_vdr import kinds as tasks

_PRECISIONS = ("fp32", "bf16", "fp16")
_LOSSES = ("cmnrl", "mnrl")
_RERANKER_LOSSES = ("bce", "listwise")
_SAMPLERS = ("no_duplicates_hashed", "no_duplicates", "batch_sampler")
DEVICES = ("auto", "cpu", "cuda")
"""launch.device (and the --device option of the commands)."""
DTYPES = ("auto", "float32", "bfloat16", "float16")
"""model.dtype (and the --dtype option of the commands)."""
_EVAL_FORMATS = ("ir", "triplets", "beir")
# training.report_to name -> the packages that provide it (any one of them)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "trackio": ("trackio",), "wandb": ("wandb",),
            "mlflow": ("mlflow",)}
REQUIRED = "???"
"""The default of a key a command cannot run without (OmegaConf's MISSING): loading fails, naming
the key and its option, unless the config file, an option or an override sets it."""
_METRICS = ("ndcg", "mrr", "map", "recall", "precision", "accuracy")  # evaluation.metrics.METRICS


def _check_steps(key: str, value: float | None) -> None:
    """A step cadence: a positive whole number of steps, or a fraction (< 1) of the total steps."""
    if value is None and key == "eval_steps":
        return
    if value is None or value <= 0 or (value >= 1 and value != int(value)):
        raise ValueError(f"training.{key} must be a whole number of steps >= 1 or a fraction in (0, 1) of the "
                         f"total steps, got {value}")


def _check_choice(section: str, key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        name = f"{section}.{key}" if section else key
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


@dataclass(kw_only=True)
class AdapterConfig:
    """model.adapter: train a LoRA adapter (PEFT) instead of every weight: the base model stays frozen,
    only the adapter is in the optimizer, checkpoints and ``final/`` (docs/adapters.md)."""

    type: str | None = None
    """null: full finetuning; lora: a LoRA adapter (PEFT's LoraConfig)."""
    rank: int = 16
    """LoRA rank r."""
    alpha: float = 32.0
    """LoRA alpha (the update is scaled by alpha / rank)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (0: none; with > 0 the loss depends on the random stream)."""
    target_modules: list[str] | None = None
    """Module names (suffixes) that get an adapter. null: the language model's attention and MLP
    projections (q/k/v/o_proj, gate/up/down_proj), plus the vision blocks with ``vision: true``."""
    vision: bool = False
    """With the default targets: also adapt the vision tower's blocks (attention qkv/proj, MLP)."""
    init_from: str | None = None
    """Continue training an existing adapter (a folder written by a LoRA run: final/ or a checkpoint)."""
    merge_on_save: bool = False
    """Also write the base model with the adapter merged in, as a plain model, to ``final/merged``."""

    def __post_init__(self) -> None:
        _check_choice("model.adapter", "type", self.type, (None, "lora"))
        if self.rank < 1:
            raise ValueError(f"model.adapter.rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"model.adapter.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.adapter.dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("model.adapter.target_modules is empty: name modules, or null for the defaults")


@dataclass(kw_only=True)
class ModelConfig:
    name_or_path: str = "./artifacts/tiny-model"
    """Local folder or hub id of a sentence-transformers model or a raw vision-language model (a value
    that looks like a path must exist; ``hf://org/name`` always means the hub: see dist_vdr.sources)."""
    dtype: str = "auto"
    """Weights dtype: auto (bf16 on GPUs that support it with precision=bf16, else fp32), float32, bfloat16, float16."""
    attn_implementation: str = "auto"
    """auto: flash_attention_2 when installed and on CUDA, else sdpa. Or any transformers value."""
    pooling: str = "auto"
    """auto: as the model defines it (a raw VLM gets last-token pooling + Normalize); or lasttoken, mean, cls."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra kwargs for from_pretrained (override dtype/attn_implementation above)."""
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    """Processor kwargs, e.g. min_pixels / max_pixels."""
    trust_remote_code: bool = False
    """Off unless the recipe needs model code from the hub."""
    gradient_checkpointing: bool = False
    compile: bool = False
    """torch.compile every transformer block (language-model layers, vision blocks) in place, with
    dynamic shapes: the norms, rotary embeddings and activations fuse into few kernels; compiled once
    per block type, not per page size. The first steps pay the compilation. A throughput lever for
    GPUs (`dist-vdr bench --ours compile:model.compile=true`)."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """A LoRA adapter instead of full finetuning (type: lora)."""

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise ValueError("model.name_or_path is empty: give a local folder or a hub id")
        _check_choice("model", "dtype", self.dtype, DTYPES)
        _check_choice("model", "pooling", self.pooling, ("auto", "lasttoken", "mean", "cls"))


@dataclass(kw_only=True)
class DatasetEntry:
    """One dataset of a mixture (``data.datasets``). A key left null takes the ``data`` section's value:
    the entry is that section with its own training rows (same keys, same meaning), and its options."""

    name: str = REQUIRED
    """Names the dataset in the logs (``loss/<name>``), run_info.jsonl and the eval metrics."""
    path: str | None = None
    train_name: str | None = None
    train_split: str | None = None
    query_column: str | None = None
    positive_column: str | None = None
    negative_columns: list[str] | None = None
    """As many as data.negative_columns (the rows of all datasets meet in one table, under data's column
    names); null: data.negative_columns."""
    max_rows: int | None = None
    """Use only the first N rows of this dataset (null: all)."""
    pages_path: str | None = None
    pages_id_column: str | None = None
    negative_ids_column: str | None = None
    weight: float | None = None
    """Share of the optimizer steps drawn from this dataset (data.mixture=weighted; null: its number of
    rows, i.e. proportional to size)."""
    cross_device_negatives: bool | None = None
    """Null: loss.cross_device_negatives. False: each query scores the pages of its own rank only."""
    in_batch_negatives: bool = True
    """False: each query scores its own positive and hard negatives only (no other row's pages)."""
    mini_batch_size: int | None = None
    """Gradient-caching rows per forward for this dataset's steps (null: loss.mini_batch_size): large pages
    want fewer rows per forward than small ones."""
    mini_batch_num_tokens: int | None = None
    """Token budget per mini-batch for this dataset's steps (null: loss.mini_batch_num_tokens)."""
    max_pixels: int | None = None
    """Downscale this dataset's training pages above this many pixels (aspect kept) before the processor,
    e.g. scans far larger than the others (null: as they are; the processor's own max_pixels still applies)."""
    eval_path: str | None = None
    """This dataset's own eval set (with eval_format and the other eval keys, null: data's). An entry that
    sets any eval key has an eval set of its own: then every such set is evaluated and their macro average
    is the main metric (data's own eval set is not used); with none, data's eval set is the evaluation."""
    eval_name: str | None = None
    eval_format: str | None = None
    eval_split: str | None = None
    eval_negative_columns: list[str] | None = None
    eval_queries_file: str | None = None
    eval_qrels_file: str | None = None

    def __post_init__(self) -> None:
        if not self.name or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"data.datasets: name {self.name!r} must be letters, digits, _ . - (it names files "
                             f"and log keys)")
        for key in ("max_rows", "mini_batch_size", "mini_batch_num_tokens", "max_pixels"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"data.datasets[{self.name}].{key} must be >= 1 or null, got {value}")
        if self.weight is not None and self.weight < 0:
            raise ValueError(f"data.datasets[{self.name}].weight must be >= 0 or null, got {self.weight}")
        if self.eval_format is not None:
            _check_choice(f"data.datasets[{self.name}]", "eval_format", self.eval_format, _EVAL_FORMATS)

    @property
    def has_eval(self) -> bool:
        """Whether the entry names eval data of its own (any eval key set)."""
        return any(getattr(self, k) is not None for k in ("eval_path", "eval_name", "eval_format", "eval_split",
                                                         "eval_negative_columns", "eval_queries_file",
                                                         "eval_qrels_file"))


_MIXTURES = ("weighted", "exhaust", "round_robin", "mixed")  # data.mixture.STRATEGIES + mixed


@dataclass(kw_only=True)
class DataConfig:
    path: str = "./artifacts/pages"
    """A folder written by save_to_disk (e.g. `dist-vdr make-synthetic-pages`) or a hub dataset id."""
    train_name: str | None = None
    """Hub dataset configuration of the training data (e.g. `train`); unused for local folders."""
    train_split: str = "train"
    query_column: str = "query"
    positive_column: str = "image"
    negative_columns: list[str] = field(default_factory=lambda: ["negative_0"])
    """Hard-negative page columns used in training (may be empty)."""
    max_train_samples: int | None = None
    """Use only the first N training rows (None: all)."""
    pages_path: str | None = None
    """Page corpus (`dist-vdr pages build` folder, dataset folder or hub id) that training page columns
    holding page ids (strings) name: pages are decoded batch by batch from it, memory-mapped, instead of
    being stored in every row (e.g. rows written by `dist-vdr mine-negatives --corpus`)."""
    pages_id_column: str = "page_id"
    """Column of pages_path holding the page ids (`id` in the published VDR layout)."""
    negative_ids_column: str | None = None
    """A column listing negative page ids per row (`negatives` in the published VDR layout):
    negative_columns are made from its first entries; rows with too few usable ids are dropped."""
    eval_format: str = "ir"
    """ir: splits of queries / corpus / qrels; triplets: an eval split of query + positive + negatives,
    whose pages (positives and negatives, de-duplicated) form the corpus (the published VDR layout);
    beir: the ViDoRe BEIR layout, a folder or hub id with corpus/, queries/, qrels/ tables (corpus-id +
    image, query-id + query, query-id + corpus-id + score) of the split eval_split (test when left at eval)."""
    eval_name: str | None = None
    """Hub dataset configuration of the eval data (e.g. `eval`)."""
    eval_split: str = "eval"
    """Split for eval_format=triplets."""
    eval_negative_columns: list[str] = field(default_factory=list)
    """For eval_format=triplets: page columns added to the corpus besides the positive."""
    eval_path: str | None = None
    """Where the eval data lives (null: data.path): a dataset with the eval splits, or for eval_format=ir
    with eval_queries_file/eval_qrels_file a page corpus such as a `dist-vdr pages build` folder."""
    eval_queries_file: str | None = None
    """For eval_format=ir: queries as JSONL/CSV/TSV (query_id, query) instead of the eval_queries split."""
    eval_qrels_file: str | None = None
    """For eval_format=ir: judgements as TREC qrels, JSONL, CSV or TSV naming page ids of the corpus
    (duplicates dropped by `pages build` are mapped to the page kept) instead of the eval_qrels split."""
    eval_queries_split: str = "eval_queries"
    eval_corpus_split: str = "eval_corpus"
    eval_qrels_split: str = "eval_qrels"
    max_eval_queries: int | None = None
    validate_images: bool = True
    """Open every page image once before training so a corrupt file fails early, with its row."""
    datasets: list[DatasetEntry] = field(default_factory=list)
    """A mixture: several datasets, each optimizer step drawn from ONE of them on every rank (its global
    batch, its negatives). Empty: the training rows of this section alone. README: Mixtures of datasets."""
    mixture: str = "weighted"
    """How the steps pick their dataset: weighted (at random by data.datasets[].weight, a dataset that runs
    out starts again), exhaust (every batch of every dataset once, in shuffled order), round_robin (in
    turn, until the smallest runs out); mixed: no per-step dataset, the rows of all datasets shuffled
    together (the batches mix datasets: the baseline; per-dataset weights and loss options do not apply)."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("data.path is empty: give a dataset folder or a hub id")
        _check_choice("data", "eval_format", self.eval_format, _EVAL_FORMATS)
        for key in ("max_train_samples", "max_eval_queries"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"data.{key} must be >= 1 or null, got {value}")
        repeated = sorted({c for c in self.train_columns if self.train_columns.count(c) > 1})
        if repeated:
            raise ValueError(f"data: column(s) {repeated} named twice among query_column, positive_column and "
                             f"negative_columns ({self.train_columns}): name each column once")
        _check_choice("data", "mixture", self.mixture, _MIXTURES)
        self._check_datasets()

    def _check_datasets(self) -> None:
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"data.datasets: names {names} repeat; give each dataset a name of its own")
        for entry in self.datasets:
            count = len(entry.negative_columns) if entry.negative_columns is not None else None
            if count is not None and count != len(self.negative_columns):
                raise ValueError(f"data.datasets[{entry.name}]: {count} negative_columns, data.negative_columns has "
                                 f"{len(self.negative_columns)}; every dataset trains with as many negatives per row")
        if self.mixture == "mixed":
            own = [d.name for d in self.datasets if d.weight is not None or d.cross_device_negatives is not None
                   or not d.in_batch_negatives or d.mini_batch_size or d.mini_batch_num_tokens]
            if own:
                raise ValueError(f"data.mixture=mixed shuffles all rows together, so data.datasets {own} cannot have "
                                 f"a weight or loss options of their own: remove them, or use data.mixture=weighted")
        local_only = [d.name for d in self.datasets if not d.in_batch_negatives
                      and not (d.negative_columns if d.negative_columns is not None else self.negative_columns)]
        if local_only:
            raise ValueError(f"data.datasets {local_only}: in_batch_negatives=false leaves each query its own hard "
                             f"negatives only, and these rows have none (negative_columns): the loss would be 0")
        weighted = [d.name for d in self.datasets if d.weight is not None]
        if weighted and self.mixture in ("exhaust", "round_robin"):
            raise ValueError(f"data.datasets {weighted} have weights, which data.mixture={self.mixture} does not use "
                             f"(it takes every dataset's batches as they come): use data.mixture=weighted or "
                             f"remove the weights")
        heavy = [d.name for d in self.datasets if d.weight is not None and not 0 <= d.weight <= 1e6]
        if heavy:
            raise ValueError(f"data.datasets {heavy}: a weight is a finite relative share in [0, 1e6] (e.g. 1 and 3); "
                             f"got {[d.weight for d in self.datasets if d.name in heavy]}")
        if self.datasets and self.mixture == "weighted" and all(d.weight == 0 for d in self.datasets):
            raise ValueError("data.datasets: every weight is 0; give one dataset a positive weight")

    @property
    def train_columns(self) -> list[str]:
        return [self.query_column, self.positive_column, *self.negative_columns]


@dataclass(kw_only=True)
class FalseNegativesConfig:
    """loss.false_negatives: candidates of the global batch that answer the query too, left out of its
    softmax (docs/false-negatives.md). Needs the global-batch loss (loss.name cmnrl)."""

    id_column: str | None = None
    """Mask by id: the training rows' column with the id of the positive page's document (or of the page),
    e.g. document_id. Each negative column N carries its page's id in column ``N_<id_column>`` (the layout
    of make-synthetic-pages: negative_0_document_id). A candidate anywhere in the global batch whose id is
    one of the query's positive ids is left out of that query's softmax (never the query's own positive)."""
    id_source: str = "rows"
    """rows: the ids are row columns (``id_column``, ``N_<id_column>``). pages: for rows that name their
    pages by id (data.pages_path), each page's id is looked up in the page corpus's column ``id_column``
    (document_id, as `pages build` writes it; data.pages_id_column, page_id: the page's own id)."""
    positive_ids_column: str | None = None
    """Mask by id: a column listing further ids relevant to each row's query, of the id_column's kind
    (e.g. relevant_page_ids, which `mine-negatives --corpus` writes: every page the qrels judge relevant);
    candidates carrying any of them are masked too."""
    guide: str | None = None
    """Mask by a guide: a frozen SentenceTransformer (folder or hub id) sharing the model's inputs (same
    processor), e.g. the base model. It embeds every row in step 1 of gradient caching; a candidate it
    scores above the query's positive less ``margin`` is masked (GIST's rule, over the global batch)."""
    margin: float = 0.0
    """Guide masking: candidates scoring above the positive's guide score - margin are masked."""
    margin_strategy: str = "absolute"
    """absolute: ``> positive - margin``; relative: ``> positive - |positive| x margin`` (0.05: 95 %)."""

    def __post_init__(self) -> None:
        if self.positive_ids_column is not None and self.id_column is None:
            raise ValueError("loss.false_negatives.positive_ids_column needs loss.false_negatives.id_column (the "
                             "candidates' ids it is compared with)")
        _check_choice("loss.false_negatives", "margin_strategy", self.margin_strategy, ("absolute", "relative"))
        _check_choice("loss.false_negatives", "id_source", self.id_source, ("rows", "pages"))
        if self.margin < 0:
            raise ValueError(f"loss.false_negatives.margin must be >= 0, got {self.margin}")

    @property
    def enabled(self) -> bool:
        return self.id_column is not None or self.guide is not None


@dataclass(kw_only=True)
class DistillationConfig:
    """loss.distillation: learn from a teacher's scores of each row's own candidates, beside the contrastive
    loss (docs/false-negatives.md#distillation). Needs the global-batch loss (loss.name cmnrl)."""

    scores_column: str | None = None
    """The rows' list column of teacher scores: the positive's, then one per negative column, e.g.
    teacher_scores (`dist-vdr mine-negatives --teacher` writes it). null: no distillation."""
    kind: str = "kl"
    """kl: KL divergence between the teacher's and the model's softmax over the row's candidates
    (sentence-transformers' DistillKLDivLoss); margin_mse: MSE of the positive-negative score margins
    (MarginMSELoss)."""
    weight: float = 1.0
    """The term's weight beside the contrastive loss (at every Matryoshka dim, with the dims' weights)."""
    temperature: float = 1.0
    """kl: the model's scores (cosine) are divided by it; the term is scaled by its square."""
    teacher_temperature: float | None = None
    """kl: the teacher's scores are divided by it (null: ``temperature``); match it to their spread."""

    def __post_init__(self) -> None:
        _check_choice("loss.distillation", "kind", self.kind, ("kl", "margin_mse"))
        if self.weight < 0:
            raise ValueError(f"loss.distillation.weight must be >= 0, got {self.weight}")
        for key in ("temperature", "teacher_temperature"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"loss.distillation.{key} must be > 0, got {value}")

    @property
    def enabled(self) -> bool:
        return self.scores_column is not None


@dataclass(kw_only=True)
class LossConfig:
    name: str = "auto"
    """auto: cmnrl for task=embedding, bce for task=reranker. Embedding: cmnrl
    (CachedMultipleNegativesRankingLoss, gradient caching) or mnrl (plain MultipleNegativesRankingLoss).
    Reranker: bce (BinaryCrossEntropyLoss over the positive and the hard-negative pairs) or listwise
    (softmax cross-entropy over each query's positive and hard negatives: the cross-encoder
    MultipleNegativesRankingLoss). Both reranker losses use gradient caching."""
    mini_batch_size: int = 1
    """Rows per gradient-caching forward/backward (cmnrl); (query, page) pairs per forward (reranker)."""
    mini_batch_num_tokens: int | None = None
    """Token budget per embedding mini-batch (cmnrl): rows are packed greedily up to this many tokens."""
    matryoshka_dims: list[int] = field(default_factory=list)
    """Matryoshka dimensions (empty: no MatryoshkaLoss). Each must be <= the embedding dimension."""
    matryoshka_weights: list[float] | None = None
    scale: float = 20.0
    """Inverse temperature of the cosine-similarity logits."""
    cross_device_negatives: bool = True
    """With several ranks, score each query against the documents of all ranks (gather)."""
    implementation: str = "auto"
    """auto: the communication-efficient global-batch loss when world size > 1 (cmnrl), else stock;
    global_batch: always it; stock: sentence-transformers' own gather (collectives grow with dims x chunks)."""
    pos_weight: float | None = None
    """Reranker bce: weight of the positive pairs (e.g. the number of negatives per query to balance them)."""
    num_in_batch_negatives: int = 0
    """Reranker listwise: extra negatives per query drawn at random from the other rows of the rank's
    batch (sentence-transformers' sampling; with > 0 the loss depends on how rows are split over ranks)."""
    false_negatives: FalseNegativesConfig = field(default_factory=FalseNegativesConfig)
    """Embedding cmnrl: mask the false negatives of the global batch (by id, by a guide)."""
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    """Embedding cmnrl: add a term learning from teacher scores of each row's candidates."""

    def __post_init__(self) -> None:
        _check_choice("loss", "name", self.name, ("auto",) + _LOSSES + _RERANKER_LOSSES)
        if self.num_in_batch_negatives < 0:
            raise ValueError("loss.num_in_batch_negatives must be >= 0")
        if self.pos_weight is not None and self.pos_weight <= 0:
            raise ValueError("loss.pos_weight must be > 0 or null")
        _check_choice("loss", "implementation", self.implementation, ("auto", "global_batch", "stock"))
        if self.implementation == "global_batch" and self.name not in ("cmnrl", "auto"):
            raise ValueError("loss.implementation=global_batch needs loss.name=cmnrl")
        for key in ("false_negatives", "distillation"):
            if getattr(self, key).enabled and (self.name not in ("cmnrl", "auto") or self.implementation == "stock"):
                raise ValueError(f"loss.{key} needs the global-batch loss: loss.name=cmnrl with "
                                 f"loss.implementation auto or global_batch")
        if self.mini_batch_size < 1:
            raise ValueError(f"loss.mini_batch_size must be >= 1, got {self.mini_batch_size}")
        if self.mini_batch_num_tokens is not None and self.mini_batch_num_tokens < 1:
            raise ValueError("loss.mini_batch_num_tokens must be >= 1 or null")
        self._check_matryoshka()

    def _check_matryoshka(self) -> None:
        if any(d < 1 for d in self.matryoshka_dims):
            raise ValueError(f"loss.matryoshka_dims must be positive, got {self.matryoshka_dims}")
        if len(set(self.matryoshka_dims)) != len(self.matryoshka_dims):
            raise ValueError(f"loss.matryoshka_dims has duplicates: {self.matryoshka_dims}")
        if self.matryoshka_weights is not None and len(self.matryoshka_weights) != len(self.matryoshka_dims):
            raise ValueError("loss.matryoshka_weights must have one weight per matryoshka dim")


@dataclass(kw_only=True)
class TrainingConfig:
    output_dir: str = "runs/tiny"
    global_batch_size: int = 32
    """Rows per optimizer step over all ranks and accumulation steps: the contrastive batch is
    per_device_batch_size x world size (cross-device negatives)."""
    per_device_batch_size: int | None = None
    """Derived from global_batch_size / (world size x gradient_accumulation_steps) when null;
    when set it must agree."""
    gradient_accumulation_steps: int = 1
    num_epochs: float = 1.0
    max_steps: int = -1
    """> 0 overrides num_epochs."""
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    lr_scheduler_type: str = "linear"
    precision: str = "fp32"
    """fp32, bf16 or fp16 (mixed precision)."""
    seed: int = 42
    logging_steps: float = 1
    eval_steps: float | None = None
    """Evaluate every N steps (< 1: that fraction of the total steps); null: only before/after."""
    save_steps: float = 0.1
    """Checkpoint every N steps (< 1: that fraction of the total steps)."""
    save_total_limit: int | None = 2
    keep_best: bool = False
    """Keep the checkpoint with the best main metric of the evaluations during training besides the newest
    save_total_limit ones (needs eval_steps = save_steps: each checkpoint carries its evaluation)."""
    final: str = "last"
    """What final/ holds: last (the weights of the last step) or best (those of the kept best checkpoint;
    needs keep_best; any engine; the card and the evaluation after training are of it)."""
    batch_sampler: str = "auto"
    """auto: no_duplicates_hashed for embedding models (a repeated page in the global batch would be a
    false in-batch negative) and for listwise rerankers with in-batch negatives; batch_sampler (plain
    shuffled batches) for rerankers otherwise: mined negatives are shared between queries, which
    no-duplicates batching cannot fill batches with."""
    dataloader_num_workers: int = 0
    record_step_stats: bool = False
    """Write ``<output_dir>/step_stats.json``: seconds, tokens, estimated FLOPs per optimizer step and
    peak memory (``dist-vdr bench`` reads it). The device is synchronised at each step boundary."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers, any of tensorboard, trackio, wandb, mlflow (empty or [none]: none). Rank 0 logs
    the per-step loss, learning rate, gradient norm, step time and throughput, the evaluations (every
    Matryoshka dim) and the resolved recipe; TensorBoard writes <output_dir>/tensorboard. README: Watching a run."""
    trainer_args: dict[str, Any] = field(default_factory=dict)
    """Any other SentenceTransformerTrainingArguments field, passed through (validated against it)."""

    def __post_init__(self) -> None:
        # `~/runs/x` is the user's home as the shell would make it, for every module that joins a name to it
        # (a literal `~` folder under the working directory took half the run's files).
        self.output_dir = os.path.expanduser(self.output_dir)
        _check_choice("training", "precision", self.precision, _PRECISIONS)
        _check_choice("training", "batch_sampler", self.batch_sampler, ("auto",) + _SAMPLERS)
        self._check_numbers()
        for key in ("logging_steps", "save_steps", "eval_steps"):
            _check_steps(key, getattr(self, key))
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"training.save_total_limit must be >= 1 or null (keep all), got {self.save_total_limit}")
        if self.dataloader_num_workers < 0:
            raise ValueError("training.dataloader_num_workers must be >= 0")
        if self.report_to == ["none"]:
            self.report_to = []
        for name in self.report_to:
            _check_choice("training", "report_to", name, tuple(TRACKERS))
        if len(set(self.report_to)) != len(self.report_to):
            raise ValueError(f"training.report_to={self.report_to} names a tracker twice (it would log everything "
                             f"twice): name each once")
        managed = {"output_dir", "per_device_train_batch_size", "learning_rate", "seed", "bf16", "fp16",
                   "max_steps", "num_train_epochs", "save_steps", "eval_steps", "batch_sampler", "use_cpu",
                   "save_total_limit", "logging_nan_inf_filter", "report_to"}
        clash = managed & set(self.trainer_args)
        if clash:
            raise ValueError(f"training.trainer_args sets {sorted(clash)}: use the training.* keys of the same meaning")

    def _check_numbers(self) -> None:
        if self.global_batch_size < 1:
            raise ValueError(f"training.global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError("training.gradient_accumulation_steps must be >= 1")
        if self.max_steps <= 0 and not self.num_epochs > 0:
            raise ValueError("set training.num_epochs > 0 or training.max_steps > 0")
        if not self.learning_rate > 0:
            raise ValueError(f"training.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"training.warmup_ratio must be in [0, 1) (a fraction of the steps), "
                             f"got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"training.weight_decay must be >= 0, got {self.weight_decay}")
        _check_choice("training", "final", self.final, ("last", "best"))
        if self.final == "best" and not self.keep_best:
            raise ValueError("training.final=best takes the weights of the kept best checkpoint: set "
                             "training.keep_best=true")
        if self.keep_best and (self.eval_steps is None or self.eval_steps != self.save_steps):
            raise ValueError(f"training.keep_best picks among checkpoints that carry an evaluation: set "
                             f"training.eval_steps equal to training.save_steps ({self.save_steps}), got "
                             f"{self.eval_steps}")


@dataclass(kw_only=True)
class EvaluationConfig:
    enabled: bool = True
    before_training: bool = True
    """Evaluate the untrained model first (stored, so a resumed run does not redo it)."""
    dims: list[int] | None = None
    """Embedding dims to evaluate (null: the Matryoshka dims, or the full dimension)."""
    batch_size: int = 16
    """Pages per forward pass."""
    ks: list[int] = field(default_factory=lambda: [1, 3, 5, 10, 100])
    main_metric: str = "ndcg@10"
    implementation: str = "sharded"
    """sharded: dist-vdr's evaluator (corpus sharded over ranks, every dim from one encode);
    stock: sentence-transformers' InformationRetrievalEvaluator, one per dim."""
    num_workers: int = -1
    """DataLoader workers decoding and preprocessing pages (sharded evaluator); -1: auto (none on CPU,
    where they compete with the model for the same cores; up to 4 per GPU rank)."""
    search_backend: str = "auto"
    """auto (faiss when installed, else torch), faiss or torch; all exact."""

    def __post_init__(self) -> None:
        _check_choice("evaluation", "implementation", self.implementation, ("sharded", "stock"))
        _check_choice("evaluation", "search_backend", self.search_backend, ("auto", "faiss", "torch"))
        if self.num_workers < -1:
            raise ValueError("evaluation.num_workers must be >= 0, or -1 for auto")
        if self.batch_size < 1:
            raise ValueError("evaluation.batch_size must be >= 1")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"evaluation.ks must be positive cutoffs, got {self.ks}")
        name, _, k = self.main_metric.partition("@")
        if name not in _METRICS or not k.isdigit() or int(k) not in self.ks:
            raise ValueError(f"evaluation.main_metric={self.main_metric!r} is not a computed metric: use "
                             f"<{'|'.join(_METRICS)}>@k with k in evaluation.ks {self.ks}")


@dataclass(kw_only=True)
class LaunchConfig:
    device: str = "auto"
    """auto: CUDA when available, else CPU (gloo). cpu forces CPU even with GPUs."""
    expected_world_size: int = 0
    """When > 0, refuse to train unless exactly this many processes joined (guards against launchers
    that silently start independent single processes)."""
    num_threads_per_process: int = 0
    """torch intra-op threads per rank (0: leave torch's default). On a CPU with P cores and W ranks use P/W."""
    handle_preemption: bool = True
    """On SIGUSR2 (SLURM's/submitit's warning before a time limit or preemption), all ranks save a
    checkpoint at the next step boundary and stop; the job is then requeued and resumes there."""
    collective_timeout_s: int = 600
    """Upper bound for any collective: if a rank dies, the others fail within this time, not hang."""
    startup_timeout_s: int = 21600
    """Upper bound for the waits around long startup work (the data pass, a checkpoint conversion):
    ranks that finish their share first wait this long, in a group of its own, with a progress line
    a minute -- not inside collective_timeout_s."""
    startup_workers: int = 0
    """Processes per rank for the startup data pass (decode + hash); 0: the cores of the node shared
    by its ranks."""
    keep_parameters_gathered: bool = False
    """FSDP2 only: keep parameters unsharded for the whole step (one all-gather per layer and step
    instead of one per mini-batch forward and backward) at the memory cost of one full model copy."""
    log_collectives: bool = False
    """Write the torch.distributed collectives of every training step (calls by name, bytes) to
    <output_dir>/collectives/rank<r>.jsonl: a communication audit (tests use it)."""

    def __post_init__(self) -> None:
        _check_choice("launch", "device", self.device, DEVICES)
        if self.collective_timeout_s < 10:
            raise ValueError("launch.collective_timeout_s must be >= 10")
        if self.startup_timeout_s < self.collective_timeout_s:
            raise ValueError(f"launch.startup_timeout_s={self.startup_timeout_s} must be >= "
                             f"launch.collective_timeout_s={self.collective_timeout_s}")
        if self.startup_workers < 0:
            raise ValueError("launch.startup_workers must be >= 0 (0: auto)")
        if self.expected_world_size < 0 or self.num_threads_per_process < 0:
            raise ValueError("launch.expected_world_size and launch.num_threads_per_process must be >= 0")


@dataclass(kw_only=True)
class RerankerConfig:
    """task=reranker: the cross-encoder, its retriever (first stage and negative mining) and evaluation."""

    head: str = "auto"
    """auto: a CrossEncoder folder/hub id keeps its own head, anything else gets logit_score;
    logit_score: LM head + LogitScore(true_token, false_token); dense: last-token pooling + a
    1-output Dense initialised from the LM head rows (W[true] - W[false])."""
    true_token: str = "1"
    false_token: str = "0"
    chat_template: str | None = None
    """null: the model's own; builtin: dist-vdr's query/document template (Qwen-VL tokens); or a .jinja file."""
    prompt: str | None = None
    """Instruction given to the reranker with every pair (rendered as the system message)."""
    retriever: str = "./artifacts/tiny-model"
    """Embedding model (folder or hub id) that retrieves the candidates to rerank and mines negatives."""
    rerank_depth: int = 20
    """Evaluation: rerank each query's top-N retrieved pages (the rest keep their retrieval order)."""
    retrieval_score_weight: float = 0.0
    """> 0: a pair's final score is the reranker's score + this weight x the retriever's cosine score,
    in training (the listwise loss over the sum: the reranker learns what retrieval gets wrong, a
    residual) and in the evaluation's ranking (also reported by the reranker's score alone).
    0: the reranker's score alone. Needs the listwise loss on mined rows (they carry the scores)."""

    def __post_init__(self) -> None:
        _check_choice("reranker", "head", self.head, ("auto", "logit_score", "dense"))
        if self.retrieval_score_weight < 0:
            raise ValueError("reranker.retrieval_score_weight must be >= 0 (0: the reranker's score alone)")
        if self.rerank_depth < 1:
            raise ValueError("reranker.rerank_depth must be >= 1")
        if not self.retriever:
            raise ValueError("reranker.retriever is empty: give the embedding model that retrieves candidates")


@dataclass(kw_only=True)
class MiningConfig:
    """Hard negatives mined with the retriever from the training pages (task=reranker, or `dist-vdr mine-negatives`)."""

    enabled: bool = True
    """task=reranker: mine before training (cached in <output_dir>/mined) and train on the result;
    false: train on data.negative_columns as they are."""
    num_negatives: int = 3
    """Mined (hard) negatives per query, written as columns negative_0..negative_{n-1}."""
    rank_start: int = 0
    """Skip this many of the best-ranked non-positive pages (likely unlabelled positives)."""
    max_rank: int = 30
    """Pick negatives only among the retriever's top max_rank pages; rows with too few are dropped."""
    margin: float | None = None
    """Keep a candidate only when its cosine score < the positive's score - margin (false-negative guard)."""
    max_score_ratio: float | None = None
    """Positive-aware threshold (NV-Retriever's TopK-PercPos; they use 0.95): keep a candidate only when its
    score < this fraction of the positive's score (a positive scoring <= 0: only candidates below it)."""
    num_random_negatives: int = 0
    """Also this many pages drawn at random (per-row seeded, never the positive or its document),
    written after the mined ones. Easy negatives: a reranker trained only on hard ones can stall
    (measured on the tiny reranker: the loss stays at ln(1 + negatives))."""
    seed: int = 0
    """Seed of the random negatives."""
    max_uses_per_page: int | None = None
    """Use a page as a negative for at most this many queries (rows in data order). Retrievers have
    hubs, pages near many queries; without a cap a few of them become most of the negatives and a
    reranker learns to recognise those pages instead of reading the query."""
    document_id_columns: dict[str, str] = field(default_factory=dict)
    """Page column -> column holding that page's document id (e.g. {image: document_id}). A candidate
    from the positive's own document is never a negative (other pages of the same PDF, or the same
    content rendered again, are often relevant too)."""

    def __post_init__(self) -> None:
        if self.num_negatives < 1:
            raise ValueError("mining.num_negatives must be >= 1")
        if self.num_random_negatives < 0:
            raise ValueError("mining.num_random_negatives must be >= 0")
        if self.max_uses_per_page is not None and self.max_uses_per_page < 1:
            raise ValueError("mining.max_uses_per_page must be >= 1 or null")
        if self.max_score_ratio is not None and not 0 < self.max_score_ratio <= 1:
            raise ValueError(f"mining.max_score_ratio must be in (0, 1] or null (e.g. 0.95), "
                             f"got {self.max_score_ratio}")
        if self.rank_start < 0 or self.max_rank < self.rank_start + self.num_negatives:
            raise ValueError(f"mining.max_rank={self.max_rank} leaves no room for {self.num_negatives} negatives after "
                             f"rank_start={self.rank_start}; raise max_rank")


@dataclass(kw_only=True)
class Config:
    task: str = "embedding"
    """embedding: a SentenceTransformer (bi-encoder); reranker: a multimodal CrossEncoder (the names
    of dist_vdr.kinds.REGISTRY)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    reranker: RerankerConfig = field(default_factory=RerankerConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)

    def __post_init__(self) -> None:
        # The task resolves its "auto" values and refuses what its kind cannot train (dist_vdr.kinds).
        tasks.get(self.task).configure(self)
        if self.training.keep_best and not self.evaluation.enabled:
            raise ValueError("training.keep_best picks the checkpoint with the best evaluation during training: "
                             "it needs evaluation.enabled=true")
        if any(d.has_eval for d in self.data.datasets) and self.evaluation.implementation == "stock":
            raise ValueError("data.datasets with eval sets of their own need evaluation.implementation=sharded "
                             "(the stock evaluator evaluates one set, on rank 0)")

    def resolve_batch(self, world_size: int) -> int:
        """Per-device batch for this world size; ValueError when the global batch does not split."""
        t = self.training
        ranks_x_accum = world_size * t.gradient_accumulation_steps
        if t.global_batch_size % ranks_x_accum:
            raise ValueError(
                f"training.global_batch_size={t.global_batch_size} is not divisible by world size {world_size} x "
                f"gradient_accumulation_steps {t.gradient_accumulation_steps} = {ranks_x_accum}; pick a multiple "
                f"of {ranks_x_accum} (e.g. {ranks_x_accum * max(1, round(t.global_batch_size / ranks_x_accum))})"
            )
        per_device = t.global_batch_size // ranks_x_accum
        if t.per_device_batch_size is not None and t.per_device_batch_size != per_device:
            raise ValueError(
                f"training.per_device_batch_size={t.per_device_batch_size} disagrees with global_batch_size="
                f"{t.global_batch_size} on {world_size} rank(s) x {t.gradient_accumulation_steps} accumulation "
                f"(= {per_device} per device); set one of them, or null per_device_batch_size"
            )
        return per_device

    def eval_dims(self, embedding_dim: int) -> list[int]:
        return list(self.evaluation.dims or self.loss.matryoshka_dims or [embedding_dim])


def _schema(schema: type | None = None):
    """The typed defaults of ``schema`` (default: :class:`Config`). A section declared without a
    default (a command's ``slurm: SlurmResources``) gets its class's field defaults: an instance
    would have run ``__post_init__``, which derives values (tasks_per_node from gpus_per_node) or
    needs values not given yet (a page build's input folder)."""
    import dataclasses
    import typing

    from omegaconf import OmegaConf

    schema = schema or Config
    node = OmegaConf.structured(schema)
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and dataclasses.is_dataclass(hints[f.name]):
            node[f.name] = OmegaConf.structured(hints[f.name])
    return node


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                check_paths: bool | str = True, schema: type | None = None, *, flags: Mapping[str, Any] | None = None,
                aliases: Mapping[str, str] | None = None) -> Any:
    """Load a recipe: defaults < YAML file < ``key=value`` overrides. Raises ValueError on any problem,
    naming the layer (file or override) it comes from. ``check_paths``: refuse local-looking model and
    data paths that do not exist (:mod:`dist_vdr.sources`), before anything is loaded or written ("data":
    the data's paths only).

    ``schema``: the dataclass to load (default :class:`Config`, a training recipe; the commands' own
    in :mod:`dist_vdr.cli.settings`). A command reads the sections it shares with a recipe from a recipe
    file and ignores the recipe's other sections; its ``resolve_sources()`` checks its paths.
    ``flags``: command-line option values by key, a layer between the file and the overrides;
    ``aliases``: the option of each key, named in messages."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = schema or Config
    flags, aliases = dict(flags or {}), dict(aliases or {})
    merged = _schema(schema)
    if path is not None:
        merged = _merge(merged, _file_layer(Path(path), schema), f" in {path}", schema, aliases)
    for key, value in flags.items():  # one layer per option: an error names the option
        merged = _merge(merged, _nested(key, value), f" in the option {aliases.get(key, key)}", schema, aliases)
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ValueError(f"overrides must look like section.key=value, got {bad}")
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise ValueError(_explain(exc, f" in the override {_override_of(exc, overrides)}", schema, aliases)) from exc
    except TypeError as exc:  # a.b.1.c=... into a list ("Cannot merge incompatible container types")
        raise ValueError(f"overrides {list(overrides)}: a list entry (e.g. of data.datasets) cannot be set by its "
                         f"index; edit the YAML, or give the whole list: data.datasets='[{{name: a, path: ...}}]'") \
            from exc
    try:
        cfg = OmegaConf.to_object(merged)
    except (OmegaConfBaseException, ValueError) as exc:
        given = {key: f"the option {aliases.get(key, key)}" for key in flags}
        raise ValueError(_blame(exc, path, overrides, schema, aliases, given)) from exc
    _check_finite(cfg, "")
    _check_loaded(cfg, schema, check_paths)
    return cfg


def _check_loaded(cfg: Any, schema: type, check_paths: bool | str) -> None:
    if schema is Config:  # only a training recipe needs the libraries' value sets (and their imports)
        _check_with_libraries(cfg)
        if check_paths == "data":  # `data check`: the data's paths, not the model's it does not load
            _resolve_sources(cfg, model=False)
        elif check_paths:
            _resolve_sources(cfg)
            _check_tracker_folders(cfg)
    elif check_paths and hasattr(cfg, "resolve_sources"):
        cfg.resolve_sources()


def _check_finite(value: Any, key: str) -> None:
    """Every number of a recipe or a command's settings is finite: a NaN passes every ``<``/``>`` bound of the
    sections' checks (``loss.false_negatives.margin: .nan`` masked nothing), an inf overflows what it scales."""
    import dataclasses
    import math

    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key}={value}: give a finite number (NaN and inf are not settings)")
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            _check_finite(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            name = getattr(item, "name", None)
            _check_finite(item, f"{key}[{name if isinstance(name, str) else i}]")
    elif isinstance(value, dict):
        for k, item in value.items():
            _check_finite(item, f"{key}.{k}")


def _file_layer(path: Path, schema: type):
    from omegaconf import DictConfig, OmegaConf

    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        layer = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends
        raise ValueError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(layer, DictConfig):
        raise ValueError(f"config file {path} must be a mapping of sections (model:, data:, training: ...), "
                         f"not a {type(layer).__name__.replace('Config', '').lower() or 'value'}")
    if schema is not Config:  # a recipe given to a command: the sections the command has no use for
        import dataclasses

        unused = {f.name for f in dataclasses.fields(Config)} - {f.name for f in dataclasses.fields(schema)}
        for name in unused & set(layer.keys()):
            layer.pop(name)
    return layer


def _nested(key: str, value: Any):
    """``a.b=value`` as a one-key config (typed: no YAML parsing of the value, as a dotlist would)."""
    from omegaconf import OmegaConf

    tree: Any = value
    for part in reversed(key.split(".")):
        tree = {part: tree}
    return OmegaConf.create(tree)


def _merge(merged, layer, where: str, schema: type, aliases: Mapping[str, str]):
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.merge(merged, layer)
    except OmegaConfBaseException as exc:
        raise ValueError(_explain(exc, where, schema, aliases)) from exc


def _override_of(exc, overrides) -> str:
    key = getattr(exc, "full_key", None) or ""
    return next((o for o in overrides if o.split("=", 1)[0] == key), f"{key}=...")


def _blame(exc, path, overrides, schema: type | None = None, aliases: Mapping[str, str] | None = None,
           given: Mapping[str, str] | None = None) -> str:
    """A value check failed: say whether the override, an option (``given``: key -> which) or the file
    set the value."""
    msg = _explain(exc, "", schema, aliases) if not isinstance(exc, ValueError) else str(exc)
    m = re.match(r"(?:bad value for config key ')?([a-z_]+(?:\.[a-z_]+)+)", msg)
    key = m.group(1) if m else None
    from_override = [o for o in overrides if key and o.split("=", 1)[0] == key]
    if from_override:
        return f"{msg} (from the override {from_override[-1]})"
    if key and given and key in given:
        return f"{msg} (from {given[key]})"
    if key is None and given:  # a message naming no key: the value may as well come from an option
        return msg
    return f"{msg} (in {path})" if path and "is not set:" not in msg else msg


def _check_with_libraries(cfg: Config) -> None:
    """Values whose valid set a library defines (checked here, before anything is loaded or written)."""
    from transformers.trainer_utils import SchedulerType

    names = [t.value for t in SchedulerType]
    if cfg.training.lr_scheduler_type not in names:
        raise ValueError(f"training.lr_scheduler_type={cfg.training.lr_scheduler_type!r} is not one of {names}")
    import importlib.util

    for name in cfg.training.report_to:
        if not any(importlib.util.find_spec(p) for p in TRACKERS[name]):
            raise ValueError(f"training.report_to={name}: the {TRACKERS[name][0]} package is not installed; "
                             f"pip install {TRACKERS[name][0]} (or pip install 'dist-vdr[tracking]'), or remove it")


def _check_tracker_folders(cfg: Config) -> None:
    """trackio's store must be writable: trackio only warns and the run's tracking would be lost. Nothing is
    created here (the nearest existing folder on the way must be writable)."""
    if "trackio" not in cfg.training.report_to:
        return
    import os

    from huggingface_hub.constants import HF_HOME

    folder = Path(os.environ.get("TRACKIO_DIR") or Path(HF_HOME) / "trackio").expanduser()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"training.report_to=trackio: trackio stores its runs in {folder}, which cannot be written "
                         f"({existing} is not a writable folder): set TRACKIO_DIR to a writable folder")


def _resolve_sources(cfg: Config, model: bool = True) -> None:
    from dist_vdr import sources

    if model:
        cfg.model.name_or_path = sources.resolve(cfg.model.name_or_path, "model.name_or_path", "model folder")
    if cfg.model.adapter.init_from:
        cfg.model.adapter.init_from = sources.resolve(cfg.model.adapter.init_from, "model.adapter.init_from",
                                                      "adapter folder")
    _resolve_data_paths("data", cfg.data, cfg.evaluation.enabled, _data_path_used(cfg))
    for k, entry in enumerate(cfg.data.datasets):
        _resolve_data_paths(f"data.datasets[{k}]", entry, cfg.evaluation.enabled)
    if not model:
        return
    for key, label in tasks.get(cfg.task).local_paths(cfg):  # the task's own paths (dotted keys, any depth)
        *sections, name = key.split(".")
        node = cfg
        for section in sections:
            node = getattr(node, section)
        if getattr(node, name) is not None:  # unset: nothing to check
            setattr(node, name, sources.resolve(getattr(node, name), key, label))


def _data_path_used(cfg: Config) -> bool:
    """Whether anything reads data.path: not when every dataset of a mixture has its own path and the
    evaluation is off, or is the datasets' own, or names data.eval_path."""
    d = cfg.data
    if not d.datasets or any(e.path is None for e in d.datasets):
        return True
    return cfg.evaluation.enabled and not any(e.has_eval for e in d.datasets) and not d.eval_path


def _resolve_data_paths(prefix: str, section, evaluating: bool, path_used: bool = True) -> None:
    """The paths of a data section or a mixture's entry (``prefix``: its key), the eval ones when evaluating."""
    from dist_vdr import sources

    for key, label in (("path", "dataset folder"), ("pages_path", "page corpus folder"),
                       ("eval_path", "eval data folder")):
        if getattr(section, key) and (key != "eval_path" or evaluating) and (key != "path" or path_used):
            setattr(section, key, sources.resolve(getattr(section, key), f"{prefix}.{key}", label))
    for key in ("eval_queries_file", "eval_qrels_file"):
        if getattr(section, key) and evaluating:
            setattr(section, key, sources.resolve_file(getattr(section, key), f"{prefix}.{key}"))


def _explain(exc, where: str, schema: type | None = None, aliases: Mapping[str, str] | None = None) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    if type(exc).__name__ == "MissingMandatoryValue":
        option = (aliases or {}).get(key)
        return f"{key} is not set: give {option + ' or ' if option else ''}{key}=..."
    if type(exc).__name__ == "ConfigKeyError" and getattr(exc, "object_type", None) is DatasetEntry:
        import dataclasses

        return (f"unknown key {key!r} of a data.datasets entry{where}; known keys: "
                f"{sorted(f.name for f in dataclasses.fields(DatasetEntry))}")
    if type(exc).__name__ == "ConfigKeyError":
        from omegaconf import OmegaConf

        section = key.rsplit(".", 1)[0] if key and "." in key else None
        node = OmegaConf.select(_schema(schema), section) if section else _schema(schema)
        known = f"; known keys{' of ' + section if section else ''}: {sorted(node.keys())}" if node is not None else ""
        return f"unknown config key {key!r}{where}{known}"
    return f"bad value for config key {key!r}{where}: {msg}"


def to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
