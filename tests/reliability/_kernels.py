"""Random shapes and dtypes through every public kernel function, on its Triton path (under
``TRITON_INTERPRET=1`` on a CPU), against its plain-PyTorch reference (``naive.py``); a share of
the cases carries a NaN or an infinity in one input element, and the kernel's non-finite outputs
must sit exactly where the reference's do.

Values are compared by relative error (for softmax attention, relative to the reference run on
``|v|``: an output ``sum_j p_j v_j`` is accurate relative to ``sum_j p_j |v_j|``, cancellation
can make it arbitrarily small). Outcomes: ``success`` (within tolerance, same non-finite positions), ``silently wrong`` (values
off, or NaN/inf where the reference has none or the other way round), ``wrongly refused`` (a
ValueError for an input the function documents as valid), ``traceback`` (anything else).

The Triton path is proved, not assumed: every case records the launchers (``<op>_fwd``) the
public function called and fails the campaign (``TritonPathNotTaken``) if the one it must reach
was not called. ``@triton.jit`` reads ``TRITON_INTERPRET`` when a kernel module is imported, so
the variable must be set before that: ``measure.py`` runs this campaign in its own subprocess
(``python tests/reliability/_kernels.py``) with ``TRITON_INTERPRET=1`` in the environment, and
``check_interpreter`` refuses to start on a CPU if the kernel modules were imported without it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys

if not any(m.endswith("kernels._dispatch") for m in sys.modules):
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any kernel module is imported

try:
    from ._harness import Case, Result, Tally
except ImportError:  # run by measure.py, which puts this folder on sys.path
    from _harness import Case, Result, Tally

TOL = {"float32": 2e-4, "bfloat16": 3e-2, "float16": 6e-3}
KERNELS = ("hyena_x", "hyena_y", "hyena_se", "mlp_hyena_x", "short_conv", "swa", "nat2d", "linear_attention", "ssd")


def _dtype(rng):
    import torch

    return rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16])


def _t(g, shape, dtype, scale=1.0):
    import torch

    return (torch.randn(shape, generator=g) * scale).to(dtype)


def make_case(name: str, rng: random.Random, g):
    """(kernel callable, reference callable, inputs list, description)."""
    import torch

    from graftfx.kernels import hyena, linear_attn, mamba2, nat2d, swa
    from graftfx.kernels.hyena import naive as hn

    dtype = _dtype(rng)
    if name in ("hyena_x", "hyena_y", "hyena_se", "short_conv"):
        b, L, d = rng.randint(1, 2), rng.randint(1, 40), rng.randint(1, 12)
        k1, k2 = rng.randint(1, hyena.MAX_TAPS), rng.randint(1, hyena.MAX_TAPS)
        u = _t(g, (b, L, 3 * d), dtype)
        w3, w1 = _t(g, (3 * d, k1), dtype, 0.5), _t(g, (d, k2), dtype, 0.5)
        b3 = _t(g, (3 * d,), dtype, 0.1) if rng.random() < 0.5 else None
        b1 = _t(g, (d,), dtype, 0.1) if rng.random() < 0.5 else None
        desc = f"u {tuple(u.shape)} {dtype} taps {k1}/{k2}"
        if name == "hyena_x":
            return (lambda u, w, b: hyena.hyena_x_gate(u, w, b)), hn.hyena_x, [u, w3, b3], desc
        if name == "hyena_y":
            return (lambda u, w, b: hyena.hyena_y_gate(u, w, b)), hn.hyena_y, [u, w1, b1], desc
        if name == "short_conv":
            return (lambda u, w, b: hyena.short_conv(u, w, b)), hn.causal_conv, [u, w3, b3], desc
        return (lambda u, w, b, w2, bb: hyena.hyena_se_gate(u, w, b, w2, bb)), hn.hyena_se, [u, w3, b3, w1, b1], desc
    if name == "mlp_hyena_x":
        b, L, m = rng.randint(1, 2), rng.randint(1, 12), rng.randint(1, 24)
        k = rng.randint(1, min(hyena.MAX_TAPS, m))
        u, w = _t(g, (b, L, 3 * m), dtype), _t(g, (L, k), dtype, 0.5)
        bias = _t(g, (L,), dtype, 0.1) if rng.random() < 0.5 else None
        return (lambda u, w, b: hyena.mlp_hyena_x_gate(u, w, b)), hn.mlp_hyena_x, [u, w, bias], \
            f"u {tuple(u.shape)} {dtype} taps {k}"
    if name in ("swa", "nat2d", "linear_attention"):
        b, h, dh = rng.randint(1, 2), rng.randint(1, 3), rng.choice([1, 3, 8, 16, 17, 32, 64])
        if name == "nat2d":
            grid = (rng.randint(1, 7), rng.randint(1, 7))
            L = grid[0] * grid[1]
        else:
            L = rng.randint(1, 48)
        q, k, v = (_t(g, (b, h, L, dh), dtype) for _ in range(3))
        scale = rng.choice([None, 0.3])
        if name == "swa":
            window = rng.randint(0, 12)
            return (lambda q, k, v: swa.sliding_window_attention(q, k, v, window, scale)), \
                (lambda q, k, v: swa.naive_swa(q, k, v, window, scale)[0]), [q, k, v], \
                f"q {tuple(q.shape)} {dtype} window {window}"
        if name == "nat2d":
            ks = rng.choice([1, 3, 5, 7])
            ks = min(ks, 2 * (min(grid) // 2) + 1) if min(grid) < ks else ks
            return (lambda q, k, v: nat2d.neighborhood_attention_2d(q, k, v, grid, ks, scale)), \
                (lambda q, k, v: nat2d.naive_nat2d(q, k, v, grid, ks, scale)[0]), [q, k, v], \
                f"q {tuple(q.shape)} {dtype} grid {grid} kernel {ks}"
        fmap = rng.choice(["elu", "relu"])
        eps = rng.choice([1e-6, 1e-3])
        return (lambda q, k, v: linear_attn.linear_attention(q, k, v, fmap, eps)), \
            (lambda q, k, v: linear_attn.linear_attn_ref(q, k, v, fmap, eps)), [q, k, v], \
            f"q {tuple(q.shape)} {dtype} {fmap}"
    # Mamba-2 SSD
    b, L, H, P = rng.randint(1, 2), rng.randint(1, 40), rng.choice([1, 2, 4]), rng.choice([1, 4, 8, 16])
    G = rng.choice([gg for gg in (1, 2, 4) if H % gg == 0])
    N = rng.choice([1, 8, 16])
    chunk = rng.choice([16, 32, 64])
    x = _t(g, (b, L, H, P), dtype)
    dt = torch.nn.functional.softplus(torch.randn(b, L, H, generator=g) - 1)
    A = -torch.exp(torch.randn(H, generator=g) * 0.5)
    B, C = _t(g, (b, L, G, N), dtype), _t(g, (b, L, G, N), dtype)
    D = torch.randn(H, generator=g)
    return (lambda x, dt, A, B, C, D: mamba2.ssd_scan(x, dt, A, B, C, D, chunk)), \
        (lambda x, dt, A, B, C, D: mamba2.ssd_chunked(x, dt, A, B, C, D, chunk)), [x, dt, A, B, C, D], \
        f"x {tuple(x.shape)} {dtype} groups {G} state {N} chunk {chunk}"


class TritonPathNotTaken(RuntimeError):
    """A case ran but its Triton launcher was not called: the comparison would prove nothing."""


def check_interpreter() -> None:
    """On a machine without a GPU the Triton path needs ``TRITON_INTERPRET=1``, set before the
    kernel modules were imported (``@triton.jit`` reads it at import)."""
    import torch

    from graftfx.kernels._dispatch import interpreting

    if not torch.cuda.is_available() and not interpreting():
        raise TritonPathNotTaken("no GPU and TRITON_INTERPRET is not 1: run the kernels campaign as "
                                 "TRITON_INTERPRET=1 python tests/reliability/_kernels.py (measure.py does)")
    from graftfx.kernels.swa import fused

    if not torch.cuda.is_available() and type(fused._swa_fwd_kernel).__name__ != "InterpretedFunction":
        raise TritonPathNotTaken("the kernel modules were imported before TRITON_INTERPRET=1 was set: "
                                 "run the kernels campaign in a fresh process (python tests/reliability/_kernels.py)")


LAUNCHERS = {"hyena_x": ["hyena.hyena_x.hyena_x_fwd"], "mlp_hyena_x": ["hyena.hyena_x.mlp_hyena_x_fwd"],
             "hyena_y": ["hyena.hyena_y.hyena_y_fwd"], "short_conv": ["hyena.featurize.short_conv_fwd"],
             "hyena_se": ["hyena.featurize.short_conv_fwd", "hyena.hyena_y.hyena_y_fwd"],
             "swa": ["swa.fused.swa_fwd"], "nat2d": ["nat2d.fused.nat2d_fwd"],
             "linear_attention": ["linear_attn.noncausal.linear_attn_fwd"], "ssd": ["mamba2.ssd.ssd_fwd"]}


def launchers(name: str) -> list[str]:
    """The Triton launchers (``module.attribute`` under graftfx.kernels) the public function
    ``name`` must call on the Triton path."""
    return LAUNCHERS[name]


@contextlib.contextmanager
def recorded(names):
    """Wrap each launcher where the custom ops look it up (its module's attribute, whatever is
    there now) for the block; yields the list of launcher names called."""
    import importlib

    calls: list[str] = []
    saved = []
    for dotted in names:
        module_name, attr = dotted.rsplit(".", 1)
        module = importlib.import_module(f"graftfx.kernels.{module_name}")
        original = getattr(module, attr)

        def wrapper(*args, _fn=original, _name=attr, **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)
        saved.append((module, attr, original))
        setattr(module, attr, wrapper)
    try:
        yield calls
    finally:
        for module, attr, original in saved:
            setattr(module, attr, original)


def kernel_case(name: str, i: int, seed: int) -> Result:
    import torch

    from graftfx.kernels._dispatch import kernels

    rng = random.Random(f"{seed}-{name}-{i}")
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    fn, ref, inputs, desc = make_case(name, rng, g)
    poison = rng.random() < 0.25
    if poison:
        j = rng.choice([n for n, t in enumerate(inputs) if t is not None and n == 0 or (t is not None and rng.random() < 0.3)]
                       or [0])
        t = inputs[j].clone()
        flat = t.view(-1)
        flat[rng.randrange(flat.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
        inputs[j] = t
        desc += f", {'nan/inf'} in input {j}"
    case = Case("kernels", name + (" (NaN/inf)" if poison else ""), "valid", desc)
    must = [n.rsplit('.', 1)[1] for n in launchers(name)]
    try:
        with kernels("triton"), recorded(launchers(name)) as calls:
            got = fn(*inputs)
        with kernels("reference"):
            want = ref(*inputs)
            # softmax attention outputs are weighted sums sum_j p_j v_j: their rounding error is
            # bounded relative to sum_j p_j |v_j| (cancellation makes |o| itself arbitrarily small)
            size = ref(*inputs[:2], inputs[2].abs()) if name in ("swa", "nat2d") else want
    except ValueError as e:
        return Result(case, "wrongly refused", f"{desc}: {e}")
    except Exception as e:  # noqa: BLE001
        return Result(case, "traceback", f"{desc}: {type(e).__name__}: {str(e)[:300]}")
    if any(m not in calls for m in must):
        raise TritonPathNotTaken(f"{name} ({desc}): launchers called {calls}, expected {must}")
    got, want = got.float(), want.float()
    if got.shape != want.shape:
        return Result(case, "silently wrong", f"{desc}: shape {tuple(got.shape)} vs reference {tuple(want.shape)}")
    bad_got, bad_ref = ~torch.isfinite(got), ~torch.isfinite(want)
    if not torch.equal(bad_got, bad_ref):
        return Result(case, "silently wrong", f"{desc}: {int(bad_got.sum())} non-finite outputs where the reference has "
                                              f"{int(bad_ref.sum())} ({int((bad_got ^ bad_ref).sum())} positions differ)")
    ok = ~bad_ref
    a, r = got[ok].double(), want[ok].double()
    scale = size.float()[ok].double() if torch.isfinite(size.float()[ok]).all() else r
    err = ((a - r).norm() / scale.norm().clamp_min(1e-12)).item() if r.numel() else 0.0
    tol = TOL[str(inputs[0].dtype).replace("torch.", "")]
    if not math.isfinite(err) or err > tol:
        return Result(case, "silently wrong", f"{desc}: relative error {err:.2e} > {tol:.0e}")
    return Result(case, "success", f"{desc}: relative error {err:.1e}")


def run_kernels(n: int, seed: int = 0, log=print) -> Tally:
    check_interpreter()
    tally = Tally()
    for name in KERNELS:
        for i in range(n):
            tally.add(kernel_case(name, i, seed))
        if log:
            log(f"  {name}: {n} cases")
    return tally


def main(argv=None) -> int:
    """Run the campaign in this (fresh) process and write ``Tally.to_json()`` to ``--out``."""
    import warnings

    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # numpy inside the interpreter, on NaN inputs
        tally = run_kernels(args.n, args.seed, log=lambda m: print(m, flush=True))
    with open(args.out, "w") as fh:
        json.dump({"tally": tally.to_json(), "summary": tally.summary()}, fh)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
