"""The reranker's config section (``reranker:`` in a recipe and in the commands that load a reranker)."""

from __future__ import annotations

from dataclasses import dataclass

from dist_vdr.config import check_choice


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
        check_choice("reranker", "head", self.head, ("auto", "logit_score", "dense"))
        if self.retrieval_score_weight < 0:
            raise ValueError("reranker.retrieval_score_weight must be >= 0 (0: the reranker's score alone)")
        if self.rerank_depth < 1:
            raise ValueError("reranker.rerank_depth must be >= 1")
        if not self.retriever:
            raise ValueError("reranker.retriever is empty: give the embedding model that retrieves candidates")
