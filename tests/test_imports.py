"""No import runs in a circle inside the package (graftfx/, kernels/ -> graftfx.kernels,
rewrites/ -> graftfx.rewrites), counting imports inside functions too: a lazy import that closes
a circle only hides it until the day the import moves to the top of the file.

Edges: ``import a.b.c`` and ``from a.b import c`` point at the module they name (``a.b.c``
when it is a module, else the package ``a.b``, i.e. its ``__init__``). Naming a package's
``__init__`` from inside the package (``import graftfx`` in ``graftfx/export/export.py``) is an
edge like any other: ``graftfx/__init__`` imports the submodule, so that is a circle.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"graftfx": "graftfx", "kernels": "graftfx.kernels", "rewrites": "graftfx.rewrites"}


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _absolute(module: str, level: int, name: str | None, is_package: bool) -> str:
    if not level:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(module, node.level, node.module, is_package)
                # ``from pkg import sub`` names the submodule; ``from pkg import name`` the package
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                found = owner(target)
                if found and found != module:
                    edges[module].add(found)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_walk_sees_a_circle():
    # The checker itself: a two-module circle through a lazy import is found.
    edges = {"graftfx.a": {"graftfx.b"}, "graftfx.b": {"graftfx.a"}, "graftfx.c": set()}
    assert cycles(edges) == [["graftfx.a", "graftfx.b"]]


def test_the_walk_reads_lazy_and_package_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "graftfx"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .sub.leaf import f\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    import graftfx\n    return graftfx\n")
    for name in ("kernels", "rewrites"):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = cycles(import_graph(modules()))
    assert found == [["graftfx", "graftfx.sub.leaf"]]


def test_no_import_cycles():
    mods = modules()
    assert len(mods) > 50, "the walk found too few modules: is ROOT right?"
    found = cycles(import_graph(mods))
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_kernels_depend_on_torch_and_triton_only():
    mods = modules()
    inside = {m for m in mods if m.startswith("graftfx.kernels")}
    for module in inside:
        tree = ast.parse(mods[module].read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            for name in names:
                top = name.split(".")[0]
                assert top not in ("graftfx",) or name.startswith("graftfx.kernels"), \
                    f"{module} imports {name}: kernels depend on torch and triton only"
