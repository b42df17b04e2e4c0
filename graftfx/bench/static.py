"""Static kernel report: compile graftfx's Triton kernels for an H100/H200 (sm_90) on any machine.

No GPU is needed. ``capture(fn)`` runs ``fn`` (a case's ``launch``: the real launchers, on ``meta``
tensors) under a fake sm_90 driver: every kernel launch is compiled by Triton (``warmup``: the
same specialisation, constexprs, alignment and options a GPU launch would get) and recorded
instead of run; an autotuned kernel compiles every config its pruning keeps. ``analyse`` reads
each compiled kernel:

- registers, spill stores/loads, stack frame: ``ptxas -v`` (Triton's bundled ptxas, sm_90a);
- shared memory: what Triton allocates (``metadata.shared``);
- the widest global load and store, and the async copies (``cp.async``, ``cp.async.bulk``: the
  loads that feed the software pipeline) in the PTX;
- per load stream: the PTX ``.loc`` line of every global load names the ``tl.load`` it came from,
  whose pointer expression names the stream (``Q``, ``k_base`` -> ``K``, ``u_ptr``): its widest load.

Must run with ``TRITON_INTERPRET=0`` in the environment before any kernel module is imported
(``@triton.jit`` picks the interpreter at decoration time); ``benchmarks/kernel_static.py`` and the
test run it in a subprocess.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import inspect
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

ARCH = 90


@dataclass
class Compiled:
    kernel: str                      # the @triton.jit function's name
    file: str                        # its source file
    config: str                      # block sizes, warps, stages
    compiled: object = field(repr=False, default=None)


@dataclass
class KernelReport:
    case: str
    family: str
    dtype: str
    kernel: str
    config: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    widest_load: int                 # bits
    widest_store: int
    async_copies: int                # cp.async / cp.async.bulk instructions
    streams: dict                    # stream -> widest load (bits), "a" suffix when async

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- capture
class _FakeDriver:
    """What ``JITFunction.run`` asks of a driver before it launches: an sm_90 target."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", ARCH, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True

    def get_benchmarker(self):
        raise RuntimeError("static report: nothing is timed")


def _config_text(kwargs: dict, options) -> str:
    blocks = " ".join(f"{k}={v}" for k, v in kwargs.items()
                      if k.startswith(("BLOCK", "BT", "BN", "BP", "N_", "CHUNK", "HEADS")) and
                      isinstance(v, int))
    return f"{blocks} w{options.num_warps} s{options.num_stages}".strip()


@contextlib.contextmanager
def _fake_gpu(records: list[Compiled]):
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the static report needs TRITON_INTERPRET=0 (kernels compile, not interpret)")
    run, tune = JITFunction.run, Autotuner.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        records.append(Compiled(self.fn.__name__, inspect.getsourcefile(self.fn),
                                _config_text(kwargs, kernel.metadata), kernel))
        return kernel

    def every_config(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        for config in self.prune_configs(kwargs):
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        self.nargs = None

    previous = driver._active               # None until a real driver was asked for
    driver.set_active(_FakeDriver())
    JITFunction.run, Autotuner.run = compile_only, every_config
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = run, tune
        driver._active = previous


def capture(fn, *args) -> list[Compiled]:
    """Every kernel ``fn(*args)`` launches, compiled for sm_90 and not run."""
    records: list[Compiled] = []
    with _fake_gpu(records):
        fn(*args)
    return records


# ----------------------------------------------------------------------------- analysis
def _bin(tool: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def _cache_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "graftfx"
    return root / "ptxas-v.json"


@functools.lru_cache(maxsize=1)
def _cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _save_cache() -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(_cache()))
        tmp.replace(path)
    except OSError:
        pass


def ptxas_usage(ptx: str, arch: str = "sm_90a") -> dict:
    """registers, spill stores/loads and stack frame bytes from ``ptxas -v`` (cached by PTX hash)."""
    key = hashlib.sha256((arch + ptx).encode()).hexdigest()
    cache = _cache()
    if key not in cache:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "k.ptx"
            src.write_text(ptx)
            run = subprocess.run([_bin("ptxas"), "-v", f"--gpu-name={arch}", str(src), "-o",
                                  str(Path(tmp) / "k.o")], capture_output=True, text=True, check=True)
        log = run.stderr

        def num(pattern):
            m = re.search(pattern, log)
            return int(m.group(1)) if m else 0
        cache[key] = {"registers": num(r"Used (\d+) registers"),
                      "stack": num(r"(\d+) bytes stack frame"),
                      "spill_stores": num(r"(\d+) bytes spill stores"),
                      "spill_loads": num(r"(\d+) bytes spill loads")}
        _save_cache()
    return cache[key]


_WIDTH = {"b8": 8, "u8": 8, "s8": 8, "b16": 16, "u16": 16, "s16": 16, "f16": 16, "bf16": 16,
          "b32": 32, "u32": 32, "s32": 32, "f32": 32, "b64": 64, "u64": 64, "s64": 64, "f64": 64}


def _access_bits(instr: str) -> int:
    parts = instr.split(".")
    vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    elem = next((_WIDTH[p] for p in reversed(parts) if p in _WIDTH), 0)
    return vec * elem


_LOAD = re.compile(r"^\s*(?:@!?%\w+\s+)?(ld\.global[\w.:]*)")
_STORE = re.compile(r"^\s*(?:@!?%\w+\s+)?(st\.global[\w.:]*)")
_ASYNC = re.compile(r"^\s*(?:@!?%\w+\s+)?(cp\.async(?:\.bulk)?[\w.:]*)\s+(.*)")
_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+\d+")
_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"')


@functools.lru_cache(maxsize=None)
def _load_streams(path: str) -> dict[int, str]:
    """{line: stream} for every ``tl.load`` in a source file: the pointer expression's first
    name, followed back through simple assignments (``k_base = K + ...`` -> ``K``)."""
    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError):
        return {}
    out: dict[int, str] = {}
    for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        assigned: dict[str, ast.AST] = {}
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                assigned.setdefault(node.targets[0].id, node.value)

        def first_name(expr, depth=0):
            names = [n for n in ast.walk(expr) if isinstance(n, ast.Name)]
            if not names:
                return None
            name = min(names, key=lambda n: (n.lineno, n.col_offset)).id
            if name in assigned and depth < 4:
                return first_name(assigned[name], depth + 1) or name
            return name

        for node in ast.walk(fn):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and node.args):
                stream = first_name(node.args[0])
                if stream:
                    for line in range(node.lineno, (node.end_lineno or node.lineno) + 1):
                        out.setdefault(line, stream)
    return out


def ptx_accesses(ptx: str) -> dict:
    """Widest global load/store (bits), async copy count, and {stream: widest load} from PTX."""
    # .file directives sit at the end of the PTX, the .loc lines naming them before
    files = {m.group(1): m.group(2) for m in map(_FILE.match, ptx.splitlines()) if m}
    loc: tuple[str, int] | None = None
    widest_load = widest_store = n_async = 0
    streams: dict[str, tuple[int, bool]] = {}

    def note(bits: int, is_async: bool):
        if loc is None:
            return
        stream = _load_streams(files.get(loc[0], "")).get(loc[1])
        if stream is None:
            return
        old = streams.get(stream, (0, False))
        streams[stream] = (max(old[0], bits), old[1] or is_async)

    for line in ptx.splitlines():
        if m := _LOC.match(line):
            loc = (m.group(1), int(m.group(2)))
        elif m := _LOAD.match(line):
            bits = _access_bits(m.group(1))
            widest_load = max(widest_load, bits)
            note(bits, False)
        elif m := _STORE.match(line):
            widest_store = max(widest_store, _access_bits(m.group(1)))
        elif m := _ASYNC.match(line):
            op, rest = m.groups()
            if ".shared.global" in op or ".global" in op and "bulk" in op:
                n_async += 1
                # cp.async.{ca,cg}.shared.global [dst], [src], cp-size(, src-size);
                size = re.search(r"\],\s*(0x[0-9a-fA-F]+|\d+)\s*[,;]", rest)
                bits = 8 * int(size.group(1), 0) if size else 0
                widest_load = max(widest_load, bits)
                note(bits, True)
    return {"widest_load": widest_load, "widest_store": widest_store, "async_copies": n_async,
            "streams": {k: f"{b}{'a' if a else ''}" for k, (b, a) in sorted(streams.items())}}


def analyse(rec: Compiled, case: str = "", family: str = "", dtype: str = "") -> KernelReport:
    k = rec.compiled
    usage = ptxas_usage(k.asm["ptx"])
    acc = ptx_accesses(k.asm["ptx"])
    return KernelReport(case, family, dtype, rec.kernel, rec.config, usage["registers"],
                        usage["spill_stores"], usage["spill_loads"], usage["stack"],
                        int(k.metadata.shared), acc["widest_load"], acc["widest_store"],
                        acc["async_copies"], acc["streams"])


def report_case(case, dtype_name: str) -> list[KernelReport]:
    """Compile every kernel of a ``graftfx.kernels.cases.KernelCase`` (forward and backward) in
    ``dtype_name`` and analyse each."""
    import torch

    from graftfx.kernels.cases import DTYPES

    inputs = case.make(torch.device("meta"), DTYPES[dtype_name])
    return [analyse(r, case.label, case.family, dtype_name) for r in capture(case.launch, inputs)]


# ----------------------------------------------------------------------------- table
COLUMNS = ("case", "dtype", "kernel", "config", "regs", "spills (st/ld B)", "smem B",
           "widest ld/st", "async", "load streams (bits; a = async copy)")


def table(rows: list[KernelReport]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        streams = ", ".join(f"{k} {v}" for k, v in r.streams.items())
        cells = [r.case, r.dtype, r.kernel.lstrip("_"), r.config, str(r.registers),
                 f"{r.spill_stores}/{r.spill_loads}", str(r.shared),
                 f"{r.widest_load}/{r.widest_store}", str(r.async_copies), streams]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def run_report(cases, dtypes=("bf16", "fp32")) -> list[KernelReport]:
    rows = []
    for case in cases:
        for dtype in dtypes:
            rows += report_case(case, dtype)
    return rows


__all__ = ["Compiled", "KernelReport", "analyse", "capture", "ptx_accesses", "ptxas_usage",
           "report_case", "run_report", "table"]

