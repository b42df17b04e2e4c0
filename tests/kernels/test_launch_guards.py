"""Two rules every kernel module keeps, read from the source (no GPU needed):

- every Triton launch (``kernel[grid](...)`` of a ``@triton.jit`` function, or of an autotuned
  one) sits inside ``with on_device(t):`` (``_dispatch.on_device``): Triton launches on the
  *current* CUDA device, which need not be the tensor's;
- the interpreter is keyed on one thing, ``_dispatch.interpreting()``: no kernel module reads
  ``TRITON_INTERPRET`` itself or picks interpreter-only settings from a tensor's device
  (``.is_cpu``, ``device.type == "cpu"``).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
MODULES = sorted(p for p in KERNELS.rglob("*.py")
                 if p.name not in ("_dispatch.py", "cases.py", "testing.py", "naive.py"))


def _jit_names(tree: ast.Module) -> set[str]:
    """Names of the module's @triton.jit / @triton.autotune functions."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                text = ast.unparse(dec)
                if text.startswith(("triton.jit", "triton.autotune", "triton.heuristics")):
                    names.add(node.name)
    return names


def _unguarded_launches(tree: ast.Module) -> list[str]:
    jit = _jit_names(tree)
    bad = []

    def visit(node, guarded):
        if isinstance(node, (ast.With, ast.AsyncWith)):
            guarded = guarded or any("on_device(" in ast.unparse(item.context_expr) for item in node.items)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                and isinstance(node.func.value, ast.Name) and node.func.value.id in jit and not guarded):
            bad.append(f"line {node.lineno}: {node.func.value.id}[...]")
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return bad


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(KERNELS)) for p in MODULES])
def test_every_launch_is_on_the_tensors_device(path):
    tree = ast.parse(path.read_text())
    assert not _unguarded_launches(tree), f"{path.name}: launches outside on_device: {_unguarded_launches(tree)}"


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(KERNELS)) for p in MODULES])
def test_one_interpreter_key(path):
    text = path.read_text()
    for needle in ("TRITON_INTERPRET\"", "TRITON_INTERPRET'", "os.environ", ".is_cpu",
                   "device.type == \"cpu\"", "device.type == 'cpu'", "device.type != \"cuda\""):
        assert needle not in text, f"{path.name} keys on {needle!r}; use _dispatch.interpreting()"


def test_the_checks_can_fail():
    src = ("import triton\n@triton.jit\ndef k(X):\n    pass\n"
           "def launch(x):\n    k[(1,)](x)\n    with on_device(x):\n        k[(1,)](x)\n")
    assert _unguarded_launches(ast.parse(src)) == ["line 6: k[...]"]
    assert any(MODULES) and {p.parent.name for p in MODULES} >= {"swa", "nat2d", "linear_attn", "mamba2", "hyena"}
