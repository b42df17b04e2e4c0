"""What the bench times: shapes, operator cases (from the registry), and each case's paths.

The bench never names an operator (the two baselines aside, in ``BASELINES``): the cases are
the registered operators (``graftfx.registry.operators()``) with their ``bench_options``, and
each path comes from the operator protocol (``graftfx.operator``). Every operator is built the
way the splicer builds it (``graftfx.splice.build_operator`` with a rule and a region): here the
region is hand-made at the bench shape, with random weights in the original layout, or copied
from a region matched in a model with fresh random weights.

Paths of one operator:

- ``triton``: the operator module itself on CUDA (its kernel core runs the Triton kernels);
  only for operators whose core has a reference (``has_reference()``).
- ``reference``: ``op.reference()``, the same operator (same weights) with its core through
  the plain-PyTorch reference (``kernel_reference``), under ``kernels("reference")``.
- ``eager``: an operator whose core is plain PyTorch (no reference): the module itself.
- ``compile``: ``torch.compile`` of the reference (or eager) module (same kernel mode).
- one path per entry of the operator's ``backends`` (named by its package): the operator built
  with the backend's options, on CUDA, when the package imports and the dtype is one it runs.

Baselines (what a replacement is compared with, at the same shape): attention regions ->
``sdpa``, the ``mha`` operator (q/k/v/out projections + ``F.scaled_dot_product_attention``);
MLP regions -> the original MLP (``mlp`` operator at the region's hidden width, r=4 in DiT).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from graftfx.errors import GraftError
from graftfx.match.grid import square_grid
from graftfx.match.region import Region

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ATTENTION, MLP = "self_attention", "mlp"
KINDS = (ATTENTION, MLP)             # region kinds the bench times, in report order
PATH_GROUPS = ("triton", "reference", "compile", "backends")


@dataclass(frozen=True)
class Baseline:
    """The original region of a kind, as an operator: ``op`` (registry name) built at the
    region's shape, reported as ``label``."""

    label: str
    op: str


# The only operator names the bench knows: the operators that ARE the original regions.
BASELINES = {ATTENTION: Baseline("sdpa", "mha"), MLP: Baseline("mlp", "mlp")}


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
    def grid(self) -> tuple[int, int] | None:
        """The token grid a hand-made region records (``graftfx.match.grid``: square token
        counts only; a 2D operator refuses the others with its own message)."""
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

    @property
    def operator(self) -> type:
        """The registered operator class (``graftfx.operator.Operator`` subclass)."""
        from graftfx.registry import get_operator

        return get_operator(self.op).cls


def bench_kind(kinds: tuple[str, ...]) -> str | None:
    """The region kind an operator replacing ``kinds`` is benched on (None: not benched)."""
    return next((k for k in KINDS if k in kinds), None)


def operator_cases(names: list[str] | None = None) -> tuple[list[OpCase], list[str]]:
    """Cases for the registered operators (all, or ``names`` in the order given): one per
    option set of the operator's ``bench_options``. All registered operators come in a stable
    order: by the kind they are benched on (attention, then MLP), then by name. Returns
    (cases, notes)."""
    from graftfx.registry import operators

    registered = operators()
    if names:
        for name in names:
            if name not in registered:
                near = difflib.get_close_matches(name, registered, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise GraftError(f"--op {name!r} is not a registered operator{hint}; registered: "
                                 f"{', '.join(sorted(registered))}")
        chosen = list(dict.fromkeys(names))
    else:
        def order(name):
            kind = bench_kind(registered[name].kinds)
            return (KINDS.index(kind) if kind else len(KINDS), name)
        chosen = sorted(registered, key=order)
    cases, notes = [], []
    for name in chosen:
        spec = registered[name]
        kind = bench_kind(spec.kinds)
        if kind is None:
            notes.append(f"{name}: replaces {'/'.join(spec.kinds)} regions only; not benched")
            continue
        for options in spec.cls.bench_options:
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
    """(label, module) of the original region at this shape: SDPA attention or the MLP."""
    base = BASELINES[kind]
    module = build(base.op, {}, region, "baseline")
    label = base.label
    if kind == MLP:
        label += f" r={(region.hidden or 4 * region.width) / region.width:g}"
    return label, module


def is_baseline(case: OpCase) -> bool:
    """True for the attention baseline itself (nothing to compare it with). The MLP baseline's
    operator is benched at other widths (its ``bench_options``) against the original."""
    return case.kind == ATTENTION and case.op == BASELINES[ATTENTION].op


# ----------------------------------------------------------------------------- paths
@dataclass
class PathSpec:
    name: str                                     # triton, reference, eager, compile, <package>
    make: Callable[[], nn.Module] | None          # builds the module to time (None: skipped)
    mode: str | None = None                       # graftfx.kernels mode to run under
    skip: str = ""                                # why it is not timed


def base_path(operator: type) -> str:
    """The PyTorch path of an operator class: ``reference`` when its core runs graftfx kernels
    (with a reference), else ``eager``."""
    return "reference" if operator.has_reference() else "eager"


def backend_skip(backend, dtype: torch.dtype, cuda: bool) -> str:
    """Why ``backend`` (a ``graftfx.operator.Backend``) cannot run here ("" when it can)."""
    from graftfx.kernels._dispatch import optional_backend

    from .harness import dtype_name

    if not cuda:
        return "needs a CUDA GPU"
    if not optional_backend(backend.package):
        return f"{backend.package} is not installed"
    if backend.dtypes and dtype not in backend.dtypes:
        return f"{backend.package} runs {'/'.join(dtype_name(d) for d in backend.dtypes)} only"
    return ""


def paths_for(case: OpCase, module: nn.Module, region: Region, device: torch.device,
              groups: set[str]) -> list[PathSpec]:
    """The paths of ``case`` (built as ``module`` for ``region``) to time on ``device``
    (``groups`` from PATH_GROUPS), all from the operator protocol."""
    from graftfx.kernels._dispatch import HAS_TRITON

    operator = type(module)
    cuda = device.type == "cuda"
    kernels = operator.has_reference()
    out: list[PathSpec] = []
    if kernels and "triton" in groups:
        why = "" if cuda and HAS_TRITON else ("needs a CUDA GPU" if HAS_TRITON else "triton is not installed")
        out.append(PathSpec("triton", (lambda: module) if not why else None, "triton", why))
    mode = "reference" if kernels else None       # the reference (and its compile): no Triton
    base: list[nn.Module] = []

    def base_module():
        if not base:
            base.append(module.reference() if kernels else module)
        return base[0]

    if "reference" in groups:
        out.append(PathSpec(base_path(operator), base_module, mode))
    if "compile" in groups:
        out.append(PathSpec("compile", lambda: torch.compile(base_module(), dynamic=False), mode))
    if "backends" in groups:
        for backend in operator.backends:
            why = backend_skip(backend, region.dtype, cuda)
            make = (lambda o=backend.options: build(case.op, {**case.options, **o}, region, case.label)
                    ) if not why else None
            out.append(PathSpec(backend.package, make, None, why))
    return out
