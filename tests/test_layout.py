"""The data side's module structure: imports flow one way (types -> io -> components ->
validate / dataset -> sources -> datamodule), so any module can be read and imported alone."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = "data_modules"


def local_imports(path: Path) -> tuple[set[str], list[str]]:
    """(modules of the package imported at module level, imports of it inside functions)."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
        else:
            continue
        if names and node.col_offset == 0:
            top.update(names)
        elif names:
            nested.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {', '.join(names)} inside a function")
    return top, nested


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_data_side_has_no_import_cycles_and_no_imports_hidden_in_functions():
    files = sorted((ROOT / PACKAGE).rglob("*.py"))
    graph, nested = {}, []
    for path in files:
        top, inside = local_imports(path)
        graph[module_name(path)] = top
        nested += inside
    assert not nested, "\n".join(nested)

    def deps(name: str) -> set[str]:
        """What importing ``name`` runs: its own imports and its parent packages' ``__init__``."""
        parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        return {d for d in graph.get(name, set()) | parents if d in graph and d != name}

    cycles, state = [], {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(deps(name)):
            if state.get(dep) == "open" and not name.startswith(dep + "."):  # a package importing its own parts is fine
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
    assert graph[f"{PACKAGE}.types"] == set(), "types imports nothing of the package"
