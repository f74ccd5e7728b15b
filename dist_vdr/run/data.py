"""Loading a run's data and the startup passes over it, before anything is written.

Every rank loads the data (memory-mapped; cheap checks: columns, queries, ids); the pages are
decoded (validation) and, when the task's sampler wants them, the rows hashed, once, sharded over
the ranks (:mod:`dist_vdr.data.startup`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dist_vdr import distributed, log
from dist_vdr.config import Config, DataConfig
from dist_vdr.data import ingest, mixture_rows, startup
from dist_vdr.data import mixture as mixture_lib
from dist_vdr.data.loading import EvalData, image_columns, load_eval, load_train
from dist_vdr.data.prepared import PreparedData

logger = log.get(__name__)


def prepare_data(cfg: Config, info: distributed.DistInfo, out: Path | None, *, hash_rows: bool,
                 extra_columns: list[str] = ()) -> PreparedData:
    """The training rows and eval data, validated (and hashed when ``hash_rows``). Collective.
    ``extra_columns``: columns the task reads besides the query and page columns (kept, not hashed)."""
    data_cfg = without_image_check(cfg.data)
    mixture = mixture_rows.load_mixture(data_cfg, list(extra_columns)) if cfg.data.datasets else None
    train_ds = mixture.train if mixture else load_train(data_cfg, extra_columns=list(extra_columns))
    for name, size in zip(mixture.names, mixture.sizes, strict=True) if mixture else ():
        entry = next(e for e in cfg.data.datasets if e.name == name)
        if size < cfg.training.global_batch_size and mixture_lib.drawn(cfg.data.mixture, entry.weight):
            raise ValueError(f"data.datasets[{name}]: {size} rows, fewer than one optimizer step "
                             f"(training.global_batch_size={cfg.training.global_batch_size}: a step's batch comes "
                             f"from one dataset); lower the global batch, add rows or drop the dataset")
    if len(train_ds) < cfg.training.global_batch_size:
        raise ValueError(f"only {len(train_ds)} training rows for a global batch of {cfg.training.global_batch_size}; "
                         f"lower training.global_batch_size or add data")
    scores = cfg.loss.distillation.scores_column
    if scores:  # every row's teacher scores, now: not when the row's step comes
        from dist_vdr.data import checks

        for part, section, name in (zip(mixture.parts, mixture.configs, mixture.names, strict=True) if mixture
                                    else [(train_ds, cfg.data, None)]):
            checks.score_lists(part, scores, 1 + len(section.negative_columns),
                               f"training data {name + ' = ' if name else ''}{section.path}[{section.train_split}]")
    eval_sets = _eval_sets(cfg, mixture) if cfg.evaluation.enabled else {}
    eval_data: EvalData | None = load_eval(data_cfg) if cfg.evaluation.enabled and not eval_sets else None
    kwargs = dict(info=info, output_dir=out, workers=cfg.launch.startup_workers,
                  timeout_s=cfg.launch.startup_timeout_s, log=logger.info)
    data = PreparedData(train_ds, eval_data, mixture=mixture, eval_sets=eval_sets)
    if cfg.data.validate_images or hash_rows:
        # One pass per dataset of a mixture (its own record: a dataset shared by two mixtures is scanned once).
        parts = zip(mixture.parts, mixture.configs, mixture.names, strict=True) if mixture else \
            [(train_ds, cfg.data, None)]
        for part, section, name in parts:
            where = f"training data {name + ' = ' if name else ''}{section.path}[{section.train_split}]"
            # The sampler's duplicate check covers the query and page columns only (the extra ones are its
            # label columns): hash exactly those.
            scanned = part.select_columns(section.train_columns) if extra_columns else part
            data.passes.append(startup.prepare(scanned, image_columns(part, section.train_columns), where,
                                               hashed=hash_rows, **kwargs))
            _report_pass(info, data.passes[-1], f"training rows{' of ' + name if name else ''}", hash_rows)
        data.train_passes = len(data.passes)
    if cfg.data.validate_images:
        sections = {name: c for name, c in zip(mixture.names, mixture.configs, strict=True)} if eval_sets else {}
        for name, corpus in ({"": eval_data} if eval_data is not None else eval_sets).items():
            section = sections.get(name, cfg.data)
            _validate_eval_corpus(data, corpus, section.eval_path or section.path, info, kwargs)
    return data


def _eval_sets(cfg: Config, mixture) -> dict[str, EvalData]:
    """The eval sets of a mixture's datasets that name one ({} when none does: data's eval set is the eval)."""
    if mixture is None:
        return {}
    sets = {name: load_eval(without_image_check(section))
            for name, entry, section in zip(mixture.names, cfg.data.datasets, mixture.configs, strict=True)
            if entry.has_eval}
    if sets:
        without = [name for name in mixture.names if name not in sets]
        logger.info(f"eval sets: {', '.join(sets)} (their macro average is the main metric)"
                    + (f"; {', '.join(without)} name(s) no eval data: not evaluated" if without else ""))
    return sets


def _validate_eval_corpus(data: PreparedData, eval_data: EvalData, corpus_path: str, info, kwargs: dict) -> None:
    if (Path(corpus_path) / ingest.MARKER_FILE).is_file():
        logger.info(f"eval corpus {corpus_path}: a `pages build` corpus, validated when it was built")
        return
    data.passes.append(startup.prepare(eval_data.corpus, ["image"], f"eval corpus {corpus_path}",
                                       hashed=False, **kwargs))
    _report_pass(info, data.passes[-1], "eval pages", False)


def without_image_check(data_cfg: DataConfig) -> DataConfig:
    """The loaders' serial image check is off: the startup pass does it, sharded."""
    return dataclasses.replace(data_cfg, validate_images=False)


def _report_pass(info: distributed.DistInfo, result: startup.StartupResult, what: str, hashed: bool) -> None:
    done = "validated and hashed" if hashed else "validated"
    if result.reused_from:
        logger.info(f"startup: {result.rows} {what} {done} before (record {result.reused_from}): no page decoded")
    else:
        logger.info(f"startup: {result.rows} {what} {done} on {info.world_size} rank(s) in {result.seconds:.1f} s "
                    f"({result.decoded_pages} pages decoded)")
