"""Operator microbenchmarks and the crossover report: the same code as ``graftfx bench``.

    python benchmarks/bench_ops.py [--op swa] [--shape pixart-2048] [--crossover] [--json out.json]
    python benchmarks/bench_ops.py --model DiT-XL/2 --rules dit-xl2-mha-swa-50p.toml

Every flag of ``graftfx bench --help`` applies. Kernel timings need a CUDA GPU; on a CPU the
PyTorch reference paths are timed at scaled-down shapes.
"""
from __future__ import annotations

import sys

from graftfx.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
