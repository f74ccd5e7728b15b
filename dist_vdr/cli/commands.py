"""`dist-vdr` command line: thin wrappers over the library.

Subcommands:
  train                 train a model from a recipe (run it under `accelerate launch`, see launch/)
  data check            validate and hash a recipe's training data ahead of training
  make-tiny-model DIR   build the offline tiny Qwen3-VL embedding model (--reranker: the tiny reranker;
                        --multi-vector: the tiny multi-vector model)
  make-synthetic-pages DIR   generate a VDR-shaped page dataset
  merge-adapter ADAPTER OUT  merge a LoRA run's adapter into its base model (a plain model folder)
  make-synthetic-pdfs DIR    generate a folder of PDFs and scans with queries and qrels
  pages build               render a folder of PDFs/images into a page corpus dataset (parallel, resumable)
  eval / mine-negatives      sharded retrieval evaluation / hard-negative mining (accelerate launch)
  score-rows                a teacher's scores of training rows' own pages, for distillation (sharded)
  submit                training as a SLURM job (submitit, preemption-safe requeue)
  bench train|loss|eval|search|corpus|startup|checkpoint   figures side by side with a baseline
                        (bench train: training throughput vs stock sentence-transformers, GPU or CPU;
                        the earlier spellings `bench OPTIONS` and `bench-loss`, `bench-eval`, ... still work)

eval, mine-negatives, score-rows, pages build, submit and bench take their settings like a recipe: a YAML file
(--config; --command-config for submit and bench train, whose --config is the recipe they train), their
options, and key=value overrides, in that order (dist_vdr.cli.settings holds the settings and their
defaults; each option's help names its key). eval and mine-negatives read the model/data/evaluation
sections of a training recipe: `dist-vdr eval --config configs/tiny.yaml model.name_or_path=runs/tiny/final`.

User errors (bad config, missing data, bad rows) print one `error:` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import os
import signal
import sys
import warnings

from dist_vdr.cli.options import Command, Opt, add_options, load_command
from dist_vdr.cli.settings import EvalCommand, SubmitCommand
from dist_vdr.config import DEVICES, DTYPES


def _train(args: argparse.Namespace) -> int:
    from dist_vdr.config import load_config
    from dist_vdr.run import preemption

    cfg = load_config(args.config, args.overrides)  # its imports start threads: the stop signals are blocked
    if cfg.launch.handle_preemption:
        preemption.install()  # the blocked signals go to its waiting thread (see preemption.install)
    else:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, preemption.stop_signums())
    _quiet_library_noise()
    from dist_vdr.run.training import headline, run_training

    result = run_training(cfg, resume=args.resume, no_resume=args.no_resume,
                          allow_config_change=args.allow_config_change)
    from dist_vdr import distributed

    if distributed.current().is_main:
        if result.final_loss is not None:
            print(f"last logged loss {result.final_loss:.6g} at step {result.global_step}", flush=True)
        if result.weights_of_step is not None:
            print(f"final/ holds the weights of step {result.weights_of_step}, the best evaluation "
                  f"(training.final=best); the evaluation after training is of those weights", flush=True)
        line = headline(result, cfg.evaluation.main_metric) if result.finished else None
        if line:
            print(line, flush=True)
        _write_run_report(cfg.training.output_dir, cfg.evaluation.main_metric)
    return 0


def _write_run_report(out: str, metric: str) -> None:
    """The run report at the end of `train` (a failure to draw it is said, the run is not failed for it)."""

    from dist_vdr.run.folder import RunDir
    from dist_vdr.run.report import write_report

    try:
        png, md = write_report(out, metric)
    except Exception as exc:  # noqa: BLE001 -- a report is no reason to fail a trained run
        print(f"the run report was not written ({type(exc).__name__}: {exc}); try `dist-vdr report {out}`",
              flush=True)
        return
    card = RunDir(out).card
    print(f"report: {md} ({png.name}){f'; model card: {card}' if card.is_file() else ''}", flush=True)


def _average(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dist_vdr.checkpoints.averaging import average
    from dist_vdr.outputs import is_local

    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    except ValueError:
        raise ValueError(f"--weights {args.weights!r}: give one number per checkpoint, comma-separated (e.g. 3,1)") \
            from None
    if args.eval_data and is_local(args.eval_data) and not Path(args.eval_data).expanduser().exists():
        raise ValueError(f"--eval-data {args.eval_data} does not exist: check the path (nothing was averaged)")
    evaluate = (lambda model: _evaluate_average(model, args)) if args.eval_data else None
    out = average(args.checkpoints, args.out, weights, evaluate=evaluate)
    print(f"averaged {len(args.checkpoints)} checkpoints into {out}" +
          (f"; evaluation in {out / 'eval'}" if args.eval_data else ""), flush=True)
    return 0


def _evaluate_average(model, args: argparse.Namespace) -> None:
    """`eval` of the averaged model while it is still in its scratch folder (a process of its own: the eval
    command's launch and device handling); its outputs become OUT/eval. A failed evaluation leaves no OUT."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    where = Path(tempfile.mkdtemp(prefix=f".{model.name}.eval-", dir=model.parent))
    try:
        cmd = [sys.executable, "-m", "dist_vdr.cli", "eval", "--model", str(model), "--data", args.eval_data,
               "--output", str(where / "eval"), *(["--device", args.device] if args.device else [])]
        code = subprocess.run(cmd).returncode
        if code != 0:
            raise ValueError(f"the evaluation of the averaged model failed (exit {code}, its error above): nothing "
                             f"was written to {args.out}; fix --eval-data and rerun")
        os.replace(where / "eval", model / "eval")
    finally:
        shutil.rmtree(where, ignore_errors=True)


def _consolidate(args: argparse.Namespace) -> int:
    from dist_vdr.checkpoints.consolidate import consolidate

    print(f"consolidated {args.checkpoint} into {consolidate(args.checkpoint, args.out)}", flush=True)
    return 0


def _report(args: argparse.Namespace) -> int:
    from dist_vdr.run.report import write_report

    for run in args.run_dir:
        png, md = write_report(run, args.metric)
        print(f"report: {md} ({png.name})")
    if len(args.run_dir) > 1:
        from dist_vdr.run.side_by_side import table

        print(table(args.run_dir, args.metric))
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from dist_vdr.config import load_config
    from dist_vdr.run.training import check_data

    paths = [a for a in args.items if "=" not in a]
    if len(paths) > 1:
        raise ValueError(f"data check takes one dataset, got {paths}")
    overrides = [*(f"data.path={p}" for p in paths), *(a for a in args.items if "=" in a)]
    check_data(load_config(args.config, overrides, check_paths="data"))  # it loads no model
    return 0


def _make_tiny_model(args: argparse.Namespace) -> int:
    from dist_vdr.kinds.tiny import TinyModelSpec, build_tiny_model, build_tiny_multi_vector, build_tiny_reranker

    if args.reranker and args.multi_vector:
        raise ValueError("--reranker and --multi-vector: give one of them")
    if args.init_from and not args.reranker:
        raise ValueError("--init-from applies to --reranker")
    if args.token_dim is not None and not args.multi_vector:
        raise ValueError("--token-dim applies to --multi-vector")
    dims = {} if args.token_dim is None else {"token_dim": args.token_dim}
    spec = TinyModelSpec(hidden_size=args.hidden_size, num_hidden_layers=args.num_layers, seed=args.seed, **dims)
    if args.reranker:
        path, what = build_tiny_reranker(args.dir, spec, init_from=args.init_from, overwrite=args.overwrite), "reranker"
    elif args.multi_vector:
        path, what = build_tiny_multi_vector(args.dir, spec, overwrite=args.overwrite), "multi-vector model"
    else:
        path, what = build_tiny_model(args.dir, spec, overwrite=args.overwrite), "embedding model"
    print(f"tiny {what} in {path}")
    return 0


def _merge_adapter(args: argparse.Namespace) -> int:
    from dist_vdr import kinds
    from dist_vdr.models.build import merge_adapter_folder

    task = kinds.get(kinds.of_folder(args.adapter, "ADAPTER_DIR"))
    out = merge_adapter_folder(args.adapter, args.out, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                               overwrite=args.overwrite,
                               load=lambda cfg: task.load_model(cfg, None, device="cpu", precision="fp32"))
    print(f"merged model in {out}")
    return 0


def _make_pages(args: argparse.Namespace) -> int:
    from dist_vdr.data.synthetic import SyntheticPagesSpec, generate_pages

    spec = SyntheticPagesSpec(num_train=args.num_train, num_negatives=args.num_negatives,
                              num_eval_queries=args.num_eval_queries, num_eval_distractors=args.num_eval_distractors,
                              seed=args.seed, style=args.style)
    path = generate_pages(args.dir, spec, overwrite=args.overwrite)
    print(f"pages in {path}")
    return 0



EVAL = Command(EvalCommand, (
    Opt("--model", "model.name_or_path", help="Retriever folder or hub id (embedding or multi-vector model)."),
    Opt("--data", "data.path", help="Dataset folder or hub id with the eval splits, or a page corpus "
                                    "(`pages build` output) with --queries and --qrels."),
    Opt("--queries", "data.eval_queries_file"),
    Opt("--qrels", "data.eval_qrels_file"),
    Opt("--dims", "evaluation.dims", help="Embedding dims to evaluate, comma-separated (none or '': the full "
                                          "dimension)."),
    Opt("--ks", "evaluation.ks", help="Metric cutoffs, comma-separated (evaluation.main_metric's k among them)."),
    Opt("--output", "eval.output"),
    Opt("--reranker", "eval.reranker"),
    Opt("--rerank-depth", "reranker.rerank_depth"),
    Opt("--retrieval-score-weight", "eval.retrieval_score_weight"),
    Opt("--cache", "eval.cache"),
    Opt("--batch-size", "evaluation.batch_size"),
    Opt("--num-workers", "evaluation.num_workers"),
    Opt("--backend", "evaluation.search_backend", choices=("auto", "faiss", "torch")),
    Opt("--eval-format", "data.eval_format", choices=("ir", "triplets", "beir")),
    Opt("--eval-name", "data.eval_name"),
    Opt("--eval-split", "data.eval_split", help="Split of the eval rows (eval_format=triplets)."),
    Opt("--negative-columns", "data.eval_negative_columns"),
    Opt("--max-queries", "data.max_eval_queries"),
    Opt("--dtype", "model.dtype", choices=DTYPES),
    Opt("--device", "launch.device", choices=DEVICES),
    Opt("--threads", "launch.num_threads_per_process"),
))


def _eval(args: argparse.Namespace) -> int:
    """Standalone sharded evaluation (run it under accelerate launch for several ranks)."""
    from dist_vdr import distributed, kinds
    from dist_vdr.data.loading import load_eval
    from dist_vdr.models.build import precision_of
    from dist_vdr.retrieval.metrics import headline
    from dist_vdr.run.step_stats import own_peak_rss_gib

    cfg = load_command(args, EVAL)
    output = eval_output(cfg)
    info = distributed.init(cfg.launch.device, 0, cfg.launch.num_threads_per_process)
    data = load_eval(dataclasses.replace(cfg.data, validate_images=False))  # as ever: the encode reads every page
    # The model's kind (recorded in its folder) says how it loads, scores and is evaluated (dist_vdr.kinds).
    task = kinds.get(kinds.of_folder(cfg.model.name_or_path))
    task.scoring(cfg)  # --model retrieves: a kind that scores no pages alone (a reranker) says so before loading
    model = task.load_model(cfg.model, cfg, device=info.device, precision=precision_of(cfg.model.dtype))
    if cfg.eval.reranker:
        from dist_vdr.retrieval.scoring import is_cosine

        if not is_cosine(task.scoring(cfg)):
            raise ValueError(f"--reranker reranks the candidates of a single-vector retriever; --model "
                             f"{cfg.model.name_or_path} is a model of task={task.name}: give a single-vector --model")
        reranker = kinds.get(kinds.of_folder(cfg.eval.reranker, flag="--reranker"))
        return reranker.rerank_command(cfg, info, data, model, output, write_eval_outputs)
    evaluator = task.command_evaluator(cfg, data, model)
    flat = evaluator(model)
    peaks = distributed.all_gather_objects(own_peak_rss_gib())
    if info.is_main:
        write_eval_outputs(output, evaluator)
        for d in evaluator.dims:
            print(f"dim {d}: {headline(evaluator.last_metrics[d])}", flush=True)
        print(f"peak resident memory per rank: {' / '.join(f'{p:.2f}' for p in peaks)} GiB", flush=True)
        print(f"outputs in {cfg.eval.output}" if cfg.eval.output else json.dumps(flat), flush=True)
    return 0


def eval_output(cfg: EvalCommand):
    """The guarded --output of eval (None: the metrics are printed), checked against every input before any
    work; the keyed cache is checked apart from the inputs too."""
    from dist_vdr.outputs import Output

    d = cfg.data
    inputs = {"--data": d.path, "data.eval_path": d.eval_path, "data.pages_path": d.pages_path,
              "--queries": d.eval_queries_file, "--qrels": d.eval_qrels_file, "--model": cfg.model.name_or_path,
              "--reranker": cfg.eval.reranker}
    if cfg.eval.cache:
        Output("eval", "--cache", cfg.eval.cache, inputs, replace_any=True).check(register=False)
    if not cfg.eval.output:
        return None
    output = Output("eval", "--output", cfg.eval.output, inputs).check()
    output.check_apart("--cache", cfg.eval.cache)
    return output


def write_eval_outputs(output, evaluator) -> None:
    if output is not None:
        with output.writing() as scratch:
            evaluator.write_outputs(str(scratch))


SUBMIT = Command(SubmitCommand, (
    Opt("--config", "submit.recipe", metavar="RECIPE"),
    Opt("--launch", "submit.launch"),
    Opt("--nodes", "slurm.nodes"),
    Opt("--gpus-per-node", "slurm.gpus_per_node"),
    Opt("--tasks-per-node", "slurm.tasks_per_node"),
    Opt("--cpus-per-task", "slurm.cpus_per_task"),
    Opt("--mem-gb", "slurm.mem_gb"),
    Opt("--time", "slurm.time_min", metavar="MINUTES"),
    Opt("--partition", "slurm.partition"),
    Opt("--account", "slurm.account"),
    Opt("--qos", "slurm.qos"),
    Opt("--constraint", "slurm.constraint"),
    Opt("--signal-delay-s", "slurm.signal_delay_s"),
    Opt("--job-name", "slurm.job_name"),
    Opt("--cluster", "slurm.cluster", choices=("slurm", "local", "debug")),
    Opt("--log-dir", "submit.log_dir"),
    Opt("--sbatch", "slurm.extra", metavar="KEY=VALUE", append=True),
    Opt("--wait", "submit.wait"),
), config_flag="--command-config")


def _submit_settings(args: argparse.Namespace) -> tuple[SubmitCommand, list[str]]:
    """The command's settings and the recipe's overrides: a key=value of the command's own sections
    (slurm.*, submit.*) sets the command, any other is the recipe's (training.max_steps=...)."""
    own_sections = {f.name for f in dataclasses.fields(SubmitCommand)}
    own = [o for o in args.overrides if o.split(".", 1)[0] in own_sections]
    return load_command(args, SUBMIT, overrides=own), [o for o in args.overrides if o not in own]


def _submit(args: argparse.Namespace) -> int:
    from dist_vdr.cli.cluster import submit

    cfg, recipe_overrides = _submit_settings(args)
    resources, s = cfg.slurm, cfg.submit
    job = submit(s.recipe, recipe_overrides, resources, launch_config=s.launch, log_dir=s.log_dir)
    print(f"submitted job {job.job_id} ({resources.nodes} node(s) x {resources.tasks_per_node} task(s), "
          f"cluster {resources.cluster})", flush=True)
    print(f"logs: {job.paths.folder} (one .out/.err per rank: {job.job_id}_<rank>_log.out)", flush=True)
    if s.wait:
        result = job.results()[0]  # one entry per task; rank 0 carries the RunResult
        print(f"job {job.job_id} finished: {dataclasses.asdict(result) if result else result}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-vdr", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_makers(sub)
    j = sub.add_parser("submit", help="submit training to SLURM with submitit (preemption-safe requeue)")
    add_options(j, SUBMIT)
    j.set_defaults(fn=_submit)
    e = sub.add_parser("eval", help="sharded retrieval evaluation of a model on a page corpus")
    add_options(e, EVAL)
    e.set_defaults(fn=_eval)
    r = sub.add_parser("report", help="report.png and report.md of a training run (finished, in progress or killed)")
    r.add_argument("run_dir", nargs="+", help="the run's training.output_dir; several: also a table of them side by "
                                              "side (the metric and the bytes a page costs at every dimension)")
    r.add_argument("--metric", default="ndcg@10", help="the evaluation metric plotted and tabulated (ndcg@10)")
    r.set_defaults(fn=_report)
    a = sub.add_parser("average", help="average the weights of several checkpoints (uniform or weighted) into a "
                                       "model folder, and evaluate it if asked")
    a.add_argument("checkpoints", nargs="+", help="checkpoint or final/ folders of the same model")
    a.add_argument("--out", required=True, help="the new model folder")
    a.add_argument("--weights", default=None, help="comma-separated, one per checkpoint (normalised; default: equal)")
    a.add_argument("--eval-data", default=None, help="evaluate the result on this data (as `dist-vdr eval --data`)")
    a.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"), help="device of the evaluation")
    a.set_defaults(fn=_average)
    c = sub.add_parser("consolidate",
                       help="an FSDP2 checkpoint (model shards) as a model folder that loads like final/")
    c.add_argument("checkpoint", help="a checkpoint-N folder of an FSDP2 run (run from the training's folder: its "
                                      "recipe names the base model)")
    c.add_argument("out", help="the new model folder")
    c.set_defaults(fn=_consolidate)

    from dist_vdr.cli import bench as cli_bench
    from dist_vdr.cli import data as cli_data

    cli_data.add_parsers(sub)  # pages build, make-synthetic-pdfs, mine-negatives
    cli_bench.add_parsers(sub)  # bench train|loss|eval|search|corpus|startup|checkpoint
    return p


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train from a recipe (launch with accelerate for several processes)")
    t.add_argument("--config", required=True, help="recipe YAML, e.g. configs/tiny.yaml")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--resume", metavar="CHECKPOINT", help="resume from this checkpoint folder")
    g.add_argument("--no-resume", action="store_true",
                   help="start fresh (refused if the output folder has checkpoints)")
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


def _add_makers(sub) -> None:
    m = sub.add_parser("make-tiny-model", help="build the offline tiny Qwen3-VL embedding model (or reranker, or "
                                               "multi-vector model)")
    m.add_argument("dir")
    m.add_argument("--reranker", action="store_true",
                   help="build the tiny multimodal reranker instead (LM head + LogitScore('1', '0'))")
    m.add_argument("--multi-vector", action="store_true",
                   help="build the tiny multi-vector (late-interaction) model instead: a sentence-transformers "
                        "MultiVectorEncoder (token projection, special tokens masked, per-token Normalize)")
    m.add_argument("--token-dim", type=int, default=None,
                   help="--multi-vector: the token vectors' dimension (default 32)")
    m.add_argument("--init-from", default=None, metavar="EMBEDDING_MODEL",
                   help="--reranker: start from this tiny embedding model's backbone weights (e.g. runs/tiny/final)")
    m.add_argument("--hidden-size", type=int, default=64)
    m.add_argument("--num-layers", type=int, default=2, help="language-model layers (a reranker warm-started from a "
                   "shallower model gets identity-initialised extra layers)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(fn=_make_tiny_model)

    g = sub.add_parser("merge-adapter", help="merge a LoRA run's adapter into its base model: a plain "
                                             "SentenceTransformer folder")
    g.add_argument("adapter", metavar="ADAPTER_DIR", help="final/ or a checkpoint of a LoRA run")
    g.add_argument("out", metavar="OUT_DIR")
    g.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights' dtype of the merged model (auto: float32)")
    g.add_argument("--trust-remote-code", action="store_true", help="the base model needs its own code")
    g.add_argument("--overwrite", action="store_true")
    g.set_defaults(fn=_merge_adapter)

    s = sub.add_parser("make-synthetic-pages", help="generate a VDR-shaped page dataset")
    s.add_argument("dir")
    s.add_argument("--num-train", type=int, default=2000)
    s.add_argument("--num-negatives", type=int, default=1)
    s.add_argument("--num-eval-queries", type=int, default=128)
    s.add_argument("--num-eval-distractors", type=int, default=0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--style", choices=("charts", "forms"), default="charts",
                   help="Page kind: charts (a header and a chart) or forms (a side band and symbols: another "
                        "vocabulary, for a tiny mixture of datasets).")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_make_pages)


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
    argv = list(sys.argv[1:] if argv is None else argv)
    _prepare_process(argv)
    args = _parse(argv)
    if args is None:
        return 2
    # train installs its signal handling first, then quiets the libraries; the page commands never
    # load transformers (its import alone is ~0.8 GB of the builder's resident memory).
    if args.command not in ("train", "pages", "make-synthetic-pdfs"):
        _quiet_library_noise()
    from dist_vdr import distributed, outputs

    if args.command not in ("train", "submit"):  # train stops at a step boundary (preemption.py)
        outputs.stop_on_signals()
    # A training run may stop with a progress bar mid-line: the error starts a line of its own.
    start = chr(10) if args.command == "train" else ""
    try:
        code = args.fn(args)
    except ValueError as exc:
        # An error every rank raised at once (rank 0 decided) is reported once, by rank 0.
        if not isinstance(exc, distributed.AllRanksError) or distributed.current().is_main:
            print(f"{start}error: {exc}", file=sys.stderr, flush=True)
        return 2
    except (outputs.Interrupted, KeyboardInterrupt) as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"{start}error: {outputs.interrupted_message(signum)}", file=sys.stderr, flush=True)
        return 128 + signum
    except Exception as exc:  # a write that failed on a full disk or a read-only folder: one line naming it
        message = outputs.explain(exc)
        if message is None:
            raise
        print(f"{start}error: {message}", file=sys.stderr, flush=True)
        return 2
    distributed.shutdown()  # every rank got here: leave the group together (see shutdown's note)
    return code


def _prepare_process(argv: list[str]) -> None:
    # A rank that dies in native code (SIGABRT/SIGSEGV) still prints the Python stacks of all its
    # threads: in a multi-process log that is often the only clue to which step and call failed.
    faulthandler.enable()
    if argv[:1] == ["train"]:
        # Before any import starts a thread (the recipe's imports start three): a thread started with the stop
        # signals unblocked would take a SIGINT/SIGTERM with the default action, killing the run without its
        # checkpoint. Blocked here, inherited by every thread; preemption.install() takes them with sigwait.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGUSR2})
    from dist_vdr.run import lifecycle

    if lifecycle.launched_by_torch_elastic():
        lifecycle.die_with_launcher()  # no rank outlives its launcher (it would go on writing the run)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _parse(argv: list[str] | None) -> argparse.Namespace | None:
    """The parsed command line; None (the error said in one line) when the parser cannot be built: its options
    come from the kinds' sections, and a kind module named in DIST_VDR_KINDS may not import."""
    from dist_vdr.cli.bench import new_spelling

    try:
        parser = build_parser()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return None
    return parser.parse_args(_options_first(new_spelling(argv), parser))


def _options_first(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Commands that take ``key=value`` overrides (train, data check, eval, ...): options may follow
    the overrides (launch/train.sh appends its own overrides after the user's arguments); argparse
    cannot take a positional list split by options, so the options go first."""
    command, sub = _subcommand(parser, argv)
    if sub is None or not any(a.nargs == "*" and not a.option_strings for a in sub._actions):
        return argv
    arity = {s: a.nargs for a in sub._actions for s in a.option_strings}
    rest, options, positionals = argv[len(command):], [], []
    i = 0
    while i < len(rest):
        token = rest[i]
        i += 1
        if not token.startswith("-"):
            positionals.append(token)
            continue
        options.append(token)
        n = _arity(arity, token)
        while i < len(rest) and (n == "*" and not rest[i].startswith("-") and "=" not in rest[i] or
                                 isinstance(n, int) and n > 0):
            options.append(rest[i])
            i += 1
            n = n - 1 if isinstance(n, int) else n
    return [*command, *options, *positionals]


def _subcommand(parser: argparse.ArgumentParser, argv: list[str]):
    """The words naming the (sub)command at the start of ``argv`` and its parser (None: no command)."""
    command: list[str] = []
    while True:
        subs = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if subs is None:
            return command, parser if command else None
        if len(argv) <= len(command) or argv[len(command)] not in subs.choices:
            return command, None
        parser = subs.choices[argv[len(command)]]
        command.append(argv[len(command)])


def _arity(arity: dict, token: str):
    """How many words follow option ``token``: an int, or "*" (words up to the next option or key=value)."""
    if "=" in token:  # --option=value
        return 0
    nargs = arity.get(token, "missing")
    if nargs == "missing":  # argparse takes a unique prefix of an option
        matches = [v for k, v in arity.items() if k.startswith(token)]
        nargs = matches[0] if len(matches) == 1 else 0
    if nargs is None or nargs == "?":
        return 1
    return nargs if nargs == "*" or isinstance(nargs, int) else 1


def entry() -> None:
    """Console-script and ``python -m`` entry: a rank of a process group exits without native teardown."""
    code = main()
    from dist_vdr import distributed
    from dist_vdr.run import lifecycle

    if distributed.was_initialized():
        lifecycle.exit_now(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
