"""The reranker's data: mined training rows and the evaluation's first-stage candidates.

The retriever (an embedding model) is loaded once per run on every rank, mines hard negatives from
the training pages and retrieves the evaluation candidates, collectively, and is freed before the
reranker loads. Both results are cached in the output folder (``mined/`` with a fingerprint,
``retrieval_candidates.json``), so a resumed or requeued run neither loads the retriever nor
mines again.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
from pathlib import Path

from dist_vdr import distributed, log
from dist_vdr.config import Config, ModelConfig
from dist_vdr.data.loading import EvalData, load_train
from dist_vdr.kinds.reranker.evaluation import retrieve
from dist_vdr.models.build import build_model
from dist_vdr.retrieval import mining
from dist_vdr.run.folder import RunDir

logger = log.get(__name__)

Candidates = dict[str, list[tuple[str, float]]]


def prepare(cfg: Config, info: distributed.DistInfo, out: Path, train_ds,
            eval_data: EvalData | None) -> tuple[object, Candidates | None]:
    """(training dataset, first-stage candidates or None). Collective."""
    mined_dir, candidates_file = RunDir(out).mined, RunDir(out).retrieval_candidates
    fp = mining.fingerprint(cfg.reranker.retriever, cfg.data.path, cfg.data.train_split,
                            cfg.data.max_train_samples, cfg.mining)
    need_mining = cfg.mining.enabled and _stale(mined_dir, fp)
    need_candidates = eval_data is not None and not candidates_file.is_file()
    candidates = None
    if need_mining or need_candidates:
        retriever = _load_retriever(cfg, info)
        if need_mining:
            _mine(cfg, info, retriever, train_ds, mined_dir, fp, cache=out / "mining_cache")
        if need_candidates:
            candidates = _retrieve(cfg, info, retriever, eval_data, candidates_file)
        del retriever
        gc.collect()
    if eval_data is not None and candidates is None:
        candidates = {q: [tuple(c) for c in pages] for q, pages in json.loads(candidates_file.read_text()).items()}
    if cfg.mining.enabled:
        train_ds = _mined_rows(cfg, mined_dir)
    return train_ds, candidates


def _load_retriever(cfg: Config, info: distributed.DistInfo):
    retriever_cfg = ModelConfig(name_or_path=cfg.reranker.retriever, dtype=cfg.model.dtype,
                                attn_implementation=cfg.model.attn_implementation,
                                trust_remote_code=cfg.model.trust_remote_code)
    return build_model(retriever_cfg, precision=cfg.training.precision, device=info.device)


def _mine(cfg: Config, info: distributed.DistInfo, retriever, train_ds, mined_dir: Path, fp: dict,
          cache: Path) -> None:
    data, e = cfg.data, cfg.evaluation
    if cfg.mining.document_id_columns:  # the training columns plus the pages' document ids
        train_ds = load_train(dataclasses.replace(data, validate_images=False),
                              extra_columns=list(cfg.mining.document_id_columns.values()))
    logger.info(f"mining {cfg.mining.num_negatives} hard negatives per query with {cfg.reranker.retriever}")
    result = mining.mine(retriever, train_ds, cfg.mining, query_column=data.query_column,
                         positive_column=data.positive_column, page_columns=list(data.negative_columns),
                         batch_size=e.batch_size, num_workers=e.num_workers, backend=e.search_backend,
                         cache_dir=str(cache), wait_timeout_s=cfg.launch.startup_timeout_s)
    if info.is_main:
        mining.write_mined(train_ds, result, mined_dir, query_column=data.query_column,
                           positive_column=data.positive_column, fingerprint=fp)
    logger.info(f"mined: {len(result.kept_rows)} rows kept, {result.num_dropped} without enough negatives "
                f"dropped -> {mined_dir}")
    distributed.barrier()


def _retrieve(cfg: Config, info: distributed.DistInfo, retriever, eval_data: EvalData,
              candidates_file: Path) -> Candidates:
    e = cfg.evaluation
    logger.info(f"retrieving the top {max(e.ks)} evaluation candidates with {cfg.reranker.retriever}")
    candidates = retrieve(retriever, eval_data, top_k=max(max(e.ks), cfg.reranker.rerank_depth),
                          batch_size=e.batch_size, num_workers=e.num_workers, backend=e.search_backend)
    if info.is_main:
        tmp = candidates_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(candidates))
        os.replace(tmp, candidates_file)
    distributed.barrier()
    return candidates


def _mined_rows(cfg: Config, mined_dir: Path):
    """The mined rows as the training dataset (with the retriever's scores when the loss uses them)."""
    negatives = [f"negative_{j}" for j in range(cfg.mining.num_negatives + cfg.mining.num_random_negatives)]
    mined_cfg = dataclasses.replace(cfg.data, path=str(mined_dir), train_name=None, max_train_samples=None,
                                    negative_columns=negatives, validate_images=False)
    if cfg.reranker.retrieval_score_weight:
        # The collator hands a "scores" column to the loss as labels (positive first, then each negative).
        train_ds = load_train(mined_cfg, extra_columns=[mining.RETRIEVER_SCORES]).rename_column(
            mining.RETRIEVER_SCORES, "scores")
    else:
        train_ds = load_train(mined_cfg)
    if len(train_ds) < cfg.training.global_batch_size:
        raise ValueError(f"mining kept {len(train_ds)} rows, fewer than the global batch "
                         f"{cfg.training.global_batch_size}: relax mining.margin / rank_start or raise max_rank")
    return train_ds


def _stale(mined_dir: Path, fp: dict) -> bool:
    marker = mining.read_marker(mined_dir)
    return marker is None or {k: marker.get(k) for k in fp} != fp
