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


def test_the_store_imports_nothing_else_of_ours():
    # the on-disk format is the contract between compress, serving and users' tools: it must be
    # readable without the methods, the kernels or vLLM
    graph = import_graph()
    bad = sorted((m, t) for m, ts in graph.items() if m.startswith("vllm_jd.store") for t in ts
                 if not t.startswith("vllm_jd.store"))
    assert bad == []
    assert any(t.startswith("vllm_jd.store") for t in graph["vllm_jd.serving.bank"])  # the rule sees real edges


def test_sources_import_only_the_store():
    # fetching adapters is used by compress and by the server's resolver alike: it must not pull
    # in either (nor vLLM)
    graph = import_graph()
    bad = sorted((m, t) for m, ts in graph.items() if m.startswith("vllm_jd.sources") for t in ts
                 if not t.startswith(("vllm_jd.sources", "vllm_jd.store")))
    assert bad == []
    assert "vllm_jd.sources.fetch" in graph["vllm_jd.compress.inputs"]  # the rule sees real edges


def _readme_layout() -> dict[str, set[str]]:
    """README's Layout block: folder → the names its lines list (after the first ":", if any;
    items split at "," and " and ", each item's first word; parenthesised notes dropped)."""
    text = (ROOT.parent / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    layout: dict[str, str] = {}
    folder = None
    for line in block.splitlines():
        if line[:1] not in (" ", ""):
            folder, line = line.split(None, 1)
        if folder:
            layout[folder] = layout.get(folder, "") + " " + line
    names = {}
    for folder, text in layout.items():
        depth, out = 0, []
        for ch in text:  # drop (parenthesised notes)
            depth += ch == "("
            if depth == 0:
                out.append(ch)
            depth -= ch == ")" and depth > 0
        listed = "".join(out)
        listed = listed.split(":", 1)[1] if ":" in listed else listed
        items = listed.replace(" and ", ",").split(",")
        names[folder] = {item.split()[0] for item in items if item.split()}
    return names


def test_readme_layout_lists_every_module_and_only_modules():
    layout = _readme_layout()
    for folder, listed in layout.items():
        path = ROOT.parent / folder
        files = {p.stem for p in path.iterdir() if p.suffix in (".py", ".sh") and p.stem != "__init__"}
        subfolders = {f.split("/")[-1] for f in layout if f.startswith(folder + "/")}
        assert files - subfolders == listed - subfolders, (
            f"{folder}: missing from README's Layout {sorted(files - listed)}, listed but absent {sorted(listed - files)}")


def test_functions_stay_short_and_modules_say_why_they_are_long():
    # the house rules: functions under ~60 lines; a module past ~300 lines says why in its docstring
    long_functions, long_modules = [], []
    for path in sorted(ROOT.rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 62:
                long_functions.append(f"{path.relative_to(ROOT.parent)}:{node.name}")
        if len(text.splitlines()) > 320 and "on purpose" not in (ast.get_docstring(tree) or ""):
            long_modules.append(str(path.relative_to(ROOT.parent)))
    assert long_functions == [] and long_modules == []
