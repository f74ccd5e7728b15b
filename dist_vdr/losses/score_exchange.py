"""InfoNCE over the global batch for large representations (token embeddings): queries travel, scores come back.

:class:`~.global_batch.GlobalBatchCachedMNRL` gathers every rank's queries AND pages, which is right for one
vector per item. A multi-vector page holds ~768 token vectors against a query's ~30, so gathering the pages
would move ~25x more bytes than needed. :class:`ScoreExchangeCachedLoss` moves the small side and the scores
instead, and is exact (the same loss and gradients as one process holding the global batch):

(a) the local queries and pages are embedded mini-batch by mini-batch without gradients (the stock gradient
    cache of the parent class), read through the scoring (its ``output_key``, or ``represent_output``);
(b) the queries ``[B, Tq, D]``, padded with zero tokens to the step's query length, are all-gathered once
    into ``[W*B, Tq, D]``;
(c) every rank scores ALL queries against its LOCAL pages (every page column, every Matryoshka dim) through
    the scoring (MaxSim is computed block by block there), one tensor ``[dims, W*B, (C-1)*B]``;
(d) the score blocks are all-gathered once: every rank holds the full ``[dims, W*B, W*(C-1)*B]`` matrix;
(e) every rank computes the same InfoNCE over the global batch (the mean over all W*B queries of the
    cross-entropy of ``scale x scores`` with each query's positive; Matryoshka dims summed with their
    weights) and its gradient with respect to the scores;
(f) the gradient of the local page columns is back-propagated through the local scoring: it reaches the
    local pages' representations and ALL gathered queries; the query gradients are summed at their owners
    by one reduce-scatter (gloo: one all-reduce);
(g) the parent's replay of the mini-batches (with gradients) back-propagates the cached representation
    gradients into the model.

Collectives per step: 3 (all-gather queries, all-gather scores, reduce-scatter query gradients), whatever
the number of page columns, mini-batches and Matryoshka dims; 4 when the query length is agreed per step
(``query_length=None``: one all-reduce MAX of one integer before the gather).

False negatives masked by id (``mask_same_ids``) or by a guide cost no collective either: what masking needs of a
query travels with its tokens in (b) (bit-packed, :func:`~.false_negatives.pack`: its id set; the guide's
representation of it and the guide's score of its own positive, computed by its owner), and every rank masks the
scores of ALL queries against its LOCAL pages (whose ids and guide representations it holds) before (d): a
masked score is -inf in the exchanged matrix, out of every softmax, with no gradient. Distillation from teacher
scores reads each row's own candidates only: local, as in the parent (its gradient is not multiplied by W: the
engine's average over ranks makes it the global mean).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dist_vdr import compat, distributed
from dist_vdr.losses import false_negatives
from dist_vdr.losses.global_batch import GlobalBatchCachedMNRL
from dist_vdr.retrieval import scoring as scorings
from dist_vdr.retrieval.scoring import PAGE, QUERY


class ScoreExchangeCachedLoss(GlobalBatchCachedMNRL):
    """Cached InfoNCE (+ Matryoshka) over the global batch exchanging queries and scores, not pages.

    Every rank returns the loss of the whole global batch (the same value on every rank: the mean over
    all W*B queries, the convention of :class:`~.global_batch.GlobalBatchCachedMNRL`, whose per-rank means
    average to it). The cached gradients are ``W x`` those of that loss, so that the engine's gradient
    average over ranks (DDP, ZeRO, FSDP2) gives the one-process gradient.

    Args:
        model: the model (the trainer swaps in its DDP wrapper); called as ``model(features, task=task)``
            with ``task`` "query" for the first column and "document" for the others (sentence-
            transformers' ``MultiVectorEncoder`` convention, stamped on the features unless they carry one).
        scoring: the kind's :class:`~dist_vdr.retrieval.scoring.Scoring`; representations ``[N, T, D]``
            (``scores``, ``truncate`` and ``represent`` are used; ``represent`` is applied before scoring).
        matryoshka_dims / matryoshka_weights: the dims of the last (token) dimension to train, each a term
            of the loss (largest first, as MatryoshkaLoss); empty: the full dimension only.
        rank / world_size: this process's place; with world_size 1 no collective is issued.
        scale: the scores' multiplier before the cross-entropy (1 / temperature; 1.0: sentence-transformers'
            multi-vector default, MaxSim scores grow with the query's length).
        mini_batch_size, mini_batch_num_tokens: the gradient cache's mini-batches (as the parent's).
        query_length: the number of tokens every query is padded to before the gather (with zero tokens:
            a zero query token adds 0 to a MaxSim score); a longer query is refused. None: the longest
            query of the step over all ranks, agreed by one more collective (an all-reduce MAX).
        represent_output: ``(model output dict, side) -> [n, T, D]`` the representation of one mini-batch
            in the scoring's layout (``side``: :data:`QUERY` or :data:`PAGE`), e.g. the multi-vector
            kind's ``from_masked(out["token_embeddings"], out["attention_mask"], side)``; None: the output
            at ``scoring.output_key`` as it is (a model that already emits the layout).
        mask_same_ids: mask false negatives by id (the batch's ``labels["ids"]``, as the parent reads them).
        guide / guide_margin / guide_margin_strategy: mask false negatives by a frozen guide model of the same
            layout (e.g. the base model) that embeds the model's own inputs, GIST's rule (as the parent).
        distillation: a :class:`~dist_vdr.config.DistillationConfig` (teacher scores in ``labels["teacher"]``).
        datasets: a mixture's per-dataset options (:class:`~.global_batch.DatasetOptions`: negatives across
            ranks or not, in-batch negatives or not, mini-batches), picked per step by ``labels["dataset"]``.

    Bytes per step, at the published ColQwen shapes (per rank B = 64 queries x Tq = 30 tokens, C - 1 = 2
    page columns of 64 pages x Tp = 768 tokens, D = 128, W = 8 ranks, tokens and their gradients in bf16
    (2 bytes), scores in fp32 (4 bytes), one token dim), counted as what each rank sends (= receives) in a
    ring all-gather / reduce-scatter: ``(W-1) x`` its own block for a gather, ``(W-1)/W x`` the input for a
    reduce-scatter:

    - this loss: queries ``(W-1)·B·Tq·D·2`` = 7·491,520 = 3,440,640 B; scores
      ``(W-1)·dims·(W·B)·((C-1)·B)·4`` = 7·262,144 = 1,835,008 B; query gradients ``(W-1)/W·(W·B)·Tq·D·2``
      = 3,440,640 B. Total 8,716,288 B (8.3 MiB) per rank per step in 3 collectives (12,156,928 B with
      fp32 query gradients). The tensors: gathered queries 3.75 MiB, full score matrix 2 MiB per dim.
    - sentence-transformers' ``CachedMultiVectorMultipleNegativesRankingLoss(gather_across_devices=True)``
      (``util.all_gather_padded`` per page column: an all-reduce MAX of the token length, an all-gather of
      the page tokens padded to the longest across ranks, an all-gather of their masks; the tokens are
      gathered with autograd, so each score chunk's backward sends a reduce-scatter of the gathered
      tokens' gradient): per column ``(W-1)·B·Tp·D·2`` = 88,080,384 B of tokens + ``(W-1)·B·Tp`` = 344,064 B
      of masks + ``(W-1)/W·(W·B)·Tp·D·2`` = 88,080,384 B of gradients (one score chunk) + 8-byte lengths;
      2 columns: 353,009,664 B (336.7 MiB) per rank per step, ``(C-1)·(3 + score chunks)`` collectives
      (NCCL; on gloo each reduce-scatter becomes W scatters). Each further score chunk adds a gradient
      reduce-scatter per column: at its defaults (``score_mini_batch_size`` = ``mini_batch_size`` = 32, so
      2 chunks of B = 64) 529,170,432 B.
      That is 40.5x this loss's bytes (and padding to the longest page across ranks only adds to it).

    The score matrix grows as ``(W·B)^2·(C-1)·dims``; it overtakes the page tokens only when
    ``W·B·dims·4 > Tp·D·2`` per page (here 512·4 = 2 KiB against 192 KiB: far away).
    """

    def __init__(self, model, scoring: scorings.Scoring, *, matryoshka_dims: Sequence[int] = (),
                 matryoshka_weights: Sequence[float] | None = None, rank: int = 0, world_size: int = 1,
                 scale: float = 1.0, mini_batch_size: int = 1, mini_batch_num_tokens: int | None = None,
                 query_length: int | None = None,
                 represent_output: Callable[[dict, str], Tensor] | None = None, mask_same_ids: bool = False,
                 guide=None, guide_margin: float = 0.0, guide_margin_strategy: str = "absolute",
                 distillation=None, datasets: Sequence = ()) -> None:
        super().__init__(model, matryoshka_dims=matryoshka_dims, matryoshka_weights=matryoshka_weights, rank=rank,
                         world_size=world_size, scale=scale, mini_batch_size=mini_batch_size,
                         mini_batch_num_tokens=mini_batch_num_tokens, scoring=scoring, mask_same_ids=mask_same_ids,
                         guide=guide, guide_margin=guide_margin, guide_margin_strategy=guide_margin_strategy,
                         distillation=distillation, datasets=datasets)
        if query_length is not None and query_length < 1:
            raise ValueError(f"query_length must be positive, got {query_length}")
        self.query_length = query_length
        self.represent_output = represent_output

    # -- (a) the representations, mini-batch by mini-batch (the parent's gradient cache) -----------------
    def forward_cached(self, sentence_features, labels=None) -> Tensor:
        features = [{**f, "task": f.get("task", QUERY if i == 0 else "document")}
                    for i, f in enumerate(sentence_features)]
        return super().forward_cached(features, labels)

    def embed_minibatch(self, sentence_feature, begin, end, with_grad, copy_random_state, random_state=None):
        out = self._embed_output(sentence_feature, begin, end, with_grad, copy_random_state, random_state)
        if self._guide_columns is not None and not with_grad:  # step (a) only: the replay needs no guide
            with torch.no_grad():
                features = compat.st_minibatch(sentence_feature, begin, end)
                self._guide_columns[-1].append(self._read_output(features, self.guide).detach())
        return out

    def _read_output(self, features: dict, model=None) -> Tensor:
        task = features.get("task")
        output = (model or self.model)(features, task=task)
        if self.represent_output is None:
            return output[self.scoring.output_key]
        return self.represent_output(output, QUERY if task == QUERY else PAGE)

    # -- (b)-(f) ---------------------------------------------------------------------------------------
    def calculate_loss(self, reps: list[list[Tensor]], labels=None, *, with_backward: bool = False) -> Tensor:
        if len(reps) < 2:
            raise ValueError(f"Expected at least 2 inputs (query, positive), got {len(reps)}")
        ids, teacher = (labels.get("ids"), labels.get("teacher")) if isinstance(labels, dict) else (labels, None)
        rank, world = self._place()
        queries = self._pad_queries(reps[0], world)  # [B, Tq, D], graph to the query mini-batches
        batch_size = queries.shape[0]
        extras = self._query_extras(ids, reps, queries.shape[1])
        gathered, extras = self._gather_queries(queries, extras, world)  # (b)
        gathered.requires_grad_(with_backward)
        with torch.set_grad_enabled(with_backward):
            local = self._local_scores(gathered, [mb for column in reps[1:] for mb in column])  # (c)
            if extras:  # false negatives to mask
                local = self._mask_local(local, extras, ids, len(reps), batch_size, rank)
        full = self._exchange_scores(local.detach(), rank, world).requires_grad_(with_backward)  # (d)
        total = self._infonce(full, batch_size, world)  # (e)
        if with_backward:
            total.backward()
            # (f) the engine averages gradients over ranks: W x the gradient of the global loss
            mine = full.grad.view(*full.shape[:2], world, -1)[:, :, rank]
            torch.autograd.backward(local, mine * world)
            owned = self._query_gradients(gathered.grad.view(world, *queries.shape), rank, world)
            torch.autograd.backward(queries, owned)
            total = total.detach()
        if self.distillation is not None:  # the rows' own candidates: local, no communication
            total = total + self._distillation(reps, teacher, with_backward)
        self._record_dataset_loss(total)
        return total

    def _query_extras(self, ids, reps: list[list[Tensor]], length: int) -> dict[str, Tensor]:
        """What travels with this rank's queries: with a fixed query length, the rank's longest query (checked on
        every rank after the gather); for false-negative masking, their id sets ``[B, K]`` (by id), the guide's
        query representations ``[B, Tq, Dg]`` (zero-padded to the queries' length) and its score of each query's
        own positive ``[B, 1]`` (by guide: the threshold lives with the query's owner)."""
        extras: dict[str, Tensor] = {}
        if self.query_length is not None:
            batch_size = sum(len(mb) for mb in reps[0])
            extras["longest"] = torch.full((batch_size, 1), self._longest_query, dtype=torch.int64)
        if self.mask_same_ids:
            row_ids = self._id_labels(ids, len(reps), sum(len(mb) for mb in reps[0]))
            extras["ids"] = false_negatives.query_id_sets(row_ids, len(reps))
        if self.guide is not None:
            columns = self._guide_columns or []
            if len(columns) != len(reps):
                raise RuntimeError("the guide's representations are missing: the loss was called without "
                                   "forward_cached")
            guide_queries = self.scoring.stack([row for mb in columns[0] for row in mb], QUERY)
            if guide_queries.shape[1] > length:
                raise ValueError(f"the guide's queries have {guide_queries.shape[1]} tokens, the model's {length}: "
                                 f"give the guide the model's processor and mask")
            guide_queries = self.scoring.represent(F.pad(guide_queries, (0, 0, 0, length - guide_queries.shape[1])))
            positives = self.scoring.represent(self.scoring.stack([row for mb in columns[1] for row in mb], PAGE))
            extras["guide"] = guide_queries
            extras["guide_positive"] = self.scoring.pair_scores(guide_queries, positives).float()[:, None]
        return extras

    def _gather_queries(self, queries: Tensor, extras: dict[str, Tensor],
                        world: int) -> tuple[Tensor, dict[str, Tensor]]:
        """(b): ``[W*B, Tq, D]`` every rank's queries, with whatever masking needs of them (:meth:`_query_extras`)
        packed into the same all-gather (bit-packed: they come back exact)."""
        batch_size, rest = queries.shape[0], queries.shape[1:]
        if not extras:
            return distributed.all_gather_stacked(queries, world).view(world * batch_size, *rest), {}
        flat = [e.reshape(1, batch_size, -1) for e in extras.values()]
        packed, layout = false_negatives.pack(queries.reshape(1, batch_size, -1), flat)
        gathered, unpacked = false_negatives.unpack(distributed.all_gather_stacked(packed, world), rest.numel(),
                                                    layout)
        out = {name: value.reshape(world * batch_size, *extras[name].shape[1:])
               for name, value in zip(extras, unpacked, strict=True)}
        longest = out.pop("longest", None)
        if longest is not None and int(longest.max()) > self.query_length:
            raise ValueError(f"a query has {int(longest.max())} tokens, over multi_vector.query_length="
                             f"{self.query_length}: raise it (queries are padded to it, never cut)")
        return gathered.reshape(world * batch_size, *rest).contiguous(), out

    def _mask_local(self, local: Tensor, extras: dict[str, Tensor], ids, num_columns: int, batch_size: int,
                    rank: int) -> Tensor:
        """Every query's false negatives among this rank's pages set to -inf (the query's own positive kept): by
        id (a page carrying one of the query's ids) and/or by guide (a page the guide scores above the query's
        positive less the margin, GIST's rule)."""
        num_queries = next(iter(extras.values())).shape[0]
        own = torch.arange(num_queries, device=local.device)
        targets = torch.where(own // batch_size == rank, own % batch_size, -1)  # local page of its own positive
        hidden = None
        if "ids" in extras:
            row_ids = self._id_labels(ids, num_columns, batch_size)
            page_ids = row_ids[:, :num_columns - 1].T.reshape(-1).to(local.device)  # columns, then rows, in order
            hidden = false_negatives.mask(extras["ids"].to(local.device), page_ids, targets)
        if "guide" in extras:
            by_guide = self._guide_mask(extras["guide"], extras["guide_positive"][:, 0], targets)
            hidden = by_guide if hidden is None else hidden | by_guide.to(hidden.device)
        self._masked_since = self._masked_since + hidden.sum()
        self._queries_since += batch_size
        self._negatives_since += batch_size * (num_queries * (num_columns - 1) - 1)
        return local.masked_fill(hidden.to(local.device), float("-inf"))

    def _guide_mask(self, guide_queries: Tensor, positive: Tensor, targets: Tensor) -> Tensor:
        """``[W*B, P]`` True where the guide scores a local page above the query's positive less the margin."""
        with torch.no_grad():
            blocks = [self.scoring.represent(self.scoring.stack([row for mb in column for row in mb], PAGE))
                      for column in (self._guide_columns or [])[1:]]
            sims = torch.cat([self.scoring.scores(guide_queries, block) for block in blocks], dim=1).float()
        margin = self.guide_margin
        absolute = self.guide_margin_strategy == "absolute"
        threshold = positive - margin if absolute else positive - positive.abs() * margin
        out = sims > threshold[:, None].to(sims.device)
        rows = torch.arange(len(targets), device=out.device)
        keep = targets >= 0
        out[rows[keep], targets[keep].to(out.device)] = False
        return out

    def _join_columns(self, reps: list[list[Tensor]]) -> list[Tensor]:
        """Each column's mini-batches as one representation, padded by the layout's rule (a token axis)."""
        return [self.scoring.stack([row for mb in column for row in mb], QUERY if c == 0 else PAGE)
                for c, column in enumerate(reps)]

    def _pad_queries(self, minibatches: list[Tensor], world: int) -> Tensor:
        """The step's query representations ``[B, Tq, D]``: each mini-batch padded with zero tokens. A query
        longer than a fixed ``query_length`` is cut here only to keep the gather's shape: its length travels in the
        gather (:meth:`_query_extras`) and every rank then stops with the same error (:meth:`_gather_queries`)."""
        longest = max(mb.shape[1] for mb in minibatches)
        self._longest_query = longest
        length = distributed.max_over_ranks(longest, world) if self.query_length is None else self.query_length
        return torch.cat([F.pad(mb[:, :length], (0, 0, 0, length - min(mb.shape[1], length))) for mb in minibatches])

    def _local_scores(self, queries: Tensor, pages: list[Tensor]) -> Tensor:
        """``[dims, Q, P]``: every query against this rank's pages (columns in order, rows in order)."""
        blocks = _same_length_blocks(pages)
        per_dim = []
        for dim, _ in self.dims_weights:
            q = self._cut(queries, dim)
            per_dim.append(torch.cat([self.scoring.scores(q, self._cut(block, dim)) for block in blocks], dim=1))
        return torch.stack(per_dim)

    def _cut(self, reps: Tensor, dim: int | None) -> Tensor:
        return self.scoring.represent(reps if dim is None else self.scoring.truncate(reps, dim))

    def _exchange_scores(self, local: Tensor, rank: int, world: int) -> Tensor:
        """``[dims, Q, W*P]`` from every rank's ``[dims, Q, P]`` block (ONE all-gather), pages in rank order."""
        gathered = distributed.all_gather_stacked(local, world)  # [W, dims, Q, P]
        return gathered.permute(1, 2, 0, 3).reshape(local.shape[0], local.shape[1], -1)

    def _query_gradients(self, grads: Tensor, rank: int, world: int) -> Tensor:
        """Every rank's contributions to the gradients of this rank's queries, summed (ONE reduce-scatter)."""
        return distributed.sum_to_owner(grads, rank, world)

    def _infonce(self, full: Tensor, batch_size: int, world: int) -> Tensor:
        """The weighted sum over dims of the mean cross-entropy of every query (query ``r*B + i``'s positive
        is rank r's first page column, row i)."""
        num_queries, pages_per_rank = full.shape[1], full.shape[2] // world
        q = torch.arange(num_queries, device=full.device)
        targets = (q // batch_size) * pages_per_rank + q % batch_size
        if not self._step.in_batch_negatives:  # a query's softmax holds its own row's pages only
            page = torch.arange(full.shape[2], device=full.device)
            row = (page // pages_per_rank) * batch_size + page % batch_size  # the row (= query) a page belongs to
            full = full.masked_fill(row[None, :] != q[:, None], float("-inf"))
        total = full.new_zeros(())
        for k, (_, weight) in enumerate(self.dims_weights):
            total = total + weight * F.cross_entropy(full[k] * self.scale, targets)
        return total


def _same_length_blocks(minibatches: list[Tensor]) -> list[Tensor]:
    """Consecutive mini-batches of the same shape concatenated (fewer, larger scoring blocks); order kept.
    Mini-batches of different token lengths stay apart: no padding rule is assumed for pages."""
    blocks: list[list[Tensor]] = []
    for mb in minibatches:
        if blocks and blocks[-1][0].shape[1:] == mb.shape[1:]:
            blocks[-1].append(mb)
        else:
            blocks.append([mb])
    return [group[0] if len(group) == 1 else torch.cat(group) for group in blocks]
