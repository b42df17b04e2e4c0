"""A DiT-XL/2 (random weights, fp32, CUDA) with every registered self-attention operator grafted
into one block each, under ``torch.compile(fullgraph=True)``: no graph break, the Triton kernels
run (kernel mode ``auto`` on CUDA), and the compiled output equals the eager one. Skipped (and
counted as skipped) without CUDA; run through ``benchmarks/gpu_check.sh``."""
from __future__ import annotations

import pytest
import torch

import graftfx
from graftfx.registry import operators
from graftfx.rules import Rule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_grafted_dit_xl2_compiles_without_graph_breaks():
    from graftfx.models import DiT_models

    torch.manual_seed(0)
    model = DiT_models["DiT-XL/2"]().cuda().eval().requires_grad_(False)
    x, t, y = (a.cuda() for a in model.example_inputs(2))
    names = sorted(n for n, s in operators().items() if "self_attention" in s.kinds)
    assert len(names) <= len(model.blocks)
    rules = [Rule(pattern="self_attention", operator=n, select={"paths": [f"blocks.{2 * i + 1}.attn"]},
                  name=n) for i, n in enumerate(names)]
    grafted = graftfx.graft(model, rules, (x, t, y))
    assert len(grafted.grafts) == len(names)
    with torch.no_grad():
        want = grafted(x, t, y)
        torch._dynamo.reset()
        got = torch.compile(grafted, fullgraph=True)(x, t, y)
    torch.cuda.synchronize()
    assert torch.isfinite(got).all()
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert err < 1e-3, f"compiled vs eager relative error {err:.2e} ({', '.join(names)})"
