"""``final/README.md``: a model card in the sentence-transformers style, from the run's records alone.

sentence-transformers builds its card with an encode on rank 0, which a sharded model (ZeRO-3, FSDP2)
cannot serve; dist-vdr switches that off and writes this one from what the run recorded (the recipe,
the data sizes, the launch, ``metrics_before.json`` / ``metrics_after.json``), so it is the same under
every engine. The task supplies the model class and the usage snippet (:meth:`Task.card_usage`).
The card is added to the marked ``final/`` (:func:`dist_vdr.checkpoints.store.add_file`): written after the
model, again once the final evaluation is in.
"""

from __future__ import annotations

import platform
from pathlib import Path

from dist_vdr.config import Config
from dist_vdr.run.results import Metrics, RunResult

CARD_FILE = "README.md"
_TABLE_METRICS = ("ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100")


def build_card(cfg: Config, result: RunResult, *, usage: str, model_class: str, run_info: dict | None,
               data_rows: dict[str, int], weights_of_step: int | None = None) -> str:
    """The card's Markdown (YAML header for the hub, then the sections)."""
    base = cfg.model.name_or_path
    lines = ["---", f"library_name: {'sentence-transformers'}",
             f"pipeline_tag: {'text-ranking' if model_class == 'CrossEncoder' else 'sentence-similarity'}",
             f"base_model: {base}", "tags:", "- sentence-transformers", "- visual-document-retrieval", "- dist-vdr",
             *(["- matryoshka"] if cfg.loss.matryoshka_dims else []),
             *(["- peft", "- lora"] if cfg.model.adapter.type else []), "---", "",
             f"# {Path(cfg.training.output_dir).name}", "",
             f"A {model_class} finetuned from `{base}` for visual document retrieval (text query -> page image) "
             f"with dist-vdr, trained on {_world(run_info)}.", ""]
    lines += _details(cfg, model_class, result)
    lines += ["## Training data", ""] + [f"- `{name}`: {n:,} rows" for name, n in data_rows.items()]
    if cfg.evaluation.enabled:
        lines.append(f"- evaluated on: `{cfg.data.eval_path or cfg.data.path}`" if not cfg.data.datasets else
                     "- evaluated on: each dataset's eval set (macro average in the dimension rows)")
    lines.append("")
    lines += _procedure(cfg, result, run_info, weights_of_step)
    lines += _evaluation(result)
    lines += ["## Usage", "", usage.strip(), ""]
    lines += _versions(run_info)
    return "\n".join(lines) + "\n"


def _world(run_info: dict | None) -> str:
    if not run_info:
        return "an unrecorded launch"
    return f"{run_info.get('world_size', '?')} rank(s), {run_info.get('device', '?')}"


def _details(cfg: Config, model_class: str, result: RunResult) -> list[str]:
    rows = [("Model type", model_class), ("Base model", f"`{cfg.model.name_or_path}`"),
            ("Task", cfg.task), ("Training precision", cfg.training.precision)]
    if result.dims:
        rows.append(("Embedding dimensions evaluated", ", ".join(str(d) for d in result.dims)))
    if cfg.loss.matryoshka_dims:
        rows.append(("Matryoshka dimensions", ", ".join(str(d) for d in cfg.loss.matryoshka_dims)))
    a = cfg.model.adapter
    if a.type:
        rows.append(("Adapter", f"{a.type} (rank {a.rank}, alpha {a.alpha:g}): this folder holds the adapter; "
                                f"see Usage to load it onto the base model"))
    return ["## Model details", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]


def _procedure(cfg: Config, result: RunResult, run_info: dict | None, weights_of_step: int | None) -> list[str]:
    t, loss = cfg.training, cfg.loss
    settings = [("loss", loss.name), ("mini_batch_size", loss.mini_batch_size), ("scale", loss.scale),
                ("cross_device_negatives", loss.cross_device_negatives)]
    if loss.false_negatives.enabled:
        settings.append(("false_negatives", f"id_column={loss.false_negatives.id_column}, "
                                            f"guide={loss.false_negatives.guide}"))
    if loss.distillation.enabled:
        settings.append(("distillation", f"{loss.distillation.kind} from {loss.distillation.scores_column}"))
    hyper = [("global_batch_size", t.global_batch_size), ("learning_rate", t.learning_rate),
             ("num_epochs", t.num_epochs), ("max_steps", t.max_steps), ("warmup_ratio", t.warmup_ratio),
             ("lr_scheduler_type", t.lr_scheduler_type), ("weight_decay", t.weight_decay), ("seed", t.seed),
             ("gradient_accumulation_steps", t.gradient_accumulation_steps), ("steps trained", result.global_step)]
    if cfg.data.datasets:
        hyper.append(("data.mixture", cfg.data.mixture))
    if weights_of_step is not None:
        hyper.append(("final", f"best: the weights of step {weights_of_step}, the best evaluation during training"))
    return ["## Training procedure", "", "Loss:", "", *(f"- `{k}`: {v}" for k, v in settings), "",
            "Hyper-parameters:", "", "| | |", "|---|---|", *(f"| `{k}` | {v} |" for k, v in hyper), "",
            *([f"Final training loss: {result.final_loss:.4f}", ""] if result.final_loss is not None else [])]


def _evaluation(result: RunResult) -> list[str]:
    """One table row per evaluated row (dims, or ranking stages, or a mixture's eval sets) after
    training, with the before value beside when there is one."""
    after = result.after
    if after is None:
        return ["## Evaluation", "", "Not evaluated (evaluation off, or not yet run).", ""]
    metrics = [m for m in _TABLE_METRICS if any(m in values for values in after.rows.values())]
    header = ["row", *(f"{m} after" for m in metrics), *(["ndcg@10 before"] if result.before else [])]
    which = (f"of final/'s weights, step {after.step} (training.final=best: the best evaluation of the "
             f"{result.global_step} steps trained)" if result.weights_of_step is not None
             else f"after training, step {after.step}")
    lines = ["## Evaluation", "", f"Held-out retrieval {which} (`metrics_after.json`; "
             f"rows: embedding dimensions, ranking stages or eval sets):", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in _ordered(after):
        cells = [_fmt(after.get(name, m)) for m in metrics]
        if result.before:
            cells.append(_fmt(result.before.get(name, "ndcg@10")))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _ordered(metrics: Metrics) -> list[str]:
    return list(metrics.to_json()["metrics"])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _versions(run_info: dict | None) -> list[str]:
    versions = dict((run_info or {}).get("versions", {}))
    versions["python"] = platform.python_version()
    try:
        from importlib.metadata import version

        versions["dist-vdr"] = version("dist-vdr")
    except Exception:  # not installed as a package (a source checkout on the path)
        pass
    return ["## Framework versions", "", *(f"- {k}: {v}" for k, v in sorted(versions.items())), ""]


def last_run_info(out: Path) -> dict | None:
    """The newest line of ``run_info.jsonl`` (this (re)start's launch), or None."""
    from dist_vdr.run.report import run_infos

    infos = run_infos(out)
    return infos[-1] if infos else None
