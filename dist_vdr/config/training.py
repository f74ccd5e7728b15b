"""The ``loss``, ``training``, ``evaluation``, ``launch`` and ``mining`` sections of a recipe."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from dist_vdr.config.values import _METRICS, _PRECISIONS, _SAMPLERS, DEVICES, TRACKERS, _check_steps, check_choice


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
        check_choice("loss.false_negatives", "margin_strategy", self.margin_strategy, ("absolute", "relative"))
        check_choice("loss.false_negatives", "id_source", self.id_source, ("rows", "pages"))
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
        check_choice("loss.distillation", "kind", self.kind, ("kl", "margin_mse"))
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
    """auto: cmnrl for task=embedding, bce for task=reranker, maxsim_infonce for task=multi_vector. Embedding: cmnrl
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
        # loss.name is checked against the task's losses (Config.__post_init__): each kind declares its own.
        if self.num_in_batch_negatives < 0:
            raise ValueError("loss.num_in_batch_negatives must be >= 0")
        if self.pos_weight is not None and self.pos_weight <= 0:
            raise ValueError("loss.pos_weight must be > 0 or null")
        check_choice("loss", "implementation", self.implementation, ("auto", "global_batch", "stock"))
        if self.mini_batch_size < 1:
            raise ValueError(f"loss.mini_batch_size must be >= 1, got {self.mini_batch_size}")
        if not self.scale > 0:
            raise ValueError(f"loss.scale must be > 0 (1 / temperature), got {self.scale}")
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
        check_choice("training", "precision", self.precision, _PRECISIONS)
        check_choice("training", "batch_sampler", self.batch_sampler, ("auto",) + _SAMPLERS)
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
            check_choice("training", "report_to", name, tuple(TRACKERS))
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
        check_choice("training", "final", self.final, ("last", "best"))
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
        check_choice("evaluation", "implementation", self.implementation, ("sharded", "stock"))
        check_choice("evaluation", "search_backend", self.search_backend, ("auto", "faiss", "torch"))
        if self.num_workers < -1:
            raise ValueError("evaluation.num_workers must be >= 0, or -1 for auto")
        if self.batch_size < 1:
            raise ValueError("evaluation.batch_size must be >= 1")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"evaluation.ks must be positive cutoffs, got {self.ks}")
        if self.dims is not None and any(d < 1 for d in self.dims):
            raise ValueError(f"evaluation.dims must be positive dimensions, got {self.dims}")
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
        check_choice("launch", "device", self.device, DEVICES)
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


