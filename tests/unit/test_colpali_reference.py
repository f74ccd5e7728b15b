"""On one process the score-exchange loss equals colpali-engine's own late-interaction losses on the same tokens.

The reference is colpali-engine 0.3.18's ``colpali_engine.loss.late_interaction_losses`` (its code, called as
it is: no re-implementation). The same random token embeddings (queries of ragged lengths, zero-padded as
colpali-engine expects; pages of full length) go through both:

- colpali-engine: ``ColbertLoss(temperature=t, normalize_scores=...)(q, p)`` on the tokens L2-normalised per
  token (ColPali's model normalises in its forward; the loss takes the tokens as they come);
- dist-vdr: :class:`~dist_vdr.losses.score_exchange.ScoreExchangeCachedLoss` (world 1: no collective), driven
  through a model, as the trainer drives it: the gradient cache's mini-batches of 2, ``from_masked`` reading of
  the output, the query padding to ``query_length`` and the replay; ``MaxSimScoring`` re-normalises per token
  (``represent``).

Both the loss and the gradients with respect to the raw (pre-normalisation) token embeddings agree (fp64).

Conventions (colpali-engine 0.3.18, ``late_interaction_losses.py`` / ``utils/maxsim.py``):

- temperature: ``self.ce_loss(scores / self.temperature, pos_idx)`` (l.179), a mean over queries: dist-vdr's
  ``scale`` is ``1 / temperature`` (colpali-engine's default ``temperature=0.02`` is ``scale=50``).
- ``normalize_scores=True`` (its default): ``lengths = (query_embeddings[:, :, 0] != 0).sum(dim=1)`` (l.108),
  ``scores / lengths.unsqueeze(1)`` (l.63) = ``MaxSimScoring(divide_by_query_length=True)`` (dist-vdr's default
  is False); ``normalize_scores=False`` = ``divide_by_query_length=False``. Differences at the edges: colpali-
  engine counts a query token by its FIRST component being non-zero, dist-vdr by any component (the same for
  L2-normalised model tokens); a query with no token scores 0/0 = NaN there, 0 in dist-vdr (count clamped to 1).
  It prints (never raises) when a normalised score leaves [0, 1] (l.67-72).
- padding: MaxSim is mask-free in both (``einsum(...).amax(dim=3).sum(dim=2)``, maxsim.py l.31, "Pad tokens must
  be exactly zero"). Zero query tokens add 0 in both. Pages DIFFER: colpali-engine zero-pads pages too, and a
  zero page token enters the max, so a query token whose similarities to all of a page's real tokens are
  negative counts 0 there instead of its (negative) best similarity; dist-vdr pads a page with copies of its
  first token (max unchanged). Full-length pages score the same (tested); the difference is pinned below.
- ``pos_aware_negative_filtering`` (default False; down-weights negatives above 0.95 x the positive, l.112-126)
  and ``use_smooth_max`` (default False; a log-sum-exp max) have no dist-vdr counterpart: left at their defaults.
- ``offset`` (the positives' column offset when colpali-engine gathers documents over GPUs): 0 on one process.
- hard negatives: ``ColbertNegativeCELoss`` is NOT InfoNCE with the negatives as extra columns: its term is
  ``F.softplus((neg_scores - pos_scores.unsqueeze(1)) / self.temperature).mean()`` (l.265), a two-way softmax of
  each query's positive against each of ITS OWN negatives separately (no other query's pages), mixed with the
  in-batch ``ColbertLoss`` (which ignores the negatives) by ``in_batch_term_weight`` (default 0.5). dist-vdr's
  loss is one softmax per query over every page of the batch, positives and negatives of all queries. The two
  coincide only for one query with one negative and ``in_batch_term_weight=0`` (tested: it checks the negative
  scores, their normalisation and the temperature). ``ColbertPairwiseCELoss`` / ``ColbertPairwiseNegativeCELoss``
  (softplus against the hardest in-batch negative) and ``ColbertSigmoidLoss`` have no dist-vdr counterpart.

colpali-engine cannot be a requirement of the test extra: every release on PyPI pins ``peft`` and ``torch`` below
dist-vdr's (0.3.18: ``peft<0.21.0`` against dist-vdr's ``peft>=0.21,<0.22``, pip reports ResolutionImpossible;
``torch<2.14.0`` against the tested 2.14.1; older releases cap both lower, and before 0.3.14 transformers<4.58).
Its loss module imports and runs with the tested set when installed with ``pip install --no-deps
colpali-engine==0.3.18``: ``make venv`` installs it so (requirements-references.txt), and this file fails, not
skips, without it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peer_references import colpali_modules

from dist_vdr.kinds.multi_vector.scoring import MaxSimScoring, from_masked
from dist_vdr.losses.score_exchange import ScoreExchangeCachedLoss

losses, maxsim = colpali_modules()

DIM, QUERY_TOKENS, PAGE_TOKENS = 16, 6, 9
TOL = 1e-10  # fp64


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    """colpali-engine's reference MaxSim (its fused kernel only runs on CUDA/MPS; CPU falls back to it anyway)."""
    monkeypatch.setenv("COLPALI_SCORES_BACKEND", "torch")


class TokenTable(torch.nn.Sequential):
    """A model whose output tokens ARE its parameters: ``input_ids`` index the rows of an embedding table (row 0
    at the padded positions), so a parameter gradient is the loss's gradient with respect to each token
    embedding. Output layout as sentence-transformers' ``MultiVectorEncoder`` (token_embeddings + scoring mask);
    a Sequential, as sentence-transformers' gradient cache looks at ``model[0]``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(torch.nn.Embedding.from_pretrained(weight.clone(), freeze=False))

    def forward(self, features: dict, task: str | None = None) -> dict:
        return {"token_embeddings": self[0](features["input_ids"]),
                "attention_mask": features["attention_mask"].bool()}


def represent_output(output: dict, side: str) -> torch.Tensor:
    return from_masked(output["token_embeddings"], output["attention_mask"], side)


def make_batch(batch: int, negatives: int, seed: int):
    """Raw token table ``[V, D]`` (row 0: the padding row) and per column ``(ids [B, T], mask [B, T])``: queries
    of 1..QUERY_TOKENS tokens (one of full length), then ``1 + negatives`` page columns of PAGE_TOKENS tokens.
    Every real token is its own row; raw rows have norms far from 1 (the per-token normalisation matters)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, QUERY_TOKENS + 1, (batch,), generator=gen)
    lengths[0] = QUERY_TOKENS
    columns, next_id = [], 1
    for c in range(2 + negatives):
        width = QUERY_TOKENS if c == 0 else PAGE_TOKENS
        mask = torch.arange(width)[None, :] < (lengths[:, None] if c == 0 else torch.full((batch, 1), width))
        ids = torch.zeros(batch, width, dtype=torch.int64)
        ids[mask] = torch.arange(next_id, next_id + int(mask.sum()))
        next_id += int(mask.sum())
        columns.append((ids, mask))
    weight = torch.randn(next_id, DIM, generator=gen, dtype=torch.float64) * (0.5 + torch.rand(
        next_id, 1, generator=gen, dtype=torch.float64))
    return weight, columns


def dist_vdr_loss(weight, columns, *, scale: float, divide: bool) -> tuple[float, torch.Tensor]:
    model = TokenTable(weight).train()
    loss_fn = ScoreExchangeCachedLoss(model, MaxSimScoring(divide_by_query_length=divide, chunk_elements=256),
                                      scale=scale, mini_batch_size=2, query_length=QUERY_TOKENS,
                                      represent_output=represent_output)
    features = [{"input_ids": ids, "attention_mask": mask.long()} for ids, mask in columns]
    loss = loss_fn(features, None)
    loss.backward()
    return float(loss.detach()), model[0].weight.grad


def colpali_tokens(weight: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """colpali-engine's input: per-token L2-normalised embeddings, exactly zero where padded."""
    return F.normalize(weight[ids], dim=-1) * mask[..., None]


def colpali_loss(loss_module, weight, columns) -> tuple[float, torch.Tensor]:
    leaf = weight.clone().requires_grad_(True)
    tokens = [colpali_tokens(leaf, ids, mask) for ids, mask in columns]
    args = tokens[:2] if len(tokens) == 2 else (tokens[0], tokens[1], torch.stack(tokens[2:], dim=1))
    loss = loss_module(*args)
    loss.backward()
    return float(loss.detach()), leaf.grad


def assert_close(got: tuple[float, torch.Tensor], ref: tuple[float, torch.Tensor]) -> None:
    (loss, grad), (ref_loss, ref_grad) = got, ref
    assert abs(loss - ref_loss) <= TOL * abs(ref_loss), (loss, ref_loss)
    assert float(ref_grad.norm()) > 0
    rel = float((grad - ref_grad).norm() / ref_grad.norm())
    assert rel <= TOL, rel


@pytest.mark.parametrize(("batch", "temperature", "normalize"),
                         [(4, 0.02, True), (6, 0.02, True), (5, 0.5, False), (6, 1.0, False)],
                         ids=["B4_t0.02_norm", "B6_t0.02_norm", "B5_t0.5_raw", "B6_t1_raw"])
def test_equals_colbert_loss(batch, temperature, normalize):
    """ColbertLoss(temperature=t, normalize_scores=n) = ScoreExchangeCachedLoss(scale=1/t) over
    MaxSimScoring(divide_by_query_length=n): the loss and every token's gradient."""
    weight, columns = make_batch(batch, negatives=0, seed=batch)
    ref = colpali_loss(losses.ColbertLoss(temperature=temperature, normalize_scores=normalize), weight, columns)
    got = dist_vdr_loss(weight, columns, scale=1 / temperature, divide=normalize)
    assert_close(got, ref)


def test_colbert_defaults_are_meanmaxsim_scale_50():
    module = losses.ColbertLoss()
    assert (module.temperature, module.normalize_scores, module.use_smooth_max,
            module.pos_aware_negative_filtering) == (0.02, True, False, False)


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_one_query_one_hard_negative_equals_colbert_negative_ce(normalize):
    """The only case where ColbertNegativeCELoss (pairwise softplus per own negative) is InfoNCE over the page
    columns: one query, one negative, no in-batch term."""
    weight, columns = make_batch(1, negatives=1, seed=11)
    ref = colpali_loss(losses.ColbertNegativeCELoss(temperature=0.05, normalize_scores=normalize,
                                                    in_batch_term_weight=0.0), weight, columns)
    got = dist_vdr_loss(weight, columns, scale=1 / 0.05, divide=normalize)
    assert_close(got, ref)


def test_hard_negatives_differ_beyond_one_query():
    """With several queries ColbertNegativeCELoss ignores the other queries' pages: not dist-vdr's loss."""
    weight, columns = make_batch(4, negatives=1, seed=12)
    ref, _ = colpali_loss(losses.ColbertNegativeCELoss(temperature=0.05, in_batch_term_weight=0.0), weight, columns)
    got, _ = dist_vdr_loss(weight, columns, scale=1 / 0.05, divide=True)
    assert abs(got - ref) > 1e-3 * abs(ref), (got, ref)


def test_zero_padded_page_differs_by_clamping_at_zero():
    """colpali-engine's zero page padding enters the max: each query token's best similarity is clamped at 0
    there; dist-vdr's page padding (copies of the first token) leaves every max as it is."""
    query = F.normalize(torch.randn(1, 3, DIM, dtype=torch.float64), dim=-1)
    page = torch.stack([-query[0, 0], F.normalize(-query[0, 0] + 0.1 * query[0, 1], dim=0)])  # token 0: all < 0
    zero_padded = torch.cat([page, torch.zeros(2, DIM, dtype=torch.float64)])[None]
    first_padded = torch.cat([page, page[:1].expand(2, -1)])[None]
    best = (query[0] @ page.T).amax(dim=1)
    assert best[0] < 0
    theirs = maxsim.maxsim_inbatch(query, zero_padded)
    ours = MaxSimScoring().scores(query, first_padded)
    torch.testing.assert_close(theirs, best.clamp(min=0).sum().view(1, 1))
    torch.testing.assert_close(ours, best.sum().view(1, 1))
    torch.testing.assert_close(maxsim.maxsim_inbatch(query, page[None]), ours)  # unpadded: the same

