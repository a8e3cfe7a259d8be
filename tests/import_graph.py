"""The import graph of the deftx package, read from the source (nothing is imported).

    python tests/import_graph.py            # modules, edges, cycles, function-local imports, layer breaches
    python tests/import_graph.py --edges    # every internal edge, "a -> b (local)" for function-local ones

A module's edges are its ``import deftx...`` / ``from deftx... import ...`` statements, at module
level or inside functions (``local``). ``from deftx.x import y`` where ``deftx.x.y`` is a module
counts as an edge to that module. Used by tests/test_architecture.py.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "deftx"
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Graph:
    modules: dict[str, Path]
    edges: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    local: set[tuple[str, str]] = field(default_factory=set)     # (importer, imported) inside a function
    external: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # top-level packages
    local_external: set[tuple[str, str]] = field(default_factory=set)   # (importer, package) inside a function

    def cycles(self) -> list[list[str]]:
        """Strongly connected components with more than one module (Tarjan)."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        out: list[list[str]] = []
        counter = [0]

        def visit(v: str) -> None:
            index[v] = low[v] = counter[0]
            counter[0] += 1
            stack.append(v)
            on_stack.add(v)
            for w in sorted(self.edges.get(v, ())):
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    out.append(sorted(component))

        sys.setrecursionlimit(10_000)
        for v in sorted(self.modules):
            if v not in index:
                visit(v)
        return out

    def reachable(self, start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            v = todo.pop()
            for w in self.edges.get(v, ()):
                if w not in seen:
                    seen.add(w)
                    todo.append(w)
        return seen


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rsplit(".", 1)[0]


def build(root: Path = ROOT) -> Graph:
    modules = {_module_name(p): p for p in sorted((root / PACKAGE).rglob("*.py"))}
    graph = Graph(modules)
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(n) for f in functions for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = _package_of(name, path).split(".")
                    package = package[:len(package) - node.level + 1]
                    base = ".".join(package + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                top = target.split(".", 1)[0]
                if top != PACKAGE:
                    graph.external[name].add(top)
                    if id(node) in inside:
                        graph.local_external.add((name, top))
                    continue
                while target and target not in modules:
                    target = target.rsplit(".", 1)[0] if "." in target else ""
                if not target or target == name or target == PACKAGE:
                    continue
                graph.edges[name].add(target)
                if id(node) in inside:
                    graph.local.add((name, target))
    return graph


def main(argv: list[str]) -> None:
    graph = build()
    n_edges = sum(len(v) for v in graph.edges.values())
    print(f"{len(graph.modules)} modules, {n_edges} internal edges, {len(graph.local)} function-local")
    cycles = graph.cycles()
    print(f"cycles: {len(cycles)}")
    for cycle in cycles:
        print("  " + " <-> ".join(cycle))
    sizes = sorted(((len(path.read_text(encoding="utf-8").splitlines()), path.relative_to(ROOT).as_posix())
                    for path in (ROOT / "deftx").rglob("*.py")), reverse=True)
    print("largest modules (lines): " + ", ".join(f"{name} {n}" for n, name in sizes[:6]))
    if "--local" in argv:
        for a, b in sorted(graph.local):
            print(f"{a} -> {b} (function-local)")
    if "--edges" in argv:
        for a in sorted(graph.edges):
            for b in sorted(graph.edges[a]):
                print(f"{a} -> {b}" + (" (local)" if (a, b) in graph.local else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
