"""The multi-vector kind's score rule: MaxSim over token embeddings (late interaction, ColBERT / ColPali).

A representation is ``[N, T, D]``: the token embeddings of N queries or pages, L2-normalised per token, ``T``
the longest item of the batch. The score of query q against page p is ``sum_i max_j <q_i, p_j>`` (i over the
query's tokens, j over the page's), optionally divided by the query's number of real tokens
(``divide_by_query_length``, colpali-engine's convention).

No mask travels with a representation: padding is written so that it cannot change a score.

- a query's padding tokens are zero vectors: ``max_j <0, p_j> = 0``, so they add 0 to the sum;
- a page's padding tokens repeat one of its real tokens (its first): a max over the page's tokens sees
  the same set of values, so every max is unchanged.

A representation is therefore one plain tensor, as the single-vector kind's is: the evaluator can store and
search it, the shared search and rescoring index it row by row, the loss can exchange it, and all of them
score it through :meth:`MaxSimScoring.scores` / :meth:`~MaxSimScoring.pair_scores` without carrying,
exchanging or slicing a mask, whatever ``T`` a batch, a shard or a rank happened to pad to (re-padding a
representation to a longer ``T`` with :func:`pad_tokens`' rule leaves its scores as they are).

:func:`pad_tokens` builds a representation from per-item token lists (what sentence-transformers'
``MultiVectorEncoder.encode_query`` / ``encode_document`` return), :func:`from_masked` from a forward
pass's padded (embeddings, scoring mask) pair. Normalisation is :meth:`MaxSimScoring.represent`'s (per
token; zero padding stays zero, repeated tokens stay repeats), in either order.

Edge cases: a query with no token scores 0 against every page; a page with no token is one zero vector
(scores 0 against every query; sentence-transformers gives such a page a sentinel score instead). A real
token that is exactly zero would not count in ``divide_by_query_length``'s number of tokens (nor in
sentence-transformers' mask-free one): an L2-normalised model output never is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dist_vdr.kinds.multi_vector.config import CHUNK_ELEMENTS
from dist_vdr.retrieval.scoring import PAGE, QUERY, CosineScoring, Scoring

KINDS = (QUERY, PAGE)
TASKS = {QUERY: "query", PAGE: "document"}
"""The ``task`` sentence-transformers' ``MultiVectorEncoder`` reads (its preprocess: per-task length, query
expansion, chat-template variable; its ``MultiVectorMask``), per side."""



def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def pad_tokens(tokens: Sequence[Tensor], kind: str, width: int = 0) -> Tensor:
    """``[N, T, D]`` from N ``[T_i, D]`` token embeddings, ``T`` = max(``width``, max ``T_i``) (at least 1 for
    pages).

    ``kind`` ``"query"``: padded with zero vectors; ``"page"``: padded with copies of the item's first
    token (a page without tokens: one zero vector). Differentiable (a copy's gradient reaches the token it
    copies). No items: ``[0, width, 0]``."""
    _check_kind(kind)
    if len(tokens) == 0:
        return torch.empty(0, width, 0)
    width = max(width, max(len(t) for t in tokens))
    if kind == PAGE:
        width = max(width, 1)
    return torch.stack([_pad_one(t, width, kind) for t in tokens])


def _pad_one(tokens: Tensor, width: int, kind: str) -> Tensor:
    if tokens.dim() != 2:
        raise ValueError(f"token embeddings must be [T, D], got shape {tuple(tokens.shape)}")
    missing = width - len(tokens)
    if missing == 0:
        return tokens
    if kind == QUERY or len(tokens) == 0:
        fill = tokens.new_zeros(missing, tokens.shape[-1])
    else:
        fill = tokens[:1].expand(missing, -1)
    return torch.cat([tokens, fill])


def from_masked(embeddings: Tensor, mask: Tensor, kind: str) -> Tensor:
    """The representation layout (:func:`pad_tokens`) of a forward pass's padded token embeddings.

    ``embeddings`` ``[N, T, D]``, ``mask`` ``[N, T]`` (bool or 0/1): True where a token is scored.

    sentence-transformers 6.2, ``MultiVectorEncoder``: its forward returns ``features["token_embeddings"]``
    ``[N, T, D]``, padded to the batch's longest input; the padded positions hold whatever the backbone
    computed there (normalised too by a token-level ``Normalize`` module; zeroed by transformers' ColPali /
    ColQwen2 retrieval heads): only the mask tells them apart. ``features["attention_mask"]`` ``[N, T]`` is
    overwritten by its ``MultiVectorMask`` module with the *scoring* mask (bool; the tokenizer's
    integer mask unchanged when the batch has no ``input_ids``): the real tokens, plus the query-expansion
    positions for ``task="query"``, minus skiplist tokens (documents by default) and, with
    ``keep_only_token_ids`` (ColPali-style image pages), minus every non-image token of a document. The
    scored tokens are thus neither a prefix (left padding, skiplists) nor contiguous in general. Its losses
    read exactly this pair; ``encode_query`` / ``encode_document`` return ``token_embeddings[i][mask[i]]``
    per input, a list of ``[T_i, D]`` tensors (what :func:`pad_tokens` takes).

    Each row keeps its scored tokens in order, then is padded by ``kind``'s rule; ``T`` becomes the largest
    number of scored tokens (at least 1 for pages). Equals :func:`pad_tokens` of the per-row selections;
    differentiable."""
    _check_kind(kind)
    if embeddings.dim() != 3 or mask.shape != embeddings.shape[:2]:
        raise ValueError(f"expected embeddings [N, T, D] and mask [N, T], got {tuple(embeddings.shape)} and "
                         f"{tuple(mask.shape)}")
    n, t, d = embeddings.shape
    real = mask.bool()
    counts = real.sum(dim=1)
    width = int(counts.max()) if n else 0
    if kind == PAGE:
        width = max(width, 1)
    if t == 0:
        return embeddings.new_zeros(n, width, d)
    # Each row's scored positions first, in their order: a stable sort of "is not scored".
    order = torch.sort((~real).to(torch.int32), dim=1, stable=True).indices[:, :width]
    filled = torch.arange(width, device=embeddings.device)[None, :] < counts[:, None]  # [N, width]
    if kind == PAGE:
        order = torch.where(filled, order, order[:, :1])  # the first scored token again
        keep = filled | (counts[:, None] > 0)  # a page without scored tokens: zeros
    else:
        keep = filled
    out = embeddings.gather(1, order[..., None].expand(-1, -1, d))
    return out.masked_fill(~keep[..., None], 0)


def real_token_counts(queries: Tensor) -> Tensor:
    """``[N]`` the number of real (non-zero) tokens of each query representation, at least 1 (an empty
    query's scores are 0 either way). sentence-transformers' mask-free MeanMaxSim counts the same way."""
    return (queries != 0).any(dim=-1).sum(dim=1).clamp(min=1)


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """Sums over query tokens run in float32 at least (bf16 would collapse nearby scores), in float64 for
    float64 inputs (the search's rescoring)."""
    return torch.promote_types(dtype, torch.float32)


def _maxsim(queries: Tensor, pages: Tensor) -> Tensor:
    """``[a, b]`` MaxSim of ``queries`` [a, Tq, D] against ``pages`` [b, Tp, D]: one [a, Tq, b, Tp] block.
    ``max`` (not ``amax``) keeps only the arg-max indices for backward, not the block."""
    a, tq, d = queries.shape
    b, tp, _ = pages.shape
    sim = (queries.reshape(a * tq, d) @ pages.reshape(b * tp, d).T).view(a, tq, b, tp)
    best = sim.max(dim=-1).values  # [a, Tq, b]
    return best.to(_accumulator(best.dtype)).sum(dim=1)


def _pair_maxsim(queries: Tensor, pages: Tensor) -> Tensor:
    """``[n]`` MaxSim of query i against page i (each pair its own matrix product)."""
    best = torch.bmm(queries, pages.transpose(1, 2)).max(dim=-1).values  # [n, Tq]
    return best.to(_accumulator(best.dtype)).sum(dim=1)


PAIR_BLOCK = 1 << 20
"""Query values one batch of :meth:`MaxSimScoring.pair_scores_rows` gathers (4 MiB of float32: in the cache)."""

SCORE_BLOCK = (512, 2048)
"""Query tokens x page tokens of one block of :meth:`MaxSimScoring.scores_rows` (4 MiB of float32 similarities)."""


def _padded(rows: Tensor, starts: Tensor, counts: Tensor) -> Tensor:
    """``[n, longest, D]``: the items of ``counts[i]`` rows from row ``starts[i]`` of ``rows``, each padded with its
    first row (a repeat changes no max), in one gather."""
    steps = torch.arange(int(counts.max()))[None, :]
    return rows[starts[:, None] + torch.where(steps < counts[:, None], steps, 0)]


def _lengths(queries: Tensor) -> Tensor:
    """``[N]`` each query's tokens up to its last non-zero one (the padding after it is zeros)."""
    real = (queries != 0).any(dim=-1)
    return torch.where(real.any(dim=1), real.shape[1] - real.flip(1).int().argmax(dim=1), 0)


def _check(queries: Tensor, pages: Tensor) -> None:
    if queries.dim() != 3 or pages.dim() != 3 or queries.shape[-1] != pages.shape[-1]:
        raise ValueError(f"MaxSim scores [N, T, D] token embeddings of the same D, got queries "
                         f"{tuple(queries.shape)} and pages {tuple(pages.shape)}")


class MaxSimScoring(Scoring):
    """Token embeddings ``[N, T, D]`` (sentence-transformers' ``token_embeddings`` output), L2-normalised per
    token, padded without masks (module docstring); scores ``sum_i max_j <q_i, p_j>``.

    Args:
        divide_by_query_length: divide each score by the query's number of real tokens (MeanMaxSim;
            colpali-engine's ``ColbertLoss(normalize_scores=True)`` with temperature 0.02, and
            sentence-transformers' ``length_normalize=True`` / ``similarity_fn_name="meanmaxsim"``): scores
            then lie in [-1, 1] whatever the query's length. False (default): plain MaxSim, the ColBERT /
            sentence-transformers ``colbert_scores`` default, whose scale grows with the query's length.
        chunk_elements: bound on the similarity block ``[queries, pages, Tq, Tp]`` alive at once in
            :meth:`scores` (queries and pages are chunked to fit; one query against one page may exceed it)
            and ``[pairs, Tq, Tp]`` in :meth:`pair_scores`. Backward keeps only each max's index
            (``[Q, Tq, P]`` in all), never a block.
        pool_factor: index-time token pooling of the pages (:meth:`forward`); 1: none.
        store_dtype: the dtype of the sharded evaluator's on-disk page store (``float16``: half the bytes; a
            normalised token's values lose nothing that moves a ranking in practice, see docs/multi-vector.md).
        first_stage_candidates: > 0: the evaluator's two-stage search keeps this many pages per query and rank by
            the inner product of MUVERA encodings (:meth:`first_stage`), then scores them by MaxSim; 0: exhaustive.

    Matryoshka cuts the token dimension: :meth:`truncate` keeps the first ``dim`` values of every token and
    re-normalises each token (zero padding stays zero, repeated page tokens stay repeats).
    """

    output_key = "token_embeddings"
    inner_product = False
    ragged = True

    def __init__(self, divide_by_query_length: bool = False, chunk_elements: int = CHUNK_ELEMENTS,
                 pool_factor: float = 1.0, store_dtype: str = "float16", first_stage_candidates: int = 0) -> None:
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be positive, got {chunk_elements}")
        if pool_factor < 1:
            raise ValueError(f"pool_factor must be >= 1, got {pool_factor}")
        self.divide_by_query_length = divide_by_query_length
        self.chunk_elements = int(chunk_elements)
        self.pool_factor = float(pool_factor)
        self.store_dtype = store_dtype
        if first_stage_candidates < 0:
            raise ValueError(f"first_stage_candidates must be >= 0, got {first_stage_candidates}")
        self.first_stage_candidates = int(first_stage_candidates)
        self._encoders: dict[int, object] = {}

    def represent(self, embeddings: Tensor) -> Tensor:
        return F.normalize(embeddings, p=2, dim=-1)

    def truncate(self, reps: Tensor, dim: int) -> Tensor:
        return F.normalize(reps[..., :dim], p=2, dim=-1)

    def scores(self, queries: Tensor, pages: Tensor) -> Tensor:
        """``[Q, P]`` from ``queries`` [Q, Tq, D] and ``pages`` [P, Tp, D], block by block."""
        _check(queries, pages)
        (num_q, tq, _), (num_p, tp, _) = queries.shape, pages.shape
        if num_q == 0 or num_p == 0 or tp == 0:
            return queries.new_zeros(num_q, num_p, dtype=_accumulator(queries.dtype))
        pair = max(1, tq * tp)
        q_rows = max(1, min(num_q, self.chunk_elements // pair))
        rows = []
        for qb in range(0, num_q, q_rows):
            q = queries[qb:qb + q_rows]
            p_rows = max(1, self.chunk_elements // (len(q) * pair))
            # split, not slices: the backward of a slice is a zero tensor as large as all the pages, per block
            parts = [_maxsim(q, block) for block in pages.split(p_rows)]
            rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
        out = rows[0] if len(rows) == 1 else torch.cat(rows)
        return out / real_token_counts(queries)[:, None] if self.divide_by_query_length else out

    def pair_scores(self, queries: Tensor, pages: Tensor) -> Tensor:
        """``[N]``: query i against page i, pair by pair (no ``[N, N]``); a pair's score does not depend on
        the other rows."""
        _check(queries, pages)
        if len(queries) != len(pages):
            raise ValueError(f"pair_scores needs as many queries as pages, got {len(queries)} and {len(pages)}")
        (n, tq, _), tp = queries.shape, pages.shape[1]
        if n == 0 or tp == 0:
            return queries.new_zeros(n, dtype=_accumulator(queries.dtype))
        rows = max(1, self.chunk_elements // max(1, tq * tp))
        parts = [_pair_maxsim(queries[i:i + rows], pages[i:i + rows]) for i in range(0, n, rows)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out / real_token_counts(queries) if self.divide_by_query_length else out

    def first_stage(self, items: Sequence[Tensor], side: str) -> Tensor:
        """MUVERA's fixed dimensional encodings of token sets (:mod:`~dist_vdr.kinds.multi_vector.fde`, its defaults;
        the same hyperplanes on every rank): a query's inner product with a page's approximates their MaxSim."""
        from dist_vdr.kinds.multi_vector.fde import FixedDimensionalEncoder

        dim = int(items[0].shape[-1]) if items else 1
        if dim not in self._encoders:
            self._encoders[dim] = FixedDimensionalEncoder(dim)
        return self._encoders[dim].encode(items, query=side == QUERY)

    def first_stage_tag(self) -> str:
        from dist_vdr.kinds.multi_vector.fde import FixedDimensionalEncoder

        return FixedDimensionalEncoder.tag()

    def trim(self, rep: Tensor, side: str) -> Tensor:
        """The item's tokens without padding: a page's trailing copies of its first token (a real token equal to
        the first one is dropped too: a repeat changes no max), a query's trailing zero vectors."""
        if side == PAGE:
            pad = (rep == rep[:1]).all(dim=-1)
            pad[0] = False
        else:
            pad = (rep == 0).all(dim=-1)
        real = (~pad).nonzero()  # the rows up to the last real one are kept
        return rep[:int(real[-1]) + 1] if len(real) else rep[:0 if side == QUERY else 1]

    def cache_tag(self) -> str:
        # Stored representations depend on the layout (per-token L2, the padding rule); the flag is kept in
        # the tag as well, so that a cache never mixes runs of the two conventions.
        pooled = f", pool_factor={self.pool_factor:g}" if self.pool_factor > 1 else ""
        pooled += f", stored as {self.store_dtype}" if self.store_dtype != "float16" else ""
        return (f"{type(self).__module__}.{type(self).__qualname__}(token_embeddings, per-token L2, "
                f"query pad=zero, page pad=first token, divide_by_query_length={self.divide_by_query_length}"
                f"{pooled})")

    # -- encoding: sentence-transformers' MultiVectorEncoder, told the side as its ``task`` -----------------
    def prepare(self, model, inputs: list, side: str, prompt: str | None) -> dict:
        return model.preprocess(inputs, prompt=prompt, task=TASKS[side])

    def forward(self, model, features: dict, side: str) -> Tensor:
        # A shallow copy: the modules write their outputs (the scoring mask over attention_mask) into it.
        out = model(dict(features), task=TASKS[side])
        tokens, mask = out["token_embeddings"].float(), out["attention_mask"].bool()
        if side == PAGE and self.pool_factor > 1:  # index-time pooling: the stored pages only, never the queries
            rows = [t[m] for t, m in zip(tokens, mask, strict=True)]
            return self.represent(pad_tokens(self.token_pooling().pool(rows, task="document"), PAGE))
        return self.represent(from_masked(tokens, mask, side))

    def token_pooling(self):
        """sentence-transformers' ``HierarchicalTokenPooling`` at :attr:`pool_factor` (Ward clustering of a page's
        tokens, each cluster replaced by its normalised mean; no protected token: the page's first scored token
        is a patch or text token like any other, as in colpali-engine's pooler)."""
        from sentence_transformers.multi_vector_encoder.modules import HierarchicalTokenPooling

        return HierarchicalTokenPooling(self.pool_factor, num_protected_tokens=0, normalize_embeddings=True)

    def stack(self, items: Sequence[Tensor], side: str, shape: Sequence[int] | None = None) -> Tensor:
        if not items:
            return torch.empty(0, *(shape or (0, 0)))
        return pad_tokens(list(items), side, width=shape[0] if shape else 0)

    def stack_rows(self, rows: Tensor, counts: Sequence[int], side: str) -> Tensor:
        """:func:`pad_tokens` of the items in one gather (a page's padding: its first row again; a query's: zeros)."""
        counts = torch.as_tensor(counts, dtype=torch.long)
        if side == QUERY or len(counts) == 0 or int(counts.min()) == 0:
            return super().stack_rows(rows, counts.tolist(), side)
        return _padded(rows, torch.cumsum(counts, 0) - counts, counts)

    def scores_rows(self, queries: Tensor, rows: Tensor, counts: Sequence[int]) -> Tensor:
        """``[Q, n]`` MaxSim of ``queries`` against n pages given as their rows one after another (``counts`` rows
        each, at least 1; the exhaustive search of a page store, without gradients). Blocks of pages of about one
        length (each padded with its first row: no max changes) meet blocks of queries of about one length (cut to
        their longest: a zero token adds 0.0 to a sum, exactly): padding costs little, and each block's similarity
        matrix (``SCORE_BLOCK`` values) stays in the cache for its max."""
        counts = torch.as_tensor(counts, dtype=torch.long)
        if len(counts) == 0 or int(counts.min()) < 1 or queries.shape[0] == 0:
            return super().scores_rows(queries, rows, counts.tolist())
        (num_q, _, d), n = queries.shape, len(counts)
        out = torch.empty(num_q, n, dtype=_accumulator(queries.dtype))
        q_len = _lengths(queries)
        q_order, p_order = torch.argsort(q_len), torch.argsort(counts)
        starts = torch.cumsum(counts, 0) - counts
        q_block = max(1, SCORE_BLOCK[0] // max(1, int(q_len.float().mean())))
        p_block = max(1, SCORE_BLOCK[1] // max(1, int(counts.float().mean())))
        for pb in range(0, n, p_block):
            p_ids = p_order[pb:pb + p_block]
            page_rows = _padded(rows, starts[p_ids], counts[p_ids])
            width = page_rows.shape[1]
            flat = page_rows.reshape(-1, d).T
            for qb in range(0, num_q, q_block):
                q_ids = q_order[qb:qb + q_block]
                tq = max(1, int(q_len[q_ids].max()))
                sim = queries[q_ids, :tq].reshape(-1, d) @ flat  # [b * tq, pages * width]
                best = sim.view(len(q_ids), tq, len(p_ids), width).amax(dim=-1)
                out[q_ids[:, None], p_ids[None, :]] = best.to(out.dtype).sum(dim=1)
        return out / real_token_counts(queries)[:, None] if self.divide_by_query_length else out

    def pair_scores_rows(self, queries: Tensor, query_of: Tensor, rows: Tensor, counts: Sequence[int],
                         page_of: Tensor) -> Tensor:
        """``[m]`` MaxSim of ``queries[query_of[i]]`` with page ``page_of[i]`` (pages as :meth:`stack_rows` takes them;
        without gradients) in the queries' precision, grouped by page: a page's tokens meet all the queries that
        want it in one batched product, pages with as many queries in one batch, and no page is copied per pair (a
        page's tokens outweigh a query's several times over). A batch gathers about ``PAIR_BLOCK`` query values:
        gathered and multiplied while in the cache, they cost a fraction of a gather to memory."""
        import numpy as np

        query_of, page_of = torch.as_tensor(query_of), torch.as_tensor(page_of)
        counts = torch.as_tensor(counts, dtype=torch.long)
        m = len(page_of)
        out = torch.zeros(m, dtype=_accumulator(queries.dtype))
        if m == 0:
            return out
        if int(counts.min()) < 1:  # a page without rows (a store never holds one): stacked as pad_tokens does
            return super().pair_scores_rows(queries, query_of, rows, counts.tolist(), page_of)
        (n, (_, tq, d)) = len(counts), queries.shape
        flat_queries, rows = queries.reshape(len(queries), tq * d), rows.to(queries.dtype)
        starts = torch.cumsum(counts, 0) - counts
        order = torch.argsort(page_of, stable=True)  # pair ids, page by page
        load = torch.bincount(page_of, minlength=n)
        first = torch.cumsum(load, 0) - load
        # pages with as many pairs batched together, and of about one length (a batch pads to its longest)
        by_load = torch.from_numpy(np.lexsort((counts.numpy(), load.numpy())))
        sorted_load = load[by_load].numpy()
        budget = max(1, min(self.chunk_elements, PAIR_BLOCK) // (tq * d))  # pairs per batch
        i = int(np.searchsorted(sorted_load, 0, side="right"))  # pages nobody asked for
        while i < n:
            widths = (np.arange(i + 1, n + 1) - i) * sorted_load[i:]
            j = i + max(1, int(np.searchsorted(widths, budget, side="right")))
            batch, width = by_load[i:j], int(sorted_load[j - 1])
            steps = torch.arange(width)[None, :]
            real_pair = steps < load[batch][:, None]
            pair = order[(first[batch][:, None] + steps).clamp(max=m - 1)]  # [b, width]; padding: any pair
            group = flat_queries.index_select(0, query_of[pair].reshape(-1)).view(len(batch), width * tq, d)
            pages = _padded(rows, starts[batch], counts[batch])
            best = torch.bmm(group, pages.transpose(1, 2)).amax(dim=2)  # [b, width * Tq]
            out[pair[real_pair]] = best.view(len(batch), width, tq).to(out.dtype).sum(dim=2)[real_pair]
            i = j
        return out / real_token_counts(queries)[query_of] if self.divide_by_query_length else out

    def encode_queries(self, model, texts: list[str], batch_size: int) -> Tensor:
        tokens = model.encode_query(list(texts), batch_size=batch_size, show_progress_bar=False)
        return self.represent(pad_tokens([t.float().cpu() for t in tokens], QUERY))


class PooledScoring(CosineScoring):
    """A hybrid model's single vector (its ``Pooling`` module's ``sentence_embedding``), compared by cosine: the
    single-vector kind's rule, read from a MultiVectorEncoder (told the side as its ``task``)."""

    def prepare(self, model, inputs: list, side: str, prompt: str | None) -> dict:
        return model.preprocess(inputs, prompt=prompt, task=TASKS[side])

    def forward(self, model, features: dict, side: str) -> Tensor:
        return self.represent(model(dict(features), task=TASKS[side])["sentence_embedding"].float())

    def encode_queries(self, model, texts: list[str], batch_size: int) -> Tensor:
        outputs = model.encode_query(list(texts), batch_size=batch_size, show_progress_bar=False, output_value=None)
        return self.represent(torch.stack([o["sentence_embedding"].float().cpu() for o in outputs]))

    def cache_tag(self) -> str:
        return f"{type(self).__module__}.{type(self).__qualname__}(sentence_embedding of a MultiVectorEncoder)"
