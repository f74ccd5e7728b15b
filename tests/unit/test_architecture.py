"""The package's structure, checked from its source (docs/architecture.md draws the same layers).

- the import graph of dist_vdr (every import statement, module level or inside a function; only
  ``if TYPE_CHECKING:`` blocks left out) has no cycle, and no module imports from a higher layer;
- no function is longer than 60 lines unless a comment on the line above its ``def`` says why;
- the training run has no branch on the task: the task (dist_vdr.kinds) decides.
"""

from __future__ import annotations

import ast
import fnmatch
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "dist_vdr"
MAX_FUNCTION_LINES = 60

# Lowest first. A module may import from its own layer (without cycles) and from layers below.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("dist_vdr", "dist_vdr.log", "dist_vdr.compat", "dist_vdr.storage", "dist_vdr.outputs",
                    "dist_vdr.sources", "dist_vdr.distributed", "dist_vdr.run.folder", "dist_vdr.run.lifecycle",
                    "dist_vdr.run.startup_timer", "dist_vdr.run.results")),
    # The registry of kinds (the package's __init__): names and import targets, read by the config.
    ("kind registry", ("dist_vdr.kinds",)),
    ("config", ("dist_vdr.config",)),
    # What every kind shares; none of it imports a kind.
    ("shared", ("dist_vdr.data", "dist_vdr.models", "dist_vdr.engines", "dist_vdr.losses", "dist_vdr.retrieval",
                "dist_vdr.checkpoints.store", "dist_vdr.run.preemption", "dist_vdr.run.resume_guard",
                "dist_vdr.run.lock", "dist_vdr.run.step_stats", "dist_vdr.kinds.base")),
    # One package per kind; tiny builds the test models of every kind.
    ("kinds", ("dist_vdr.kinds.*",)),
    # consolidate builds a kind's model; averaging consolidates.
    ("run", ("dist_vdr.run", "dist_vdr.checkpoints")),
    ("entry points", ("dist_vdr.cli", "dist_vdr.bench")),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """The layer of ``module``: patterns match the module or a package above it (``x`` matches ``x`` and
    ``x.y``; ``x*`` is a glob); the longest matching pattern wins (``dist_vdr.kinds.*`` beats ``dist_vdr.kinds``)."""
    best, best_len = None, -1
    for i, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if pattern == "dist_vdr":  # the package's __init__ only
                hit = module == pattern
            else:
                hit = fnmatch.fnmatchcase(module, pattern) or module.startswith(pattern + ".")
            if hit and len(pattern) > best_len:
                best, best_len = i, len(pattern)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)")
    return best


def _runtime_nodes(tree: ast.AST, type_checking: bool = False):
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only, never imported at run time),
    unless ``type_checking``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if not type_checking and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(module: str, path: Path, known: set[str], type_checking: bool = False) -> set[str]:
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text()), type_checking):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "dist_vdr")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "dist_vdr":
                target = node.module
            else:
                continue
            for alias in node.names:  # `from . import x` imports the submodule x when there is one
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return {m for m in found if m in known and m != module}


def import_graph(type_checking: bool = False) -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {m: imports_of(m, p, known, type_checking) for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_import_graph_has_no_cycle():
    """No cycle, counting the imports made for annotations only (``if TYPE_CHECKING:``) too: a type a module
    names is a dependency a reader follows."""
    cycle = find_cycle(import_graph(type_checking=True))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


MAX_TOP_LEVEL_MODULES = 10
MAX_MODULE_LINES = 600


def test_the_top_level_holds_few_modules_and_no_module_is_long():
    """The package's structure shows in its folders: at most 10 modules at the top (``__init__`` counted), none
    over 600 lines anywhere."""
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"{len(top)} modules at the top of dist_vdr/: {top}"
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_module_imports_from_a_higher_layer():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in import_graph().items() for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_checks_can_fail():
    """The broken variants: a cycle and an upward import are found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("dist_vdr.cli.commands") > layer_of("dist_vdr.run.training") \
        > layer_of("dist_vdr.kinds.embedding.task") > layer_of("dist_vdr.models.build") > layer_of("dist_vdr.config") \
        > layer_of("dist_vdr.kinds")
    known = {"dist_vdr.config", "dist_vdr.cli", "dist_vdr.kinds", "dist_vdr.kinds.base"}
    tree = "from . import cli\nfrom .kinds import base\nif TYPE_CHECKING:\n    from . import kinds\n"
    probe = REPO / "tests" / "_probe_module.py"
    try:
        probe.write_text(tree)
        assert imports_of("dist_vdr.config", probe, known) == {"dist_vdr.cli", "dist_vdr.kinds.base"}
    finally:
        probe.unlink()


def _long_functions() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = node.end_lineno - node.lineno + 1
            reason = lines[start - 2].strip() if start >= 2 else ""
            if length > MAX_FUNCTION_LINES and not reason.startswith("# long:"):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_over_60_lines_without_a_reason():
    long = _long_functions()
    assert not long, ("functions over 60 lines (split them, or put '# long: <why>' on the line above the def):\n"
                      + "\n".join(long))


@pytest.mark.parametrize("path", [*sorted(
    str(p.relative_to(REPO)) for p in (PACKAGE / "run").glob("*.py"))])
def test_the_run_has_no_task_branch(path):
    source = (REPO / path).read_text()
    tree = ast.parse(source)
    branches = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Compare)
                and any(("task" in ast.unparse(side)) or (isinstance(side, ast.Constant) and side.value in
                                                          ("embedding", "reranker"))
                        for side in [n.left, *n.comparators])]
    assert not branches, f"{path} branches on the task: {branches}; ask the task (dist_vdr.kinds) instead"


def test_ruff_is_clean_under_the_committed_config():
    """`make lint`: the rules of pyproject.toml's [tool.ruff], zero findings."""
    ruff = subprocess.run([sys.executable, "-m", "ruff", "check", "dist_vdr", "tests", "launch", "slurm"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert ruff.returncode == 0, ruff.stdout[-4000:] + ruff.stderr[-2000:]


RUN_NAMES = {"final", "final.tmp", "final.previous", "mined", "resolved_config.yaml", "run_info.jsonl", "startup",
             "startup_times.json", "step_stats.json", "collectives", "metrics.json", "ndcg_vs_dim.png", "report.md",
             "report.png", "retrieval_candidates.json", "slurm-logs"}


def test_the_run_folders_names_are_defined_in_one_module():
    """Every path into a run folder is asked of dist_vdr.run.folder.RunDir: no other module joins a run folder's
    names (`out / "final"`, `out / f"metrics_{which}.json"`)."""
    import ast

    spelled = []
    for module, path in _modules().items():
        if module == "dist_vdr.run.folder":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)):
                continue
            right = node.right
            literal = right.value if isinstance(right, ast.Constant) and isinstance(right.value, str) else None
            if isinstance(right, ast.JoinedStr) and right.values and isinstance(right.values[0], ast.Constant):
                literal = str(right.values[0].value) + "{}"
            if literal and (literal in RUN_NAMES or literal.startswith(("metrics_{", "eval_{", "checkpoint-{"))):
                spelled.append(f"{module}:{node.lineno} / {literal!r}")
    assert not spelled, f"run folder names spelled outside dist_vdr/run/folder.py: {spelled}"
