"""A reranker in the commands: loaded as a teacher (`mine-negatives --teacher`, `score-rows`), and evaluated over a
retriever's candidates (`dist-vdr eval --model RETRIEVER --reranker R`)."""

from __future__ import annotations

import dataclasses
import functools
import gc

from dist_vdr import log


def load(model_cfg, cfg, *, device: str, precision: str, flag: str):
    """The reranker at ``model_cfg.name_or_path``, loaded and prompted as ``cfg.reranker`` says."""
    from dist_vdr.kinds.reranker.model import build_reranker

    try:
        return build_reranker(model_cfg, cfg.reranker, device=device, precision=precision)
    except (ValueError, OSError, KeyError) as exc:  # transformers' own messages run to pages
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{flag} {model_cfg.name_or_path} does not load as a reranker ({first}); give a reranker (a "
                         f"dist-vdr reranker's final/, or e.g. Qwen/Qwen3-VL-Reranker-2B), or say what it is with "
                         f"--teacher-type") from None


def teacher(reranker, cfg):
    """The reranker's scores of each query's pages: a collective ``(queries, pages, cells) -> [Q, k]``."""
    from dist_vdr.kinds.reranker.scoring import row_scores

    return functools.partial(row_scores, reranker, batch_size=cfg.evaluation.batch_size, prompt=cfg.reranker.prompt)


def rerank(cfg, info, data, retriever, output, write) -> int:
    """The retriever's top-k, the top reranker.rerank_depth reranked (queries sharded over ranks); ``write``:
    the command's writer of the evaluator's outputs."""
    from dist_vdr.kinds.reranker.evaluation import RerankEvaluator, retrieve
    from dist_vdr.kinds.reranker.model import build_reranker, fusion_weight
    from dist_vdr.models.build import precision_of
    from dist_vdr.retrieval.metrics import headline

    e, depth = cfg.evaluation, cfg.reranker.rerank_depth
    weight, notes = fusion_weight(cfg.eval.reranker, cfg.eval.retrieval_score_weight, cfg.model.name_or_path)
    candidates = retrieve(retriever, data, top_k=max(max(e.ks), depth), batch_size=e.batch_size,
                          num_workers=e.num_workers, backend=e.search_backend)
    del retriever
    gc.collect()
    precision = precision_of(cfg.model.dtype)
    reranker = build_reranker(dataclasses.replace(cfg.model, name_or_path=cfg.eval.reranker), cfg.reranker,
                              device=info.device, precision=precision)
    for note in notes:
        log.get(__name__).info(note)
    evaluator = RerankEvaluator(data, candidates, depth=depth, ks=e.ks, batch_size=e.batch_size,
                                prompt=cfg.reranker.prompt, retrieval_score_weight=weight)
    evaluator(reranker)
    if info.is_main:
        write(output, evaluator)
        stages = [("retrieval", evaluator.retrieval_metrics), ("reranked", evaluator.last_metrics)]
        if evaluator.last_alone_metrics:
            stages.append(("reranker score alone", evaluator.last_alone_metrics))
        for stage, m in stages:
            print(f"{stage}: {headline(m)}", flush=True)
    return 0
