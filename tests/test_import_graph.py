"""No import cycle among megatron_ppu's modules.

The graph is built with ``ast`` from every ``import`` statement of every module under
``megatron_ppu/`` (module level and inside functions alike: a cycle through a deferred import is
still two modules that need each other), with relative imports resolved; an edge from a module
to a package it lives in is dropped (Python imports a package before its submodules anyway).
Imports under ``if TYPE_CHECKING:`` are left out: they name types for annotations and never run.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _runtime_nodes(tree):
    """Every node of ``tree`` except those inside an ``if TYPE_CHECKING:`` block."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", None)) == \
                    "TYPE_CHECKING":
                todo.extend(child.orelse)
                continue
            todo.append(child)


def import_graph(package_dir: Path) -> dict:
    """module name -> the set of modules of the package it imports."""
    files = {}
    for path in package_dir.rglob("*.py"):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    graph = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        deps = set()
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".")[: len(mod.split(".")) - (node.level - 1) - (0 if is_pkg else 1)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # `from X import name`: the submodule X.name if there is one, else X
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for n in names:
                while n and n not in files:
                    n = n.rpartition(".")[0]
                if n and n != mod and not mod.startswith(n + "."):
                    deps.add(n)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict):
    """One cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                return stack[stack.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        stack.pop()
        state[v] = "done"
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_the_checker_finds_a_cycle(tmp_path):
    """The checker itself, on a package written here: a -> b (deferred import) -> a is a cycle."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import a\n")
    (pkg / "sub" / "a.py").write_text("from .b import f\nfrom .. import c\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg.sub.a import g\n")
    (pkg / "c.py").write_text("import os\n")
    g = import_graph(pkg)
    assert g["pkg.sub"] == {"pkg.sub.a"} and g["pkg.sub.a"] == {"pkg.sub.b", "pkg.c"}
    assert find_cycle(g) == ["pkg.sub.a", "pkg.sub.b", "pkg.sub.a"]
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg import c\n")
    assert find_cycle(import_graph(pkg)) is None


def test_megatron_ppu_has_no_import_cycle():
    graph = import_graph(ROOT / "megatron_ppu")
    assert len(graph) > 30 and "megatron_ppu.training.arguments" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_test_module_imports_another():
    """Shared test helpers live in tests/conftest.py or megatron_ppu/testing/, never in another test
    module (a test file imported by another runs its module code twice and couples the two)."""
    offenders = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            mods = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.name}: {m}" for m in mods
                          if m.startswith("tests.test_") or (m.startswith("test_") and m != path.stem)]
    assert not offenders, offenders
