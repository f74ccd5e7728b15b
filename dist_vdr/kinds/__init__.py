"""The registry of model kinds: each name a recipe's ``task:`` can take, and what that kind declares.

A kind is a package (``dist_vdr/kinds/embedding/``, ``dist_vdr/kinds/reranker/``) whose ``__init__`` declares a
:class:`Kind`: its :class:`~dist_vdr.kinds.base.Task` (everything that differs between kinds: config rules, data,
model, loss, scoring, evaluator, trainer, final files, headline), its loss names, its own config section and the
shared options it takes. The config composes the recipe from these declarations (``dist_vdr.config``), the
training run and the commands ask the Task; none of the shared code names a kind.

A kind from outside the package is added by one :func:`register` call, in a module the processes of a run import:
name it in ``DIST_VDR_KINDS`` (comma-separated modules, imported before the registry answers) or in the
``dist_vdr.kinds`` entry-point group of an installed package (docs/tasks.md has a worked example).

Declarations name their classes by ``"module:Class"`` and are imported when first used: the config layer reads
this registry, and loading a recipe must not import every kind's model code (nor could it statically: kind
modules build on the config).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

KIND_FILE = "dist_vdr_kind.json"
"""The record of a model folder's kind (``{"task": name}``), written into every model folder a run or a command
makes: the commands that load a model (eval, mine-negatives, score-rows, ...) ask its kind's Task how."""
KINDS_ENV = "DIST_VDR_KINDS"
"""Comma-separated modules imported before the registry answers (each registers its kinds)."""
ENTRY_POINTS = "dist_vdr.kinds"
"""The entry-point group of installed packages that register kinds (each entry: a module to import)."""


@dataclass(frozen=True)
class Kind:
    """What a kind declares, read without importing its model code."""

    task: str
    """``"module:Class"`` of its :class:`~dist_vdr.kinds.base.Task`."""
    losses: tuple[str, ...] = ()
    """Its ``loss.name`` values; the first is what ``loss.name: auto`` means."""
    section: tuple[str, str] | None = None
    """Its own recipe section: (key, ``"module:Class"`` of the section's dataclass), e.g. ``("reranker", ...)``."""
    options: tuple[str, ...] = ()
    """The keys of shared sections that only some kinds take (e.g. ``loss.matryoshka_dims``) and this one does:
    a key some kind lists is refused, when set, for every kind that does not list it."""
    recognizes: str | None = None
    """``"module:function"`` (path -> bool): whether a model folder that records no kind is one of this kind
    (folders written before the kind was recorded; none: the first registered kind's)."""


REGISTRY: dict[str, Kind | str] = {
    "embedding": "dist_vdr.kinds.embedding:KIND",
    "reranker": "dist_vdr.kinds.reranker:KIND",
    "multi_vector": "dist_vdr.kinds.multi_vector:KIND",
}
"""Name -> its :class:`Kind`, or ``"module:ATTR"`` of one (imported on first use)."""

_tasks: dict[str, Any] = {}
_plugins_done: set[str] = set()
_version = [0]


def version() -> int:
    """Changes whenever a kind is registered (the config's composed schema is rebuilt then)."""
    _load_plugins()
    return _version[0]


def register(name: str, kind: Kind | str) -> None:
    """Add a kind: ``register("toy", Kind(task="my_pkg.toy:ToyTask", losses=("toy",), ...))``. A ``"module:Class"``
    string of a Task subclass declares the kind the class extends (its ``extends``) with this class as its task
    (``register("triplet", "my_tasks.triplet:TripletTask")`` for a subclass of the embedding task)."""
    if isinstance(kind, str):
        if ":" not in kind:
            raise ValueError(f"a kind is registered as 'module:Class' or a Kind, got {kind!r}")
        module, _, attr = kind.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        base = getattr(cls, "extends", None)
        kind = replace(declaration(base), task=kind) if base else Kind(task=kind)
    REGISTRY[name] = kind
    _tasks.pop(name, None)
    _version[0] += 1


def names() -> list[str]:
    _load_plugins()
    return list(REGISTRY)


def declaration(name: str) -> Kind:
    """The :class:`Kind` registered as ``name`` (ValueError naming the registered ones)."""
    _load_plugins()
    if name not in REGISTRY:
        raise ValueError(f"task={name!r} is not one of {names()}" + (
            f" (a kind from outside dist-vdr is registered by a module named in {KINDS_ENV})"))
    entry = REGISTRY[name]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = REGISTRY[name] = getattr(importlib.import_module(module), attr)
    return entry


def get(name: str):
    """The task of the kind named ``name`` (one instance per process)."""
    if name not in _tasks:
        module, _, cls = declaration(name).task.partition(":")
        task = getattr(importlib.import_module(module), cls)()
        task.name = name
        _tasks[name] = task
    return _tasks[name]


def section_class(name: str) -> tuple[str, type] | None:
    """(recipe key, dataclass) of the kind's own config section, or None."""
    section = declaration(name).section
    if section is None:
        return None
    module, _, cls = section[1].partition(":")
    return section[0], getattr(importlib.import_module(module), cls)


def record(name: str) -> str:
    """The text of :data:`KIND_FILE` for a model of the kind ``name``."""
    import json

    return json.dumps({"task": name}, indent=2)


def of_folder(path: str | Path, flag: str = "--model", default: bool = True) -> str | None:
    """The kind of the model folder ``path``: its record, else the kind that recognizes it, else (``default``)
    the first registered kind, or None."""
    import json

    recorded = Path(path) / KIND_FILE
    if recorded.is_file():
        try:
            name = json.loads(recorded.read_text())["task"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{flag} {path}: {KIND_FILE} is unreadable ({exc}); write it again as "
                             f'{{"task": "<kind>"}}') from None
        if name not in names():
            raise ValueError(f"{flag} {path} is a model of task={name!r}, which is not registered here "
                             f"({names()}): name the module that registers it in {KINDS_ENV}")
        return name
    for name in names():
        recognizer = declaration(name).recognizes
        if recognizer:
            module, _, func = recognizer.partition(":")
            if getattr(importlib.import_module(module), func)(str(path)):
                return name
    return names()[0] if default else None


def optional_options() -> dict[str, list[str]]:
    """Each shared key that only some kinds take -> those kinds."""
    taken: dict[str, list[str]] = {}
    for name in names():
        for key in declaration(name).options:
            taken.setdefault(key, []).append(name)
    return taken


def _load_plugins() -> None:
    """Import the modules of ``DIST_VDR_KINDS`` and of the entry-point group (once each)."""
    wanted = [m.strip() for m in os.environ.get(KINDS_ENV, "").split(",") if m.strip()]
    if "entry points" not in _plugins_done:
        _plugins_done.add("entry points")
        from importlib.metadata import entry_points

        wanted += [ep.value for ep in entry_points(group=ENTRY_POINTS)]
    for module in wanted:
        if module not in _plugins_done:
            _plugins_done.add(module)
            try:
                importlib.import_module(module.partition(":")[0])
            except ImportError as exc:
                raise ValueError(f"{KINDS_ENV}: cannot import {module!r} ({exc}); put its folder on PYTHONPATH") \
                    from exc
