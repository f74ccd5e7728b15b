"""Where a model or dataset comes from: a local path, or the Hugging Face Hub.

The rule (docs/usage.md, "Paths and hub ids"): a value is a **local path** when it exists, starts with
``.``, ``/`` or ``~``, has more than one ``/``, or its first component exists in the current
folder (``artifacts/pagez`` when ``artifacts/`` exists). A local path that does not exist is
refused at load time -- without the rule a typo became a hub id: a traceback after a minute of
retries offline, and online a download from whatever account is named like the folder. Anything
else (``org/name``, ``name``) is a **hub id**; ``hf://org/name`` says so explicitly and always
means the hub, even when a folder ``org`` exists here.
"""

from __future__ import annotations

import os

HUB_PREFIX = "hf://"


def looks_local(value: str) -> bool:
    if value.startswith((".", "/", "~")) or value.count("/") > 1:
        return True
    return os.path.exists(value.split("/", 1)[0])


def resolve(value: str, key: str, what: str = "folder") -> str:
    """The value to load from: a local path that exists, or a hub id (``hf://`` removed).

    ValueError with the fix for a local-looking path that does not exist.
    """
    if value.startswith(HUB_PREFIX):
        return value[len(HUB_PREFIX):]
    expanded = os.path.expanduser(value)
    if os.path.exists(expanded):
        return expanded
    if looks_local(value):
        hub = ("" if value.startswith((".", "/", "~"))
               else f", or write {HUB_PREFIX}{value} if it is a Hugging Face Hub id")
        raise ValueError(f"{key}={value!r}: no such {what} (relative to {os.getcwd()}); fix the path{hub}")
    return value


def resolve_file(value: str, key: str) -> str:
    """A file that must exist locally (query and qrels files have no hub form)."""
    expanded = os.path.expanduser(value)
    if not os.path.isfile(expanded):
        raise ValueError(f"{key}={value!r}: no such file (relative to {os.getcwd()})")
    return expanded


def resolve_args(args, files: tuple[str, ...] = ("queries", "qrels"), **folders: str) -> None:
    """Command-line flags naming models/data (``--model`` ...) by the same rule; query/qrels files must exist."""
    for name, what in folders.items():
        if getattr(args, name, None):
            setattr(args, name, resolve(getattr(args, name), f"--{name.replace('_', '-')}", what))
    for name in files:
        if getattr(args, name, None):
            setattr(args, name, resolve_file(getattr(args, name), f"--{name}"))
