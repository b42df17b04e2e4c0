"""torch.compile on every registered operator, in the model it is grafted into.

Every operator the registry holds is grafted into the bundled digits DiT (8 blocks, width 128,
4 heads, 64 tokens on an 8 x 8 grid; pretrained weights) and the grafted model is compiled with
``torch.compile(fullgraph=True)`` (inductor, on the CPU): no graph break anywhere, and the
compiled model computes what the eager one does. Training is checked on the same graph through
AOTAutograd (``backend="aot_eager"``: the gradient of every spliced parameter under one random
cotangent); inductor's backward code generation would cost minutes here.

To keep it fast the model is traced once (batch 2) and the operators share compiled models: each
grafted model carries several operators, one per block (an attention operator in
``blocks.i.attn``, an MLP operator in ``blocks.i.mlp``), dealt round-robin over as few models as
the 8 blocks allow (two today, compiled side by side under ``pytest -n 2``). Measured on the
shared 2-core machine (load about 2) with a cold inductor cache: about 1.5 minutes wall. An operator whose region
kinds the DiT does not have (joint attention) is reported as skipped, by name. Kernel mode is the
default ``auto`` (the PyTorch reference on a CPU; the custom ops are opaque to the compiler
either way, so their fake kernels and autograd registration are what is checked here).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import graftfx
from graftfx.models import load_bundled_digits_dit
from graftfx.registry import operators
from graftfx.rules import Rule
from graftfx.select.select import select
from graftfx.splice.splice import splice

# region kind -> (the pattern matching it in the DiT, the module slot of block i)
SLOTS = {"self_attention": ("self_attention", "attn"), "mlp": ("mlp", "mlp")}
DEPTH = 8                                   # the bundled digits DiT's blocks


def _groups() -> tuple[list[list[tuple[str, str, str]]], list[str]]:
    """The registry's operators laid out over as few grafted models as the slots allow, dealt
    round-robin so the models are about the same size (``pytest -n 2`` compiles them side by
    side): [[(operator, pattern, path), ...]]; and the operators the DiT has no region for."""
    by_slot: dict[str, list[str]] = {kind: [] for kind in SLOTS}
    absent = []
    for name, spec in sorted(operators().items()):
        kind = next((k for k in spec.kinds if k in SLOTS), None)
        (by_slot[kind] if kind else absent).append(name)
    n = max(-(-len(names) // DEPTH) for names in by_slot.values())
    groups: list[list[tuple[str, str, str]]] = [[] for _ in range(n)]
    for kind, names in by_slot.items():
        pattern, slot = SLOTS[kind]
        for i, name in enumerate(names):
            groups[i % n].append((name, pattern, f"blocks.{i // n}.{slot}"))
    return groups, absent


GROUPS, ABSENT = _groups()

# The inductor compile runs in a child process with scalar C++ (``cpp.vec_isa_ok = False``):
# that halves the C++ compile time and leaves what is checked (one graph, lowered, equal to
# eager) as it is, but the setting must not reach other tests' compiles in a shared worker
# (inductor keeps per-process C++ prefix state), hence the process of its own.
_INDUCTOR = """
import json, sys
import torch
torch._inductor.config.cpp.vec_isa_ok = False
import graftfx
from graftfx.models import load_bundled_digits_dit
from graftfx.rules import Rule
from graftfx.select.select import select
from graftfx.splice.splice import splice
torch.manual_seed(0)
model = load_bundled_digits_dit().requires_grad_(False)
inputs = model.example_inputs(2)
rules = [Rule(pattern=p, operator=n, select={"paths": [path]}, name=n + "@" + path)
         for n, p, path in json.loads(sys.argv[1])]
grafted = splice(select(graftfx.trace(model, inputs), rules))
with torch.no_grad():
    want = grafted(*inputs)
    got = torch.compile(grafted, fullgraph=True, backend="inductor")(*inputs)
torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
print("equal")
"""


@pytest.fixture(scope="module")
def traced():
    torch.manual_seed(0)
    model = load_bundled_digits_dit().requires_grad_(False)
    x, t, y = model.example_inputs(2)
    return graftfx.trace(model, (x, t, y)), (x, t, y)


def test_every_operator_is_compiled():
    """The groups cover the registry: every operator is compiled, or has no region in the DiT."""
    compiled = {name for group in GROUPS for name, _, _ in group}
    assert compiled | set(ABSENT) == set(operators())
    assert {"mamba2", "swa", "nat2d", "linear_attention", "hyena_x", "mlp"} <= compiled
    for name in ABSENT:
        assert not set(operators()[name].kinds) & set(SLOTS), name


@pytest.mark.parametrize("group", GROUPS, ids=["+".join(n for n, _, _ in g) for g in GROUPS])
def test_compiled_graft_matches_eager(group, traced, tmp_path):
    tr, inputs = traced
    rules = [Rule(pattern=pattern, operator=name, select={"paths": [path]}, name=f"{name}@{path}")
             for name, pattern, path in group]
    grafted = splice(select(tr, rules))
    where = {g.target: type(grafted.get_submodule(g.target)).operator_name for g in grafted.grafts}
    assert where == {path: name for name, _, path in group}

    label = ", ".join(f"{n} at {p}" for n, _, p in group)
    # inductor: the forward, as a user's sampler runs it, in a process of its own (see _INDUCTOR)
    run = subprocess.run([sys.executable, "-c", _INDUCTOR, json.dumps(group)], capture_output=True, text=True,
                         timeout=900, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert run.returncode == 0, f"inductor ({label}):\n{run.stderr[-3000:]}"
    assert run.stdout.strip().splitlines()[-1] == "equal", run.stdout[-2000:]

    # training: the same graph with autograd through AOTAutograd (the custom ops' fakes and
    # backward registrations), without inductor's code generation (minutes on 2 cores)
    names, params = zip(*grafted.spliced_named_parameters())
    out = grafted(*inputs)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    want = torch.autograd.grad(out, params, cot)
    torch._dynamo.reset()
    got_out = torch.compile(grafted, fullgraph=True, backend="aot_eager")(*inputs)
    got = torch.autograd.grad(got_out, params, cot)
    torch.testing.assert_close(got_out, out, rtol=1e-4, atol=1e-5, msg=lambda m: f"output ({label}): {m}")
    for name, g, w in zip(names, got, want):
        assert w.abs().sum() > 0, f"no eager gradient reaches {name}"
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("name", ABSENT or ["(none)"])
def test_operator_without_a_region_in_the_dit(name):
    if name == "(none)":
        return
    pytest.skip(f"{name}: no {'/'.join(operators()[name].kinds)} region in the digits DiT")
