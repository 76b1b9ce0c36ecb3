"""The package's layers (docs/architecture.md): the import-linter contract in pyproject.toml
holds, no import cycle exists (function-level imports counted), every function-level import of
the package's own modules says why, and the top level holds only the few modules it should."""

import ast
import os

import grimp
from importlinter.cli import lint_imports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "dp_jax")
TOP_LEVEL = {"__init__.py", "masks.py", "rng.py", "main.py", "report.py"}


def test_layers_contract_is_kept():
    cwd = os.getcwd()
    os.chdir(ROOT)  # import-linter reads pyproject.toml from the working directory
    try:
        assert lint_imports(no_cache=True, no_logo=True) == 0
    finally:
        os.chdir(cwd)


def _strongly_connected(graph: dict) -> list:
    """Tarjan's strongly connected components of ``graph`` (node -> set of nodes)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            out.append(comp)

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    g = grimp.build_graph("dp_jax", cache_dir=None)  # the shims' imports counted too
    graph = {m: g.find_modules_directly_imported_by(m) for m in g.modules}
    cycles = [c for c in _strongly_connected(graph) if len(c) > 1]
    assert cycles == []


def test_strongly_connected_finds_a_cycle():
    """The cycle finder itself: a 3-cycle and a self-contained tail."""
    comps = _strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert {"a", "b", "c"} in comps and {"d"} in comps


def _function_level_imports(path):
    src = open(path).read()
    lines = src.splitlines()
    out = []

    def visit(node, infunc):
        for c in ast.iter_child_nodes(node):
            if infunc and isinstance(c, ast.ImportFrom) and (c.module or "").startswith("dp_jax"):
                i = c.lineno - 2  # a comment above a block of imports covers the block
                while i > 0 and lines[i].strip().startswith(("from ", "import ")):
                    i -= 1
                out.append((c.lineno, lines[c.lineno - 1], lines[i]))
            visit(c, infunc or isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef)))
    visit(ast.parse(src), False)
    return out


def test_function_level_imports_say_why():
    missing = []
    for dirpath, _, names in os.walk(PKG):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                for lineno, line, before in _function_level_imports(path):
                    if "#" not in line and not before.strip().startswith("#"):
                        missing.append(f"{os.path.relpath(path, ROOT)}:{lineno}")
    assert missing == []


def test_top_level_holds_only_shims_and_core_modules():
    modules = {n for n in os.listdir(PKG) if n.endswith(".py")}
    assert modules <= TOP_LEVEL, modules - TOP_LEVEL
