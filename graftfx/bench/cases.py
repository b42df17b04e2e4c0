"""What the bench times: shapes, operator cases (from the registry), and each case's paths.

Every operator is built the way the splicer builds it (``graftfx.splice.build_operator`` with a
rule and a region): here the region is hand-made at the bench shape, with random weights in
the original layout, or copied from a region matched in a model with fresh random weights.

Paths of one operator:

- ``triton``: the operator module itself on CUDA (its ``graftfx::`` custom ops run the Triton
  kernels); only for operators with kernels (those in ``REFERENCES``).
- ``reference``: the same computation through the kernels' plain-PyTorch references
  (``graftfx.kernels.<op>.naive``), the operator's own projections and weights.
- ``eager``: operators without kernels (``mlp``, ``mha``, ``hyena_x2d``) are plain PyTorch:
  the module itself.
- ``compile``: ``torch.compile`` of the reference (or eager) module.
- ``flash_attn`` / ``mamba_ssm`` / ``causal_conv1d``: the operator with that optional backend,
  on CUDA when the package imports.

Baselines (what a replacement is compared with, at the same shape): attention regions ->
``sdpa``, the ``mha`` operator (q/k/v/out projections + ``F.scaled_dot_product_attention``);
MLP regions -> the original MLP (``mlp`` operator at the region's hidden width, r=4 in DiT).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from graftfx.errors import GraftError
from graftfx.match.region import Region

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ATTENTION, MLP = "self_attention", "mlp"

# The paper's operators (and graftfx's additions) in report order; anything else registered
# is benched after them.
PAPER_OPS = ("hyena_x", "hyena_y", "hyena_se", "hyena_x2d", "swa", "nat2d", "linear_attention",
             "mamba2", "mlp", "mlp_hyena_x", "mha")
# Option sets benched per operator (default: the operator's defaults). The paper's MLP widths:
# r = 3 and 6 (r = 4, the original, is the MLP baseline).
VARIANTS: dict[str, list[dict]] = {"mlp": [{"ratio": 3}, {"ratio": 6}]}
# Optional backends: operator -> [(package, options that select it)]
OPTIONAL: dict[str, list[tuple[str, dict]]] = {
    "swa": [("flash_attn", {"backend": "flash_attn"})],
    "mamba2": [("mamba_ssm", {"backend": "mamba_ssm"})],
    "hyena_x": [("causal_conv1d", {"conv_backend": "causal_conv1d"})],
    "hyena_se": [("causal_conv1d", {"conv_backend": "causal_conv1d"})],
}
PATH_GROUPS = ("triton", "reference", "compile", "backends")


# ----------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    tokens: int
    dim: int
    heads: int | None                # None for MLP regions matched in a model
    dtype: str                       # key of DTYPES

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def grid(self) -> tuple[int, int]:
        return square_grid(self.tokens)

    def label(self) -> str:
        heads = f" H{self.heads}" if self.heads else ""
        return f"B{self.batch} L{self.tokens} D{self.dim}{heads}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    "dit-xl2": Shape("dit-xl2", 8, 256, 1152, 16, "bf16"),           # DiT-XL/2, 256x256
    "pixart-1024": Shape("pixart-1024", 8, 4096, 1152, 16, "bf16"),  # PixArt-Sigma 1024px
    "pixart-2048": Shape("pixart-2048", 8, 16384, 1152, 16, "bf16"),  # PixArt-Sigma 2048px
}
# On a CPU without --full the presets shrink: tokens / 4 (the grid side / 2, still square),
# width / 4 and heads / 4 (the head dim stays 72), batch 1, fp32.
CPU_TOKENS_DIV, CPU_DIM_DIV = 4, 4


def square_grid(tokens: int) -> tuple[int, int]:
    """The most square (H, W) with H * W = tokens, H <= W (what the 2D operators see)."""
    h = math.isqrt(tokens)
    while tokens % h:
        h -= 1
    return h, tokens // h


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return next(h for h in range(min(n, limit), 0, -1) if n % h == 0)


def resolve_shapes(names: list[str] | None, device: torch.device, *, batch=None, tokens=None,
                   dim=None, heads=None, dtype=None, full: bool = False) -> tuple[list[Shape], list[str]]:
    """Presets (default: all three on CUDA, dit-xl2 on a CPU), scaled down on a CPU unless
    ``full``, then the explicit overrides. Returns (shapes, notes for the report header)."""
    cuda = device.type == "cuda"
    names = names or (list(PRESETS) if cuda else ["dit-xl2"])
    for name in names:
        if name not in PRESETS:
            near = difflib.get_close_matches(name, PRESETS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise GraftError(f"--shape {name!r} is not a known shape{hint}; choose from "
                             f"{', '.join(PRESETS)} and override with --batch/--tokens/--dim/--heads/--dtype")
    for flag, value in (("--batch", batch), ("--tokens", tokens), ("--dim", dim), ("--heads", heads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise GraftError(f"{flag} {value!r} must be a positive integer")
    if dtype is not None and dtype not in DTYPES:
        raise GraftError(f"--dtype {dtype!r} is not supported; choose from {', '.join(DTYPES)}")
    notes, shapes = [], []
    scale = not cuda and not full
    for name in names:
        preset = s = PRESETS[name]
        if scale:
            s = Shape(s.name, 1, s.tokens // CPU_TOKENS_DIV, s.dim // CPU_DIM_DIV,
                      s.heads // CPU_DIM_DIV, "fp32")
        s = dataclasses.replace(s, batch=batch or s.batch, tokens=tokens or s.tokens,
                                dim=dim or s.dim, dtype=dtype or s.dtype)
        want = heads or s.heads
        if s.dim % want:
            if heads is not None:
                raise GraftError(f"--heads {heads} does not divide --dim {s.dim}; pick a divisor of {s.dim}")
            fitted = _largest_divisor_at_most(s.dim, want)
            notes.append(f"{name}: {want} heads do not divide the width {s.dim}; using {fitted}")
            want = fitted
        s = dataclasses.replace(s, heads=want)
        if scale:
            notes.append(f"CPU: preset {name} ({preset.label()} {preset.dtype}) runs at {s.label()} "
                         f"{s.dtype} (scaled down to B1, L/{CPU_TOKENS_DIV}, D/{CPU_DIM_DIV}, "
                         f"heads/{CPU_DIM_DIV}, fp32, then the overrides); pass --full for the real shape")
        if s not in shapes:
            shapes.append(s)
    return shapes, notes


# ----------------------------------------------------------------------------- operator cases
@dataclass
class OpCase:
    op: str                          # registry name
    options: dict = field(default_factory=dict)
    kind: str = ATTENTION            # the region kind it replaces here
    label: str = ""                  # op plus options, e.g. "mlp r=3"

    def __post_init__(self):
        if not self.label:
            opts = " ".join(f"{'r' if k == 'ratio' else k}={v}" for k, v in self.options.items())
            self.label = f"{self.op} {opts}".strip()


def operator_cases(names: list[str] | None = None) -> tuple[list[OpCase], list[str]]:
    """Cases for the registered operators (all, or ``names``). Returns (cases, notes)."""
    from graftfx.registry import operators

    registered = operators()
    notes = []
    if names:
        for name in names:
            if name not in registered:
                near = difflib.get_close_matches(name, registered, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise GraftError(f"--op {name!r} is not a registered operator{hint}; registered: "
                                 f"{', '.join(sorted(registered))}")
        chosen = list(dict.fromkeys(names))
    else:
        chosen = [n for n in PAPER_OPS if n in registered]
        chosen += sorted(n for n in registered if n not in PAPER_OPS)
        missing = [n for n in PAPER_OPS if n not in registered]
        if missing:
            notes.append(f"not registered (skipped): {', '.join(missing)}")
    cases = []
    for name in chosen:
        kinds = registered[name].kinds
        kind = ATTENTION if ATTENTION in kinds else MLP if MLP in kinds else None
        if kind is None:
            notes.append(f"{name}: replaces {'/'.join(kinds)} regions only; not benched")
            continue
        for options in VARIANTS.get(name, [{}]):
            cases.append(OpCase(name, dict(options), kind))
    return cases, notes


# ----------------------------------------------------------------------------- regions, building
def _random_weights(shapes: dict[str, tuple[int, ...]], device, dtype, generator) -> dict:
    out = {}
    for name, shape in shapes.items():
        w = torch.randn(shape, generator=generator) * 0.02
        if name.endswith("norm.weight"):
            w = w + 1.0
        out[name] = w.to(device=device, dtype=dtype)
    return out


def make_region(kind: str, shape: Shape, device: torch.device, seed: int = 0) -> Region:
    """A hand-made region at ``shape``: a DiT attention (q/k/v/out) or MLP (fc1/fc2, r=4)."""
    d, g = shape.dim, torch.Generator().manual_seed(seed)
    if kind == ATTENTION:
        names = {f"{n}.{p}": (d, d) if p == "weight" else (d,) for n in ("q", "k", "v", "out")
                 for p in ("weight", "bias")}
        extra = dict(heads=shape.heads, head_dim=d // shape.heads,
                     details={"scale": (d // shape.heads) ** -0.5})
    elif kind == MLP:
        names = {"fc1.weight": (4 * d, d), "fc1.bias": (4 * d,), "fc2.weight": (d, 4 * d),
                 "fc2.bias": (d,)}
        extra = dict(hidden=4 * d, activation="gelu_tanh")
    else:
        raise ValueError(f"make_region: kind must be {ATTENTION!r} or {MLP!r}, got {kind!r}")
    return Region(path=f"bench.{'attn' if kind == ATTENTION else 'mlp'}", kind=kind, pattern=kind,
                  input=None, output=None, nodes=(), width=d, out_width=d, tokens=shape.tokens,
                  grid=shape.grid, weights=_random_weights(names, device, shape.torch_dtype, g),
                  dtype=shape.torch_dtype, **extra)


def region_like(region: Region, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Region:
    """A matched region (perhaps on the meta device) with fresh random weights on ``device``."""
    g = torch.Generator().manual_seed(seed)
    shapes = {name: tuple(w.shape) for name, w in region.weights.items()}
    return dataclasses.replace(region, weights=_random_weights(shapes, device, dtype, g), dtype=dtype)


def build(op: str, options: dict, region: Region, name: str = "bench") -> nn.Module:
    """The operator as the splicer builds it: registry + rule options + region."""
    from graftfx.rules import Rule
    from graftfx.splice.splice import build_operator

    rule = Rule(pattern=region.pattern, operator=op, options=dict(options), name=name)
    return build_operator(rule, region)


def baseline_for(kind: str, region: Region) -> tuple[str, nn.Module]:
    """(name, module) of the original region at this shape: SDPA attention or the MLP."""
    if kind == ATTENTION:
        return "sdpa", build("mha", {}, region, "baseline")
    ratio = (region.hidden or 4 * region.width) / region.width
    return f"mlp r={ratio:g}", build("mlp", {}, region, "baseline")


# ----------------------------------------------------------------------------- references
class Reference(nn.Module):
    """The operator's computation through the kernels' plain-PyTorch references; shares the
    operator's parameters (so fwd+bwd reaches the same weights)."""

    def __init__(self, op: nn.Module, fn: Callable):
        super().__init__()
        self.op, self.fn = op, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (B, L, D) -> (B, L, out)
        return self.fn(self.op, x)


def _taps(conv: nn.Module):
    return conv.weight.squeeze(1), conv.bias


_HYENA_FILTERS = {"hyena_x": ("short_filter",), "hyena_y": ("inner_filter",),
                  "hyena_se": ("short_filter", "inner_filter")}


def _hyena(gate_name: str):
    def make(op):
        from graftfx.kernels.hyena import naive

        gate, filters = getattr(naive, gate_name), _HYENA_FILTERS[gate_name]

        def forward(m, x):
            u = m.in_proj(x)                                           # (B, L, 3D)
            taps = [t for name in filters for t in _taps(getattr(m, name))]
            return m.out_proj(gate(u, *taps).to(x.dtype))              # (B, L, D)
        return Reference(op, forward)
    return make


def _heads_split(m, x):
    B, L, _ = x.shape
    qkv = m.qkv(x).view(B, L, 3, m.heads, m.head_dim)                  # (B, L, 3, H, Dh)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)                        # 3 x (B, H, L, Dh)


def _heads_merge(m, o, x):
    B, L, D = x.shape
    return m.proj(o.to(x.dtype).transpose(1, 2).reshape(B, L, D))     # (B, L, D)


def _swa(op):
    from graftfx.kernels.swa import naive_swa

    def forward(m, x):
        q, k, v = _heads_split(m, x)
        return _heads_merge(m, naive_swa(q, k, v, m.config.window)[0], x)
    return Reference(op, forward)


def _nat2d(op):
    from graftfx.kernels.nat2d import naive_nat2d

    def forward(m, x):
        q, k, v = _heads_split(m, x)
        o, _ = naive_nat2d(q, k, v, m._grid(x.shape[1]), m.config.kernel_size)
        return _heads_merge(m, o, x)
    return Reference(op, forward)


def _linear_attention(op):
    from graftfx.kernels.linear_attn import linear_attn_ref

    def forward(m, x):
        q, k, v = _heads_split(m, x)
        return _heads_merge(m, linear_attn_ref(q, k, v, m.config.feature_map, m.config.eps), x)
    return Reference(op, forward)


def _mlp_hyena_x(op):
    from graftfx.kernels.hyena import naive

    def forward(m, x):
        u = m.in_proj(x)                                               # (B, L, 3 r D)
        y = naive.mlp_hyena_x(u, *_taps(m.short_filter))               # (B, L, r D)
        return m.out_proj(y.to(x.dtype))
    return Reference(op, forward)


def _mamba2(op):
    # The module's own "reference" backend: the chunked SSD scan in plain PyTorch.
    ref = copy.deepcopy(op)
    ref.config = dataclasses.replace(op.config, backend="reference")
    return ref


# operator -> builder of its reference module; these operators have Triton kernels.
REFERENCES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "hyena_x": _hyena("hyena_x"), "hyena_y": _hyena("hyena_y"), "hyena_se": _hyena("hyena_se"),
    "swa": _swa, "nat2d": _nat2d, "linear_attention": _linear_attention,
    "mlp_hyena_x": _mlp_hyena_x, "mamba2": _mamba2,
}


@dataclass
class PathSpec:
    name: str                                     # triton, reference, eager, compile, <package>
    make: Callable[[], nn.Module] | None          # builds the module to time (None: skipped)
    mode: str | None = None                       # graftfx.kernels mode to run under
    skip: str = ""                                # why it is not timed


def paths_for(case: OpCase, module: nn.Module, region: Region, device: torch.device,
              groups: set[str]) -> list[PathSpec]:
    """The paths of ``case`` to time on ``device`` (``groups`` from PATH_GROUPS)."""
    from graftfx.kernels._dispatch import HAS_TRITON, optional_backend

    cuda = device.type == "cuda"
    out: list[PathSpec] = []
    has_kernel = case.op in REFERENCES
    if has_kernel and "triton" in groups:
        why = "" if cuda and HAS_TRITON else ("needs a CUDA GPU" if HAS_TRITON else "triton is not installed")
        out.append(PathSpec("triton", (lambda: module) if not why else None, "triton", why))
    base_name = "reference" if has_kernel else "eager"
    base: list[nn.Module] = []

    def base_module():
        if not base:
            base.append(REFERENCES[case.op](module) if has_kernel else module)
        return base[0]

    if "reference" in groups:
        out.append(PathSpec(base_name, base_module))
    if "compile" in groups:
        out.append(PathSpec("compile", lambda: torch.compile(base_module(), dynamic=False)))
    if "backends" in groups:
        for package, options in OPTIONAL.get(case.op, []):
            why = ("needs a CUDA GPU" if not cuda else
                   f"{package} is not installed" if not optional_backend(package) else
                   "flash_attn runs fp16/bf16 only" if package == "flash_attn"
                   and region.dtype not in (torch.float16, torch.bfloat16) else "")
            make = (lambda o=options: build(case.op, {**case.options, **o}, region)) if not why else None
            out.append(PathSpec(package, make, None, why))
    return out
