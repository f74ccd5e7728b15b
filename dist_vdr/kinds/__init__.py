"""The task registry: each model kind a recipe's ``task:`` can name, and the module that provides it.

A task (see :class:`dist_vdr.kinds.base.Task`) supplies everything that differs between model
kinds: its config rules, data preparation, model, loss, evaluator, trainer, final files and
headline. ``dist_vdr.training.run_training`` asks the task and has no branch of its own.

Adding a task is one module with a ``Task`` subclass plus one line in ``REGISTRY`` (or, outside
this package, one :func:`register` call; docs/tasks.md has a worked example).

Entries name their class by ``"module:Class"`` and are imported when first used: the config layer
validates ``task:`` through this registry, and loading a recipe must not import the model code of
every task (nor could it: task modules build on the config, so a static import would be a cycle).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dist_vdr.kinds.base import Task

REGISTRY: dict[str, str] = {
    "embedding": "dist_vdr.kinds.embedding.task:EmbeddingTask",
    "reranker": "dist_vdr.kinds.reranker.task:RerankerTask",
}

_loaded: dict[str, Task] = {}


def names() -> list[str]:
    return list(REGISTRY)


def register(name: str, target: str) -> None:
    """Add a task from outside the package: ``register("mine", "my_pkg.my_task:MyTask")``."""
    if ":" not in target:
        raise ValueError(f"a task is registered as 'module:Class', got {target!r}")
    REGISTRY[name] = target
    _loaded.pop(name, None)


def get(name: str) -> Task:
    """The task named ``name`` (one instance per process)."""
    if name not in REGISTRY:
        raise ValueError(f"task={name!r} is not one of {names()}")
    if name not in _loaded:
        module, _, cls = REGISTRY[name].partition(":")
        task = getattr(importlib.import_module(module), cls)()
        task.name = name
        _loaded[name] = task
    return _loaded[name]
