"""`dist-vdr report RUN_DIR`: ``report.png`` and ``report.md`` of a training run, from its folder alone.

Read, never written to the run's checkpoints: the newest complete checkpoint's ``trainer_state.json``
(the logged series: loss, learning rate, gradient norm, step time and throughput, the evaluations
during training), ``metrics_before.json`` / ``metrics_after.json``, ``run_info.jsonl`` (launch, data
plan) and ``resolved_config.yaml``. So it works for a finished run, one still in progress or killed
(up to its newest checkpoint), an embedding model (rows: Matryoshka dims) and a reranker (rows: ranking
stages). ``dist-vdr train`` writes both at the end of a run.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from dist_vdr.checkpoints import store as checkpoint
from dist_vdr.outputs import replacing_file
from dist_vdr.run.folder import REPORT_MD, REPORT_PNG, RunDir
from dist_vdr.run.results import Metrics

_SERIES = (("loss", "training loss"), ("learning_rate", "learning rate"), ("grad_norm", "gradient norm"),
           ("samples_per_second", "throughput (rows/s)"))
_EVAL_KEY = re.compile(r"^eval_(?:(?P<set>[^/]+)/)?dim(?P<dim>\d+)_cosine_(?P<metric>[a-z]+@\d+)$")
_STAGE_KEY = re.compile(r"^eval_(?P<stage>[a-z]+)_(?P<metric>[a-z]+@\d+)$")


def history(run: Path, damaged: list[str] | None = None) -> tuple[list[dict], Path | None]:
    """The log history of the newest complete checkpoint whose trainer_state.json reads (and which), or
    ([], None); a newer one that does not read is named in ``damaged``."""
    for _, folder, complete in reversed(checkpoint.list_checkpoints(run)):
        if not complete:
            continue
        try:
            return json.loads((folder / "trainer_state.json").read_text()).get("log_history", []), folder
        except (OSError, ValueError) as exc:
            if damaged is not None:
                damaged.append(f"{folder.name}/trainer_state.json does not read "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})")
    return [], None


def run_infos(run: Path) -> list[dict]:
    """The lines of run_info.jsonl that read (a run killed while appending leaves half a line)."""
    path, infos = RunDir(run).run_info, []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            infos.append(json.loads(line))
        except ValueError:
            continue
    return infos


def series(log: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(h["step"], float(h[key])) for h in log if key in h and isinstance(h[key], (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def eval_curves(log: list[dict], metric: str = "ndcg@10") -> dict[str, tuple[list[int], list[float]]]:
    """Evaluations during training: row name (a dim, or a reranker's stage) -> (steps, values)."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for h in log:
        for key, value in h.items():
            m = _EVAL_KEY.match(key) or _STAGE_KEY.match(key)
            if not m or m.group("metric") != metric:
                continue
            groups = m.groupdict()
            name = groups.get("dim") or groups.get("stage")
            if groups.get("set"):
                continue  # a mixture's per-set figures: the macro average (no set) is plotted
            steps, values = curves.setdefault(str(name), ([], []))
            steps.append(h["step"])
            values.append(float(value))
    return curves


def write_report(run: str | os.PathLike, metric: str = "ndcg@10") -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.md`` into ``run``; ValueError when it is no run folder."""
    from dist_vdr.outputs import Output

    run = Path(run)
    if not RunDir(run).resolved_config.is_file():
        raise ValueError(f"{run} is not a dist-vdr run folder (no resolved_config.yaml): give a training.output_dir")
    Output("report", "RUN_DIR", run).claim().check_writable()  # a read-only or full run folder: one line
    damaged: list[str] = []
    log, newest = history(run, damaged)
    before, after = (_metrics(RunDir(run).metrics(w)) for w in ("before", "after"))
    known = {m for metrics in (before, after) if metrics for values in metrics.rows.values() for m in values}
    if known and metric not in known:
        raise ValueError(f"--metric {metric}: the run's evaluations hold {sorted(known)[:8]}...; pick one of them")
    png = _plot(run, log, before, after, metric)
    md = run / REPORT_MD
    with replacing_file(md) as tmp:
        tmp.write_text(_markdown(run, log, newest, before, after, metric, damaged))
    return png, md


def _metrics(path: Path) -> Metrics | None:
    try:
        return Metrics.read(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path} does not read as a metrics record ({exc}): repair or remove it") from exc


# long: one figure, six panels, each a few lines
def _plot(run: Path, log: list[dict], before: Metrics | None, after: Metrics | None, metric: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7), dpi=110)
    for ax, (key, label) in zip(axes.flat, _SERIES, strict=False):
        steps, values = series(log, key)
        if steps:
            ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    ax = axes.flat[4]
    curves = eval_curves(log, metric)
    title = f"{metric.upper()} during training"
    if not curves and before is not None and after is not None:  # the two ends, joined
        curves = {name: ([before.step, after.step], [before.get(name, metric), after.get(name, metric)])
                  for name in after.rows if "/" not in name and before.get(name, metric) is not None}
        title += " (before/after only;\ntraining.eval_steps adds points)"
    for name, (steps, values) in sorted(curves.items(), key=lambda kv: _order(kv[0])):
        ax.plot(steps, values, marker="o", label=name)
    if not curves:
        ax.text(0.5, 0.5, "no evaluation during training\n(training.eval_steps)", ha="center", va="center",
                transform=ax.transAxes, color="gray")
    else:
        ax.legend(fontsize=8, title="dim / stage", title_fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    _plot_before_after(axes.flat[5], before, after, metric)
    fig.suptitle(f"{run.name}", fontsize=11)
    fig.tight_layout()
    try:
        with replacing_file(run / REPORT_PNG) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return run / REPORT_PNG


def _order(name: str) -> tuple[int, str]:
    return (-int(name), "") if name.isdigit() else (0, name)


def _plot_before_after(ax, before: Metrics | None, after: Metrics | None, metric: str) -> None:
    rows = [name for name in (after or before).rows if "/" not in name] if (after or before) else []
    rows.sort(key=_order)
    if not rows:
        ax.text(0.5, 0.5, "not evaluated", ha="center", va="center", transform=ax.transAxes, color="gray")
    width = 0.38
    for k, (label, metrics) in enumerate((("before", before), ("after", after))):
        if metrics is None:
            continue
        values = [metrics.get(name, metric) or 0.0 for name in rows]
        ax.bar([i + (k - 0.5) * width for i in range(len(rows))], values, width, label=label)
    ax.set_xticks(range(len(rows)), rows, fontsize=8)
    ax.set_title(f"{metric.upper()} before / after training")
    ax.set_xlabel("dim / stage")
    if rows:
        top = max((m.get(name, metric) or 0.0) for m in (before, after) if m for name in rows)
        ax.set_ylim(0, max(top, 1e-3) * 1.3)  # room for the legend above the bars
        ax.legend(fontsize=8, ncol=2, loc="upper center")
    ax.grid(True, axis="y", alpha=0.3)


def _markdown(run: Path, log: list[dict], newest: Path | None, before: Metrics | None, after: Metrics | None,
              metric: str, damaged: list[str] = ()) -> str:
    infos = run_infos(run)
    info = infos[-1] if infos else {}
    steps, _ = series(log, "loss")
    runtime = [h["train_runtime"] for h in log if "train_runtime" in h]
    state = "finished (final/ complete)" if checkpoint.is_complete(RunDir(run).final) else "in progress or stopped"
    best = _weights_of_step(RunDir(run).final)
    if best is not None:
        state = f"finished (final/ complete: the weights of step {best}, the best evaluation, training.final=best)"
    lines = [f"# Run report: {run.name}", "", f"![report]({REPORT_PNG})", "", "## Run", "",
             f"- state: {state}; newest checkpoint: {newest.name if newest else 'none'}"
             + (f" (read instead of newer damaged ones: {'; '.join(damaged)})" if damaged else ""),
             f"- launch: world size {info.get('world_size', '?')}, device {info.get('device', '?')}, "
             f"{len(infos)} (re)start(s), last started {info.get('started', '?')}",
             f"- steps logged: {steps[-1] if steps else 0}"
             + (f"; training time {runtime[-1]:.0f} s" if runtime else ""),
             f"- versions: {', '.join(f'{k} {v}' for k, v in sorted(info.get('versions', {}).items())) or '?'}", ""]
    lines += _config_summary(run)
    if info.get("datasets"):
        lines += ["## Data", "", "| dataset | rows | weight | steps per epoch | epochs of its rows per epoch |",
                  "|---|---|---|---|---|"]
        lines += [f"| {d['name']} | {d['rows']} | {d['weight']:g} | {d['steps_per_epoch']:g} | "
                  f"{d['epochs_per_epoch']:g} |" for d in info["datasets"]]
        lines.append("")
    lines += _table(before, after, metric)
    runs = sorted(p.relative_to(run).as_posix() for p in run.glob("eval_*/**/run.*.trec"))
    if runs:
        lines += ["## TREC runs", "", *(f"- [{p}]({p})" for p in runs), ""]
    return "\n".join(lines) + "\n"


def _weights_of_step(final: Path) -> int | None:
    """training.final=best: the step whose weights ``final/`` holds, from its marker (None: the last step)."""
    if not checkpoint.is_complete(final):
        return None
    try:
        return json.loads((final / checkpoint.MARKER_FILE).read_text()).get("weights_of_step")
    except (OSError, ValueError, AttributeError):
        return None


def _config_summary(run: Path) -> list[str]:
    import yaml

    cfg = yaml.safe_load(RunDir(run).resolved_config.read_text()) or {}
    picks = [("task", cfg.get("task")), ("model", cfg.get("model", {}).get("name_or_path")),
             ("data", cfg.get("data", {}).get("path") if not cfg.get("data", {}).get("datasets")
              else ", ".join(d["name"] for d in cfg["data"]["datasets"])),
             ("loss", cfg.get("loss", {}).get("name")),
             ("matryoshka dims", cfg.get("loss", {}).get("matryoshka_dims")),
             *((k, cfg.get("training", {}).get(k)) for k in ("global_batch_size", "learning_rate", "num_epochs",
                                                               "max_steps", "precision", "seed"))]
    return ["## Recipe", "", "(the whole of it: `resolved_config.yaml`)", "", "| | |", "|---|---|",
            *(f"| {k} | {v} |" for k, v in picks), ""]


def _table(before: Metrics | None, after: Metrics | None, metric: str) -> list[str]:
    if before is None and after is None:
        return ["## Evaluation", "", "No evaluation recorded (evaluation off, or the run has not got there).", ""]
    rows = list((after or before).to_json()["metrics"])
    lines = ["## Evaluation", "", f"| row | {metric} before | {metric} after | change |", "|---|---|---|---|"]
    for name in rows:
        b = before.get(name, metric) if before else None
        a = after.get(name, metric) if after else None
        change = f"{a - b:+.4f}" if a is not None and b is not None else "-"
        lines.append(f"| {name} | {'-' if b is None else f'{b:.4f}'} | {'-' if a is None else f'{a:.4f}'} | {change} |")
    return lines + [""]
