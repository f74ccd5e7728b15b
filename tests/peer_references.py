"""Peers' own code used as references by the tests (requirements-references.txt), imported so that it cannot change
how the rest of a test process behaves."""

from __future__ import annotations

from pathlib import Path


def colpali_modules():
    """colpali-engine's loss modules (requirements-references.txt, installed --no-deps), imported WITHOUT its
    package ``__init__``: that imports its models, which register with transformers and change how later
    checkpoints of this process load (the tiny reranker's warm start failed after it). The loss modules need
    only torch."""
    import importlib
    import importlib.util
    import sys
    import types

    if "colpali_engine" not in sys.modules:
        spec = importlib.util.find_spec("colpali_engine")
        if spec is None:
            raise ImportError("colpali-engine is not installed: `pip install --no-deps -r requirements-references.txt`")
        package = types.ModuleType("colpali_engine")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["colpali_engine"] = package
        for name in ("utils", "loss"):  # their __init__s import only their own modules
            sub = types.ModuleType(f"colpali_engine.{name}")
            sub.__path__ = [str(Path(package.__path__[0]) / name)]
            sys.modules[f"colpali_engine.{name}"] = sub
    return (importlib.import_module("colpali_engine.loss.late_interaction_losses"),
            importlib.import_module("colpali_engine.utils.maxsim"))
