"""Print the import graph of bard_data (and the trainers) and fail on a cycle.

    python scripts/import_graph.py              # package-level edges (bard_data.X -> bard_data.Y) and cycles
    python scripts/import_graph.py --modules    # every module-level edge too

Every import counts, also one inside a function (a lazy import hides a cycle, it does not remove
it); imports under ``if TYPE_CHECKING:`` do not (they never run). Exit status 1 when the module
graph or the package graph has a cycle. The layer order itself is import-linter's contract in
pyproject.toml; this script is the picture, and the cycle check at module granularity.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import grimp


def _group(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "bard_data" and len(parts) > 1 else parts[0]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", action="store_true", help="also print every module-level edge")
    ap.add_argument("packages", nargs="*", default=["bard_data", "trainers"])
    args = ap.parse_args(argv)
    graph = grimp.build_graph(*args.packages, exclude_type_checking_imports=True)
    modules: dict[str, set[str]] = defaultdict(set)
    groups: dict[str, set[str]] = defaultdict(set)
    for m in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(m):
            if imported.split(".")[0] not in args.packages:
                continue
            modules[m].add(imported)
            a, b = _group(m), _group(imported)
            if a != b and not (m == "bard_data" or imported == "bard_data"):
                groups[a].add(b)
    print("package-level imports:")
    for a in sorted(groups):
        print(f"  {a} -> {', '.join(sorted(groups[a]))}")
    if args.modules:
        print("module-level imports:")
        for m in sorted(modules):
            print(f"  {m} -> {', '.join(sorted(modules[m]))}")
    bad = 0
    for kind, edges in (("package", groups), ("module", modules)):
        for comp in _cycles(edges):
            print(f"{kind} cycle: {' <-> '.join(comp)}")
            bad += 1
    print("no cycles" if not bad else f"{bad} cycle(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
