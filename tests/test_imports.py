"""The package's import graph: acyclic, and no import hidden inside a function to dodge a cycle.

The graph is read from the source (ast), not from an interpreter: in one interpreter every
`import vaelab.x` first runs `vaelab/__init__.py`, which imports most modules in one fixed order,
so a cycle that only bites when entered from another module would never show. Edges are the
imports a module runs when it is loaded (module level, class bodies included); the implicit
import of a module's parent packages is not an edge.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import vaelab

PACKAGE = Path(vaelab.__file__).parent
# The CLI imports what each subcommand needs inside the subcommand (a thin CLI, see STYLE.md).
LAZY_ALLOWED = {"vaelab.cli"}
# Edges left out of the graph, each with what removes it (none now; an entry must name a real edge).
PENDING_EDGES: set[tuple[str, str]] = set()


def module_files() -> dict[str, Path]:
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


MODULES = module_files()


def imported_modules(name: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The vaelab modules an import statement in module `name` loads."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name.split(".")[0] == "vaelab"}
    if node.level:
        package = name.split(".") if MODULES[name].name == "__init__.py" else name.split(".")[:-1]
        base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != "vaelab":
        return set()
    # `from . import x` loads the submodule x where there is one, else takes a name from the package.
    return {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}


def imports(name: str) -> tuple[set[str], set[str]]:
    """(loaded with the module, loaded only when a function runs) vaelab modules of `name`."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    eager, lazy = set(), set()

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (lazy if in_function else eager).update(imported_modules(name, child))
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(tree, False)
    return eager - {name}, lazy - {name}


GRAPH = {name: {m for m in imports(name)[0] if (name, m) not in PENDING_EDGES} for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_reader_finds_imports_and_cycles():
    """The reader on known statements, and the cycle finder on a cycle and on a tree: a test that
    reads no edges would pass on any package."""
    parse = lambda text: ast.parse(text).body[0]  # noqa: E731
    assert imported_modules("vaelab.models.vae", parse("from ..batch import Batch")) == {"vaelab.batch"}
    assert imported_modules("vaelab.models.vae", parse("from . import register, vae_step")) == {
        "vaelab.models", "vaelab.models.vae_step"}
    assert imported_modules("vaelab.models", parse("from .base import GenerativeModel")) == {"vaelab.models.base"}
    assert imported_modules("vaelab.train", parse("from . import checkpoint as ckpt")) == {"vaelab.checkpoint"}
    assert imported_modules("vaelab.train", parse("import torch")) == set()
    assert "vaelab.train_config" in GRAPH["vaelab.train"] and "vaelab.models" in GRAPH["vaelab"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_is_acyclic():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_each_pending_edge_still_exists():
    """An edge fixed at its source leaves the list: it must not excuse a new one later."""
    for source, target in PENDING_EDGES:
        assert target in imports(source)[0], f"{source} no longer imports {target}: drop it from PENDING_EDGES"


@pytest.mark.parametrize("name", sorted(set(MODULES) - LAZY_ALLOWED))
def test_no_vaelab_import_hides_inside_a_function(name):
    """With the graph acyclic, every import can sit at the top of its module, where a reader
    sees what the module depends on."""
    assert not imports(name)[1], f"{name} imports {sorted(imports(name)[1])} inside a function"


def test_the_leaf_modules_import_no_torch():
    """train_config, config, errors and version stay free of torch: the CLI reads the training
    options, and the run-folder code the version, without a heavy import behind them."""
    leaves = ["vaelab.train_config", "vaelab.config", "vaelab.errors", "vaelab.version"]
    code = ("import importlib.util, sys\n"
            f"root = {str(PACKAGE)!r}\n"
            "pkg = importlib.util.module_from_spec(importlib.util.spec_from_file_location(\n"
            "    'vaelab', root + '/__init__.py', submodule_search_locations=[root]))\n"
            "sys.modules['vaelab'] = pkg  # the package object without running its __init__\n"
            f"for name in {leaves!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_every_public_name_resolves_and_import_vaelab_loads_no_plotting():
    """Every name of vaelab.__all__ is there (and in dir(vaelab)); those that draw (figures,
    recipes, the notebook helpers) load matplotlib only when first used, so `import vaelab`, and
    every command that draws nothing, stays as quick as it was."""
    code = ("import sys, vaelab\n"
            "print('matplotlib' in sys.modules)\n"
            "print([n for n in vaelab.__all__ if getattr(vaelab, n, None) is None])\n"
            "print('matplotlib' in sys.modules, set(vaelab.__all__) <= set(dir(vaelab)))\n"
            "try:\n"
            "    vaelab.no_such_name\n"
            "except AttributeError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["False", "[]", "True True", "module 'vaelab' has no attribute 'no_such_name'"]
