"""The package's dependency rules, read from the source (every import, function-level ones too):
no import cycles, and kernels import nothing of serving, the scheduler or the replicas."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import vllm_jd

ROOT = Path(vllm_jd.__file__).parent


def import_graph() -> dict[str, set[str]]:
    """Module → the vllm_jd modules it imports anywhere in its source (TYPE_CHECKING blocks too)."""
    mods = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(("vllm_jd", *p.relative_to(ROOT).with_suffix("").parts))
        mods[name.removesuffix(".__init__")] = p
    graph: dict[str, set[str]] = defaultdict(set)
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vllm_jd"):
                for a in node.names:
                    target = f"{node.module}.{a.name}"
                    graph[m].add(target if target in mods else node.module)
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names if a.name in mods)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_kernels_import_nothing_of_serving():
    graph = import_graph()
    bad = sorted((m, t) for m, ts in graph.items() if m.startswith("vllm_jd.kernels") for t in ts
                 if t.startswith(("vllm_jd.serving", "vllm_jd.scheduler", "vllm_jd.replicas")))
    assert bad == []
