"""Peak memory of the multi-vector scoring step: dist-vdr's chunked MaxSim next to the unchunked einsum and
sentence-transformers' scoring. Measured at tiny shapes on CPU, computed at the published shapes.

The step is the one each rank runs in :class:`~dist_vdr.losses.score_exchange.ScoreExchangeCachedLoss`:
``_local_scores`` (c) and its backward (f). Every gathered query ``[W*B, Tq, D]`` is scored against the rank's
local pages ``[C*B, Tp, D]`` (C page columns). Then an upstream gradient on every score is back-propagated,
as the loss does. The variants:

- ``dist-vdr``: :meth:`MaxSimScoring.scores` with ``chunk_elements``. The similarities are scored in blocks of
  at most that many elements.
- ``naive``: one einsum builds ``[Q, P, Tq, Tp]``, then amax and sum: the obvious implementation, and
  colpali-engine 0.3.18's torch path (``utils/maxsim.py``: its ``ColbertLoss`` without the optional
  late-interaction-kernels package or without a GPU; with both it calls a fused kernel, not measured here).
  ``amax`` keeps the whole tensor for its backward (``max`` would keep only the arg-max indices).
- ``sentence-transformers``: the scoring of its ``CachedMultiVectorMultipleNegativesRankingLoss``
  (``gather_across_devices=True``). It scores the rank's own B queries against the gathered pages of all
  ranks, stacked as ``[W*B, C, Tp, D]`` with masks. The queries go in ``score_mini_batch_size`` chunks, and
  each chunk is back-propagated before the next. Each chunk goes through ``colbert_scores``, whose ``maxsim``
  cuts the pages to a 100M-element budget.

Peak memory is the most torch CPU-allocator memory live during the step, above what was live at its start.
It is read from the profiler's allocation events (``profile_memory``). Every tensor counts, backward
temporaries included; BLAS scratch does not. The figure is exact and repeats from run to run; peak RSS does
not (glibc keeps and reuses freed blocks, and a tensor's pages count only once touched).

    dist-vdr bench maxsim [--world-size 1 --batch 64 --query-tokens 30 --page-columns 2 --page-tokens 256 --dim 128]
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from dist_vdr.kinds.multi_vector.config import CHUNK_ELEMENTS

VARIANTS = ("dist-vdr", "naive", "sentence-transformers")
ST_SCORE_MINI_BATCH = 32
"""sentence-transformers' default ``score_mini_batch_size`` (= its default ``mini_batch_size``)."""
ST_BUDGET = 100_000_000
"""sentence-transformers' ``maxsim`` element budget (``chunk_elements=None``)."""
PUBLISHED = {"world": 8, "batch": 64, "query_tokens": 30, "page_columns": 2, "page_tokens": 768, "dim": 128}
"""The published ColQwen shapes, per rank (as in the ScoreExchangeCachedLoss docstring)."""
INDEX_BYTES = 8  # the int64 arg-max indices max() keeps for its backward


def naive_scores(queries, pages):
    """``[Q, P]`` MaxSim through the whole ``[Q, P, Tq, Tp]`` similarity tensor: colpali-engine 0.3.18's
    ``_torch_maxsim``, ``einsum("bnd,csd->bcns", query, doc).amax(dim=3).sum(dim=2)``."""
    return torch.einsum("bnd,csd->bcns", queries, pages).amax(dim=3).sum(dim=2)


def _st_step(queries, pages, grad, columns: int, score_mini_batch_size: int) -> None:
    from sentence_transformers.multi_vector_encoder.scoring import colbert_scores

    docs = torch.stack(pages.split(len(pages) // columns), dim=1)  # [W*B, C, Tp, D] (its stack of the columns)
    docs_mask = torch.ones(docs.shape[:3], dtype=torch.bool)
    queries_mask = torch.ones(queries.shape[:2], dtype=torch.bool)
    # its score column j*C + c is page c*(W*B) + j (column c, row j)
    order = torch.arange(len(pages)).view(columns, -1).T.reshape(-1)
    for b in range(0, len(queries), score_mini_batch_size):
        e = b + score_mini_batch_size
        scores = colbert_scores(queries[b:e], docs, queries_mask=queries_mask[b:e], documents_mask=docs_mask)
        scores.backward(grad[b:b + len(scores), order].to(scores.dtype))


def peak_bytes(fn) -> int:
    """The most CPU-allocator bytes live while ``fn()`` runs, above those live when it starts."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # no profiler start/stop lines on stderr
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()  # an allocation's size, a free's negative size
        peak = max(peak, live)
    return peak


def measure(*, world: int = 1, batch: int = 64, query_tokens: int = 30, page_columns: int = 2, page_tokens: int = 256,
            dim: int = 128, chunk_elements: int = CHUNK_ELEMENTS, score_mini_batch_size: int = ST_SCORE_MINI_BATCH,
            seed: int = 0) -> dict[str, int]:
    """Peak bytes of one rank's scoring step (forward + backward, fp32, CPU) per variant."""
    from dist_vdr.kinds.multi_vector.scoring import MaxSimScoring

    gen = torch.Generator().manual_seed(seed)
    queries = F.normalize(torch.randn(world * batch, query_tokens, dim, generator=gen), dim=-1)  # gathered
    pages = F.normalize(torch.randn(world * page_columns * batch, page_tokens, dim, generator=gen), dim=-1)
    local = pages[:page_columns * batch]  # this rank's pages
    grad = torch.randn(world * batch, world * page_columns * batch, generator=gen)
    scoring = MaxSimScoring(chunk_elements=chunk_elements)
    steps = {
        "dist-vdr": lambda q, p: scoring.scores(q, p).backward(grad[:, :len(p)]),
        "naive": lambda q, p: naive_scores(q, p).backward(grad[:, :len(p)]),
        "sentence-transformers": lambda q, p: _st_step(q, p, grad, page_columns, score_mini_batch_size),
    }
    inputs = {"dist-vdr": (queries, local), "naive": (queries, local),
              "sentence-transformers": (queries[:batch], pages)}  # its own queries against the gathered pages
    out = {}
    for variant in VARIANTS:
        q, p = (t.clone().requires_grad_() for t in inputs[variant])
        out[variant] = peak_bytes(lambda step=steps[variant], q=q, p=p: step(q, p))
    return out


def dist_vdr_block(num_q: int, num_p: int, tq: int, tp: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """Elements of the largest block :meth:`MaxSimScoring.scores` builds (its chunking rule; the last, smaller
    query chunk takes more pages)."""
    pair = max(1, tq * tp)
    q_rows = max(1, min(num_q, chunk_elements // pair))
    return max(n * min(num_p, max(1, chunk_elements // (n * pair))) * pair for n in _chunk_sizes(num_q, q_rows))


def st_block(num_q: int, num_docs: int, tq: int, tp: int, dim: int, budget: int = ST_BUDGET) -> int:
    """Elements of the largest ``[queries, pages, Tq, Tp]`` intermediate of sentence-transformers' ``maxsim``
    (its ``_chunk_ranges`` rule: the padded tokens of both sides count against the budget)."""
    q_rows = min(num_q, max(1, (budget - tp * dim) // ((tp + dim) * tq)))
    return max(n * min(num_docs, max(1, (budget - n * tq * dim) // ((n * tq + dim) * tp))) * tq * tp
               for n in _chunk_sizes(num_q, q_rows))


def _chunk_sizes(total: int, rows: int) -> set[int]:
    return {rows, total % rows or rows}


def computed(*, world: int, batch: int, query_tokens: int, page_columns: int, page_tokens: int, dim: int,
             token_bytes: int = 2, chunk_elements: int = CHUNK_ELEMENTS,
             score_mini_batch_size: int = ST_SCORE_MINI_BATCH) -> dict[str, dict[str, int]]:
    """Per variant, in bytes: ``similarity`` the largest similarity tensor (its gradient in the backward is as
    large), ``kept`` what the max keeps from forward to backward (the int64 arg-max indices; naive: amax keeps
    its input, the whole similarity tensor, and its output), ``tokens`` the token tensors the step scores
    (sentence-transformers: the gathered columns and their stacked copy)."""
    q, tq, tp, d = world * batch, query_tokens, page_tokens, dim
    local, gathered = page_columns * batch, world * page_columns * batch
    s = min(score_mini_batch_size, batch)
    ours = {"kept": q * tq * local * INDEX_BYTES, "tokens": (q * tq + local * tp) * d * token_bytes}
    return {
        "dist-vdr": {"similarity": dist_vdr_block(q, local, tq, tp, chunk_elements) * token_bytes, **ours},
        "naive": {"similarity": q * local * tq * tp * token_bytes, "kept": q * local * tq * (tp + 1) * token_bytes,
                  "tokens": ours["tokens"]},
        "sentence-transformers": {"similarity": st_block(s, world * batch, tq, tp, d) * token_bytes,
                                  "kept": s * tq * gathered * INDEX_BYTES,
                                  "tokens": (batch * tq + 2 * gathered * tp) * d * token_bytes},
    }


def _mib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def _row(label: str, values: dict) -> str:
    base = values["dist-vdr"]
    ratios = "".join(f"{values[v] / base:>12.1f}x" for v in VARIANTS[1:])
    return f"{label:34s}" + "".join(f"{_mib(values[v]):>14s}" for v in VARIANTS) + ratios


def run(*, world: int = 1, batch: int = 64, query_tokens: int = 30, page_columns: int = 2, page_tokens: int = 256,
        dim: int = 128, chunk_elements: int = CHUNK_ELEMENTS, score_mini_batch_size: int = ST_SCORE_MINI_BATCH) -> dict:
    """The measured peaks at these shapes (fp32), the computed figures there (fp32) and at :data:`PUBLISHED`
    (bf16 tokens)."""
    shapes = {"world": world, "batch": batch, "query_tokens": query_tokens, "page_columns": page_columns,
              "page_tokens": page_tokens, "dim": dim}
    knobs = {"chunk_elements": chunk_elements, "score_mini_batch_size": score_mini_batch_size}
    return {"shapes": shapes, **knobs, "measured": measure(**shapes, **knobs),
            "computed": computed(**shapes, token_bytes=4, **knobs),
            "published": computed(**PUBLISHED, token_bytes=2, **knobs)}


def _computed_rows(figures: dict, prefix: str = "") -> list[str]:
    return [_row(prefix + label, {v: figures[v][key] for v in VARIANTS}) for key, label in (
        ("similarity", "largest similarity tensor"), ("kept", "kept for backward"),
        ("tokens", "token tensors scored"))]


def format_report(result: dict) -> str:
    sh, pub = result["shapes"], PUBLISHED
    header = f"{'':34s}{'dist-vdr':>14s}{'naive':>14s}{'ST':>14s}{'naive/ours':>13s}{'ST/ours':>13s}"
    return "\n".join([
        f"scoring step, forward + backward, fp32 on CPU: {sh['world'] * sh['batch']} queries x {sh['query_tokens']} "
        f"tokens against {sh['page_columns'] * sh['batch']} local pages x {sh['page_tokens']} tokens (W={sh['world']}, "
        f"B={sh['batch']}, C={sh['page_columns']}), D={sh['dim']}, chunk_elements={result['chunk_elements']}, "
        f"ST score_mini_batch_size={result['score_mini_batch_size']}",
        header,
        _row("measured peak (CPU allocator)", result["measured"]),
        *_computed_rows(result["computed"], "computed: "),
        "",
        f"computed at the published shapes, per rank (W={pub['world']}, B={pub['batch']}, Tq={pub['query_tokens']}, "
        f"C={pub['page_columns']}, Tp={pub['page_tokens']}, D={pub['dim']}, bf16 tokens)",
        header,
        *_computed_rows(result["published"]),
        "(ST = sentence-transformers' CachedMultiVectorMultipleNegativesRankingLoss scoring; the backward builds the "
        "gradient of each similarity tensor, as large; kept: the arg-max indices, naive: amax's input and output, "
        "ST: one score chunk's indices; ST's tokens: the gathered pages and their stacked copy)",
    ])
