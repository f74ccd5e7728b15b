"""The global-batch loss on W gloo ranks (real DDP) equals one process holding the whole global batch.

For each case, after one optimizer step's forward/backward the mean loss over ranks and every
parameter gradient (after DDP's all-reduce) match the single-process stock sentence-transformers
loss on the same samples in the same global order (fp32, relative difference <= 1e-5). Two
deliberately broken variants (gradients not returned to their owners; gradients off by W; false
negatives masked with this rank's ids or guide embeddings only) must fail the same comparison, so the test can fail.
Collective counts: constant in mini-batches and dims, and unchanged by masking false negatives.
"""

from __future__ import annotations

import pytest

from loss_harness import Case, max_rel_diff, reference, run_distributed

TOL = 1e-5
DIMS7 = (64, 56, 48, 40, 32, 24, 16)

CASES_W2 = [
    Case("mb1_1neg_3dims"),
    Case("mb1_2neg", num_negatives=2),
    Case("token_budget_2neg", num_negatives=2, mini_batch_size=4, mini_batch_num_tokens=90),
    Case("grad_accum2", grad_accum=2),
    Case("vs_plain_mnrl", reference="plain"),
    Case("no_matryoshka", dims=()),
    Case("stock_gather_baseline", implementation="stock"),
    Case("broken_no_return", implementation="broken_no_return"),
    Case("broken_scale", implementation="broken_scale"),
    # loss.false_negatives by id: the candidates' ids gathered with the embeddings (loss_harness.make_id_labels)
    Case("mask_ids_2neg", num_negatives=2, extra={"ids": True}),
    Case("mask_ids_token_budget_grad_accum2", num_negatives=2, mini_batch_size=4, mini_batch_num_tokens=90,
         grad_accum=2, extra={"ids": True}),
    Case("broken_local_ids", implementation="broken_local_ids", extra={"ids": True}),
    # ... and by a guide (GIST's rule over the global batch), with ids too; its embeddings ride in the same gather
    Case("mask_guide_and_ids_2neg", num_negatives=2, extra={"ids": True, "guide": True}),
    Case("mask_guide_relative_mb2", mini_batch_size=2, extra={"guide": True, "strategy": "relative", "margin": 0.05}),
    Case("broken_local_guide", implementation="broken_local_guide", extra={"guide": True}),
    # loss.distillation: teacher scores of each row's own candidates, beside the contrastive loss
    Case("distill_kl_2neg_ids", num_negatives=2, extra={"teacher": "kl", "temperature": 0.5, "ids": True}),
    Case("distill_margin_mse_mb2_grad_accum2", mini_batch_size=2, grad_accum=2, extra={"teacher": "margin_mse"}),
    # a mixture dataset's own options (data.datasets[]): reference = the stock loss over the blocks they keep apart
    Case("mixture_local_negatives_mb2", num_negatives=2, per_rank_batch=3,
         extra={"dataset": {"cross_device_negatives": False, "mini_batch_size": 2}}),
    Case("mixture_no_in_batch_negatives", num_negatives=2, extra={"dataset": {"in_batch_negatives": False}}),
    Case("broken_options_ignored", implementation="broken_options_ignored",
         extra={"dataset": {"cross_device_negatives": False}}),
]
CASES_W4 = [
    Case("w4_mb1_3dims"),
    Case("w4_token_budget_2neg", num_negatives=2, mini_batch_size=4, mini_batch_num_tokens=90),
    Case("w4_grad_accum2_vs_plain", grad_accum=2, reference="plain"),
    Case("w4_mask_ids_3dims", extra={"ids": True}),
    Case("w4_mask_guide", extra={"guide": True}),
    Case("w4_distill_kl_2neg", num_negatives=2, extra={"teacher": "kl"}),
    Case("w4_mixture_local_negatives", extra={"dataset": {"cross_device_negatives": False}}),
]
# Collective counts: 8 rows per rank, 1 vs 8 mini-batches, 1 vs 7 dims, ours vs stock.
COUNT_CASES = [
    Case(f"count_{impl}_mb{mb}_dims{len(dims)}", implementation=impl, per_rank_batch=8, mini_batch_size=mb, dims=dims)
    for impl in ("global_batch", "stock") for mb in (8, 1) for dims in ((64,), DIMS7)
] + [Case("count_global_batch_mb1_dims7_mask_ids_guide_distill", per_rank_batch=8, mini_batch_size=1, dims=DIMS7,
          extra={"ids": True, "guide": True, "teacher": "kl"})]  # masking and distillation add no collective


@pytest.fixture(scope="module")
def results_w2(tiny_model, tmp_path_factory):
    return run_distributed(str(tiny_model), CASES_W2 + COUNT_CASES, 2, str(tmp_path_factory.mktemp("w2")))


@pytest.fixture(scope="module")
def results_w4(tiny_model, tmp_path_factory):
    return run_distributed(str(tiny_model), CASES_W4, 4, str(tmp_path_factory.mktemp("w4")))


def _compare(tiny_model, case: Case, got: dict, world: int) -> tuple[float, float]:
    ref_loss, ref_grads = reference(str(tiny_model), case, world)
    return abs(got["loss"] - ref_loss) / abs(ref_loss), max_rel_diff(got["grads"], ref_grads)


@pytest.mark.parametrize("case", [c for c in CASES_W2 if not c.implementation.startswith("broken")],
                         ids=lambda c: c.name)
def test_two_ranks_equal_single_process(tiny_model, results_w2, case):
    loss_diff, grad_diff = _compare(tiny_model, case, results_w2[case.name], 2)
    assert loss_diff <= TOL and grad_diff <= TOL, (loss_diff, grad_diff)


@pytest.mark.parametrize("case", CASES_W4, ids=lambda c: c.name)
def test_four_ranks_equal_single_process(tiny_model, results_w4, case):
    loss_diff, grad_diff = _compare(tiny_model, case, results_w4[case.name], 4)
    assert loss_diff <= TOL and grad_diff <= TOL, (loss_diff, grad_diff)


@pytest.mark.parametrize("name", ["broken_no_return", "broken_scale", "broken_local_ids", "broken_local_guide",
                                  "broken_options_ignored"])
def test_broken_variants_are_caught(tiny_model, results_w2, name):
    case = next(c for c in CASES_W2 if c.name == name)
    _, grad_diff = _compare(tiny_model, case, results_w2[name], 2)
    assert grad_diff > 100 * TOL, f"{name} went unnoticed (gradient difference {grad_diff})"


def test_collectives_constant_in_mini_batches_and_dims(results_w2):
    ours = {c.name: results_w2[c.name]["collectives"] for c in COUNT_CASES if c.implementation == "global_batch"}
    stock = {c.name: results_w2[c.name]["collectives"] for c in COUNT_CASES if c.implementation == "stock"}
    assert len({tuple(sorted(c.items())) for c in ours.values()}) == 1, ours
    counts = next(iter(ours.values()))
    columns = 3  # query, positive, 1 negative (gathered together, as ONE stacked tensor)
    embedding = counts.get("all_gather", 0) + counts.get("all_reduce", 0) - 1  # minus DDP's one gradient bucket
    assert counts.get("all_gather") == 1 and embedding <= columns + 1, counts
    # Stock sentence-transformers grows with mini-batches and dims (the problem this loss solves).
    total = {name: sum(c.values()) for name, c in stock.items()}
    assert total["count_stock_mb1_dims7"] > total["count_stock_mb8_dims1"] * 10, total
    assert sum(counts.values()) < min(total.values())
