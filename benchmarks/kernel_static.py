"""Static kernel report: every graftfx Triton kernel, forward and backward, compiled for sm_90
(H100/H200) by Triton's own compiler and ptxas on this machine, no GPU needed.

    python benchmarks/kernel_static.py [--dtype bf16 --dtype fp32] [--family swa] [--json out.json]

At the bench shapes (``graftfx.kernels.cases.static_cases``: L = 4096, batch 8, width 1152 as
16 heads of 72 and 18 heads of 64, q/k/v as head views of one packed projection; Mamba-2 at the
paper's config; Hyena on the (B, L, 3456) in-projection output), one row per compiled kernel
(autotuned kernels: one row per config their pruning keeps): registers, spills, shared memory,
the widest global load/store, async copies, and the widest load of each load stream.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"        # before any kernel module is imported
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", action="append", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--family", action="append", help="kernel families (default: all)")
    p.add_argument("--head-dim", action="append", type=int, help="head dims (default: 72 and 64)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)

    import torch
    import triton

    from graftfx.bench.harness import environment
    from graftfx.bench.static import run_report, table
    from graftfx.kernels.cases import HEAD_DIMS, static_cases

    cases = static_cases(tuple(args.head_dim or HEAD_DIMS))
    if args.family:
        cases = [c for c in cases if c.family in args.family]
    start = time.time()
    rows = run_report(cases, tuple(args.dtype or ("bf16", "fp32")))
    meta = environment(torch.device("cpu"), "python " + " ".join(["benchmarks/kernel_static.py", *(argv or sys.argv[1:])]))
    meta["target"] = "sm_90a (Triton GPUTarget('cuda', 90, 32)), ptxas bundled with triton " + triton.__version__
    print(f"Static kernel report: {meta['target']}; {meta['date']}; torch {meta['torch']}; "
          f"command `{meta['command']}`; {time.time() - start:.0f} s\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": [r.as_dict() for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
