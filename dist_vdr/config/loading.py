"""Loading a recipe or a command's settings: defaults < YAML file < options < ``key=value`` overrides; every
failure a ``ValueError`` naming the key, the layer it came from and the fix."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dist_vdr import kinds
from dist_vdr.config.model_data import DatasetEntry
from dist_vdr.config.recipe import Config, recipe_schema
from dist_vdr.config.values import TRACKERS


def _schema(schema: type | None = None):
    """The typed defaults of ``schema`` (default: :class:`Config`). A section declared without a
    default (a command's ``slurm: SlurmResources``) gets its class's field defaults: an instance
    would have run ``__post_init__``, which derives values (tasks_per_node from gpus_per_node) or
    needs values not given yet (a page build's input folder)."""
    import dataclasses
    import typing

    from omegaconf import OmegaConf

    schema = recipe_schema(schema)
    node = OmegaConf.structured(schema)
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and dataclasses.is_dataclass(hints[f.name]):
            node[f.name] = OmegaConf.structured(hints[f.name])
    return node


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                check_paths: bool | str = True, schema: type | None = None, *, flags: Mapping[str, Any] | None = None,
                aliases: Mapping[str, str] | None = None) -> Any:
    """Load a recipe: defaults < YAML file < ``key=value`` overrides. Raises ValueError on any problem,
    naming the layer (file or override) it comes from. ``check_paths``: refuse local-looking model and
    data paths that do not exist (:mod:`dist_vdr.sources`), before anything is loaded or written ("data":
    the data's paths only).

    ``schema``: the dataclass to load (default :class:`Config`, a training recipe; the commands' own
    in :mod:`dist_vdr.cli.settings`). A command reads the sections it shares with a recipe from a recipe
    file and ignores the recipe's other sections; its ``resolve_sources()`` checks its paths.
    ``flags``: command-line option values by key, a layer between the file and the overrides;
    ``aliases``: the option of each key, named in messages."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = recipe_schema(schema)
    flags, aliases = dict(flags or {}), dict(aliases or {})
    merged = _schema(schema)
    if path is not None:
        merged = _merge(merged, _file_layer(Path(path), schema), f" in {path}", schema, aliases)
    for key, value in flags.items():  # one layer per option: an error names the option
        merged = _merge(merged, _nested(key, value), f" in the option {aliases.get(key, key)}", schema, aliases)
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ValueError(f"overrides must look like section.key=value, got {bad}")
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise ValueError(_explain(exc, f" in the override {_override_of(exc, overrides)}", schema, aliases)) from exc
    except TypeError as exc:  # a.b.1.c=... into a list ("Cannot merge incompatible container types")
        raise ValueError(f"overrides {list(overrides)}: a list entry (e.g. of data.datasets) cannot be set by its "
                         f"index; edit the YAML, or give the whole list: data.datasets='[{{name: a, path: ...}}]'") \
            from exc
    try:
        cfg = OmegaConf.to_object(merged)
    except (OmegaConfBaseException, ValueError) as exc:
        given = {key: f"the option {aliases.get(key, key)}" for key in flags}
        raise ValueError(_blame(exc, path, overrides, schema, aliases, given)) from exc
    _check_finite(cfg, "")
    _check_loaded(cfg, schema, check_paths)
    return cfg


def _check_loaded(cfg: Any, schema: type, check_paths: bool | str) -> None:
    if issubclass(schema, Config):  # only a training recipe needs the libraries' value sets (and their imports)
        _check_with_libraries(cfg)
        if check_paths == "data":  # `data check`: the data's paths, not the model's it does not load
            _resolve_sources(cfg, model=False)
        elif check_paths:
            _resolve_sources(cfg)
            _check_tracker_folders(cfg)
    elif check_paths and hasattr(cfg, "resolve_sources"):
        cfg.resolve_sources()


def _check_finite(value: Any, key: str) -> None:
    """Every number of a recipe or a command's settings is finite: a NaN passes every ``<``/``>`` bound of the
    sections' checks (``loss.false_negatives.margin: .nan`` masked nothing), an inf overflows what it scales."""
    import dataclasses
    import math

    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key}={value}: give a finite number (NaN and inf are not settings)")
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            _check_finite(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            name = getattr(item, "name", None)
            _check_finite(item, f"{key}[{name if isinstance(name, str) else i}]")
    elif isinstance(value, dict):
        for k, item in value.items():
            _check_finite(item, f"{key}.{k}")


def _file_layer(path: Path, schema: type):
    from omegaconf import DictConfig, OmegaConf

    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        layer = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends
        raise ValueError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(layer, DictConfig):
        raise ValueError(f"config file {path} must be a mapping of sections (model:, data:, training: ...), "
                         f"not a {type(layer).__name__.replace('Config', '').lower() or 'value'}")
    if not issubclass(schema, Config):  # a recipe given to a command: the sections the command has no use for
        import dataclasses

        unused = ({f.name for f in dataclasses.fields(recipe_schema(Config))}
                  - {f.name for f in dataclasses.fields(schema)})
        for name in unused & set(layer.keys()):
            layer.pop(name)
    return layer


def _nested(key: str, value: Any):
    """``a.b=value`` as a one-key config (typed: no YAML parsing of the value, as a dotlist would)."""
    from omegaconf import OmegaConf

    tree: Any = value
    for part in reversed(key.split(".")):
        tree = {part: tree}
    return OmegaConf.create(tree)


def _merge(merged, layer, where: str, schema: type, aliases: Mapping[str, str]):
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.merge(merged, layer)
    except OmegaConfBaseException as exc:
        raise ValueError(_explain(exc, where, schema, aliases)) from exc


def _override_of(exc, overrides) -> str:
    key = getattr(exc, "full_key", None) or ""
    return next((o for o in overrides if o.split("=", 1)[0] == key), f"{key}=...")


def _blame(exc, path, overrides, schema: type | None = None, aliases: Mapping[str, str] | None = None,
           given: Mapping[str, str] | None = None) -> str:
    """A value check failed: say whether the override, an option (``given``: key -> which) or the file
    set the value."""
    msg = _explain(exc, "", schema, aliases) if not isinstance(exc, ValueError) else str(exc)
    m = re.match(r"(?:bad value for config key ')?([a-z_]+(?:\.[a-z_]+)+)", msg)
    key = m.group(1) if m else None
    from_override = [o for o in overrides if key and o.split("=", 1)[0] == key]
    if from_override:
        return f"{msg} (from the override {from_override[-1]})"
    if key and given and key in given:
        return f"{msg} (from {given[key]})"
    if key is None and given:  # a message naming no key: the value may as well come from an option
        return msg
    return f"{msg} (in {path})" if path and "is not set:" not in msg else msg


def _check_with_libraries(cfg: Config) -> None:
    """Values whose valid set a library defines (checked here, before anything is loaded or written)."""
    from transformers.trainer_utils import SchedulerType

    names = [t.value for t in SchedulerType]
    if cfg.training.lr_scheduler_type not in names:
        raise ValueError(f"training.lr_scheduler_type={cfg.training.lr_scheduler_type!r} is not one of {names}")
    import importlib.util

    for name in cfg.training.report_to:
        if not any(importlib.util.find_spec(p) for p in TRACKERS[name]):
            raise ValueError(f"training.report_to={name}: the {TRACKERS[name][0]} package is not installed; "
                             f"pip install {TRACKERS[name][0]} (or pip install 'dist-vdr[tracking]'), or remove it")


def _check_tracker_folders(cfg: Config) -> None:
    """trackio's store must be writable: trackio only warns and the run's tracking would be lost. Nothing is
    created here (the nearest existing folder on the way must be writable)."""
    if "trackio" not in cfg.training.report_to:
        return

    from huggingface_hub.constants import HF_HOME

    folder = Path(os.environ.get("TRACKIO_DIR") or Path(HF_HOME) / "trackio").expanduser()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"training.report_to=trackio: trackio stores its runs in {folder}, which cannot be written "
                         f"({existing} is not a writable folder): set TRACKIO_DIR to a writable folder")


def _resolve_sources(cfg: Config, model: bool = True) -> None:
    from dist_vdr import sources

    if model:
        cfg.model.name_or_path = sources.resolve(cfg.model.name_or_path, "model.name_or_path", "model folder")
    if cfg.model.adapter.init_from:
        cfg.model.adapter.init_from = sources.resolve(cfg.model.adapter.init_from, "model.adapter.init_from",
                                                      "adapter folder")
    _resolve_data_paths("data", cfg.data, cfg.evaluation.enabled, _data_path_used(cfg))
    for k, entry in enumerate(cfg.data.datasets):
        _resolve_data_paths(f"data.datasets[{k}]", entry, cfg.evaluation.enabled)
    if not model:
        return
    for key, label in kinds.get(cfg.task).local_paths(cfg):  # the task's own paths (dotted keys, any depth)
        *sections, name = key.split(".")
        node = cfg
        for section in sections:
            node = getattr(node, section)
        if getattr(node, name) is not None:  # unset: nothing to check
            setattr(node, name, sources.resolve(getattr(node, name), key, label))


def _data_path_used(cfg: Config) -> bool:
    """Whether anything reads data.path: not when every dataset of a mixture has its own path and the
    evaluation is off, or is the datasets' own, or names data.eval_path."""
    d = cfg.data
    if not d.datasets or any(e.path is None for e in d.datasets):
        return True
    return cfg.evaluation.enabled and not any(e.has_eval for e in d.datasets) and not d.eval_path


def _resolve_data_paths(prefix: str, section, evaluating: bool, path_used: bool = True) -> None:
    """The paths of a data section or a mixture's entry (``prefix``: its key), the eval ones when evaluating."""
    from dist_vdr import sources

    for key, label in (("path", "dataset folder"), ("pages_path", "page corpus folder"),
                       ("eval_path", "eval data folder")):
        if getattr(section, key) and (key != "eval_path" or evaluating) and (key != "path" or path_used):
            setattr(section, key, sources.resolve(getattr(section, key), f"{prefix}.{key}", label))
    for key in ("eval_queries_file", "eval_qrels_file"):
        if getattr(section, key) and evaluating:
            setattr(section, key, sources.resolve_file(getattr(section, key), f"{prefix}.{key}"))


def _explain(exc, where: str, schema: type | None = None, aliases: Mapping[str, str] | None = None) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    if type(exc).__name__ == "MissingMandatoryValue":
        option = (aliases or {}).get(key)
        return f"{key} is not set: give {option + ' or ' if option else ''}{key}=..."
    if type(exc).__name__ == "ConfigKeyError" and getattr(exc, "object_type", None) is DatasetEntry:
        import dataclasses

        return (f"unknown key {key!r} of a data.datasets entry{where}; known keys: "
                f"{sorted(f.name for f in dataclasses.fields(DatasetEntry))}")
    if type(exc).__name__ == "ConfigKeyError":
        from omegaconf import OmegaConf

        section = key.rsplit(".", 1)[0] if key and "." in key else None
        node = OmegaConf.select(_schema(schema), section) if section else _schema(schema)
        known = f"; known keys{' of ' + section if section else ''}: {sorted(node.keys())}" if node is not None else ""
        return f"unknown config key {key!r}{where}{known}"
    return f"bad value for config key {key!r}{where}: {msg}"


def to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
