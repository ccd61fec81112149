"""The package's import rules, checked on its source: no import cycles (function-level
imports included: a cycle hidden in a function is still a cycle of design), no module importing
another's underscore names, and product code never importing the test tooling."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import blockspace

PACKAGE = Path(blockspace.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path) -> Iterator[tuple[str, str | None, int]]:
    """(module imported, name taken from it or None, line) for every blockspace import."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "blockspace":
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "blockspace":
                continue
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in MODULES:
                    yield submodule, None, node.lineno
                else:
                    yield node.module, alias.name, node.lineno


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, _, _ in imports_of(path):
            # Importing a package's module runs the package's __init__ too, which these keep
            # empty of imports; the edge that matters is to the module itself.
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle_and_nothing_else() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_no_module_imports_another_modules_underscore_names() -> None:
    crossings = [
        f"{name}:{line} imports {target}.{taken}"
        for name, path in MODULES.items()
        for target, taken, line in imports_of(path)
        if taken is not None and taken.startswith("_") and not taken.startswith("__")
    ]
    assert crossings == []


def test_product_code_never_imports_the_test_tooling() -> None:
    offenders = [
        f"{name}:{line} imports {target}"
        for name, path in MODULES.items()
        if not name.startswith("blockspace.testing")
        for target, _, line in imports_of(path)
        if target.startswith("blockspace.testing")
    ]
    assert offenders == []


def test_package_inits_hold_no_imports() -> None:
    """Subpackage __init__ files stay docstrings: an import there would run on every import
    of any module of the package and could close a cycle this test cannot see."""
    busy = [
        name for name, path in MODULES.items()
        if path.name == "__init__.py" and name != "blockspace" and any(imports_of(path))
    ]
    assert busy == []
