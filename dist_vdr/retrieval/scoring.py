"""How a kind represents and scores queries and pages: one object, read by every part that scores.

The global-batch loss, the false-negative guide, the sharded evaluator's encoding and search, mining
and teacher scoring all go through a :class:`Scoring` instead of assuming one vector per query and
page compared by cosine. A kind says which it uses (:meth:`dist_vdr.kinds.base.Task.scoring`); a kind
with another representation (e.g. token embeddings ``[N, T, D]`` scored by MaxSim) subclasses
:class:`Scoring` and plugs in without editing those modules.

:class:`CosineScoring` is the embedding kind's (and every default's): the ``sentence_embedding``
output, L2-normalised, compared by inner product; Matryoshka dims truncate and re-normalise. Its
numbers are bitwise those of the code before this seam.

Nothing here imports a kind.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

QUERY, PAGE = "query", "page"
"""The side an input is encoded for (queries are texts, pages are page images)."""


class Scoring:
    """How queries and pages are represented and scored (subclass it; :meth:`scores` is required).

    A *representation* is a tensor whose first dimension runs over queries or pages (``[N, D]`` for one
    vector each, ``[N, T, D]`` for token embeddings); its last dimension is the one a Matryoshka dim cuts.

    - :attr:`output_key`: the key of the model's forward output read as the embeddings;
    - :meth:`represent`: a model's embeddings -> the stored representation (what the evaluator keeps and
      searches, what the loss scores); applied again to a truncated representation, so it must leave a
      representation as it is (normalising twice is fine);
    - :meth:`truncate`: a representation cut to a Matryoshka dim (a representation again);
    - :meth:`scores`: ``[Q, P]`` the scores of queries against pages -- the one primitive; differentiable
      (the loss back-propagates through it), higher is better;
    - :meth:`pair_scores`: ``[N]`` query i against page i, each pair computed on its own (the evaluator's
      and mining's rescoring, distillation): a pair's score must not depend on the other rows;
    - :attr:`inner_product`: True only when ``scores(q, p)`` equals ``q @ p.T`` of ``[N, D]`` stored
      representations; faiss inner-product search is then valid. Otherwise search computes
      :meth:`scores` block by block (torch).

    How the evaluator, mining and teacher scoring encode (``side``: :data:`QUERY` or :data:`PAGE`):
    :meth:`prepare` (a batch's model inputs, in DataLoader workers), :meth:`forward` (a batch's
    representation), :meth:`stack` (items' representations as one batch's, padded as the layout allows),
    :meth:`encode_queries` (texts through the model's own query encoding).
    """

    output_key: str = "sentence_embedding"
    inner_product: bool = False
    ragged: bool = False
    """True when items' representations differ in shape (a token axis): :meth:`stack` pads them to one."""
    store_dtype: str | None = None
    """The sharded evaluator keeps a rank's page representations on disk in this dtype (``"float16"`` or
    ``"float32"``; :class:`~dist_vdr.retrieval.token_store.TokenStore`) and searches them chunk by chunk, each
    item as :meth:`trim` gives it; None: in memory as one tensor."""

    def represent(self, embeddings: Tensor) -> Tensor:
        """The stored representation of a model's embeddings (default: as they are)."""
        return embeddings

    def truncate(self, reps: Tensor, dim: int) -> Tensor:
        """``reps`` cut to the first ``dim`` values of its last dimension (default: no re-normalisation)."""
        return reps[..., :dim]

    def scores(self, queries: Tensor, pages: Tensor) -> Tensor:
        """``[Q, P]``: every query (``queries[i]``) scored against every page (``pages[j]``)."""
        raise NotImplementedError

    def pair_scores(self, queries: Tensor, pages: Tensor) -> Tensor:
        """``[N]``: query i scored against page i (default: :meth:`scores` of each pair alone)."""
        if len(queries) == 0:
            return queries.new_empty(0)
        return torch.stack([self.scores(queries[i:i + 1], pages[i:i + 1])[0, 0] for i in range(len(queries))])

    first_stage_candidates: int = 0
    """The sharded evaluator's two-stage search (:mod:`dist_vdr.retrieval.two_stage`): the pages per query and rank
    that :meth:`first_stage`'s vectors pick for the exact score; 0: every page is scored exactly."""

    def first_stage(self, items: Sequence[Tensor], side: str) -> Tensor:
        """``[n, F]`` one vector per item (each as :meth:`trim` gives it) whose inner products approximate
        :meth:`scores` (the two-stage search's first stage)."""
        raise NotImplementedError(f"{type(self).__name__} has no first stage")

    def first_stage_tag(self) -> str:
        """What :meth:`first_stage`'s vectors depend on besides the items (a two-stage index on disk keys on it)."""
        return type(self).__name__

    def trim(self, rep: Tensor, side: str) -> Tensor:
        """One item's representation without the padding :meth:`stack` added (what a store keeps; :meth:`stack`
        of trimmed items must score as the untrimmed ones). Default: as it is."""
        return rep

    def cache_tag(self) -> str:
        """What stored representations depend on besides the model: the evaluator's encoding cache keys on it
        (so representations of another scoring are never reused)."""
        return f"{type(self).__module__}.{type(self).__qualname__}"

    # -- encoding (the evaluator, mining, teacher scoring) ---------------------------------------------
    def prepare(self, model, inputs: list, side: str, prompt: str | None) -> dict:
        """The model inputs of a batch (on the CPU; run in DataLoader workers)."""
        return model.preprocess(inputs, prompt=prompt)

    def forward(self, model, features: dict, side: str) -> Tensor:
        """The float32 representation ``[n, ...]`` of one batch of :meth:`prepare`'s features (on the model's
        device; the caller picks no_grad / autocast)."""
        return self.represent(model(features)[self.output_key].float())

    def stack(self, items: Sequence[Tensor], side: str, shape: Sequence[int] | None = None) -> Tensor:
        """One representation ``[n, *shape]`` of ``n`` items' representations (each a row of some batch's).
        ``shape``: the trailing shape to give it (a layout with a token axis pads to it; several ranks' rows
        are joined so); None: the items' own (their largest). No items: ``[0, *shape]``."""
        if not items:
            return torch.empty(0, *(shape or (0,)))
        return torch.stack(list(items))

    def stack_rows(self, rows: Tensor, counts: Sequence[int], side: str) -> Tensor:
        """:meth:`stack` of items given as one tensor of their rows one after another (``counts``: rows per item; what
        a page store reads). Default: split, then :meth:`stack`."""
        return self.stack(list(torch.split(rows, list(counts))), side)

    def scores_rows(self, queries: Tensor, rows: Tensor, counts: Sequence[int]) -> Tensor:
        """:meth:`scores` of pages given as :meth:`stack_rows` takes them (default: stacked, then scored)."""
        return self.scores(queries, self.stack_rows(rows, counts, PAGE))

    def pair_scores_rows(self, queries: Tensor, query_of: Tensor, rows: Tensor, counts: Sequence[int],
                         page_of: Tensor) -> Tensor:
        """``[m]``: the score of ``queries[query_of[i]]`` with page ``page_of[i]`` of pages given as :meth:`stack_rows`
        takes them (a page store's float32 chunk), in the queries' precision. Default: :meth:`pair_scores` of the
        stacked pages, one copy per pair."""
        return self.pair_scores(queries[query_of], self.stack_rows(rows, counts, PAGE)[page_of].to(queries.dtype))

    def encode_queries(self, model, texts: list[str], batch_size: int) -> Tensor:
        """float32 representations on the CPU of ``texts`` through the model's own query encoding
        (sentence-transformers' ``encode_query``)."""
        # The default output is asked as before (models without an output_value argument keep working).
        output = {} if self.output_key == "sentence_embedding" else {"output_value": self.output_key}
        emb = model.encode_query(list(texts), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False,
                                 **output)
        return self.represent(emb.float()).cpu()


class CosineScoring(Scoring):
    """One vector per query and page (``sentence_embedding``), L2-normalised; scores are cosine similarities
    (inner products of the stored vectors). Matryoshka: truncate, then re-normalise."""

    inner_product = True

    def represent(self, embeddings: Tensor) -> Tensor:
        return F.normalize(embeddings, p=2, dim=-1)

    def truncate(self, reps: Tensor, dim: int) -> Tensor:
        return F.normalize(reps[..., :dim], p=2, dim=-1)

    def scores(self, queries: Tensor, pages: Tensor) -> Tensor:
        return queries @ pages.T

    def pair_scores(self, queries: Tensor, pages: Tensor) -> Tensor:
        return (queries * pages).sum(dim=-1)

    def cache_tag(self) -> str:
        return ""  # the encoding cache's keys from before the seam stay valid


def resolve(scoring: Scoring | None) -> Scoring:
    """``scoring``, or :class:`CosineScoring` for None (the default of every function taking one)."""
    return CosineScoring() if scoring is None else scoring


def is_cosine(scoring: Scoring | None) -> bool:
    """Whether ``scoring`` is exactly today's cosine (None or a plain :class:`CosineScoring`, no subclass)."""
    return scoring is None or type(scoring) is CosineScoring
