"""Resource ceilings: how much a rule file, an operator, a manifest or a checkpoint may ask graftfx
to read or allocate. Each is checked before the work it guards, and exceeding one is a one-line
GraftError naming the input, the figure, the ceiling and how to raise it.

Ceilings that a legitimate job could reach are configurable through environment variables:

=============================== ================================= ==============================
variable                        what                              default
=============================== ================================= ==============================
GRAFTFX_MAX_PARAM_RATIO         an operator's parameters (and     64 x the parameters of the
                                buffers) over the region's        region it replaces
GRAFTFX_MIN_PARAM_CEILING       an operator is never refused      2**20 (1,048,576)
                                below this many
GRAFTFX_MAX_INPUT_ELEMENTS      elements of a manifest's example  2**26 (67,108,864)
                                inputs, all together
=============================== ================================= ==============================

Fixed ceilings (no legitimate file comes near them): rule and study files at most 1 MiB, TOML
nesting 8 levels, 1,024 rules, 4,096 items per list, 64 KiB per string, integers within 64 bits;
manifests at most 16 MiB; a DiT at most 1,024 blocks and width 65,536.
"""
from __future__ import annotations

import math
import os

from graftfx.errors import GraftError

MAX_TOML_BYTES = 1 << 20
MAX_TOML_DEPTH = 8
MAX_RULES = 1024
MAX_LIST = 4096
MAX_STRING = 1 << 16
MAX_INT = 1 << 63
MAX_MANIFEST_BYTES = 16 << 20
MAX_DEPTH = 1024
MAX_WIDTH = 1 << 16
MAX_SIDE = 1 << 16               # input size, patch, channels, classes of a DiT


def _env_number(name: str, default: float) -> float:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise GraftError(f"environment variable {name}={text!r} is not a number; unset it or give e.g. "
                         f"{name}={default:g}") from None
    if not math.isfinite(value) or value <= 0:
        raise GraftError(f"environment variable {name}={text!r} must be a finite number > 0")
    return value


def param_ratio() -> float:
    return _env_number("GRAFTFX_MAX_PARAM_RATIO", 64.0)


def param_floor() -> int:
    return int(_env_number("GRAFTFX_MIN_PARAM_CEILING", float(1 << 20)))


def max_input_elements() -> int:
    return int(_env_number("GRAFTFX_MAX_INPUT_ELEMENTS", float(1 << 26)))


def human_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{int(n)}"


def operator_size(op) -> int:
    """Elements held by a module: parameters and buffers (meta tensors count as well)."""
    return sum(t.numel() for t in op.parameters()) + sum(t.numel() for t in op.buffers())


def check_operator_size(op, rule, region) -> None:
    """Refuse an operator far larger than the region it replaces (``ratio = 10000``): a GraftError
    naming the rule, the region, the size and the ceiling. Called by ``build_operator`` after
    every build; the CLI, ``distill_plan`` and ``load_grafted`` build on the meta device first
    (``graftfx.export.preflight``), so nothing large is allocated before this check."""
    size = operator_size(op)
    own = max(int(getattr(region, "params", 0) or 0), 1)
    ceiling = max(param_ratio() * own, param_floor())
    if size > ceiling:
        options = ", ".join(f"{k}={v!r}" for k, v in dict(rule.options).items()) or "defaults"
        raise GraftError(
            f"{rule.where}operator {rule.operator!r} for {region.path or '<root>'} would hold {human_count(size)} "
            f"parameters, {size / own:.0f}x the {human_count(own)} of the region it replaces (ceiling "
            f"{param_ratio():g}x, GRAFTFX_MAX_PARAM_RATIO); lower its options ({options}) or raise the ceiling")


def check_toml_shape(data, where: str) -> None:
    """Depth, list lengths, string lengths and integer sizes of parsed TOML, against the fixed
    ceilings (a rule or study file is a handful of short tables)."""
    stack = [(data, 1, "")]
    while stack:
        value, depth, key = stack.pop()
        at = f" (at {key})" if key else ""
        if depth > MAX_TOML_DEPTH:
            raise GraftError(f"{where}: nested more than {MAX_TOML_DEPTH} levels deep{at}; a rule file is flat tables "
                             "of short values")
        if isinstance(value, dict):
            stack.extend((v, depth + 1, f"{key}.{k}" if key else str(k)) for k, v in value.items())
        elif isinstance(value, list):
            if len(value) > MAX_LIST:
                raise GraftError(f"{where}: a list of {len(value)} items{at}, more than {MAX_LIST}; shorten it")
            stack.extend((v, depth + 1, f"{key}[{i}]") for i, v in enumerate(value))
        elif isinstance(value, str):
            if len(value) > MAX_STRING:
                raise GraftError(f"{where}: a string of {len(value)} characters{at}, more than {MAX_STRING}; shorten it")
        elif isinstance(value, int) and not isinstance(value, bool):
            if not -MAX_INT <= value < MAX_INT:
                raise GraftError(f"{where}: the integer{at} does not fit in 64 bits; give a value of sensible size")


def resolve_device(spec, flag: str = "--device"):
    """A torch device the run can use: ``cpu``, ``cuda`` or ``cuda:N`` (present on this machine);
    anything else is a one-line GraftError naming the flag."""
    import torch

    text = str(spec) if spec is not None else ""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise GraftError(f"{flag} {text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GraftError(f"{flag} {text}: no CUDA device on this machine; use {flag} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise GraftError(f"{flag} {text}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise GraftError(f"{flag} {text}: graftfx trains and evaluates on cpu or cuda; use one of those")
    return device
