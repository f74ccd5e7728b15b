"""The multi-vector kind's config section (``multi_vector:`` in a recipe and in the commands that load such a
model)."""

from __future__ import annotations

from dataclasses import dataclass, field

CHUNK_ELEMENTS = 1 << 24
"""Default bound on the ``[queries, pages, query tokens, page tokens]`` similarity block scored at once
(2**24 floats: 64 MiB in float32). (Here, not in scoring.py: loading a recipe imports no torch.)"""


@dataclass(kw_only=True)
class MultiVectorConfig:
    """task=multi_vector: token vectors scored by MaxSim (docs/multi-vector.md)."""

    token_dim: int = 128
    """The token vectors' dimension of a NEW projection (a backbone that is no MultiVectorEncoder yet); a saved
    MultiVectorEncoder keeps its own. loss.matryoshka_dims cut this dimension."""
    image_tokens_only: bool = False
    """A new head's page mask: score the image-patch tokens of a page only (colpali-engine's
    mask_non_image_embeddings); false: every token but the chat template's special tokens."""
    divide_by_query_length: bool = False
    """Divide each MaxSim score by the query's number of tokens (colpali-engine's normalize_scores, scores in
    [-1, 1]: loss.scale then acts as for cosine scores, e.g. 50 = colpali's temperature 0.02); false: the plain
    sum over query tokens (ColBERT and sentence-transformers' default, used with loss.scale 1)."""
    query_length: int | None = None
    """The number of tokens every query is padded to before the loss exchanges queries between ranks (a longer
    query stops the run with the fix); null: the step's longest query over the ranks, agreed by one more
    collective per step."""
    chunk_elements: int = CHUNK_ELEMENTS
    """The bound on the [queries, pages, query tokens, page tokens] similarity block scored at once, in the loss,
    the evaluation and mining (2**24 floats: 64 MiB in float32)."""

    pool_factor: float = 1.0
    """Index-time token pooling of the evaluation, mining and teacher scoring (not training): each page keeps about
    1 / pool_factor of its token vectors (sentence-transformers' HierarchicalTokenPooling: Ward clusters replaced by
    their normalised means); 1: none. Queries are never pooled."""
    store_dtype: str = "float16"
    """The dtype of the evaluation's on-disk page store (each rank writes its pages' token vectors there and scores
    them chunk by chunk: memory does not grow with the corpus): float16 (half the bytes) or float32 (the encoder's
    own values). In eval.cache when given (kept, keyed), else a scratch folder removed after each evaluation."""
    first_stage_candidates: int = 0
    """> 0: the evaluation (and `dist-vdr eval`) searches in two stages: each rank keeps this many pages per query by
    the inner product of MUVERA fixed dimensional encodings of the token sets (2,560 values per page, an index
    written beside the page store at its first search), then scores only those by exact MaxSim. Faster on large
    corpora, approximate (a page the first stage misses is lost: `dist-vdr bench eval-multi-vector` states the
    recall); 0: every page is scored exactly."""
    hybrid: bool = False
    """Also a pooled single vector on the same backbone (jina-embeddings-v4's design): one encode per mini-batch
    gives the token vectors and the pooled vector, and the loss trains both (the single vector: cosine InfoNCE over
    the global batch, Matryoshka on single_vector_dims); the single vector serves as a first stage, the tokens as
    the exact second stage. The pooling is model.pooling (auto: the base's own Pooling, else last token)."""
    single_vector_dims: list[int] = field(default_factory=list)
    """hybrid: the Matryoshka dims of the pooled vector (empty: its full dimension, the backbone's hidden size)."""
    single_vector_weight: float = 1.0
    """hybrid: the single-vector term's weight beside the token term."""
    single_vector_scale: float = 20.0
    """hybrid: the single-vector term's scale (1 / temperature of its cosine scores)."""

    def __post_init__(self) -> None:
        if self.single_vector_weight < 0 or self.single_vector_scale <= 0:
            raise ValueError("multi_vector.single_vector_weight must be >= 0 and single_vector_scale > 0")
        if any(d < 1 for d in self.single_vector_dims):
            raise ValueError(f"multi_vector.single_vector_dims must be >= 1, got {self.single_vector_dims}")
        if len(set(self.single_vector_dims)) != len(self.single_vector_dims):
            raise ValueError(f"multi_vector.single_vector_dims has duplicates: {self.single_vector_dims}")
        if self.single_vector_dims and not self.hybrid:
            raise ValueError("multi_vector.single_vector_dims applies to multi_vector.hybrid=true")
        if not self.pool_factor >= 1:
            raise ValueError(f"multi_vector.pool_factor must be >= 1 (1: no pooling), got {self.pool_factor}")
        self._check_evaluation()
        if self.token_dim < 1:
            raise ValueError(f"multi_vector.token_dim must be >= 1, got {self.token_dim}")
        if self.query_length is not None and self.query_length < 1:
            raise ValueError(f"multi_vector.query_length must be >= 1 or null, got {self.query_length}")
        if self.chunk_elements < 1:
            raise ValueError(f"multi_vector.chunk_elements must be >= 1, got {self.chunk_elements}")

    def _check_evaluation(self) -> None:
        if self.store_dtype not in ("float16", "float32"):
            raise ValueError(f"multi_vector.store_dtype must be float16 or float32, got {self.store_dtype!r}")
        if self.first_stage_candidates < 0:
            raise ValueError(f"multi_vector.first_stage_candidates must be >= 0 (0: exhaustive), got "
                             f"{self.first_stage_candidates}")
