"""`dist-vdr` data subcommands: page corpora from documents, and hard-negative mining.

  make-synthetic-pdfs DIR       a generated folder of PDFs and scans + queries/qrels (offline demo input)
  pages build --input --out     PDFs and images -> page corpus dataset (parallel, resumable)
  mine-negatives                hard negatives with an embedding model, sharded over ranks, either
                                for a training split's own pages (--data) or over a page corpus
                                for judged queries (--corpus --queries --qrels)
"""

from __future__ import annotations

import argparse


def _make_pdfs(args: argparse.Namespace) -> int:
    from .data.synthetic_pdfs import SyntheticPdfSpec, generate_pdf_folder

    spec = SyntheticPdfSpec(num_documents=args.num_documents, max_pages_per_document=args.max_pages_per_document,
                            num_scans=args.num_scans, seed=args.seed)
    out = generate_pdf_folder(args.dir, spec, overwrite=args.overwrite)
    print(f"documents in {out}/documents; queries and qrels in {out}")
    return 0


def _pages(args: argparse.Namespace) -> int:
    import sys

    from .data.ingest import BuildInterrupted, PagesBuildConfig, build_pages, format_summary

    cfg = PagesBuildConfig(input_dir=args.input, out_dir=args.out, dpi=args.dpi, max_pixels=args.max_pixels,
                           max_image_pixels=args.max_image_pixels, text=args.text, image_format=args.image_format,
                           files_per_shard=args.files_per_shard, pages_per_shard=args.pages_per_shard,
                           max_pages_per_document=args.max_pages_per_document,
                           follow_symlinks=args.follow_symlinks, num_workers=args.num_workers)
    try:
        summary = build_pages(cfg, overwrite=args.overwrite, show_progress=not args.quiet)
    except BuildInterrupted as exc:  # not an error: the build stopped where it was asked to, resumably
        print(exc, file=sys.stderr, flush=True)
        # Exit now: the rest of main (leaving a process group that a page build never joins)
        # imports torch, ~2 s that a user who pressed Ctrl-C should not wait for.
        raise SystemExit(exc.exit_code) from None
    print(format_summary(summary, args.out), flush=True)
    return 0


def _mine(args: argparse.Namespace) -> int:
    """Hard negatives (run it under accelerate launch for several ranks)."""
    from . import distributed, mining
    from .config import MiningConfig, ModelConfig
    from .model import build_model

    corpus_mode = args.corpus is not None
    if corpus_mode == (args.data is not None):
        raise ValueError("give either --data (a training split with page images) or --corpus with --queries and "
                         "--qrels (a page corpus and judged queries)")
    if corpus_mode and not (args.queries and args.qrels):
        raise ValueError("--corpus needs --queries and --qrels (e.g. train_queries.jsonl, train_qrels.trec)")
    from .sources import resolve_args

    resolve_args(args, model="model folder", data="dataset folder", corpus="page corpus folder")
    info = distributed.init(args.device, 0, args.threads)
    id_columns = dict(item.split("=", 1) for item in args.document_id_column)
    cfg = MiningConfig(num_negatives=args.num_negatives, num_random_negatives=args.num_random_negatives,
                       rank_start=args.rank_start, max_rank=args.max_rank, margin=args.margin,
                       max_uses_per_page=args.max_uses_per_page, document_id_columns=id_columns, seed=args.seed)
    encode = {"batch_size": args.batch_size, "num_workers": args.num_workers, "cache_dir": args.cache}
    if corpus_mode:
        from .data import judgements
        from .data.loading import load_pages, read_corpus_qrels

        corpus = load_pages(args.corpus)
        queries = judgements.read_queries(args.queries)
        qrels = read_corpus_qrels(args.qrels, corpus, args.corpus)
    else:
        from .config import DataConfig
        from .data.loading import load_train

        data = DataConfig(path=args.data, train_name=args.name, train_split=args.split,
                          query_column=args.query_column, positive_column=args.positive_column,
                          negative_columns=args.page_columns, validate_images=False)
        ds = load_train(data, extra_columns=list(id_columns.values()))
    model = build_model(ModelConfig(name_or_path=args.model, dtype=args.dtype), device=info.device,
                        precision="bf16" if args.dtype == "bfloat16" else "fp32")
    if corpus_mode:
        rows, dropped = mining.mine_corpus(model, corpus, queries, qrels, cfg,
                                           exclude_same_document=args.exclude_same_document, **encode)
        if info.is_main:
            from pathlib import Path

            fp = {"retriever": args.model, "corpus": str(Path(args.corpus).resolve()), "queries": args.queries,
                  "qrels": args.qrels, "exclude_same_document": args.exclude_same_document,
                  "mining": cfg.__dict__, "rows": len(rows), "dropped": dropped}
            mining.save_atomic(rows, args.out, fp)
            print(f"{len(rows)} queries with {len(rows.column_names) - 4} negatives each in {args.out} ({dropped} "
                  f"without enough candidates dropped); pages are named by id: train with "
                  f"data.path={args.out} data.pages_path={args.corpus}", flush=True)
    else:
        result = mining.mine(model, ds, cfg, query_column=args.query_column, positive_column=args.positive_column,
                             page_columns=args.page_columns, **encode)
        if info.is_main:
            fp = mining.fingerprint(args.model, args.data, args.split, None, cfg)
            mining.write_mined(ds, result, args.out, query_column=args.query_column,
                               positive_column=args.positive_column, fingerprint=fp)
            print(f"{len(result.kept_rows)} rows with {result.negatives.shape[1]} negatives each in {args.out} "
                  f"({result.num_dropped} rows without enough candidates dropped; {len(result.pages)} distinct "
                  f"pages)", flush=True)
    distributed.barrier()
    return 0


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
    b.add_argument("--input", required=True, help="folder of PDFs and page images (searched recursively)")
    b.add_argument("--out", required=True, help="output dataset folder (resumed when it holds an unfinished build)")
    b.add_argument("--dpi", type=float, default=144.0, help="PDF render resolution")
    b.add_argument("--max-pixels", type=int, default=4_000_000, help="scale rendered PDF pages down to at most this")
    b.add_argument("--max-image-pixels", type=int, default=89_478_485,
                   help="refuse image files larger than this as decompression bombs")
    b.add_argument("--text", action="store_true", help="also store the PDF text layer (column text)")
    b.add_argument("--image-format", default="png", choices=["png", "jpeg"], help="encoding of rendered PDF pages")
    b.add_argument("--files-per-shard", type=int, default=32, help="at most this many files (or parts) per shard")
    b.add_argument("--pages-per-shard", type=int, default=64,
                   help="at most this many pages per shard (bounds a worker's memory; long PDFs span several shards)")
    b.add_argument("--max-pages-per-document", type=int, default=10_000,
                   help="skip (and list in skipped.jsonl) the pages of a document past this one")
    b.add_argument("--follow-symlinks", action="store_true",
                   help="also follow symlinks that point outside --input (those not followed are listed)")
    b.add_argument("--num-workers", type=int, default=0, help="rendering processes (0: one per core)")
    b.add_argument("--overwrite", action="store_true",
                   help="delete the output folder first and rebuild (only a `pages build` output)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(fn=_pages)

    mn = sub.add_parser("mine-negatives", help="mine hard negatives with an embedding model (sharded over ranks)")
    mn.add_argument("--model", required=True, help="embedding model folder or hub id")
    mn.add_argument("--data", default=None, help="training split with query + positive page columns (images)")
    mn.add_argument("--corpus", default=None, help="page corpus (`pages build` output) to mine from, with "
                                                   "--queries/--qrels; writes rows naming pages by id")
    mn.add_argument("--queries", default=None, help="with --corpus: training queries (JSONL/CSV/TSV)")
    mn.add_argument("--qrels", default=None, help="with --corpus: their qrels (TREC/JSONL/CSV/TSV); the "
                                                  "highest-graded page is the positive, no relevant page a negative")
    mn.add_argument("--exclude-same-document", action="store_true",
                    help="with --corpus: never pick a page of the positive's document")
    mn.add_argument("--out", required=True, help="output dataset folder: query, positive, negative_0..n-1")
    mn.add_argument("--name", default=None, help="hub dataset configuration")
    mn.add_argument("--split", default="train")
    mn.add_argument("--query-column", default="query")
    mn.add_argument("--positive-column", default="image")
    mn.add_argument("--page-columns", nargs="*", default=[], help="more page columns whose pages join the corpus")
    mn.add_argument("--num-negatives", type=int, default=3)
    mn.add_argument("--num-random-negatives", type=int, default=0, help="also this many random pages per query")
    mn.add_argument("--max-uses-per-page", type=int, default=None, help="use a page as negative at most this often")
    mn.add_argument("--rank-start", type=int, default=0, help="skip this many best non-positive pages")
    mn.add_argument("--max-rank", type=int, default=30, help="pick only among the top max-rank pages")
    mn.add_argument("--margin", type=float, default=None, help="negatives must score < positive - margin")
    mn.add_argument("--document-id-column", action="append", default=[], metavar="PAGECOL=IDCOL",
                    help="with --data: never pick a page of the positive's document (repeat per page column)")
    mn.add_argument("--seed", type=int, default=0, help="seed of the random negatives")
    mn.add_argument("--batch-size", type=int, default=16)
    mn.add_argument("--num-workers", type=int, default=-1)
    mn.add_argument("--cache", default=None, help="per-shard embedding cache folder (resumable)")
    mn.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    mn.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    mn.add_argument("--threads", type=int, default=0)
    mn.set_defaults(fn=_mine)
