"""The score-exchange loss (dist_vdr.losses.score_exchange: queries' tokens gathered, scores and query gradients
exchanged) on W gloo ranks (real DDP) equals one process holding the global batch.

The model is a toy multi-vector encoder emitting ragged token embeddings (token_loss_harness.TokenEncoder),
scored by the multi-vector kind's MaxSimScoring. For each case, after one optimizer step's forward/backward the
mean loss over ranks and every parameter gradient (after DDP's all-reduce) match a plain one-process
computation over the global batch (no mini-batches, no gradient cache, no exchange; fp32, relative difference
<= 1e-5). Hard negatives (2-3 page columns), mini-batches of 1, token budgets, two or three token dims, gradient
accumulation, false negatives masked by id (ids shared across rows and ranks), distillation (kl, margin_mse).
Two deliberately broken variants (the scores not exchanged; the query gradients not returned to their owners)
must fail the same comparison. Collectives per step: 3 (4 with the query length agreed per step), whatever
the page columns, mini-batches and dims. On one process the loss and gradients equal sentence-transformers'
CachedMultiVectorMultipleNegativesRankingLoss (its own code, same scale); on 2 ranks its gather is counted.
"""

from __future__ import annotations

import pytest

from token_loss_harness import (
    Case,
    build_loss,
    collate,
    global_micro_batches,
    make_model,
    reference,
    rel_diffs,
    run_distributed,
    run_step,
)

TOL = 1e-5

CASES_W2 = [
    Case("mb1_2cols_2dims"),
    Case("mb2_1col_full_dim_agreed_length", mini_batch_size=2, page_columns=1, dims=(), query_length=None),
    Case("grad_accum2_mb1_2cols_2dims", grad_accum=2),
    Case("token_budget_2cols_2dims", per_rank_batch=3, mini_batch_size=4, mini_batch_num_tokens=12),
    # the counts' extremes: 1 vs 4 mini-batches, 1 vs 3 page columns, 1 vs 3 dims
    Case("count_mb4_1col_1dim", per_rank_batch=4, mini_batch_size=4, page_columns=1, dims=()),
    Case("count_mb1_3cols_3dims", per_rank_batch=4, mini_batch_size=1, page_columns=3, dims=(16, 8, 4)),
    Case("stock_gather_2cols", implementation="stock", dims=()),
    # false negatives masked by id (ids riding in the query gather) and distillation, with mini-batches and dims
    Case("mask_ids_distill_kl_2cols_2dims", mini_batch_size=2, per_rank_batch=3, mask_ids=True, distillation="kl"),
    Case("distill_margin_mse_2cols_agreed_length", distillation="margin_mse", query_length=None),
    Case("mask_guide_and_ids_mb2_2cols_2dims", mini_batch_size=2, per_rank_batch=3, mask_ids=True, mask_guide=True),
    # the hybrid: + the pooled vector's cosine InfoNCE (Matryoshka), from the same encode
    Case("hybrid_mb2_2cols_2dims_single_2dims", mini_batch_size=2, per_rank_batch=3, hybrid_dims=(16, 8)),
    # a mixture's per-dataset options (the step's dataset in labels["dataset"])
    Case("dataset_no_in_batch_negatives", per_rank_batch=3, dataset=(("in_batch_negatives", False),)),
    Case("dataset_local_negatives_mb2", mini_batch_size=2, per_rank_batch=3,
         dataset=(("cross_device_negatives", False), ("mini_batch_size", 1))),
    Case("broken_no_score_exchange", implementation="broken_no_score_exchange"),
    Case("broken_no_query_return", implementation="broken_no_query_return"),
]
CASES_W4 = [
    Case("w4_mb1_2cols_2dims"),
    Case("w4_mb2_3cols_agreed_length", mini_batch_size=2, page_columns=3, query_length=None),
    Case("w4_mask_ids_2cols", mask_ids=True),
    Case("w4_mask_guide_3cols", page_columns=3, mask_guide=True),
    Case("w4_hybrid_agreed_length", hybrid_dims=(), query_length=None),
]
BROKEN = [c for c in CASES_W2 if c.implementation.startswith("broken")]


@pytest.fixture(scope="module")
def results_w2(tmp_path_factory):
    return run_distributed(CASES_W2, 2, str(tmp_path_factory.mktemp("w2")))


@pytest.fixture(scope="module")
def results_w4(tmp_path_factory):
    return run_distributed(CASES_W4, 4, str(tmp_path_factory.mktemp("w4")))


def _diffs(case: Case, got: dict, world: int) -> tuple[float, float]:
    return rel_diffs(got["loss"], got["grads"], *reference(case, world))


@pytest.mark.parametrize("case", [c for c in CASES_W2 if c not in BROKEN], ids=lambda c: c.name)
def test_two_ranks_equal_single_process(results_w2, case):
    loss_diff, grad_diff = _diffs(case, results_w2[case.name], 2)
    assert loss_diff <= TOL and grad_diff <= TOL, (loss_diff, grad_diff)


@pytest.mark.parametrize("case", CASES_W4, ids=lambda c: c.name)
def test_four_ranks_equal_single_process(results_w4, case):
    loss_diff, grad_diff = _diffs(case, results_w4[case.name], 4)
    assert loss_diff <= TOL and grad_diff <= TOL, (loss_diff, grad_diff)


def test_every_rank_returns_the_global_loss(results_w2, results_w4):
    for results, cases in ((results_w2, CASES_W2), (results_w4, CASES_W4)):
        for case in cases:
            if case.implementation == "score_exchange" and case.distillation is None and not case.dataset \
                    and case.hybrid_dims is None:  # distillation, local datasets, the single vector: per rank
                losses = results[case.name]["rank_losses"]
                assert max(losses) - min(losses) <= 1e-6 * abs(losses[0]), (case.name, losses)


@pytest.mark.parametrize("case", BROKEN, ids=lambda c: c.name)
def test_broken_variants_are_caught(results_w2, case):
    _, grad_diff = _diffs(case, results_w2[case.name], 2)
    assert grad_diff > 100 * TOL, f"{case.name} went unnoticed (gradient difference {grad_diff})"


def test_collectives_per_step_constant(results_w2, results_w4):
    """The loss's forward issues 2 all-gathers (queries, scores) + 1 reduction (query gradients; gloo: an
    all-reduce), + 1 all-reduce MAX where the query length is agreed; the backward only DDP's one bucket."""
    for results, cases in ((results_w2, CASES_W2), (results_w4, CASES_W4)):
        for case in cases:
            if case.implementation != "score_exchange":
                continue
            got = results[case.name]
            steps = case.grad_accum
            expected = {"all_gather": 2 * steps, "all_reduce": (1 + (case.query_length is None)) * steps}
            if case.dataset:  # a dataset that keeps its negatives on their rank: no exchange at all
                expected = {}
            if case.hybrid_dims is not None:  # + the single vector's all-gather and gradient reduction
                expected = {"all_gather": expected["all_gather"] + steps, "all_reduce": expected["all_reduce"] + steps}
            assert got["forward"] == expected, (case.name, got["forward"])
            assert got["backward"] == {"all_reduce": 1}, (case.name, got["backward"])
    stock = results_w2["stock_gather_2cols"]
    ours = results_w2["mb1_2cols_2dims"]  # the same rows, columns and mini-batches (two dims even)
    assert sum(ours["forward"].values()) < sum(stock["forward"].values()), (ours["forward"], stock["forward"])
    # the counter's bytes (every collective's input and output tensors): fewer even at these tiny shapes
    assert ours["forward_bytes"] < stock["forward_bytes"], (ours["forward_bytes"], stock["forward_bytes"])


def test_single_process_equals_sentence_transformers():
    """One process, the same toy model and rows: sentence-transformers' CachedMultiVectorMultipleNegatives-
    RankingLoss (its own masks and colbert_scores), this loss (world 1) and the plain reference agree."""
    case = Case("st", dims=(), per_rank_batch=4, mini_batch_size=1)
    ref_loss, ref_grads = reference(case, 1)
    for implementation in ("stock", "score_exchange"):
        model = make_model()
        loss_fn = build_loss(model, Case("st", implementation=implementation, dims=(), per_rank_batch=4), 0, 1)
        got = run_step(model, loss_fn, [[collate(col) for col in cols] for cols in global_micro_batches(case, 1)])
        loss_diff, grad_diff = rel_diffs(got["loss"], got["grads"], ref_loss, ref_grads)
        assert loss_diff <= TOL and grad_diff <= TOL, (implementation, loss_diff, grad_diff)
        assert got["forward"] == {}, got["forward"]  # one process: no collective


def test_a_query_over_query_length_on_one_rank_stops_every_rank_alike(tmp_path):
    """Rank 0's queries have 6 tokens, rank 1's 5, query_length=5: the lengths travel in the query gather, so both
    ranks raise the same error after it (before, rank 0 raised alone and rank 1 waited in the gather)."""
    import torch.multiprocessing as mp

    from token_loss_harness import make_columns, overflow_worker

    assert [len(s) for s in make_columns(4, 2, 0)[0]] == [4, 6, 4, 5]  # ranks 0 and 1: longest 6 and 5
    mp.start_processes(overflow_worker, args=(2, str(tmp_path / "init"), Case("overflow", query_length=5),
                                              str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    for rank in (0, 1):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert text == "ValueError: a query has 6 tokens, over multi_vector.query_length=5: raise it (queries are " \
                       "padded to it, never cut)", (rank, text)


def test_query_longer_than_query_length_refused():
    case = Case("short", query_length=2)
    loss_fn = build_loss(make_model(), case, 0, 1)
    with pytest.raises(ValueError, match="query_length=2"):
        loss_fn([collate(col) for col in global_micro_batches(case, 1)[0]], None)


def test_published_shapes_bytes_in_docstring():
    """The docstring's byte counts follow from the formulas at the published shapes."""
    from dist_vdr.losses.score_exchange import ScoreExchangeCachedLoss

    w, b, tq, tp, d, cols = 8, 64, 30, 768, 128, 2
    ours = (w - 1) * b * tq * d * 2 + (w - 1) * (w * b) * (cols * b) * 4 + (w - 1) * b * tq * d * 2
    stock = cols * ((w - 1) * b * tp * d * 2 + (w - 1) * b * tp + (w - 1) * b * tp * d * 2)
    doc = " ".join(ScoreExchangeCachedLoss.__doc__.split())
    assert (ours, stock) == (8_716_288, 353_009_664)
    assert "8,716,288 B" in doc and "353,009,664 B" in doc and f"{stock / ours:.1f}x" in doc
