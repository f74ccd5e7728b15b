"""The settings of the `dist-vdr bench*` commands, one section each (``bench``, ``bench_loss``, ...):
loaded like a recipe (YAML file < options < ``key=value``), their options generated from these fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from dist_vdr.config import REQUIRED, EvaluationConfig
from dist_vdr.kinds.multi_vector.config import CHUNK_ELEMENTS


@dataclass(kw_only=True)
class TrainBench:
    """`dist-vdr bench train`: training throughput of dist-vdr's settings next to stock sentence-transformers."""

    work_dir: str = REQUIRED
    """Scratch folder (model, generated pages, one run per setting)."""
    model: str = "tiny"
    """tiny, qwen3-vl-2b (random weights, built offline) or a model folder."""
    recipe: str | None = None
    """Recipe of the dist-vdr settings (none: configs/tiny.yaml for tiny, configs/qwen3-vl-embedding-2b-vdr.yaml
    for qwen3-vl-2b)."""
    steps: int = 3
    """Measured optimizer steps per setting."""
    warmup_steps: int = 1
    """Optimizer steps per setting before the measured ones."""
    global_batch_size: int | None = None
    """Triplets per step (none: the recipe's)."""
    stock: list[str] = field(default_factory=lambda: ["mb1", "mb8", "mb16", "tok6000"])
    """Stock settings: mbN = mini_batch_size N, tokN = mini_batch_num_tokens N (empty: none)."""
    ours: list[str] = field(default_factory=list)
    """dist-vdr settings, each NAME[:key=value,...]: the recipe with overrides (empty: the recipe as is)."""
    pages: str = "mixed"
    """mixed: real page shapes at 150 dpi; anchor: 1416x1648 as the stock anchors."""
    device: str = "auto"
    """auto, cuda or cpu."""
    timeout_s: float | None = None
    """Per-setting time limit in seconds (none: no limit)."""


@dataclass(kw_only=True)
class TrainBenchCommand:
    bench: TrainBench = field(default_factory=TrainBench)


@dataclass(kw_only=True)
class LossBench:
    """`dist-vdr bench loss`: collectives, bytes and s/step of the stock gather vs the global-batch loss."""

    model: str = "artifacts/tiny-model"
    """Model folder."""
    world_size: int = 2
    """Processes (ranks)."""
    global_batch: int = 64
    """Rows per step over all ranks."""
    mini_batch_size: int = 1
    """Rows per gradient-caching forward/backward."""
    dims: list[int] = field(default_factory=list)
    """Matryoshka dims (empty: 7 dims scaled to the 64-d tiny model)."""
    steps: int = 3
    """Measured steps."""
    json: bool = False
    """Also print the raw figures as JSON."""


@dataclass(kw_only=True)
class LossBenchCommand:
    bench_loss: LossBench = field(default_factory=LossBench)


@dataclass(kw_only=True)
class EvalBench:
    """`dist-vdr bench eval`: 7-dim sweep, stock per-dim evaluators vs the sharded evaluator, 1 and W ranks
    (pages per forward and preprocessing workers: evaluation.batch_size, evaluation.num_workers)."""

    model: str = "artifacts/tiny-model"
    """Model folder."""
    data: str = REQUIRED
    """Dataset folder with eval_queries/eval_corpus/eval_qrels."""
    dims: list[int] = field(default_factory=lambda: [64, 48, 32, 16, 8, 4, 2])
    """The Matryoshka dims swept."""
    world_size: int = 2
    """Ranks of the sharded run."""


@dataclass(kw_only=True)
class EvalBenchCommand:
    bench_eval: EvalBench = field(default_factory=EvalBench)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


@dataclass(kw_only=True)
class CorpusBench:
    """`dist-vdr bench corpus`: pages build and corpus mining, 1 process vs W, rows compared."""

    work_dir: str = REQUIRED
    """Scratch folder (generated PDFs, corpora, mined rows)."""
    model: str = "artifacts/tiny-model"
    """Embedding model folder for the mining figures."""
    num_documents: int = 2300
    """Generated PDFs (~4.5 pages each)."""
    num_scans: int = 200
    """Generated page scans (images)."""
    render_documents: int = 400
    """PDFs rendered at dpi for the build figures."""
    dpi: float = 144.0
    """Render resolution of the build figures."""
    world_size: int = 2
    """Processes of the parallel runs."""
    json: bool = False
    """Also print the raw figures as JSON."""


@dataclass(kw_only=True)
class CorpusBenchCommand:
    bench_corpus: CorpusBench = field(default_factory=CorpusBench)


@dataclass(kw_only=True)
class StartupBench:
    """`dist-vdr bench startup`: time to the first step by phase: rows, ranks, first start vs resume."""

    work_dir: str = REQUIRED
    """Scratch folder (model, generated pages and rows, runs)."""
    rows: list[int] = field(default_factory=lambda: [1000, 100000])
    """Row counts of the rows naming pages by id."""
    image_rows: int = 1000
    """Rows holding their pages (0: none)."""
    num_pages: int = 64
    """Distinct generated pages."""
    world_size: int = 2
    """Ranks of the multi-rank runs."""
    launch: str = "launch/cpu.yaml"
    """accelerate config for the multi-rank runs."""
    json: bool = False
    """Also print the raw figures as JSON."""


@dataclass(kw_only=True)
class StartupBenchCommand:
    bench_startup: StartupBench = field(default_factory=StartupBench)


@dataclass(kw_only=True)
class CheckpointBench:
    """`dist-vdr bench checkpoint`: checkpoint file hashing (the completion marker) next to writing."""

    work_dir: str = REQUIRED
    """Scratch folder on the file system the runs write to."""
    size_gb: float = 4.26
    """Gigabytes written and hashed (4.26: Qwen3-VL-2B in bf16)."""

    def __post_init__(self) -> None:
        if not self.size_gb > 0:
            raise ValueError(f"bench_checkpoint.size_gb must be > 0, got {self.size_gb}")


@dataclass(kw_only=True)
class CheckpointBenchCommand:
    bench_checkpoint: CheckpointBench = field(default_factory=CheckpointBench)


@dataclass(kw_only=True)
class SearchBench:
    """`dist-vdr bench search`: exact top-100 + metrics vs faiss IndexFlatIP, time and peak RSS."""

    num_pages: int = 1_000_000
    """Corpus vectors."""
    num_queries: int = 10_000
    """Query vectors."""
    dim: int = 64
    """Vector dimension."""
    backend: str = "faiss"
    """faiss or torch: the search compared with the exact top-100."""


@dataclass(kw_only=True)
class SearchBenchCommand:
    bench_search: SearchBench = field(default_factory=SearchBench)


@dataclass(kw_only=True)
class MultiVectorSearchBench:
    """`dist-vdr bench eval-multi-vector`: late-interaction search on the same generated token embeddings, side by
    side (dist_vdr.bench.multi_vector_search): dist-vdr's exact sharded MaxSim on 1 and W ranks, its two-stage
    search, sentence-transformers' multi-vector evaluator, fast-plaid; seconds, peak RSS, NDCG@10, recall."""

    work_dir: str = REQUIRED
    """Scratch folder (the generated corpus, the page stores, fast-plaid's index)."""
    pages: int = 20_000
    """Pages of the corpus."""
    page_tokens: int = 64
    """Most tokens of a page (each has 3/4 to all of them)."""
    queries: int = 200
    query_tokens: int = 16
    """Most tokens of a query (each has half to all of them)."""
    dim: int = 128
    """Token dimension."""
    world_size: int = 2
    """The ranks of the sharded run beside 1 (gloo processes, the cores split between them)."""
    candidates: int = 400
    """Pages per query the two-stage search's first stage keeps (>= 100)."""
    sentence_transformers: bool = True
    """Run sentence-transformers' evaluator (one process, the corpus in memory)."""
    fast_plaid_python: str | None = None
    """An interpreter with fast-plaid (`make bench-fast-plaid-venv`: .venv-fast-plaid/bin/python); none: skipped."""
    seed: int = 0
    json: bool = False
    """Also print the raw figures as JSON."""
    in_process: bool = False
    """Run the 1-rank methods in this process, not in fresh interpreters: quicker (the tests' setting), but their
    peak RSS is then this process's, not their own."""

    def __post_init__(self) -> None:
        for name in ("pages", "page_tokens", "queries", "query_tokens", "dim", "world_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"bench_mv_search.{name} must be >= 1, got {getattr(self, name)}")
        if self.candidates < 100:
            raise ValueError(f"bench_mv_search.candidates must be >= 100 (the top-100 is kept), got {self.candidates}")
        if self.queries > self.pages:
            raise ValueError("bench_mv_search.queries must be <= pages (each query has a page of its own)")


@dataclass(kw_only=True)
class MultiVectorSearchBenchCommand:
    bench_mv_search: MultiVectorSearchBench = field(default_factory=MultiVectorSearchBench)


@dataclass(kw_only=True)
class MaxsimBench:
    """`dist-vdr bench maxsim`: peak memory of the multi-vector scoring step (forward + backward), dist-vdr's chunked
    MaxSim vs the unchunked einsum and sentence-transformers' scoring; measured on CPU, computed at the published
    shapes."""

    world_size: int = 1
    """Ranks whose queries are gathered (W); one process measures one rank's step."""
    batch: int = 64
    """Queries per rank (B)."""
    query_tokens: int = 30
    """Tokens per query (Tq)."""
    page_columns: int = 2
    """Page columns per rank (C), B pages each."""
    page_tokens: int = 256
    """Tokens per page (Tp)."""
    dim: int = 128
    """Token dimension (D)."""
    chunk_elements: int = CHUNK_ELEMENTS
    """dist-vdr's bound on a similarity block (multi_vector.chunk_elements)."""
    score_mini_batch_size: int = 32
    """sentence-transformers' score_mini_batch_size (its default: mini_batch_size = 32)."""
    json: bool = False
    """Also print the raw figures as JSON."""

    def __post_init__(self) -> None:
        for name in ("world_size", "batch", "query_tokens", "page_columns", "page_tokens", "dim", "chunk_elements",
                     "score_mini_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"bench_maxsim.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(kw_only=True)
class MaxsimBenchCommand:
    bench_maxsim: MaxsimBench = field(default_factory=MaxsimBench)


@dataclass(kw_only=True)
class PoolingBench:
    """`dist-vdr bench pooling`: index-time token pooling of a multi-vector model's pages, NDCG@10 and bytes per page
    at each pool factor beside no pooling (one process)."""

    model: str = REQUIRED
    """A multi-vector model folder (a run's final/)."""
    data: str = REQUIRED
    """A page dataset with an eval set (data.eval_format ir: eval_queries / eval_corpus / eval_qrels)."""
    pool_factors: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0, 4.0])
    """The pool factors, the first the baseline of the ratios."""
    divide_by_query_length: bool = False
    """MeanMaxSim (as the model was trained: rankings differ where query lengths differ)."""
    batch_size: int = 16
    max_queries: int | None = None

    def __post_init__(self) -> None:
        if not self.pool_factors or any(not f >= 1 for f in self.pool_factors):
            raise ValueError(f"bench_pooling.pool_factors must be >= 1, got {self.pool_factors}")
        if self.batch_size < 1:
            raise ValueError("bench_pooling.batch_size must be >= 1")


@dataclass(kw_only=True)
class PoolingBenchCommand:
    bench_pooling: PoolingBench = field(default_factory=PoolingBench)
