"""The project's module import graph, read with ``ast`` (nothing is imported), and its cycles.

    python scripts/import_graph.py          print cycles and forbidden arrows; exit 1 if any

Every import counts, including those inside functions and under ``TYPE_CHECKING``: a lazy import
hides a circle from Python, not from a reader. Folders may not form circles either. The product's
packages are layered in the order the data flows, and an arrow may only point down the layers:
``misalign_monitor`` (the one command) > ``review`` (the auditors' app) > ``service`` (the
sidecar) > ``tap`` > ``wire`` (the contract) > ``detectors`` (bundles, scoring, the error tree);
none of them imports ``tests``, ``bench`` or ``scripts``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "misalign_monitor",
    "review",
    "service",
    "detectors",
    "tap",
    "wire",
    "bench",
    "scripts",
    "tests",
)
LAYERS = ("misalign_monitor", "review", "service", "tap", "wire", "detectors")
TOOLS = ("tests", "bench", "scripts")
FORBIDDEN = {layer: (*LAYERS[: i + 1], *TOOLS) for i, layer in enumerate(LAYERS)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package's ``__init__`` for ``from pkg import
    name`` only when ``pkg.name`` is not itself a module)."""
    files = {
        module_name(p): p
        for pkg in PACKAGES
        for p in (root / pkg).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    edges: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".")[
                        : len(mod.split(".")) - node.level + (1 if is_pkg else 0)
                    ]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names
                ]
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    edges[mod].add(t)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def package_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same graph between folders (a module counts for the package that holds it)."""

    def folder(m: str) -> str:
        return m if (ROOT / m.replace(".", "/")).is_dir() else m.rpartition(".")[0] or m

    out: dict[str, set[str]] = {}
    for a, targets in edges.items():
        fa = folder(a)
        out.setdefault(fa, set())
        for b in targets:
            fb = folder(b)
            out.setdefault(fb, set())
            if fb != fa:
                out[fa].add(fb)
    return out


def forbidden(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    bad = []
    for a, targets in edges.items():
        for b in targets:
            top_a, top_b = a.split(".")[0], b.split(".")[0]
            if top_b != top_a and top_b in FORBIDDEN.get(top_a, ()):
                bad.append((a, b))
    return sorted(bad)


def main() -> int:
    edges = graph()
    found = cycles(edges)
    folders = cycles(package_graph(edges))
    bad = forbidden(edges)
    for comp in found:
        print("cycle:", " <-> ".join(comp))
    for comp in folders:
        print("folder cycle:", " <-> ".join(comp))
    for a, b in bad:
        print(f"forbidden: {a} -> {b}")
    n = sum(len(t) for t in edges.values())
    print(
        f"{len(edges)} modules, {n} imports: {len(found)} cycles, {len(folders)} folder cycles, "
        f"{len(bad)} forbidden arrows"
    )
    return 1 if found or folders or bad else 0


if __name__ == "__main__":
    sys.exit(main())
