"""`dist-vdr` data subcommands: page corpora from documents, and hard-negative mining.

  make-synthetic-pdfs DIR       a generated folder of PDFs and scans + queries/qrels (offline demo input)
  pages build --input --out     PDFs and images -> page corpus dataset (parallel, resumable)
  mine-negatives                hard negatives with an embedding model, sharded over ranks, either
                                for a training split's own pages (--data) or over a page corpus
                                for judged queries (--corpus --queries --qrels)
  score-rows                    a teacher's scores (embedding model or reranker) of each training row's
                                own positive and negatives, for loss.distillation, sharded over ranks

`pages build`, `mine-negatives` and `score-rows` take their settings as a recipe does (dist_vdr.cli.settings:
IngestCommand, MineCommand, ScoreRowsCommand): --config FILE, the options below, key=value overrides.
"""

from __future__ import annotations

import argparse
import os

from dist_vdr.cli.options import Command, Opt, add_options, given_options, load_command
from dist_vdr.cli.settings import IngestCommand, MineCommand, ScoreRowsCommand
from dist_vdr.config import DEVICES, DTYPES

BUILD = Command(IngestCommand, (
    Opt("--input", "ingest.input_dir"),
    Opt("--out", "ingest.out_dir"),
    Opt("--dpi", "ingest.dpi"),
    Opt("--max-pixels", "ingest.max_pixels"),
    Opt("--max-image-pixels", "ingest.max_image_pixels"),
    Opt("--text", "ingest.text"),
    Opt("--image-format", "ingest.image_format", choices=("png", "jpeg")),
    Opt("--files-per-shard", "ingest.files_per_shard"),
    Opt("--pages-per-shard", "ingest.pages_per_shard"),
    Opt("--max-pages-per-document", "ingest.max_pages_per_document"),
    Opt("--follow-symlinks", "ingest.follow_symlinks"),
    Opt("--num-workers", "ingest.num_workers"),
    Opt("--overwrite", "build.overwrite"),
    Opt("--quiet", "build.quiet"),
))

# The training rows' split and columns (mine-negatives --data, score-rows).
_ROW_COLUMNS = (
    Opt("--name", "data.train_name"),
    Opt("--split", "data.train_split", help="Split of the training data."),
    Opt("--query-column", "data.query_column", help="Column of the query text."),
    Opt("--positive-column", "data.positive_column", help="Column of the positive page."),
)

MINE = Command(MineCommand, (
    Opt("--model", "model.name_or_path", help="Retriever folder or hub id (embedding or multi-vector model)."),
    Opt("--data", "data.path", help="Training split with query + positive page columns (images) to mine for "
                                    "(give it, --corpus, or a --config file naming it)."),
    Opt("--corpus", "mine.corpus"),
    Opt("--queries", "mine.queries"),
    Opt("--qrels", "mine.qrels"),
    Opt("--exclude-same-document", "mine.exclude_same_document"),
    Opt("--out", "mine.out"),
    *_ROW_COLUMNS,
    Opt("--page-columns", "mine.page_columns", nargs="*"),
    Opt("--num-negatives", "mining.num_negatives"),
    Opt("--num-random-negatives", "mining.num_random_negatives"),
    Opt("--max-uses-per-page", "mining.max_uses_per_page"),
    Opt("--rank-start", "mining.rank_start"),
    Opt("--max-rank", "mining.max_rank"),
    Opt("--margin", "mining.margin"),
    Opt("--max-score-ratio", "mining.max_score_ratio"),
    Opt("--document-id-column", "mining.document_id_columns", metavar="PAGECOL=IDCOL", append=True,
        help="With data.path: never pick a page of the positive's document, by the column holding the page's "
             "document id (repeat per page column)."),
    Opt("--seed", "mining.seed"),
    Opt("--batch-size", "evaluation.batch_size"),
    Opt("--num-workers", "evaluation.num_workers"),
    Opt("--cache", "mine.cache"),
    Opt("--teacher", "mine.teacher"),
    Opt("--teacher-type", "mine.teacher_type"),
    Opt("--dtype", "model.dtype", choices=DTYPES),
    Opt("--device", "launch.device", choices=DEVICES),
    Opt("--threads", "launch.num_threads_per_process"),
))

SCORE = Command(ScoreRowsCommand, (
    Opt("--teacher", "model.name_or_path", help="The teacher: an embedding model or a reranker (folder or hub id)."),
    Opt("--teacher-type", "score.teacher_type"),
    Opt("--data", "data.path", help="Training rows with query, positive and negative page columns (images)."),
    Opt("--out", "score.out"),
    *_ROW_COLUMNS,
    Opt("--negative-columns", "data.negative_columns", nargs="*"),
    Opt("--batch-size", "evaluation.batch_size"),
    Opt("--num-workers", "evaluation.num_workers"),
    Opt("--dtype", "model.dtype", choices=DTYPES),
    Opt("--device", "launch.device", choices=DEVICES),
    Opt("--threads", "launch.num_threads_per_process"),
))


def _make_pdfs(args: argparse.Namespace) -> int:
    from dist_vdr.data.synthetic_pdfs import SyntheticPdfSpec, generate_pdf_folder

    spec = SyntheticPdfSpec(num_documents=args.num_documents, max_pages_per_document=args.max_pages_per_document,
                            num_scans=args.num_scans, seed=args.seed)
    out = generate_pdf_folder(args.dir, spec, overwrite=args.overwrite)
    print(f"documents in {out}/documents; queries and qrels in {out}")
    return 0


def _pages(args: argparse.Namespace) -> int:
    import sys

    from dist_vdr.data.ingest import BuildInterrupted, build_pages, format_summary

    cfg = load_command(args, BUILD)
    try:
        summary = build_pages(cfg.ingest, overwrite=cfg.build.overwrite, show_progress=not cfg.build.quiet)
    except BuildInterrupted as exc:  # the build stopped where it was asked to, resumably: one line, as any stop
        print(f"error: {exc}", file=sys.stderr, flush=True)
        # Exit now: the rest of main (leaving a process group that a page build never joins)
        # imports torch, ~2 s that a user who pressed Ctrl-C should not wait for.
        raise SystemExit(exc.exit_code) from None
    print(format_summary(summary, cfg.ingest.out_dir), flush=True)
    return 0


def _load_mine(args: argparse.Namespace) -> MineCommand:
    cfg = load_command(args, MINE, check_paths=False)
    # The training split to mine for: --data (or data.path=), or the data section of a --config
    # file; with --corpus a config file's data section is not used.
    data_flag = "data.path" in given_options(args, MINE) or any(o.startswith("data.path=") for o in args.overrides)
    if (cfg.corpus_mode and data_flag) or not (cfg.corpus_mode or data_flag or args.command_config):
        raise ValueError("give either --data (a training split with page images) or --corpus with --queries and "
                         "--qrels (a page corpus and judged queries)")
    cfg.resolve_sources()
    return cfg


def _mine(args: argparse.Namespace) -> int:
    """Hard negatives (run it under accelerate launch for several ranks)."""
    from dist_vdr import distributed, kinds
    from dist_vdr.models.build import precision_of
    from dist_vdr.retrieval.mining import check_out

    cfg = _load_mine(args)
    m = cfg.mine
    m.out = os.path.expanduser(m.out)
    inputs = {"--data": None if cfg.corpus_mode else cfg.data.path, "--corpus": m.corpus, "--queries": m.queries,
              "--qrels": m.qrels, "--model": cfg.model.name_or_path, "--teacher": m.teacher}
    if m.cache:  # the keyed cache is written too: apart from the inputs and from the output
        from dist_vdr.outputs import Output

        Output("mine-negatives", "--cache", m.cache, inputs, replace_any=True).check(register=False)
    check_out(m.out, inputs).check_apart("--cache", m.cache)
    info = distributed.init(cfg.launch.device, 0, cfg.launch.num_threads_per_process)
    e = cfg.evaluation
    encode = {"batch_size": e.batch_size, "num_workers": e.num_workers, "backend": e.search_backend,
              "cache_dir": cfg.mine.cache}
    inputs = _corpus_inputs(cfg) if cfg.corpus_mode else _split_inputs(cfg)
    precision = precision_of(cfg.model.dtype)
    # The retriever's kind (recorded in its folder) says how it loads and scores (dist_vdr.kinds).
    task = kinds.get(kinds.of_folder(cfg.model.name_or_path))
    encode["scoring"] = task.scoring(cfg)
    model = task.load_model(cfg.model, cfg, device=info.device, precision=precision)
    encode["teacher"] = _teacher(cfg, info.device, precision) if cfg.mine.teacher else None
    if cfg.corpus_mode:
        _mine_corpus(cfg, info, model, *inputs, encode)
    else:
        _mine_split(cfg, info, model, inputs, encode)
    distributed.barrier()
    return 0


def _teacher(cfg: MineCommand, device: str, precision: str):
    """The teacher of --teacher as ``(queries, pages, cells) -> scores`` (collective, see mining.mine)."""
    import dataclasses

    from dist_vdr.models.build import check_model_path

    path = check_model_path(cfg.mine.teacher, key="mine.teacher")
    return _load_teacher(dataclasses.replace(cfg.model, name_or_path=path), cfg.mine.teacher_type, cfg,
                         device, precision, flag="--teacher")[0]


def _load_teacher(model_cfg, teacher_type: str, cfg, device: str, precision: str, flag: str):
    """(the teacher at ``model_cfg.name_or_path`` as a collective ``(queries, pages, cells) -> [Q, k]``, its kind):
    the kind recorded in its folder, or ``teacher_type`` when not auto, says how it loads and scores
    (:meth:`dist_vdr.kinds.base.Task.teacher`); loaded with ``model_cfg``'s dtype and attention."""
    from dist_vdr import kinds

    path = model_cfg.name_or_path
    found = kinds.of_folder(path, flag=flag, default=False)  # None: nothing in the folder says
    kind = teacher_type if teacher_type != "auto" else found or kinds.names()[0]
    if found is not None and found != kind:
        raise ValueError(f"{flag} {path} is a model of task={found}, not {teacher_type}: use --teacher-type {found} "
                         f"(or auto)")
    task = kinds.get(kind)
    return task.teacher(task.load_model(model_cfg, cfg, device=device, precision=precision, flag=flag), cfg), kind


def _teacher_record(cfg: MineCommand) -> dict:
    """What the mined rows' marker says of their teacher scores."""
    m = cfg.mine
    if not m.teacher:
        return {"teacher": None}
    negatives = cfg.mining.num_negatives + cfg.mining.num_random_negatives
    positive = "image" if cfg.corpus_mode else cfg.data.positive_column
    kind = _kind_of(m.teacher, m.teacher_type)
    return {"teacher": m.teacher, "teacher_type": m.teacher_type, **kind.teacher_record(cfg),
            "columns": [positive, *(f"negative_{j}" for j in range(negatives))]}


def _kind_of(path: str, teacher_type: str):
    from dist_vdr import kinds

    return kinds.get(kinds.of_folder(path, flag="--teacher") if teacher_type == "auto" else teacher_type)


def _score_rows(args: argparse.Namespace) -> int:
    """Teacher scores of the rows' own pages (run it under accelerate launch for several ranks)."""
    import dataclasses

    from dist_vdr import distributed
    from dist_vdr.data import page_refs
    from dist_vdr.data.loading import load_train
    from dist_vdr.data.splits import load_split
    from dist_vdr.models.build import precision_of
    from dist_vdr.retrieval import mining

    cfg = load_command(args, SCORE, check_paths=False)
    cfg.resolve_sources()
    d = cfg.data
    cfg.score.out = os.path.expanduser(cfg.score.out)
    if not d.negative_columns:
        raise ValueError("score-rows needs the rows' negative columns (--negative-columns negative_0 ...): "
                         "distillation compares the positive's score with the negatives'")
    split = load_split(d.path, d.train_name, d.train_split)
    if d.pages_path or page_refs.id_columns(split, [c for c in d.train_columns[1:] if c in split.column_names]):
        raise ValueError("score-rows reads rows holding page images; for rows that name pages by id "
                         "(data.pages_path), score them while mining: mine-negatives --corpus ... --teacher T")
    mining.check_out(cfg.score.out, {"--data": d.path, "--teacher": cfg.model.name_or_path}, "score-rows")
    info = distributed.init(cfg.launch.device, 0, cfg.launch.num_threads_per_process)
    # Every column of the rows is kept (document ids for masking, ...); the pages are decoded by the scoring.
    columns = split.column_names
    ds = load_train(dataclasses.replace(d, validate_images=False), extra_columns=columns)
    precision = precision_of(cfg.model.dtype)
    teacher, kind = _load_teacher(cfg.model, cfg.score.teacher_type, cfg, info.device, precision, flag="--teacher")
    scores = mining.score_rows(ds, d.query_column, [d.positive_column, *d.negative_columns], teacher,
                               wait_timeout_s=cfg.launch.startup_timeout_s)
    if info.is_main:
        marker = {"teacher": cfg.model.name_or_path, "teacher_type": kind,
                  **_kind_of(cfg.model.name_or_path, kind).teacher_record(cfg), "data": d.path, "split": d.train_split,
                  "columns": [d.positive_column, *d.negative_columns], "format": 1}
        if mining.TEACHER_SCORES in ds.column_names:  # rows scored before: this teacher's scores replace them
            ds = ds.remove_columns([mining.TEACHER_SCORES])
        mining.save_atomic(ds.add_column(mining.TEACHER_SCORES, scores.astype("float32").tolist()), cfg.score.out,
                           marker, command="score-rows")
        cut = f" (the first {d.max_train_samples}: data.max_train_samples)" if d.max_train_samples else ""
        print(f"{len(ds)} rows{cut} with {mining.TEACHER_SCORES} of {scores.shape[1]} pages each in "
              f"{cfg.score.out} (the training split only: evaluate from {d.path}): train with "
              f"data.path={cfg.score.out} data.eval_path={d.path} "
              f"loss.distillation.scores_column={mining.TEACHER_SCORES}", flush=True)
    distributed.barrier()
    return 0


def _corpus_inputs(cfg: MineCommand) -> tuple:
    from dist_vdr.data import judgements
    from dist_vdr.data.loading import load_pages, read_corpus_qrels

    m = cfg.mine
    corpus = load_pages(m.corpus)
    return corpus, judgements.read_queries(m.queries), read_corpus_qrels(m.qrels, corpus, m.corpus)


def _split_inputs(cfg: MineCommand):
    import dataclasses

    from dist_vdr.data.loading import load_train

    # The split's own page columns: the query, the positive and mine.page_columns (not the
    # recipe's negative columns); its pages are decoded by the encode, so no validation pass.
    data = dataclasses.replace(cfg.data, negative_columns=list(cfg.mine.page_columns), validate_images=False)
    return load_train(data, extra_columns=list(cfg.mining.document_id_columns.values()))


def _mine_corpus(cfg: MineCommand, info, model, corpus, queries, qrels, encode: dict) -> None:
    from pathlib import Path

    from dist_vdr.retrieval import mining

    m = cfg.mine
    rows, dropped = mining.mine_corpus(model, corpus, queries, qrels, cfg.mining,
                                       exclude_same_document=m.exclude_same_document, **encode)
    if info.is_main:
        fp = {"retriever": cfg.model.name_or_path, **_teacher_record(cfg), "corpus": str(Path(m.corpus).resolve()),
              "queries": m.queries,
              "qrels": m.qrels, "exclude_same_document": m.exclude_same_document,
              "mining": cfg.mining.__dict__, "rows": len(rows), "dropped": dropped}
        mining.save_atomic(rows, m.out, fp)
        print(f"{len(rows)} queries with {len(rows.column_names) - 4} negatives each in {m.out} ({dropped} "
              f"without enough candidates dropped); pages are named by id: train with "
              f"data.path={m.out} data.pages_path={m.corpus}", flush=True)


def _mine_split(cfg: MineCommand, info, model, ds, encode: dict) -> None:
    from dist_vdr.retrieval import mining

    d, out = cfg.data, cfg.mine.out
    result = mining.mine(model, ds, cfg.mining, query_column=d.query_column, positive_column=d.positive_column,
                         page_columns=list(cfg.mine.page_columns), **encode)
    if info.is_main:
        fp = {**mining.fingerprint(cfg.model.name_or_path, d.path, d.train_split, None, cfg.mining),
              **_teacher_record(cfg)}
        mining.write_mined(ds, result, out, query_column=d.query_column, positive_column=d.positive_column,
                           fingerprint=fp)
        print(f"{len(result.kept_rows)} rows with {result.negatives.shape[1]} negatives each in {out} "
              f"({result.num_dropped} rows without enough candidates dropped; {len(result.pages)} distinct "
              f"pages)", flush=True)


def add_parsers(sub) -> None:
    g = sub.add_parser("make-synthetic-pdfs", help="generate a folder of PDFs and scans with queries and qrels")
    g.add_argument("dir")
    g.add_argument("--num-documents", type=int, default=40)
    g.add_argument("--max-pages-per-document", type=int, default=8)
    g.add_argument("--num-scans", type=int, default=20)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--overwrite", action="store_true")
    g.set_defaults(fn=_make_pdfs)

    pages = sub.add_parser("pages", help="page corpora: `pages build` renders PDFs and images into a dataset")
    psub = pages.add_subparsers(dest="pages_command", required=True)
    b = psub.add_parser("build", help="render every page of every PDF (and take image files) into a dataset")
    add_options(b, BUILD)
    b.set_defaults(fn=_pages)

    mn = sub.add_parser("mine-negatives", help="mine hard negatives with an embedding model (sharded over ranks)")
    add_options(mn, MINE)
    mn.set_defaults(fn=_mine)

    sc = sub.add_parser("score-rows", help="a teacher's scores of training rows' own pages, for distillation "
                                           "(sharded over ranks)")
    add_options(sc, SCORE)
    sc.set_defaults(fn=_score_rows)
