"""`dist-vdr bench*` subcommands: benchmarks that print figures (dist_vdr.bench).

Each takes its settings as a recipe does (dist_vdr.bench.settings, one section per command):
a YAML file (--config; --command-config for `bench`, whose --config is the recipe it measures),
the options below, key=value overrides (e.g. bench_loss.steps=5).
"""

from __future__ import annotations

import argparse
import json

from dist_vdr.bench.settings import (
    CheckpointBenchCommand,
    CorpusBenchCommand,
    EvalBenchCommand,
    LossBenchCommand,
    MaxsimBenchCommand,
    MultiVectorSearchBenchCommand,
    PoolingBenchCommand,
    SearchBenchCommand,
    StartupBenchCommand,
    TrainBenchCommand,
)
from dist_vdr.cli.options import Command, Opt, add_options, load_command

TRAIN = Command(TrainBenchCommand, (
    Opt("--work-dir", "bench.work_dir"),
    Opt("--model", "bench.model"),
    Opt("--config", "bench.recipe", metavar="RECIPE"),
    Opt("--steps", "bench.steps"),
    Opt("--warmup-steps", "bench.warmup_steps"),
    Opt("--global-batch-size", "bench.global_batch_size"),
    Opt("--stock", "bench.stock"),
    Opt("--ours", "bench.ours", metavar="NAME[:key=value,...]", append=True,
        help="A dist-vdr setting: the recipe with overrides (repeatable; none: the recipe as is)."),
    Opt("--pages", "bench.pages", choices=("mixed", "anchor")),
    Opt("--device", "bench.device", choices=("auto", "cuda", "cpu")),
    Opt("--timeout-s", "bench.timeout_s"),
), config_flag="--command-config")

LOSS = Command(LossBenchCommand, tuple(Opt(f"--{k.replace('_', '-')}", f"bench_loss.{k}") for k in (
    "model", "world_size", "global_batch", "mini_batch_size", "dims", "steps", "json")))

EVAL = Command(EvalBenchCommand, (
    Opt("--model", "bench_eval.model"),
    Opt("--data", "bench_eval.data"),
    Opt("--dims", "bench_eval.dims"),
    Opt("--batch-size", "evaluation.batch_size"),
    Opt("--num-workers", "evaluation.num_workers"),
    Opt("--world-size", "bench_eval.world_size"),
))

CORPUS = Command(CorpusBenchCommand, tuple(Opt(f"--{k.replace('_', '-')}", f"bench_corpus.{k}") for k in (
    "work_dir", "model", "num_documents", "num_scans", "render_documents", "dpi", "world_size", "json")))

STARTUP = Command(StartupBenchCommand, tuple(Opt(f"--{k.replace('_', '-')}", f"bench_startup.{k}") for k in (
    "work_dir", "rows", "image_rows", "num_pages", "world_size", "launch", "json")))

CHECKPOINT = Command(CheckpointBenchCommand, (Opt("--work-dir", "bench_checkpoint.work_dir"),
                                              Opt("--size-gb", "bench_checkpoint.size_gb")))

MAXSIM = Command(MaxsimBenchCommand, tuple(Opt(f"--{k.replace('_', '-')}", f"bench_maxsim.{k}") for k in (
    "world_size", "batch", "query_tokens", "page_columns", "page_tokens", "dim", "chunk_elements",
    "score_mini_batch_size", "json")))

MV_SEARCH = Command(MultiVectorSearchBenchCommand, tuple(
    Opt(f"--{k.replace('_', '-')}", f"bench_mv_search.{k}") for k in (
        "work_dir", "pages", "page_tokens", "queries", "query_tokens", "dim", "world_size", "candidates",
        "sentence_transformers", "fast_plaid_python", "seed", "json")))

POOLING = Command(PoolingBenchCommand, (
    Opt("--model", "bench_pooling.model"), Opt("--data", "bench_pooling.data"),
    Opt("--pool-factors", "bench_pooling.pool_factors"),
    Opt("--divide-by-query-length", "bench_pooling.divide_by_query_length"),
    Opt("--batch-size", "bench_pooling.batch_size"), Opt("--max-queries", "bench_pooling.max_queries")))

SEARCH = Command(SearchBenchCommand, (
    Opt("--num-pages", "bench_search.num_pages"),
    Opt("--num-queries", "bench_search.num_queries"),
    Opt("--dim", "bench_search.dim"),
    Opt("--backend", "bench_search.backend", choices=("faiss", "torch")),
))


def _in_work_dir(command: str, work_dir: str, inputs: dict, run):
    """``run(folder)`` in the output guard's scratch folder beside ``--work-dir``, renamed to it at the end:
    a work folder apart from the inputs, and no half-run bench left in its place."""
    from dist_vdr.outputs import Output

    with Output(command, "--work-dir", work_dir, inputs).check().writing({"holds_outputs": True}) as scratch:
        return run(str(scratch))


def _bench(args: argparse.Namespace) -> int:
    from dist_vdr.bench import train_speed

    b = load_command(args, TRAIN).bench
    report = _in_work_dir("bench train", b.work_dir, {"--model": b.model, "--config": b.recipe}, lambda work: (
        train_speed.run_train_bench(
            work, model=b.model, config=b.recipe, steps=b.steps, warmup_steps=b.warmup_steps,
            global_batch_size=b.global_batch_size, stock=list(b.stock), ours=list(b.ours) or None, pages=b.pages,
            device=b.device, timeout_s=b.timeout_s)))
    print(train_speed.format_table(report))
    print(f"written: {b.work_dir}/bench.json, {b.work_dir}/bench.md", flush=True)
    return 0


def _bench_loss(args: argparse.Namespace) -> int:
    from dist_vdr.bench import loss_comm

    b = load_command(args, LOSS).bench_loss
    dims = tuple(b.dims) or loss_comm.TINY_DIMS
    results = loss_comm.run(b.model, world_size=b.world_size, global_batch=b.global_batch,
                            mini_batch_size=b.mini_batch_size, dims=dims, steps=b.steps)
    print(loss_comm.format_table(results, world_size=b.world_size, global_batch=b.global_batch,
                                 mini_batch_size=b.mini_batch_size, dims=dims))
    if b.json:
        print(json.dumps(results))
    return 0


def _bench_eval(args: argparse.Namespace) -> int:
    from dist_vdr.bench import eval_speed

    cfg = load_command(args, EVAL)
    b, e = cfg.bench_eval, cfg.evaluation
    results = eval_speed.run_eval_bench(b.model, b.data, list(b.dims), batch_size=e.batch_size,
                                        workers=e.num_workers, world_size=b.world_size)
    print(eval_speed.format_eval(results, b.world_size))
    return 0


def _bench_corpus(args: argparse.Namespace) -> int:
    from dist_vdr.bench import corpus

    b = load_command(args, CORPUS).bench_corpus
    results = _in_work_dir("bench corpus", b.work_dir, {"--model": b.model}, lambda work: corpus.run_corpus_bench(
        work, model=b.model, num_documents=b.num_documents, num_scans=b.num_scans,
        render_documents=b.render_documents, dpi=b.dpi, world_size=b.world_size))
    print(corpus.format_corpus(results))
    if b.json:
        print(json.dumps(results, indent=2))
    return 0


def _bench_startup(args: argparse.Namespace) -> int:
    from dist_vdr.bench import startup

    b = load_command(args, STARTUP).bench_startup
    report = _in_work_dir("bench startup", b.work_dir, {}, lambda work: startup.run(
        work, rows=list(b.rows), image_rows=b.image_rows, world_size=b.world_size, num_pages=b.num_pages,
        launch_config=b.launch))
    print(startup.format_report(report), flush=True)
    if b.json:
        print(json.dumps({**report, "summary": startup.summarise(report)}, indent=2))
    return 0


def _bench_checkpoint(args: argparse.Namespace) -> int:
    from dist_vdr.bench import checkpoint_hash

    b = load_command(args, CHECKPOINT).bench_checkpoint
    result = _in_work_dir("bench checkpoint", b.work_dir, {}, lambda work: checkpoint_hash.run(work, b.size_gb))
    print(checkpoint_hash.format_result(result), flush=True)
    return 0


def _bench_search(args: argparse.Namespace) -> int:
    from dist_vdr.bench import eval_speed

    b = load_command(args, SEARCH).bench_search
    results = eval_speed.run_search_bench(b.num_pages, b.num_queries, b.dim, backend=b.backend)
    print(eval_speed.format_search(results, b.num_pages, b.num_queries, b.dim))
    return 0


def _bench_maxsim(args: argparse.Namespace) -> int:
    from dist_vdr.bench import maxsim_memory

    b = load_command(args, MAXSIM).bench_maxsim
    result = maxsim_memory.run(world=b.world_size, batch=b.batch, query_tokens=b.query_tokens,
                               page_columns=b.page_columns, page_tokens=b.page_tokens, dim=b.dim,
                               chunk_elements=b.chunk_elements, score_mini_batch_size=b.score_mini_batch_size)
    print(maxsim_memory.format_report(result))
    if b.json:
        print(json.dumps(result))
    return 0


def _bench_mv_search(args: argparse.Namespace) -> int:
    from dist_vdr.bench import multi_vector_search

    b = load_command(args, MV_SEARCH).bench_mv_search
    inputs = {"--fast-plaid-python": b.fast_plaid_python} if b.fast_plaid_python else {}
    results = _in_work_dir("bench eval-multi-vector", b.work_dir, inputs, lambda work: multi_vector_search.run(
        work, pages=b.pages, page_tokens=b.page_tokens, queries=b.queries, query_tokens=b.query_tokens, dim=b.dim,
        world_size=b.world_size, candidates=b.candidates, sentence_transformers=b.sentence_transformers,
        fast_plaid_python=b.fast_plaid_python, seed=b.seed, log=lambda line: print(line, flush=True),
        in_process=b.in_process))
    print(multi_vector_search.format_report(results), flush=True)
    if b.json:
        print(json.dumps(results))
    return 0


def _bench_pooling(args: argparse.Namespace) -> int:
    from dist_vdr.bench import token_pooling

    b = load_command(args, POOLING).bench_pooling
    rows = token_pooling.run(b.model, b.data, b.pool_factors, divide_by_query_length=b.divide_by_query_length,
                             batch_size=b.batch_size, max_queries=b.max_queries)
    print(token_pooling.format_table(rows), flush=True)
    return 0


COMMANDS = {
    "train": (TRAIN, _bench, "training throughput: dist-vdr train vs stock sentence-transformers settings, side by "
                             "side (s/step, triplets/s, tokens/s, MFU, peak memory)"),
    "loss": (LOSS, _bench_loss, "collectives, bytes and s/step: stock ST gather vs the global-batch loss"),
    "eval": (EVAL, _bench_eval, "7-dim sweep: stock per-dim evaluators vs the sharded evaluator, 1 and W ranks"),
    "maxsim": (MAXSIM, _bench_maxsim, "peak memory of the multi-vector scoring step: chunked MaxSim vs the "
                                      "unchunked einsum and sentence-transformers' scoring"),
    "eval-multi-vector": (MV_SEARCH, _bench_mv_search, "late-interaction search on the same token embeddings: "
                                                       "exact sharded MaxSim (1 and W ranks), two-stage, "
                                                       "sentence-transformers' evaluator, fast-plaid"),
    "pooling": (POOLING, _bench_pooling, "index-time token pooling of a multi-vector model's pages: NDCG@10 and "
                                         "bytes per page at each pool factor beside none"),
    "search": (SEARCH, _bench_search, "exact top-100 + metrics vs faiss IndexFlatIP, time and peak RSS"),
    "corpus": (CORPUS, _bench_corpus, "pages build and corpus mining: 1 process vs W, rows compared"),
    "startup": (STARTUP, _bench_startup, "time to the first step by phase: rows, ranks, first start vs resume"),
    "checkpoint": (CHECKPOINT, _bench_checkpoint, "checkpoint file hashing (the completion marker) next to writing"),
}
"""`dist-vdr bench NAME` -> (its settings and options, its function, its help)."""


def add_parsers(sub) -> None:
    bench = sub.add_parser("bench", help=f"figures side by side with a baseline: bench {'|'.join(COMMANDS)}",
                           description="Benchmarks that print figures side by side with a baseline in the same run "
                                       "(docs/benchmarks.md). The earlier spellings `bench OPTIONS` (= bench train) "
                                       "and `bench-loss`, `bench-eval`, ... still work.")
    group = bench.add_subparsers(dest="bench_command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (command, fn, help_text) in COMMANDS.items():
        parser = group.add_parser(name, help=help_text)
        add_options(parser, command)
        parser.set_defaults(fn=fn)


def new_spelling(argv: list[str]) -> list[str]:
    """The earlier spellings as the grouped ones: ``bench-loss ...`` -> ``bench loss ...``, and ``bench`` followed
    by options (the training bench, before the group) -> ``bench train ...``."""
    if argv and argv[0].startswith("bench-") and argv[0][len("bench-"):] in COMMANDS:
        return ["bench", argv[0][len("bench-"):], *argv[1:]]
    if argv and argv[0] == "bench" and len(argv) > 1 and argv[1] not in COMMANDS and argv[1] not in ("-h", "--help"):
        return ["bench", "train", *argv[1:]]
    return argv
