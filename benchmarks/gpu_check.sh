#!/usr/bin/env bash
# One prepared GPU check (issue 14): run on a machine with a CUDA GPU, its own python3 with
# torch (2.11+, CUDA) and Triton, and no network. No venv, no downloads: the repo goes on
# PYTHONPATH. Runs the CUDA tests (tests/cuda) under a time limit, then the kernel benchmarks
# (`graftfx bench --kernels`: every kernel core against flex_attention / SDPA / the installed
# baselines, output-checked, with the issue-14 targets as ratios) under a time budget, then
# then the per-step latency of a PixArt-Sigma-sized transformer at 1024 and 2048 px (issue 10:
# base vs 50% Hyena-X and SWA, `benchmarks/bench_diffusers.py latency`), then writes one JSON and one
# markdown summary (device, versions, date, each test's outcome, the kernel and latency tables) to
# $GPU_CHECK_OUT (default benchmarks/gpu_check/; $OUT when the device tool sets it).
# Budget: tests 240 s + kernel bench 120 s (+45 s grace) + latency 75 s < 8 minutes.
#
#     bash benchmarks/gpu_check.sh            # or: make gpu-check
#
# Exit status: 0 all passed, 1 a test or a kernel-bench check failed, 2 no usable CUDA GPU here
# (said on one line).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
DEST=${GPU_CHECK_OUT:-${OUT:-$ROOT/benchmarks/gpu_check}}
LIMIT=${GPU_CHECK_LIMIT_S:-240}          # the tests' share of the 8-minute budget
LATENCY_S=${GPU_CHECK_LATENCY_S:-75}     # the per-step latency table's
BENCH_S=${GPU_CHECK_BENCH_S:-120}        # the kernel bench's: no new timing starts after it
mkdir -p "$DEST"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0 GRAFTFX_KERNELS=auto PYTHONUNBUFFERED=1

"$PY" - <<'PY' || exit 2
import sys
try:
    import torch, triton
except ImportError as e:
    sys.exit(f"gpu-check: {e.name} is not importable by this python3 ({sys.executable}); "
             "run on the GPU machine's own python3")
if not torch.cuda.is_available():
    sys.exit(f"gpu-check: no CUDA GPU here (torch {torch.__version__}, CUDA build "
             f"{torch.version.cuda}); run this on the GPU machine")
print(f"gpu-check: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
for pkg in ("flash_attn", "mamba_ssm", "causal_conv1d", "fla"):
    import importlib.util
    if importlib.util.find_spec(pkg) is None:
        print(f"gpu-check: baseline {pkg} not installed: skipped")
PY

start=$(date +%s)
timeout "$LIMIT" "$PY" -m pytest -q -p no:cacheprovider -rs tests/cuda --junitxml "$DEST/cuda-tests.xml" \
    2>&1 | tee "$DEST/cuda-tests.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "gpu-check: the CUDA tests ran past ${LIMIT} s and were stopped"

echo "gpu-check: kernel benchmarks (graftfx bench --kernels, budget ${BENCH_S} s)"
timeout $(( BENCH_S + 45 )) "$PY" -m graftfx bench --kernels --cuda-graphs --budget-s "$BENCH_S" \
    --json "$DEST/kernels.json" > "$DEST/kernels.md" 2> "$DEST/kernels.log"
brc=$?
cat "$DEST/kernels.md"
[ "$brc" = 124 ] && echo "gpu-check: the kernel benchmarks ran past $(( BENCH_S + 45 )) s and were stopped"
[ "$brc" != 0 ] && tail -n 5 "$DEST/kernels.log"

echo "gpu-check: per-step latency, PixArt-Sigma size (budget ${LATENCY_S} s)"
timeout "$LATENCY_S" "$PY" benchmarks/bench_diffusers.py latency --repeat 5 > "$DEST/latency.md" 2> "$DEST/latency.log"
lrc=$?
cat "$DEST/latency.md"
[ "$lrc" = 124 ] && echo "gpu-check: the latency table ran past ${LATENCY_S} s and was stopped (rows so far kept)"
[ "$lrc" != 0 ] && tail -n 5 "$DEST/latency.log"

"$PY" - "$DEST" "$rc" "$(( $(date +%s) - start ))" "$brc" <<'PY'
import datetime, json, platform, sys, xml.etree.ElementTree as ET
from pathlib import Path
import torch, triton
dest, rc, secs, brc = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rows = []
try:
    for tc in ET.parse(dest / "cuda-tests.xml").iter("testcase"):
        kids = {c.tag: (c.get("message") or "")[:300] for c in tc}
        status = ("failed" if "failure" in kids or "error" in kids else
                  "skipped" if "skipped" in kids else "passed")
        rows.append({"test": f"{tc.get('classname')}::{tc.get('name')}", "status": status,
                     "seconds": float(tc.get("time") or 0),
                     "message": kids.get("failure") or kids.get("error") or kids.get("skipped") or ""})
except (OSError, ET.ParseError) as e:
    rows.append({"test": "(junit report)", "status": "missing", "seconds": 0, "message": str(e)})
meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
        "python": platform.python_version(), "command": "bash benchmarks/gpu_check.sh",
        "pytest_exit": rc, "kernel_bench_exit": brc, "seconds": secs}
try:
    bench = json.loads((dest / "kernels.json").read_text())
except (OSError, ValueError) as e:
    bench = {"error": f"no kernel bench results: {e}"}
(dest / "gpu_check.json").write_text(json.dumps({"meta": meta, "tests": rows, "kernel_bench": bench},
                                                indent=1))
count = {s: sum(r["status"] == s for r in rows) for s in ("passed", "failed", "skipped")}
md = [f"GPU check: {meta['device']}; torch {meta['torch']} (CUDA {meta['cuda']}); triton {meta['triton']}; "
      f"{meta['date']}; `{meta['command']}`; {secs} s; " + ", ".join(f"{v} {k}" for k, v in count.items()), "",
      "| test | status | s | message |", "|---|---|---|---|"]
md += [f"| {r['test']} | {r['status']} | {r['seconds']:.1f} | {r['message'].splitlines()[0] if r['message'] else ''} |"
       for r in rows]
try:
    kernel_md = (dest / "kernels.md").read_text()
except OSError:
    kernel_md = ""
md += ["", "Kernel benchmarks (`graftfx bench --kernels`, exit " + str(brc) + "):", "",
       kernel_md.strip() or "(no output: see kernels.log)"]
try:
    latency_md = (dest / "latency.md").read_text()
except OSError:
    latency_md = ""
md += ["", "Per-step latency (`python benchmarks/bench_diffusers.py latency --repeat 5`):", "",
       latency_md.strip() or "(no output: see latency.log)"]
(dest / "gpu_check.md").write_text("\n".join(md) + "\n")
print(md[0])
PY
exit $(( rc == 0 && brc == 0 ? 0 : 1 ))
