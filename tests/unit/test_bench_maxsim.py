"""`dist-vdr bench maxsim` (dist_vdr.bench.maxsim_memory): peak memory of the multi-vector scoring step.

The measured figures are allocator bytes (the profiler's allocation events), exact and repeatable, so they can
be compared here; no timing is checked. The computed figures are checked against the blocks the code really
builds (dist-vdr's MaxSimScoring and sentence-transformers' maxsim) and against the published-shape numbers of
docs/benchmarks.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sentence_transformers.multi_vector_encoder.scoring import colbert_scores

import dist_vdr.kinds.multi_vector.scoring as scoring_mod
from dist_vdr.bench import maxsim_memory as mm
from dist_vdr.kinds.multi_vector.scoring import MaxSimScoring

SMALL = {"world": 2, "batch": 4, "query_tokens": 3, "page_columns": 2, "page_tokens": 8, "dim": 8}


def test_run_measures_every_variant_and_chunking_lowers_the_peak():
    result = mm.run(**SMALL, chunk_elements=96, score_mini_batch_size=2)
    measured = result["measured"]
    assert set(measured) == set(mm.VARIANTS)
    assert all(isinstance(v, int) and v > 0 for v in measured.values())
    assert measured["dist-vdr"] < measured["naive"]
    computed = result["computed"]
    assert computed["dist-vdr"]["similarity"] < computed["naive"]["similarity"]
    assert computed["dist-vdr"]["kept"] == 8 * 3 * 8 * 8  # [Q, Tq, P] int64
    # the naive peak holds its whole similarity tensor (kept by amax) and its gradient
    assert measured["naive"] >= 2 * computed["naive"]["similarity"]
    report = mm.format_report(result)
    assert "measured peak" in report and "published shapes" in report


def test_measured_peak_is_repeatable():
    shapes = {**SMALL, "chunk_elements": 96, "score_mini_batch_size": 2}
    assert mm.measure(**shapes) == mm.measure(**shapes)


def _largest(monkeypatch, module, name: str, fn) -> int:
    """Runs ``fn`` recording the largest [a, b, Tq, Tp] block ``module.name(a_side, b_side, ...)`` scores."""
    seen = []
    original = getattr(module, name)

    def spy(a, b, *args, **kwargs):
        seen.append(a.shape[0] * b.shape[0] * a.shape[1] * b.shape[1])
        return original(a, b, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    fn()
    return max(seen)


def test_computed_blocks_are_the_ones_the_code_builds(monkeypatch):
    import sentence_transformers.util.similarity as st_similarity

    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(10, 3, 8, generator=g), dim=-1)
    p = F.normalize(torch.randn(13, 7, 8, generator=g), dim=-1)
    for chunk in (1, 21, 100, 400, 10_000):
        built = _largest(monkeypatch, scoring_mod, "_maxsim",
                         lambda c=chunk: MaxSimScoring(chunk_elements=c).scores(q, p))
        monkeypatch.undo()
        assert built == mm.dist_vdr_block(10, 13, 3, 7, chunk)
    for budget in (100, 700, 3000, 10**8):
        built = _largest(monkeypatch, st_similarity, "_maxsim_score_documents",
                         lambda b=budget: colbert_scores(q, p[:, None], chunk_elements=b))
        monkeypatch.undo()
        assert built == mm.st_block(10, 13, 3, 7, 8, budget)


def test_published_figures_of_the_docs():
    figures = mm.computed(**mm.PUBLISHED, token_bytes=2)
    assert figures["naive"]["similarity"] == 512 * 128 * 30 * 768 * 2  # 1.51e9 elements, 2.81 GiB
    assert figures["dist-vdr"]["similarity"] == 512 * 1 * 30 * 768 * 2  # 11.8 M elements, 22.5 MiB
    assert figures["sentence-transformers"]["similarity"] == 32 * 119 * 30 * 768 * 2  # 87.7 M elements, 167.3 MiB
    assert figures["dist-vdr"]["kept"] == 512 * 30 * 128 * 8  # 15 MiB
    assert figures["naive"]["kept"] == 512 * 128 * 30 * 769 * 2  # the similarity tensor and amax's output
    assert figures["sentence-transformers"]["tokens"] == (64 * 30 + 2 * 1024 * 768) * 128 * 2  # 384.5 MiB


def test_naive_is_colpali_engines_torch_path():
    from peer_references import colpali_modules

    _, colpali_maxsim = colpali_modules()
    g = torch.Generator().manual_seed(1)
    q, p = torch.randn(5, 3, 8, generator=g), torch.randn(6, 7, 8, generator=g)
    torch.testing.assert_close(mm.naive_scores(q, p), colpali_maxsim._torch_maxsim(q, p), rtol=0, atol=0)
