"""Every default is defined once, in the config dataclass: the command-line options add none.

For every subcommand whose options alias config keys: no such option has an argparse default of its
own, and the command parsed without them ends up with the dataclass default of every key. Options
that alias no key are listed here (a new option must either alias a key or be added to the list).
Also: the CLI forms the tests, the Makefile and launch/ use still parse to the same settings, and a
training recipe's sections can be reused by eval and mine-negatives.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import typing

import pytest

from conftest import REPO
from dist_vdr.cli.bench import new_spelling
from dist_vdr.cli.commands import _options_first, _submit_settings, build_parser
from dist_vdr.cli.options import composed, load_command

# Options that are not settings of a config dataclass (the train/data-check/make-*/merge-adapter commands).
UNMAPPED = {
    "train": {"--config", "--resume", "--no-resume", "--allow-config-change"},
    "data check": {"--config"},
    "report": {"--metric"},
    "average": {"--out", "--weights", "--eval-data", "--device"},
    "consolidate": set(),
    "make-tiny-model": {"--reranker", "--multi-vector", "--token-dim", "--init-from", "--hidden-size", "--num-layers",
                        "--seed", "--overwrite"},
    "make-synthetic-pages": {"--num-train", "--num-negatives", "--num-eval-queries", "--num-eval-distractors",
                             "--seed", "--overwrite", "--style"},
    "make-synthetic-pdfs": {"--num-documents", "--max-pages-per-document", "--num-scans", "--seed", "--overwrite"},
    "merge-adapter": {"--dtype", "--trust-remote-code", "--overwrite"},
}

# The options each command cannot run without, with a value (paths need not exist: check_paths=False).
REQUIRED = {
    "eval": {"--model": "m", "--data": "d"},
    "mine-negatives": {"--model": "m", "--out": "o"},  # and --data or --corpus: see test_mine_takes_one_source
    "score-rows": {"--teacher": "m", "--data": "d", "--out": "o"},
    "pages build": {"--input": "<in>", "--out": "<out>"},
    "submit": {"--config": "recipe.yaml"},
    "bench train": {"--work-dir": "w"},
    "bench eval": {"--data": "d"},
    "bench corpus": {"--work-dir": "w"},
    "bench startup": {"--work-dir": "w"},
    "bench checkpoint": {"--work-dir": "w"},
    "bench pooling": {"--model": "m", "--data": "d"},
    "bench eval-multi-vector": {"--work-dir": "w"},
}


def _subcommands(parser: argparse.ArgumentParser, prefix: str = ""):
    """(name, parser) of every leaf subcommand ("pages build", "eval", ...)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix.strip(), parser
        return
    for name, sub in subs[0].choices.items():
        yield from _subcommands(sub, f"{prefix} {name}")


SUBCOMMANDS = dict(_subcommands(build_parser()))
CONFIGURED = sorted(name for name, p in SUBCOMMANDS.items() if p.get_default("command_spec") is not None)


def test_the_settings_commands_are_configured():
    assert set(CONFIGURED) == {"eval", "mine-negatives", "score-rows", "pages build", "submit", "bench train",
                               "bench loss", "bench eval", "bench corpus", "bench startup", "bench checkpoint",
                               "bench search", "bench maxsim", "bench pooling", "bench eval-multi-vector"}
    assert set(SUBCOMMANDS) == set(CONFIGURED) | set(UNMAPPED)


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_no_option_has_a_default_of_its_own(name):
    """An option aliasing a config key has no argparse default (SUPPRESS: absent, it overrides nothing);
    any other option is one of the known unmapped ones."""
    parser = SUBCOMMANDS[name]
    spec = parser.get_default("command_spec")
    aliases = spec.aliases if spec else {}
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0]
        if action.dest in aliases:
            assert aliases[action.dest] == flag
            assert action.default is argparse.SUPPRESS, f"{name} {flag} has default {action.default!r}"
        elif spec and action.dest == "command_config":
            assert action.default is None
        else:
            assert flag in UNMAPPED.get(name, ()), f"{name} {flag} aliases no config key (dest {action.dest!r})"


def _key(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _required_values(name: str, tmp_path) -> dict[str, str]:
    values = dict(REQUIRED.get(name, {}))
    for flag, value in values.items():
        if value.startswith("<"):
            folder = tmp_path / value.strip("<>")
            folder.mkdir(exist_ok=True)
            values[flag] = str(folder)
    return values


def _expected_sections(schema: type, given: dict[str, str]) -> dict[str, object]:
    """Each section of ``schema`` as the dataclasses define it, with the required keys set: the section's
    default instance, or (a section declared without one) its class built from the given keys."""
    hints = typing.get_type_hints(schema)
    sections = {}
    for f in dataclasses.fields(schema):
        values = {k.split(".", 1)[1]: v for k, v in given.items() if k.split(".", 1)[0] == f.name}
        if f.default_factory is not dataclasses.MISSING:
            sections[f.name] = dataclasses.replace(f.default_factory(), **values)
        else:
            sections[f.name] = hints[f.name](**values)
    return sections


@pytest.mark.parametrize("name", CONFIGURED)
def test_an_absent_option_leaves_the_dataclass_default(name, tmp_path):
    parser = build_parser()
    spec = SUBCOMMANDS[name].get_default("command_spec")
    required = _required_values(name, tmp_path)
    argv = [*name.split(), *(word for flag, value in required.items() for word in (flag, value))]
    cfg = load_command(parser.parse_args(argv), spec, check_paths=False)
    given = {key: required[flag] for key, flag in spec.aliases.items() if flag in required}
    expected = _expected_sections(composed(spec.schema), given)
    assert cfg == composed(spec.schema)(**expected)  # every key, aliased by an option or not
    for key in spec.aliases:
        section, _, rest = key.partition(".")
        assert _key(cfg, key) == _key(expected[section], rest), key


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_a_required_option_left_out_is_named(name, tmp_path):
    parser = build_parser()
    spec = SUBCOMMANDS[name].get_default("command_spec")
    required = _required_values(name, tmp_path)
    for left_out in required:
        argv = [*name.split(), *(w for f, v in required.items() if f != left_out for w in (f, v))]
        with pytest.raises(ValueError, match=rf"is not set: give {left_out} or "):
            load_command(parser.parse_args(argv), spec, check_paths=False)


def _settings(argv: list[str]):
    parser = build_parser()
    args = parser.parse_args(_options_first(new_spelling(argv), parser))  # as main parses
    if args.command == "submit":  # its key=value overrides of other sections are the recipe's
        return _submit_settings(args)[0], args
    return load_command(args, args.command_spec, check_paths=False), args


# The forms used by the tests, the Makefile and launch/ (values shortened), with what they must set.
FORMS = [
    (["eval", "--model", "m", "--data", "d", "--dims", "64,32", "--batch-size", "8", "--output", "o"],
     {"model.name_or_path": "m", "data.path": "d", "evaluation.dims": [64, 32], "evaluation.batch_size": 8,
      "eval.output": "o"}),
    (["eval", "--model", "m", "--reranker", "r", "--data", "d", "--rerank-depth", "10", "--batch-size", "8",
      "--output", "o", "--device", "cpu"],
     {"eval.reranker": "r", "reranker.rerank_depth": 10, "launch.device": "cpu", "eval.retrieval_score_weight": None}),
    (["eval", "--model", "m", "--data", "d", "--dims", "64", "--device", "cpu", "--cache", "c", "--queries", "q.jsonl",
      "--qrels", "q.trec"],
     {"evaluation.dims": [64], "eval.cache": "c", "data.eval_queries_file": "q.jsonl",
      "data.eval_qrels_file": "q.trec"}),
    (["eval", "--model", "m", "--data", "d", "--dims", "", "--ks", "1,10", "--negative-columns", "a,b",
      "--eval-format", "triplets", "--max-queries", "4", "--retrieval-score-weight", "0.5", "--threads", "2"],
     {"evaluation.dims": [], "evaluation.ks": [1, 10], "data.eval_negative_columns": ["a", "b"],
      "data.eval_format": "triplets", "data.max_eval_queries": 4, "eval.retrieval_score_weight": 0.5,
      "launch.num_threads_per_process": 2}),
    (["mine-negatives", "--model", "m", "--data", "d", "--out", "o", "--page-columns", "negative_0",
      "--num-negatives", "2", "--num-random-negatives", "0", "--max-rank", "100", "--max-uses-per-page", "2",
      "--document-id-column", "image=document_id", "--document-id-column", "negative_0=negative_0_document_id",
      "--batch-size", "8", "--device", "cpu"],
     {"mine.page_columns": ["negative_0"], "mining.num_negatives": 2, "mining.max_rank": 100,
      "mining.max_uses_per_page": 2, "evaluation.batch_size": 8,
      "mining.document_id_columns": {"image": "document_id", "negative_0": "negative_0_document_id"}}),
    (["mine-negatives", "--model", "m", "--corpus", "c", "--queries", "q.jsonl", "--qrels", "q.trec", "--out", "o",
      "--num-negatives", "2", "--num-random-negatives", "1", "--max-rank", "60", "--max-uses-per-page", "1",
      "--exclude-same-document", "--batch-size", "8", "--device", "cpu"],
     {"mine.corpus": "c", "mine.exclude_same_document": True, "mining.num_random_negatives": 1}),
    (["pages", "build", "--input", "<in>", "--out", "<out>", "--dpi", "20", "--num-workers", "2", "--quiet",
      "--files-per-shard", "5", "--overwrite", "--text", "--image-format", "jpeg"],
     {"ingest.dpi": 20.0, "ingest.num_workers": 2, "build.quiet": True, "ingest.files_per_shard": 5,
      "build.overwrite": True, "ingest.text": True, "ingest.image_format": "jpeg"}),
    (["submit", "--cluster", "local", "--nodes", "1", "--tasks-per-node", "2", "--time", "5", "--wait",
      "--config", "configs/tiny.yaml", "training.max_steps=4"],
     {"slurm.cluster": "local", "slurm.tasks_per_node": 2, "slurm.time_min": 5, "submit.wait": True,
      "submit.recipe": "configs/tiny.yaml"}),
    (["submit", "--config", "r.yaml", "--nodes", "2", "--time", "10", "--signal-delay-s", "60", "--sbatch", "a=b",
      "slurm.job_name=x"],
     {"slurm.nodes": 2, "slurm.signal_delay_s": 60, "slurm.extra": {"a": "b"}, "slurm.job_name": "x"}),
    (["bench", "--model", "tiny", "--work-dir", "w", "--global-batch-size", "4", "--steps", "1", "--warmup-steps",
      "1", "--stock", "mb2", "--ours", "recipe", "--ours", "mb1:loss.mini_batch_size=1", "--timeout-s", "300"],
     {"bench.stock": ["mb2"], "bench.ours": ["recipe", "mb1:loss.mini_batch_size=1"], "bench.timeout_s": 300.0,
      "bench.global_batch_size": 4}),
    (["bench", "--model", "qwen3-vl-2b", "--device", "cuda", "--work-dir", "w", "--stock", "", "--config", "r.yaml"],
     {"bench.stock": [], "bench.recipe": "r.yaml", "bench.device": "cuda"}),
    (["bench", "--model", "qwen3-vl-2b", "--device", "auto", "--work-dir", "w", "--steps", "2", "--warmup-steps", "1",
      "--stock", "mb1,mb8,tok6000", "--ours", "tok6000:loss.mini_batch_size=64,loss.mini_batch_num_tokens=6000",
      "--ours", "c:model.compile=true", "--timeout-s", "240"],  # launch/bench_gpu.sh
     {"bench.stock": ["mb1", "mb8", "tok6000"], "bench.steps": 2,
      "bench.ours": ["tok6000:loss.mini_batch_size=64,loss.mini_batch_num_tokens=6000", "c:model.compile=true"]}),
    (["mine-negatives", "--model", "m", "--corpus", "c", "--queries", "q.jsonl", "--qrels", "q.trec", "--out", "o",
      "--num-negatives", "1", "--max-rank", "100", "--max-uses-per-page", "3", "--exclude-same-document", "--device",
      "cpu"],  # Makefile demo-pdfs
     {"mining.num_negatives": 1, "mining.max_rank": 100, "mining.max_uses_per_page": 3, "launch.device": "cpu"}),
    (["bench-loss", "--dims", "8,4", "--world-size", "4", "--json"],
     {"bench_loss.dims": [8, 4], "bench_loss.world_size": 4, "bench_loss.json": True}),
    (["bench-eval", "--data", "d", "--batch-size", "4", "--num-workers", "0"],
     {"evaluation.batch_size": 4, "evaluation.num_workers": 0, "bench_eval.dims": [64, 48, 32, 16, 8, 4, 2]}),
    (["bench-startup", "--work-dir", "w", "--rows", "10,20", "--launch", "launch/cpu.yaml"],
     {"bench_startup.rows": [10, 20]}),
    (["bench-search", "--num-pages", "1000", "--backend", "torch"],
     {"bench_search.num_pages": 1000, "bench_search.backend": "torch"}),
    (["bench-checkpoint", "--work-dir", "w", "--size-gb", "0.5"], {"bench_checkpoint.size_gb": 0.5}),
    (["bench-corpus", "--work-dir", "w", "--num-documents", "10", "--dpi", "30"],
     {"bench_corpus.num_documents": 10, "bench_corpus.dpi": 30.0}),
]


@pytest.mark.parametrize("argv, expected", FORMS, ids=lambda v: " ".join(v[:3]) if isinstance(v, list) else "")
def test_the_forms_in_use_still_parse(argv, expected, tmp_path):
    argv = [str(tmp_path / a.strip("<>")) if a.startswith("<") else a for a in argv]
    for folder in ("in",):
        (tmp_path / folder).mkdir(exist_ok=True)
    cfg, _ = _settings(argv)
    for key, value in expected.items():
        assert _key(cfg, key) == value, key


@pytest.mark.parametrize("old,new", [
    (["bench", "--model", "tiny", "--work-dir", "w", "--steps", "1"], ["bench", "train", "--model", "tiny",
                                                                       "--work-dir", "w", "--steps", "1"]),
    (["bench-loss", "--dims", "8,4"], ["bench", "loss", "--dims", "8,4"]),
    (["bench-eval", "--data", "d"], ["bench", "eval", "--data", "d"]),
    (["bench-search", "--num-pages", "10"], ["bench", "search", "--num-pages", "10"]),
    (["bench-corpus", "--work-dir", "w"], ["bench", "corpus", "--work-dir", "w"]),
    (["bench-startup", "--work-dir", "w"], ["bench", "startup", "--work-dir", "w"]),
    (["bench-checkpoint", "--work-dir", "w"], ["bench", "checkpoint", "--work-dir", "w"]),
])
def test_the_bench_group_keeps_the_earlier_spellings(old, new):
    """`dist-vdr bench train|loss|eval|search|corpus|startup|checkpoint`; `bench OPTIONS` and `bench-NAME` still
    mean the same command with the same settings."""
    (cfg_old, args_old), (cfg_new, args_new) = _settings(old), _settings(new)
    assert args_old.fn is args_new.fn and cfg_old == cfg_new


def test_the_other_commands_still_parse():
    parser = build_parser()
    for argv in (["train", "training.max_steps=3", "--config", "configs/tiny.yaml", "--no-resume"],
                 ["data", "check", "pages", "--config", "configs/tiny.yaml", "model.name_or_path=m"],
                 ["make-tiny-model", "--reranker", "d", "--init-from", "runs/tiny/final"],
                 ["make-synthetic-pages", "d", "--num-train", "4000"],
                 ["make-synthetic-pdfs", "d", "--num-documents", "1000", "--num-scans", "200"]):
        args = parser.parse_args(_options_first(argv, parser))
        assert args.fn is not None
    args = parser.parse_args(_options_first(["train", "a.b=1", "--config", "c", "x.y=2", "--resume", "ck"], parser))
    assert (args.config, args.resume, args.overrides) == ("c", "ck", ["a.b=1", "x.y=2"])
    args = parser.parse_args(_options_first(["data", "check", "d", "k=v", "--config", "c"], parser))
    assert (args.config, args.items) == ("c", ["d", "k=v"])


def test_overrides_may_come_between_options():
    cfg, args = _settings(["mine-negatives", "mining.seed=3", "--model", "m", "--page-columns", "a", "b",
                           "mining.rank_start=1", "--data", "d", "--out", "o"])
    assert args.overrides == ["mining.seed=3", "mining.rank_start=1"]
    assert cfg.mine.page_columns == ["a", "b"] and cfg.mining.seed == 3 and cfg.mining.rank_start == 1
    cfg, _ = _settings(["eval", "--model", "m", "--data", "d", "--batch-size", "4", "evaluation.batch_size=6"])
    assert cfg.evaluation.batch_size == 6  # the key=value override is the last layer


def test_eval_reuses_a_recipe(tmp_path):
    cfg, _ = _settings(["eval", "--config", "configs/tiny.yaml", "model.name_or_path=runs/tiny/final",
                        "eval.output=out"])
    from dist_vdr.config import load_config

    recipe = load_config(REPO / "configs/tiny.yaml", check_paths=False)
    assert cfg.model.name_or_path == "runs/tiny/final" and cfg.eval.output == "out"
    assert cfg.data.path == recipe.data.path and cfg.evaluation == recipe.evaluation
    assert cfg.model.dtype == recipe.model.dtype and cfg.launch == recipe.launch
    command = tmp_path / "eval.yaml"
    command.write_text("eval:\n  output: o\nmodel:\n  name_or_path: m\ndata:\n  path: d\n")
    cfg, _ = _settings(["eval", "--config", str(command), "--output", "p"])
    assert (cfg.eval.output, cfg.model.name_or_path) == ("p", "m")  # an option over the file


def test_settings_errors_name_the_key_and_the_layer(tmp_path):
    with pytest.raises(ValueError, match=r"mining.max_rank=4 leaves no room .* \(from the option --max-rank\)"):
        _settings(["mine-negatives", "--model", "m", "--data", "d", "--out", "o", "--max-rank", "4",
                   "--num-negatives", "5"])
    with pytest.raises(ValueError, match=r"unknown config key 'mine.outt' in the override mine.outt=x; known keys"):
        _settings(["mine-negatives", "--model", "m", "--data", "d", "mine.outt=x"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest:\n  dpi: lots\n")
    with pytest.raises(ValueError, match=r"bad value for config key 'ingest.dpi' in .*bad.yaml"):
        _settings(["pages", "build", "--config", str(bad), "--input", "i", "--out", "o"])
    typo = tmp_path / "typo.yaml"
    typo.write_text("ingset:\n  dpi: 20\n")
    with pytest.raises(ValueError, match=r"unknown config key 'ingset' in .*typo.yaml; known keys: \['build', 'ingest"):
        _settings(["pages", "build", "--config", str(typo), "--input", "i", "--out", "o"])
    with pytest.raises(ValueError, match=r"^--input i is not a folder of PDFs/images$"):  # a recipe's sections: unused
        _settings(["pages", "build", "--config", "configs/tiny.yaml", "--input", "i", "--out", "o"])


def test_mine_takes_one_source(tmp_path):
    from dist_vdr.cli.data import _load_mine

    parser = build_parser()
    for folder in ("d", "c"):
        (tmp_path / folder).mkdir()
    (tmp_path / "q.jsonl").write_text("")
    base = ["mine-negatives", "--model", str(tmp_path / "d"), "--out", "o"]
    queries = str(tmp_path / "q.jsonl")
    corpus = ["--corpus", str(tmp_path / "c"), "--queries", queries, "--qrels", queries]
    for argv in ([], ["--data", str(tmp_path / "d"), *corpus], [f"data.path={tmp_path / 'd'}", *corpus]):
        with pytest.raises(ValueError, match="give either --data .* or --corpus with --queries and --qrels"):
            _load_mine(parser.parse_args(_options_first([*base, *argv], parser)))
    assert _load_mine(parser.parse_args(_options_first([*base, *corpus], parser))).corpus_mode
    assert not _load_mine(parser.parse_args([*base, "--data", str(tmp_path / "d")])).corpus_mode
    # A recipe names the split to mine for; with --corpus its data section is not used.
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  path: {tmp_path / 'd'}\n")
    assert not _load_mine(parser.parse_args([*base, "--config", str(recipe)])).corpus_mode
    assert _load_mine(parser.parse_args([*base, "--config", str(recipe), *corpus])).corpus_mode
    with pytest.raises(ValueError, match=r"mine.corpus \(--corpus\) needs mine.queries and mine.qrels"):
        _load_mine(parser.parse_args([*base, "--corpus", str(tmp_path / "c")]))


def test_pages_build_imports_no_model_library(tmp_path):
    """A page builder's memory: transformers alone is ~0.8 GB; the settings must not pull it in."""
    probe = ("import sys; from dist_vdr.cli import main; "
             f"code = main(['pages', 'build', '--input', {str(tmp_path)!r}, '--out', {str(tmp_path / 'x')!r}]); "
             "print(code, [m for m in ('torch', 'transformers') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "[]"], proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: --out ") and len(proc.stderr.splitlines()) == 1
