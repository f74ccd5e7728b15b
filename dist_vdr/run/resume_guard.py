"""Resume only what was started: the recipe of a checkpoint must match the recipe of the rerun.

Every checkpoint records the resolved recipe it was trained with (``checkpoint.CONFIG_FILE``). On
resume the current recipe is compared with it key by key, in three classes:

- launch keys (``launch.*``, ``training.output_dir``, ``training.per_device_batch_size``) describe
  where and on how many ranks the run goes on, not what it trains: never compared (resuming on
  another number of ranks is a feature);
- reporting keys (evaluation, logging and checkpoint cadence, eval data, compile/checkpointing and
  gradient-caching mini-batch levers that leave the arithmetic as it is) do not change the weights:
  accepted, and listed;
- the schedule length (``training.max_steps``, ``training.num_epochs``) changes the learning rate
  of the remaining steps: accepted only with ``--allow-config-change``;
- everything else (model, training data, loss, batch, optimiser, precision, seed, sampler, ...)
  changes what the run means: refused with the list of differences and the fix.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from dist_vdr.config import recipe_schema, to_yaml

LAUNCH_KEYS = ("launch.", "training.output_dir", "training.per_device_batch_size")
REPORTING_KEYS = (
    "evaluation.", "training.logging_steps", "training.save_steps", "training.save_total_limit",
    "training.eval_steps", "training.record_step_stats", "training.dataloader_num_workers",
    "data.max_eval_queries", "data.eval_", "data.validate_images", "model.compile", "model.gradient_checkpointing",
    "reranker.rerank_depth",
    # Memory levers of gradient caching, which computes the same loss and gradients at any mini-batch
    # size (tests/integration/test_loss_equivalence.py): lowering them is how a resumed run fits a smaller GPU.
    "loss.mini_batch_size", "loss.mini_batch_num_tokens",
    # The multi-vector scoring's block bound (chunked = unchunked), its fixed vs agreed query length (the same loss)
    # and its index-time pooling and page store (evaluation, mining and teacher scoring only).
    "multi_vector.chunk_elements", "multi_vector.query_length", "multi_vector.pool_factor",
    "multi_vector.store_dtype", "multi_vector.first_stage_candidates",
    "model.adapter.merge_on_save",  # what final/ holds besides the adapter, not what trains
)
SCHEDULE_KEYS = ("training.max_steps", "training.num_epochs")
PATH_KEYS = ("model.name_or_path", "data.path", "data.pages_path", "reranker.retriever")


def _flatten(node, prefix: str = "") -> dict[str, object]:
    """Dotted keys; a list of named sections (``data.datasets``) by name: ``data.datasets[docs].eval_path``."""
    if isinstance(node, dict):
        out: dict[str, object] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(node, list) and node and all(isinstance(item, dict) and "name" in item for item in node):
        out = {}
        for item in node:
            out.update(_flatten({k: v for k, v in item.items() if k != "name"}, f"{prefix[:-1]}[{item['name']}]."))
        return out
    return {prefix[:-1]: node}


_DATASET_KEY = re.compile(r"^data\.datasets\[[^\]]*\]\.(?P<key>.+)$")
_LOSS_TWINS = ("mini_batch_size", "mini_batch_num_tokens")


def twin(key: str) -> str:
    """The top-level key a per-dataset key stands for (``data.datasets[x].eval_path`` -> ``data.eval_path``,
    ``data.datasets[x].mini_batch_size`` -> ``loss.mini_batch_size``): it is classed as that one."""
    m = _DATASET_KEY.match(key)
    if not m:
        return key
    return f"loss.{m['key']}" if m["key"] in _LOSS_TWINS else f"data.{m['key']}"


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _same_path(a, b) -> bool:
    """Two spellings of one local folder (relative vs absolute) are the same model or data."""
    if not (isinstance(a, str) and isinstance(b, str)) or not (os.path.exists(a) and os.path.exists(b)):
        return False
    return Path(a).resolve() == Path(b).resolve()


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    key = twin(key)
    return any(key == p or (p.endswith((".", "_")) and key.startswith(p)) for p in prefixes)


def differences(recorded_yaml: str, current_yaml: str) -> dict[str, tuple[object, object]]:
    """key -> (recorded, current) for every compared key whose value changed."""
    old, new = _flatten(yaml.safe_load(recorded_yaml) or {}), _flatten(yaml.safe_load(current_yaml) or {})
    defaults = _defaults()
    diff = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b or _matches(key, LAUNCH_KEYS) or (twin(key) in PATH_KEYS and _same_path(a, b)):
            continue
        if key not in old and key in defaults and b == defaults[key]:
            continue  # a key added by a newer dist-vdr, at its default: the recorded run had that behaviour
        if key not in old and _DATASET_KEY.match(key) and b is None:
            continue  # the same for a dataset's key (null: data's value)
        diff[key] = (a, b)
    return diff


def _defaults() -> dict[str, object]:
    """Every key of a recipe at its default value (flattened as the recorded recipes are)."""
    return _flatten(yaml.safe_load(to_yaml(recipe_schema()())))


def check(recorded_yaml: str | None, current_yaml: str, checkpoint: str, allow_change: bool) -> list[str]:
    """Refuse (ValueError) a resume whose recipe changed the run; return notes on accepted changes."""
    if recorded_yaml is None:
        return [f"{checkpoint} records no recipe (written by an older dist-vdr): the recipe is not compared"]
    diff = differences(recorded_yaml, current_yaml)
    meaning = {k: v for k, v in diff.items() if not _matches(k, REPORTING_KEYS + SCHEDULE_KEYS)}
    schedule = {k: v for k, v in diff.items() if _matches(k, SCHEDULE_KEYS)}
    reporting = {k: v for k, v in diff.items() if _matches(k, REPORTING_KEYS)}

    def listing(d: dict) -> str:
        return ", ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in d.items())

    if meaning:
        raise ValueError(f"the recipe differs from the one {checkpoint} was trained with ({listing(meaning)}): "
                         f"these change what the run trains; start a new run in another training.output_dir, or "
                         f"resume with the recorded recipe ({Path(checkpoint) / 'dist_vdr_config.yaml'})")
    if schedule and not allow_change:
        raise ValueError(f"the schedule differs from the one {checkpoint} was trained with ({listing(schedule)}): "
                         f"it changes the learning rate of the remaining steps; pass --allow-config-change to "
                         f"continue with it, or start a new run in another training.output_dir")
    notes = []
    if schedule:
        notes.append(f"--allow-config-change: continuing with {listing(schedule)}")
    if reporting:
        notes.append(f"changed since {checkpoint} (reporting only, the training is unchanged): {listing(reporting)}")
    return notes


def schedule_changed(recorded_yaml: str | None, current_yaml: str) -> bool:
    """Whether the schedule length differs (a finished run extended by --allow-config-change trains on)."""
    if recorded_yaml is None:
        return False
    return any(_matches(k, SCHEDULE_KEYS) for k in differences(recorded_yaml, current_yaml))
