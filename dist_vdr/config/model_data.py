"""The ``model`` and ``data`` sections of a recipe (and of the commands that load a model or a dataset)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from dist_vdr.config.values import _EVAL_FORMATS, DTYPES, REQUIRED, check_choice


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
        check_choice("model.adapter", "type", self.type, (None, "lora"))
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
        check_choice("model", "dtype", self.dtype, DTYPES)
        check_choice("model", "pooling", self.pooling, ("auto", "lasttoken", "mean", "cls"))


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
            check_choice(f"data.datasets[{self.name}]", "eval_format", self.eval_format, _EVAL_FORMATS)

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
        check_choice("data", "eval_format", self.eval_format, _EVAL_FORMATS)
        for key in ("max_train_samples", "max_eval_queries"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"data.{key} must be >= 1 or null, got {value}")
        repeated = sorted({c for c in self.train_columns if self.train_columns.count(c) > 1})
        if repeated:
            raise ValueError(f"data: column(s) {repeated} named twice among query_column, positive_column and "
                             f"negative_columns ({self.train_columns}): name each column once")
        check_choice("data", "mixture", self.mixture, _MIXTURES)
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


