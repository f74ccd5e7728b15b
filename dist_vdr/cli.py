"""`dist-vdr` command line: thin wrappers over the library.

Subcommands:
  train                 train a model from a recipe (run it under `accelerate launch`, see launch/)
  make-tiny-model DIR   build the offline tiny Qwen3-VL embedding model (--reranker: the tiny reranker)
  make-synthetic-pages DIR   generate a VDR-shaped page dataset
  make-synthetic-pdfs DIR    generate a folder of PDFs and scans with queries and qrels
  pages build               render a folder of PDFs/images into a page corpus dataset (parallel, resumable)
  eval / mine-negatives      sharded retrieval evaluation / hard-negative mining (accelerate launch)
  bench                 training throughput vs stock sentence-transformers (GPU or CPU)
  bench-loss / bench-eval / bench-search / bench-corpus   benchmarks that print figures

User errors (bad config, missing data, bad rows) print one `error:` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import json
import os
import sys
import warnings


def _train(args: argparse.Namespace) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    if cfg.launch.handle_preemption:
        from . import preemption

        preemption.install()  # before torch, gloo or any library starts a thread (see preemption.install)
    _quiet_library_noise()
    from .training import headline, run_training

    results = run_training(cfg, resume=args.resume, no_resume=args.no_resume,
                           allow_config_change=args.allow_config_change)
    from . import distributed

    info = distributed.current()
    if info.is_main:
        if results.get("final_loss") is not None:
            print(f"last logged loss {results['final_loss']:.6g} at step {results.get('global_step')}", flush=True)
        line = headline(results, results.get("dims", []), cfg.evaluation.main_metric)
        if line:
            print(line, flush=True)
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from .config import load_config
    from .training import check_data

    paths = [a for a in args.items if "=" not in a]
    if len(paths) > 1:
        raise ValueError(f"data check takes one dataset, got {paths}")
    overrides = [*(f"data.path={p}" for p in paths), *(a for a in args.items if "=" in a)]
    check_data(load_config(args.config, overrides))
    return 0


def _make_tiny_model(args: argparse.Namespace) -> int:
    from .tiny import TinyModelSpec, build_tiny_model, build_tiny_reranker

    spec = TinyModelSpec(hidden_size=args.hidden_size, num_hidden_layers=args.num_layers, seed=args.seed)
    if args.init_from and not args.reranker:
        raise ValueError("--init-from applies to --reranker")
    if args.reranker:
        path = build_tiny_reranker(args.dir, spec, init_from=args.init_from, overwrite=args.overwrite)
    else:
        path = build_tiny_model(args.dir, spec, overwrite=args.overwrite)
    print(f"tiny {'reranker' if args.reranker else 'embedding model'} in {path}")
    return 0


def _make_pages(args: argparse.Namespace) -> int:
    from .data.synthetic import SyntheticPagesSpec, generate_pages

    spec = SyntheticPagesSpec(num_train=args.num_train, num_negatives=args.num_negatives,
                              num_eval_queries=args.num_eval_queries, num_eval_distractors=args.num_eval_distractors,
                              seed=args.seed)
    path = generate_pages(args.dir, spec, overwrite=args.overwrite)
    print(f"pages in {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    """Standalone sharded evaluation (run it under accelerate launch for several ranks)."""
    from . import distributed
    from .config import DataConfig, ModelConfig
    from .data.loading import load_eval
    from .evaluation.sharded import ShardedRetrievalEvaluator
    from .model import build_model, embedding_dim

    from .sources import resolve_args

    resolve_args(args, model="model folder", data="dataset or page corpus folder", reranker="reranker folder")
    info = distributed.init(args.device, 0, args.threads)
    data_cfg = DataConfig(path=args.data, eval_format=args.eval_format, eval_name=args.eval_name,
                          eval_queries_file=args.queries, eval_qrels_file=args.qrels,
                          eval_split=args.eval_split, max_eval_queries=args.max_queries,
                          eval_negative_columns=args.negative_columns.split(",") if args.negative_columns else [],
                          validate_images=False)
    data = load_eval(data_cfg)
    model = build_model(ModelConfig(name_or_path=args.model, dtype=args.dtype), device=info.device,
                        precision="bf16" if args.dtype == "bfloat16" else "fp32")
    if args.reranker:
        return _eval_rerank(args, info, data, model)
    dims = [int(d) for d in args.dims.split(",")] if args.dims else [embedding_dim(model)]
    evaluator = ShardedRetrievalEvaluator(data, dims, ks=[int(k) for k in args.ks.split(",")],
                                          batch_size=args.batch_size, num_workers=args.num_workers,
                                          backend=args.backend, cache_dir=args.cache)
    flat = evaluator(model, output_path=args.output if info.is_main else None)
    if info.is_main:
        for d in evaluator.dims:
            m = evaluator.last_metrics[d]
            print(f"dim {d}: NDCG@10 {m.get('ndcg@10', float('nan')):.4f}  MRR@10 {m.get('mrr@10', float('nan')):.4f}  "
                  f"Recall@10 {m.get('recall@10', float('nan')):.4f}", flush=True)
        print(f"outputs in {args.output}" if args.output else json.dumps(flat), flush=True)
    return 0


def _eval_rerank(args: argparse.Namespace, info, data, retriever) -> int:
    """--reranker: the retriever's top-k, the top --rerank-depth reranked (queries sharded over ranks)."""
    import gc

    from .config import ModelConfig, RerankerConfig
    from .reranker.evaluation import RerankEvaluator, retrieve
    from .reranker.model import FUSION_FILE, build_reranker, saved_fusion

    ks = [int(k) for k in args.ks.split(",")]
    candidates = retrieve(retriever, data, top_k=max(max(ks), args.rerank_depth), batch_size=args.batch_size,
                          num_workers=args.num_workers, backend=args.backend)
    del retriever
    gc.collect()
    reranker = build_reranker(ModelConfig(name_or_path=args.reranker, dtype=args.dtype), RerankerConfig(),
                              device=info.device, precision="bf16" if args.dtype == "bfloat16" else "fp32")
    weight = args.retrieval_score_weight
    if weight is None:  # a residual reranker ranks by its score + its training weight x retrieval score
        fusion = saved_fusion(args.reranker) or {}
        weight = fusion.get("retrieval_score_weight", 0.0)
        if weight and info.is_main:
            print(f"ranking by reranker score + {weight:g} x retrieval score (the reranker's {FUSION_FILE}; "
                  f"--retrieval-score-weight overrides)", flush=True)
            if fusion.get("retriever") not in (args.model, None):
                print(f"note: this reranker was trained on the scores of {fusion['retriever']}, not of {args.model}",
                      flush=True)
    if weight < 0:
        raise ValueError("--retrieval-score-weight must be >= 0")
    evaluator = RerankEvaluator(data, candidates, depth=args.rerank_depth, ks=ks, batch_size=args.batch_size,
                                retrieval_score_weight=weight)
    evaluator(reranker, output_path=args.output if info.is_main else None)
    if info.is_main:
        stages = [("retrieval", evaluator.retrieval_metrics), ("reranked", evaluator.last_metrics)]
        if evaluator.last_alone_metrics:
            stages.append(("reranker score alone", evaluator.last_alone_metrics))
        for stage, m in stages:
            print(f"{stage}: NDCG@10 {m.get('ndcg@10', float('nan')):.4f}  MRR@10 {m.get('mrr@10', float('nan')):.4f}  "
                  f"Recall@10 {m.get('recall@10', float('nan')):.4f}", flush=True)
    return 0


def _submit(args: argparse.Namespace) -> int:
    from .cluster import SlurmResources, submit

    extra = dict(item.split("=", 1) for item in args.sbatch) if args.sbatch else {}
    resources = SlurmResources(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                               cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, time_min=args.time,
                               partition=args.partition, account=args.account, qos=args.qos, constraint=args.constraint,
                               signal_delay_s=args.signal_delay_s, job_name=args.job_name, cluster=args.cluster,
                               extra=extra)
    job = submit(args.config, args.overrides, resources, launch_config=args.launch, log_dir=args.log_dir)
    print(f"submitted job {job.job_id} ({resources.nodes} node(s) x {resources.tasks_per_node} task(s), "
          f"cluster {resources.cluster})", flush=True)
    print(f"logs: {job.paths.folder} (one .out/.err per rank: {job.job_id}_<rank>_log.out)", flush=True)
    if args.wait:
        results = job.results()  # one entry per task; rank 0 carries the metrics
        print(f"job {job.job_id} finished: {results[0]}", flush=True)
    return 0


def _bench_loss(args: argparse.Namespace) -> int:
    from .bench import loss_comm

    dims = tuple(int(d) for d in args.dims.split(",")) if args.dims else loss_comm.TINY_DIMS
    results = loss_comm.run(args.model, world_size=args.world_size, global_batch=args.global_batch,
                            mini_batch_size=args.mini_batch_size, dims=dims, steps=args.steps)
    print(loss_comm.format_table(results, world_size=args.world_size, global_batch=args.global_batch,
                                 mini_batch_size=args.mini_batch_size, dims=dims))
    if args.json:
        print(json.dumps(results))
    return 0


def _bench_eval(args: argparse.Namespace) -> int:
    from .bench import eval_speed

    dims = [int(d) for d in args.dims.split(",")]
    results = eval_speed.run_eval_bench(args.model, args.data, dims, batch_size=args.batch_size,
                                        workers=args.num_workers, world_size=args.world_size)
    print(eval_speed.format_eval(results, args.world_size))
    return 0


def _bench_corpus(args: argparse.Namespace) -> int:
    from .bench import corpus

    results = corpus.run_corpus_bench(args.work_dir, model=args.model, num_documents=args.num_documents,
                                      num_scans=args.num_scans, render_documents=args.render_documents,
                                      dpi=args.dpi, world_size=args.world_size)
    print(corpus.format_corpus(results))
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import train_speed

    report = train_speed.run_train_bench(
        args.work_dir, model=args.model, config=args.config, steps=args.steps, warmup_steps=args.warmup_steps,
        global_batch_size=args.global_batch_size, stock=[s for s in args.stock.split(",") if s],
        ours=args.ours or None, pages=args.pages, device=args.device, timeout_s=args.timeout_s)
    print(train_speed.format_table(report))
    print(f"written: {args.work_dir}/bench.json, {args.work_dir}/bench.md", flush=True)
    return 0


def _bench_search(args: argparse.Namespace) -> int:
    from .bench import eval_speed

    results = eval_speed.run_search_bench(args.num_pages, args.num_queries, args.dim, backend=args.backend)
    print(eval_speed.format_search(results, args.num_pages, args.num_queries, args.dim))
    return 0


def _bench_startup(args: argparse.Namespace) -> int:
    from .bench import startup

    report = startup.run(args.work_dir, rows=[int(n) for n in args.rows.split(",") if n],
                         image_rows=args.image_rows, world_size=args.world_size, num_pages=args.num_pages,
                         launch_config=args.launch)
    print(startup.format_report(report), flush=True)
    if args.json:
        print(json.dumps({**report, "summary": startup.summarise(report)}, indent=2))
    return 0


def _bench_checkpoint(args: argparse.Namespace) -> int:
    from .bench import checkpoint_hash

    print(checkpoint_hash.format_result(checkpoint_hash.run(args.work_dir, args.size_gb)), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-vdr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a recipe (launch with accelerate for several processes)")
    t.add_argument("--config", required=True, help="recipe YAML, e.g. configs/tiny.yaml")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--resume", metavar="CHECKPOINT", help="resume from this checkpoint folder")
    g.add_argument("--no-resume", action="store_true", help="start fresh (refused if the output folder has checkpoints)")
    t.add_argument("--allow-config-change", action="store_true",
                   help="resume although training.max_steps/num_epochs differ from the checkpoint's recipe")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. training.max_steps=20")
    t.set_defaults(fn=_train)

    dc = sub.add_parser("data", help="data commands: `data check` validates and hashes a recipe's data ahead of "
                                     "training (the record makes training start without the pass)")
    dc_sub = dc.add_subparsers(dest="data_command", required=True)
    chk = dc_sub.add_parser("check", help="the training start's page validation and row hashing, done now")
    chk.add_argument("--config", default=None, help="the recipe whose data to check (its data/training settings)")
    chk.add_argument("items", nargs="*", metavar="DATA | key=value",
                     help="the dataset folder or hub id (sets data.path), and config overrides")
    chk.set_defaults(fn=_data_check)

    m = sub.add_parser("make-tiny-model", help="build the offline tiny Qwen3-VL embedding model (or reranker)")
    m.add_argument("dir")
    m.add_argument("--reranker", action="store_true",
                   help="build the tiny multimodal reranker instead (LM head + LogitScore('1', '0'))")
    m.add_argument("--init-from", default=None, metavar="EMBEDDING_MODEL",
                   help="--reranker: start from this tiny embedding model's backbone weights (e.g. runs/tiny/final)")
    m.add_argument("--hidden-size", type=int, default=64)
    m.add_argument("--num-layers", type=int, default=2, help="language-model layers (a reranker warm-started from a "
                   "shallower model gets identity-initialised extra layers)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(fn=_make_tiny_model)

    s = sub.add_parser("make-synthetic-pages", help="generate a VDR-shaped page dataset")
    s.add_argument("dir")
    s.add_argument("--num-train", type=int, default=2000)
    s.add_argument("--num-negatives", type=int, default=1)
    s.add_argument("--num-eval-queries", type=int, default=128)
    s.add_argument("--num-eval-distractors", type=int, default=0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_make_pages)
    j = sub.add_parser("submit", help="submit training to SLURM with submitit (preemption-safe requeue)")
    j.add_argument("--config", required=True)
    j.add_argument("--launch", default=None, help="accelerate config naming the engine (DDP when omitted)")
    j.add_argument("--nodes", type=int, default=1)
    j.add_argument("--gpus-per-node", type=int, default=0, help="one task per GPU; 0 for CPU jobs")
    j.add_argument("--tasks-per-node", type=int, default=None, help="CPU jobs: ranks per node (default 1)")
    j.add_argument("--cpus-per-task", type=int, default=None)
    j.add_argument("--mem-gb", type=float, default=None)
    j.add_argument("--time", type=int, default=60, help="time limit in minutes")
    j.add_argument("--partition")
    j.add_argument("--account")
    j.add_argument("--qos")
    j.add_argument("--constraint")
    j.add_argument("--signal-delay-s", type=int, default=90, help="USR2 this long before the time limit")
    j.add_argument("--job-name", default="dist-vdr")
    j.add_argument("--cluster", default="slurm", choices=["slurm", "local", "debug"])
    j.add_argument("--log-dir", default=None, help="default: <training.output_dir>/slurm-logs")
    j.add_argument("--sbatch", action="append", metavar="KEY=VALUE", help="extra #SBATCH option, repeatable")
    j.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    j.add_argument("overrides", nargs="*", metavar="key=value")
    j.set_defaults(fn=_submit)

    e = sub.add_parser("eval", help="sharded retrieval evaluation of a model on a page corpus")
    e.add_argument("--model", required=True, help="model folder or hub id")
    e.add_argument("--data", required=True, help="dataset folder or hub id with the eval splits, or a page corpus "
                                                 "(`pages build` output) with --queries and --qrels")
    e.add_argument("--queries", default=None, help="queries file (JSONL/CSV/TSV) instead of the eval_queries split")
    e.add_argument("--qrels", default=None, help="qrels file (TREC/JSONL/CSV/TSV) naming page ids of --data")
    e.add_argument("--dims", default="", help="comma-separated dims (default: the full dimension)")
    e.add_argument("--ks", default="1,3,5,10,100")
    e.add_argument("--output", default=None, help="folder for metrics JSON/CSV, TREC runs, qrels and the plot")
    e.add_argument("--reranker", default=None, help="also rerank the model's top pages with this CrossEncoder")
    e.add_argument("--rerank-depth", type=int, default=20, help="pages reranked per query (with --reranker)")
    e.add_argument("--retrieval-score-weight", type=float, default=None,
                   help="rank by reranker score + this x retrieval score (default: the weight a residual reranker "
                        "was trained with, from its folder; 0 for others)")
    e.add_argument("--cache", default=None, help="per-shard embedding cache folder (resumable)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--num-workers", type=int, default=-1, help="page-preprocessing workers (-1: auto)")
    e.add_argument("--backend", default="auto", choices=["auto", "faiss", "torch"])
    e.add_argument("--eval-format", default="ir", choices=["ir", "triplets"])
    e.add_argument("--eval-name", default=None)
    e.add_argument("--eval-split", default="eval")
    e.add_argument("--negative-columns", default="", help="triplets format: page columns added to the corpus")
    e.add_argument("--max-queries", type=int, default=None)
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: default)")
    e.set_defaults(fn=_eval)

    from .cli_data import add_parsers

    add_parsers(sub)  # pages build, make-synthetic-pdfs, mine-negatives

    b = sub.add_parser("bench-loss", help="collectives, bytes and s/step: stock ST gather vs the global-batch loss")
    b.add_argument("--model", default="artifacts/tiny-model")
    b.add_argument("--world-size", type=int, default=2)
    b.add_argument("--global-batch", type=int, default=64)
    b.add_argument("--mini-batch-size", type=int, default=1)
    b.add_argument("--dims", default="", help="comma-separated Matryoshka dims (default: 7 dims scaled to 64-d)")
    b.add_argument("--steps", type=int, default=3)
    b.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    b.set_defaults(fn=_bench_loss)
    be = sub.add_parser("bench-eval", help="7-dim sweep: stock per-dim evaluators vs the sharded evaluator, 1 and W ranks")
    be.add_argument("--model", default="artifacts/tiny-model")
    be.add_argument("--data", required=True, help="dataset folder with eval_queries/eval_corpus/eval_qrels")
    be.add_argument("--dims", default="64,48,32,16,8,4,2")
    be.add_argument("--batch-size", type=int, default=16)
    be.add_argument("--num-workers", type=int, default=-1)
    be.add_argument("--world-size", type=int, default=2)
    be.set_defaults(fn=_bench_eval)

    bc = sub.add_parser("bench-corpus", help="pages build and corpus mining: 1 process vs W, rows compared")
    bc.add_argument("--work-dir", required=True, help="scratch folder (generated PDFs, corpora, mined rows)")
    bc.add_argument("--model", default="artifacts/tiny-model")
    bc.add_argument("--num-documents", type=int, default=2300, help="generated PDFs (~4.5 pages each)")
    bc.add_argument("--num-scans", type=int, default=200)
    bc.add_argument("--render-documents", type=int, default=400, help="PDFs rendered at --dpi for the build figures")
    bc.add_argument("--dpi", type=float, default=144.0)
    bc.add_argument("--world-size", type=int, default=2)
    bc.add_argument("--json", action="store_true")
    bc.set_defaults(fn=_bench_corpus)

    bt = sub.add_parser("bench", help="training throughput: dist-vdr train vs stock sentence-transformers settings, "
                                      "side by side (s/step, triplets/s, tokens/s, MFU, peak memory)")
    bt.add_argument("--work-dir", required=True, help="scratch folder (model, generated pages, one run per setting)")
    bt.add_argument("--model", default="tiny", help="tiny, qwen3-vl-2b (random weights, built offline) or a model folder")
    bt.add_argument("--config", default=None, help="recipe for the dist-vdr settings (default: configs/tiny.yaml for "
                    "tiny, configs/qwen3-vl-embedding-2b-vdr.yaml for qwen3-vl-2b)")
    bt.add_argument("--steps", type=int, default=3, help="measured optimizer steps per setting")
    bt.add_argument("--warmup-steps", type=int, default=1)
    bt.add_argument("--global-batch-size", type=int, default=None, help="triplets per step (default: the recipe's)")
    bt.add_argument("--stock", default="mb1,mb8,mb16,tok6000",
                    help="stock settings: mbN = mini_batch_size N, tokN = mini_batch_num_tokens N ('' for none)")
    bt.add_argument("--ours", action="append", metavar="NAME[:key=value,...]",
                    help="a dist-vdr setting: the recipe with overrides (repeatable; default: the recipe as is)")
    bt.add_argument("--pages", default="mixed", choices=["mixed", "anchor"],
                    help="mixed: real page shapes at 150 dpi; anchor: 1416x1648 as the stock anchors")
    bt.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    bt.add_argument("--timeout-s", type=float, default=None, help="per-setting time limit")
    bt.set_defaults(fn=_bench)

    bu = sub.add_parser("bench-startup", help="time to the first step by phase: rows, ranks, first start vs resume")
    bu.add_argument("--work-dir", required=True, help="scratch folder (model, generated pages and rows, runs)")
    bu.add_argument("--rows", default="1000,100000", help="row counts of the rows naming pages by id")
    bu.add_argument("--image-rows", type=int, default=1000, help="rows holding their pages (0: none)")
    bu.add_argument("--num-pages", type=int, default=64, help="distinct generated pages")
    bu.add_argument("--world-size", type=int, default=2)
    bu.add_argument("--launch", default="launch/cpu.yaml", help="accelerate config for the multi-rank runs")
    bu.add_argument("--json", action="store_true")
    bu.set_defaults(fn=_bench_startup)

    bk = sub.add_parser("bench-checkpoint", help="checkpoint file hashing (the completion marker) next to writing")
    bk.add_argument("--work-dir", required=True, help="scratch folder on the file system the runs write to")
    bk.add_argument("--size-gb", type=float, default=4.26, help="bytes written and hashed (default: Qwen3-VL-2B bf16)")
    bk.set_defaults(fn=_bench_checkpoint)

    bs = sub.add_parser("bench-search", help="exact top-100 + metrics vs faiss IndexFlatIP, time and peak RSS")
    bs.add_argument("--num-pages", type=int, default=1_000_000)
    bs.add_argument("--num-queries", type=int, default=10_000)
    bs.add_argument("--dim", type=int, default=64)
    bs.add_argument("--backend", default="faiss", choices=["faiss", "torch"])
    bs.set_defaults(fn=_bench_search)
    return p


def _quiet_library_noise() -> None:
    # torch deprecates the autograd all_gather that sentence-transformers 6.2 calls once per loss
    # chunk: one warning per step per rank drowns the log without telling the user anything.
    warnings.filterwarnings("ignore", message=r".*all_gather is deprecated", category=FutureWarning)
    # The per-save "Writing model shards" bars of transformers (the Trainer's own progress bar stays).
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    # A rank that dies in native code (SIGABRT/SIGSEGV) still prints the Python stacks of all its
    # threads: in a multi-process log that is often the only clue to which step and call failed.
    faulthandler.enable()
    from . import lifecycle

    if lifecycle.launched_by_torch_elastic():
        lifecycle.die_with_launcher()  # no rank outlives its launcher (it would go on writing the run)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(_options_first(list(sys.argv[1:] if argv is None else argv)))
    # train installs its signal handling first, then quiets the libraries; the page commands never
    # load transformers (its import alone is ~0.8 GB of the builder's resident memory).
    if args.command not in ("train", "pages", "make-synthetic-pdfs"):
        _quiet_library_noise()
    from . import distributed

    try:
        code = args.fn(args)
    except ValueError as exc:
        # An error every rank raised at once (rank 0 decided) is reported once, by rank 0.
        if not isinstance(exc, distributed.AllRanksError) or distributed.current().is_main:
            # A training run may stop with a progress bar mid-line: the error starts a line of its own.
            print(f"{chr(10) if args.command == 'train' else ''}error: {exc}", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:
        from .storage import no_space_message

        message = no_space_message(os.getcwd(), exc) if exc.errno == errno.ENOSPC else None
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 2
    distributed.shutdown()  # every rank got here: leave the group together (see shutdown's note)
    return code


_VALUE_OPTIONS = ("--config", "--resume")


def _options_first(argv: list[str]) -> list[str]:
    """``train``/``data check``: options may follow the key=value overrides (launch/train.sh appends
    its own overrides after the user's arguments); argparse cannot take a positional list split by
    options, so the options go first."""
    command = argv[:2] if argv[:2] == ["data", "check"] else argv[:1]
    if command not in (["train"], ["data", "check"]):
        return argv
    rest, options, positionals = argv[len(command):], [], []
    i = 0
    while i < len(rest):
        token = rest[i]
        if token.startswith("-"):
            options.append(token)
            if token in _VALUE_OPTIONS and i + 1 < len(rest):
                options.append(rest[i + 1])
                i += 1
        else:
            positionals.append(token)
        i += 1
    return [*command, *options, *positionals]


def entry() -> None:
    """Console-script and ``python -m`` entry: a rank of a process group exits without native teardown."""
    code = main()
    from . import distributed, lifecycle

    if distributed.was_initialized():
        lifecycle.exit_now(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
