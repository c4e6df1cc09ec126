"""The package's layout: one folder per step, imports one way, no circles, the documented tree.

Read from the source with `ast` (nothing is imported), so every import counts: module level,
inside functions and under `TYPE_CHECKING` alike.
"""

from __future__ import annotations

import ast
import graphlib
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pipelines"

FOUNDATIONS = {
    "config", "dodo_contract", "durable", "warehouse", "lock", "logs", "gc_passes",
    "webhook_store", "alerts", "metrics", "bookkeeping",
}  # fmt: skip
"""Shared by every step; they import one another only."""
STEPS = {"extract", "transform", "emit", "sandbox"}
"""One folder each; outside its folder a step is imported through its package only."""
COMPOSERS = {"job", "cli", "analysis", "commands"}
"""They compose the steps: `job` (a run), `commands` (the operator's other commands), `analysis`
(the notebooks' helpers) and, above them all, `cli`."""
MAY_IMPORT_COMPOSERS = {
    "job": set(),
    "commands": {"job", "analysis"},
    "analysis": set(),
    "cli": {"job", "commands"},
}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    names: tuple[str, ...]
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str) -> str:
    """The module an import name refers to (`pipelines.emit.ledger`, or a package)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(module: str) -> list[Import]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "pipelines":
                    found.append(Import(module, resolve(alias.name), (), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "pipelines":
                continue
            names = tuple(a.name for a in node.names)
            # `from pipelines.emit import ledger` imports the module pipelines.emit.ledger
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            for sub in submodules:
                found.append(Import(module, sub, (), node.lineno))
            rest = tuple(n for n in names if f"{base}.{n}" not in MODULES)
            if rest or not submodules:
                found.append(Import(module, resolve(base), rest, node.lineno))
    return found


ALL_IMPORTS = [imp for module in MODULES for imp in imports_of(module)]


def area(module: str) -> str:
    """`emit` for pipelines.emit.ledger, `config` for pipelines.config, `` for the package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_belongs_to_a_known_area() -> None:
    known = FOUNDATIONS | STEPS | COMPOSERS | {""}
    assert {m: area(m) for m in MODULES if area(m) not in known} == {}


def test_no_import_circles() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in ALL_IMPORTS:
        if imp.imported != imp.importer:
            graph[imp.importer].add(imp.imported)
    # A package's __init__ re-exporting its own modules is not a circle; a module importing
    # its own package's __init__ back would be, and stays an edge.
    try:
        tuple(graph_order(graph))
    except graphlib.CycleError as exc:
        pytest.fail(f"import circle: {' -> '.join(exc.args[1])}")


def graph_order(graph: dict[str, set[str]]) -> tuple[str, ...]:
    return tuple(graphlib.TopologicalSorter(graph).static_order())


def rule_breaks(imp: Import) -> str | None:
    """Why this import breaks the direction of the flow, or None."""
    src, dst = area(imp.importer), area(imp.imported)
    if dst == "" or src == dst:
        return None
    if src in FOUNDATIONS or src == "":
        return None if dst in FOUNDATIONS else "a foundation imports no step and no composer"
    if dst in FOUNDATIONS:
        return None
    if src in STEPS:
        return "a step imports the foundations and its own folder only"
    if dst in STEPS:
        return None if imp.imported == f"pipelines.{dst}" else "another step's internals"
    if dst in MAY_IMPORT_COMPOSERS.get(src, set()):
        return None
    return f"{src} may not import {dst}"


def test_imports_follow_the_flow() -> None:
    breaks = [
        f"{MODULES[i.importer].relative_to(REPO)}:{i.line} imports {i.imported}: {why}"
        for i in ALL_IMPORTS
        if (why := rule_breaks(i))
    ]
    assert breaks == []


def test_no_private_name_crosses_a_module() -> None:
    crossing = []
    for imp in ALL_IMPORTS:
        crossing += [
            f"{imp.importer}:{imp.line} takes {name} from {imp.imported}"
            for name in imp.names
            if name.startswith("_") and not name.startswith("__")
        ]
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {
            (alias.asname or alias.name): alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom | ast.Import)
            for alias in node.names
            if f"{getattr(node, 'module', '') or ''}.{alias.name}".lstrip(".") in MODULES
            or alias.name in MODULES
        }
        crossing += [
            f"{module}:{node.lineno} reads {node.value.id}.{node.attr}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ]
    assert crossing == []


def documented_tree() -> set[str]:
    """Paths in the tree drawn in docs/architecture.md (the block that starts `pipelines/`)."""
    text = (REPO / "docs" / "architecture.md").read_text()
    block = re.search(r"```text\n(pipelines/\n.*?)```", text, re.DOTALL)
    assert block, "docs/architecture.md has no ```text block drawing the pipelines/ tree"
    paths, stack = set(), []
    for line in block.group(1).splitlines():
        entry = re.match(r"^([ │├└─]*)([\w.]+/?)", line)
        if not entry:
            continue
        depth = len(entry.group(1)) // 4
        stack[depth:] = [entry.group(2).rstrip("/")]
        if entry.group(2).endswith(".py"):
            paths.add("/".join(stack))
    return paths


def test_the_documented_tree_is_the_tree() -> None:
    actual = {str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py")}
    assert documented_tree() == actual


def test_no_import_circles_in_the_benchmarks() -> None:
    bench = REPO / "bench"
    graph: dict[str, set[str]] = {}
    for path in sorted(bench.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        imported = {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bench.")
        } | {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
            if alias.name.startswith("bench.")
        }
        graph[f"bench.{path.stem}"] = imported - {f"bench.{path.stem}"}
    assert graph["bench.lookback_bench"] >= {"bench.harness"}
    try:
        graph_order(graph)
    except graphlib.CycleError as exc:
        pytest.fail(f"import circle in bench/: {' -> '.join(exc.args[1])}")
