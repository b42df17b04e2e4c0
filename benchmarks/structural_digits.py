"""Structural rewrites on the bundled digits DiT (8 blocks -> depth 4): quality, size and latency.

    python benchmarks/structural_digits.py [--steps1 N] [--steps2 N] [--seed S] [--out-dir DIR]

The digits experiment of the structural-rewrites issue. Arms, every one of depth 4 but the teacher:

- ``teacher``: the bundled DiT (8 blocks), evaluated only.
- ``parallel``: ``digits-parallel-pairs.toml`` (blocks (0,1), (2,3), ... -> one parallel block
  each), stage 1 (each pair's module regresses the teacher's pair-boundary output, from a cache of
  ``--samples`` teacher calibration samples) then stage 2 (all parameters, the DiT loss).
- ``merged``: ``merge_blocks`` on every pair (weights: the mean of the two blocks), trained as
  ``parallel`` (same stage-1 and stage-2 budgets).
- ``drop``: ``digits-drop-every-other.toml`` (blocks 1, 3, 5, 7 removed): no stage 1 (nothing new to
  train), stage 2 only, with the same number of training samples as ``parallel``'s two stages
  together: ``steps2_drop = ceil((steps1 * batch1 + steps2 * batch2) / batch2)``.
- ``parallel-untrained``, ``merged-untrained``, ``drop-untrained``: the rewrite alone, evaluated
  right after splicing (no training), to show what the training adds.
- ``scratch``: a depth-4 DiT of the same width, heads and recipe as the teacher (``graftfx
  pretrain``'s trainer, ``DIGITS_CONFIG`` with depth 4) trained from random weights with the same
  training FLOPs as the whole ``parallel`` arm (teacher cache recording + stage 1 + stage 2).

Compute is counted in FLOPs, with forward FLOPs per sample measured by
``torch.utils.flop_counter.FlopCounterMode`` on each model, and a training step (forward +
backward) counted as 3x its forward. A block's FLOPs are (teacher - dropped model) / 4; a pair's
module costs two blocks. The FLOPs of every arm are reported, not only the matched ones.

Each model is measured by ``graftfx.eval.evaluate`` (Digits-FID against the real digits with the
committed classifier, class accuracy; DDIM, classifier-free guidance, the same noise for every
arm), its parameter count, and CPU latency per sample at batch 16 (torch.no_grad, the median of
``--latency-rounds`` interleaved rounds after a warm-up call, divided by 16). Writes
``docs/structural-results.md`` and ``docs/structural-results.json`` (``--doc``, ``--json``); the
working folders (cache, checkpoints) go to ``--out-dir``. A failing arm is reported as skipped
with its error, and the other arms still run.
"""
from __future__ import annotations

import argparse
import datetime
import math
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ARMS = ("teacher", "parallel-untrained", "parallel", "merged-untrained", "merged", "drop-untrained", "drop", "scratch")
RULES = {"parallel": "digits-parallel-pairs.toml", "drop": "digits-drop-every-other.toml"}
LABELS = {"teacher": "teacher (8 blocks)", "parallel": "parallel pairs (4 parallel blocks)",
          "merged": "merged pairs (4 mean-merged blocks)", "drop": "drop every other block (4 blocks)",
          "scratch": "depth-4 DiT from scratch",
          "parallel-untrained": "parallel pairs, no training", "merged-untrained": "merged pairs, no training",
          "drop-untrained": "drop every other block, no training"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " (see the module docstring)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    p.add_argument("--samples", type=int, default=256, help="teacher calibration samples cached for stage 1")
    p.add_argument("--steps1", type=int, default=80, help="stage-1 steps (parallel, merged)")
    p.add_argument("--batch1", type=int, default=8, help="stage-1 batch")
    p.add_argument("--lr1", type=float, default=5e-4, help="stage-1 learning rate")
    p.add_argument("--steps2", type=int, default=25, help="stage-2 steps (parallel, merged)")
    p.add_argument("--batch2", type=int, default=16, help="stage-2 batch (all distilled arms)")
    p.add_argument("--lr2", type=float, default=1e-4, help="stage-2 learning rate")
    p.add_argument("--ema2", type=float, default=0.99,
                   help="stage-2 EMA decay (the engine's 0.999 would keep a short run's EMA near its start)")
    p.add_argument("--scratch-batch", type=int, default=64, help="batch of the from-scratch depth-4 run")
    p.add_argument("--scratch-lr", type=float, default=1e-3, help="learning rate of the from-scratch run")
    p.add_argument("--eval-per-class", type=int, default=10, help="samples per class for Digits-FID/accuracy")
    p.add_argument("--eval-steps", default="ddim10", help="sampler steps for the evaluation")
    p.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale of the evaluation")
    p.add_argument("--latency-batch", type=int, default=16, help="batch of the latency measurement")
    p.add_argument("--latency-rounds", type=int, default=7, help="interleaved timing rounds (median)")
    p.add_argument("--seed", type=int, default=0, help="seed of training, calibration and evaluation noise")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out-dir", default="runs/structural-digits", help="working folder (cache, checkpoints)")
    p.add_argument("--doc", default=str(ROOT / "docs" / "structural-results.md"), help="markdown report")
    p.add_argument("--json", default=str(ROOT / "docs" / "structural-results.json"), help="JSON record")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--latency-from", metavar="JSON", default=None,
                   help="train nothing: re-time the arms of a JSON record this script wrote (the architectures "
                        "rebuilt untrained: latency does not depend on weight values), update its latencies "
                        "and rewrite --doc")
    p.add_argument("--report-from", metavar="JSON", default=None,
                   help="run nothing: rewrite --doc from a JSON record this script wrote (its settings and command)")
    return p


def forward_flops(model, inputs) -> float:
    """Forward FLOPs per sample (FlopCounterMode counts a multiply-add as 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops() / inputs[0].shape[0]


def distill_arm(name: str, rules, latents, labels, a, out: Path, stage1: bool, steps2: int, progress: bool):
    """One distilled arm, from its own freshly loaded teacher: stage 2 sets the teacher's
    requires_grad to False, and structural modules spliced from such a teacher inherit it (their
    stage 1 then fails), so no arm reuses another arm's teacher object."""
    import graftfx
    from graftfx.distill import DistillSettings, Stage1Config, Stage2Config, distill_plan
    from graftfx.models import load_bundled_digits_dit

    teacher = load_bundled_digits_dit().eval()
    traced = graftfx.trace(teacher, teacher.example_inputs(2))
    plan = graftfx.select(traced, graftfx.load_rules(rules))
    settings = DistillSettings(
        stage="both" if stage1 else "2", samples=a.samples, shard_size=256, export=False,
        stage1=Stage1Config(steps=a.steps1, batch_size=a.batch1, lr=a.lr1, seed=a.seed, ckpt_every=10**9),
        stage2=Stage2Config(steps=steps2, batch_size=a.batch2, lr=a.lr2, warmup=10, ema_decay=a.ema2,
                            seed=a.seed, ckpt_every=10**9, num_classes=teacher.config.num_classes))
    torch.manual_seed(a.seed)
    result = distill_plan(plan, latents, labels, out / name, settings, progress=progress,
                          model_id="bundled:digits", log=lambda *m: print(f"  [{name}]", *m))
    return result.grafted.eval(), {"stage1_loss": result.stage1["losses"] if result.stage1 else None,
                                   "stage2_loss": result.stage2["loss"] if result.stage2 else None}


def scratch_arm(steps: int, a, out: Path, progress: bool):
    from graftfx.data import DIGITS_CONFIG
    from graftfx.pretrain.train import TrainSettings, train_digits

    settings = TrainSettings(steps=steps, batch=a.scratch_batch, lr=a.scratch_lr, warmup=min(100, steps // 10),
                             seed=a.seed, ckpt_every=max(steps, 1), log_every=25,
                             model=dict(DIGITS_CONFIG, depth=4))
    folder = out / f"scratch-{steps}"
    if folder.exists():   # a fresh run each time (train_digits refuses a folder holding a run)
        import shutil
        shutil.rmtree(folder)
    res = train_digits(folder, settings, progress=progress, export=False, command="benchmarks/structural_digits.py")
    return res.ema.eval(), {"final_loss": res.final_loss, "eval_loss": res.eval_loss, "steps": steps,
                            "batch": a.scratch_batch, "wall_s": res.wall_s}


def latency(models: dict, x, rounds: int) -> dict[str, float]:
    """Median ms per sample over interleaved rounds (every model timed in the same stretch)."""
    times = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(*x)
        for _ in range(rounds):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(*x)
                times[k].append(time.perf_counter() - t0)
    n = x[0].shape[0]
    return {k: sorted(ts)[len(ts) // 2] * 1e3 / n for k, ts in times.items()}


def architectures(arms, traced, seed: int) -> dict:
    """Untrained models of each arm's architecture (for timing only)."""
    import graftfx
    from graftfx.data import DIGITS_CONFIG
    from graftfx.models import DiT, DiTConfig

    out = {}
    for arm in arms:
        torch.manual_seed(seed)
        if arm == "teacher":
            out[arm] = traced.model
        elif arm == "scratch":
            out[arm] = DiT(DiTConfig(**dict(DIGITS_CONFIG, depth=4))).eval()
        elif arm in RULES:
            out[arm] = graftfx.splice(graftfx.select(traced, graftfx.load_rules(RULES[arm]))).eval()
    return out


def retime(a) -> int:
    import json

    import graftfx
    from graftfx.io import atomic_write_json, atomic_write_text
    from graftfx.models import load_bundled_digits_dit
    from graftfx.rules import Rule, Select

    if a.threads:
        torch.set_num_threads(a.threads)
    RULES["merged"] = [Rule("block", "merge_blocks", Select(), name="merge-pairs")]
    rec = json.loads(Path(a.latency_from).read_text())
    teacher = load_bundled_digits_dit().eval()
    traced = graftfx.trace(teacher, teacher.example_inputs(2))
    timed = [k for k, r in rec["results"].items() if r.get("latency_ms_per_sample") is not None]
    batch = rec["meta"]["settings"]["latency_batch"]
    print(f"== re-timing {', '.join(timed)} at batch {batch}, {a.latency_rounds} rounds")
    lat = latency(architectures(timed, traced, a.seed), teacher.example_inputs(batch), a.latency_rounds)
    before = {arm: rec["results"][arm]["latency_ms_per_sample"] for arm in lat}
    for arm, ms in lat.items():
        rec["results"][arm]["latency_ms_per_sample"] = ms
        print(f"  {arm}: {ms:.2f} ms/sample")
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rec["meta"]["latency"] = {"command": "python benchmarks/structural_digits.py " + " ".join(
        shlex.quote(x) for x in sys.argv[1:]), "date": now, "rounds": a.latency_rounds,
        "device": f"CPU: {cpu_name()}, {torch.get_num_threads()} torch threads",
        "previous_ms_per_sample": rec["meta"].get("latency", {}).get("previous_ms_per_sample", before)}
    rec["meta"]["settings"]["latency_rounds"] = a.latency_rounds
    atomic_write_json(a.latency_from, rec)
    atomic_write_text(a.doc, report(rec, argparse.Namespace(**rec["meta"]["settings"])))
    print(f"updated {a.latency_from} and wrote {a.doc}")
    return 0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.latency_from:
        return retime(a)
    if a.report_from:
        import json

        from graftfx.io import atomic_write_text

        rec = json.loads(Path(a.report_from).read_text())
        atomic_write_text(a.doc, report(rec, argparse.Namespace(**rec["meta"]["settings"])))
        print(f"wrote {a.doc} from {a.report_from}")
        return 0
    arms = [s.strip() for s in a.arms.split(",") if s.strip()]
    bad = [s for s in arms if s not in ARMS]
    if bad:
        print(f"error: --arms {bad[0]!r} is not one of {', '.join(ARMS)}", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    progress = not a.no_progress
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    import graftfx
    from graftfx.data import DIGITS_CONFIG
    from graftfx.distill import load_data
    from graftfx.eval import evaluate
    from graftfx.io import atomic_write_json, atomic_write_text
    from graftfx.match.cost import count_params
    from graftfx.models import DiT, DiTConfig, load_bundled_digits_dit
    from graftfx.rules import Rule, Select

    RULES["merged"] = [Rule("block", "merge_blocks", Select(), name="merge-pairs")]
    print("== load + trace the bundled digits DiT")
    teacher = load_bundled_digits_dit().eval()
    traced = graftfx.trace(teacher, teacher.example_inputs(2))
    latents, labels = load_data("digits")

    # ---- compute accounting (FLOPs per sample, measured) ----
    x16 = teacher.example_inputs(a.latency_batch)
    f_teacher = forward_flops(teacher, x16)
    dropped = graftfx.splice(graftfx.select(traced, graftfx.load_rules(RULES["drop"])))
    f_depth4 = forward_flops(dropped, x16)
    f_block = (f_teacher - f_depth4) / 4
    f_scratch = forward_flops(DiT(DiTConfig(**dict(DIGITS_CONFIG, depth=4))).eval(), x16)
    del dropped
    record = a.samples * f_teacher                        # teacher forward on each calibration sample
    stage1 = a.steps1 * a.batch1 * 4 * 3 * (2 * f_block)  # 4 pair modules, forward + backward
    stage2 = a.steps2 * a.batch2 * 3 * f_teacher          # parallel model: the teacher's FLOPs
    stage2_merged = a.steps2 * a.batch2 * 3 * f_depth4    # merged model: depth-4 FLOPs
    budget_samples = a.steps1 * a.batch1 + a.steps2 * a.batch2
    steps2_drop = math.ceil(budget_samples / a.batch2)
    parallel_total = record + stage1 + stage2
    scratch_steps = max(1, round(parallel_total / (a.scratch_batch * 3 * f_scratch)))
    compute = {
        "flops_forward_per_sample": {"teacher": f_teacher, "depth4": f_depth4, "block": f_block,
                                     "scratch_depth4": f_scratch},
        "parallel": {"record": record, "stage1": stage1, "stage2": stage2, "total": parallel_total},
        "merged": {"record": record, "stage1": stage1, "stage2": stage2_merged,
                   "total": record + stage1 + stage2_merged},
        "drop": {"stage2": steps2_drop * a.batch2 * 3 * f_depth4, "total": steps2_drop * a.batch2 * 3 * f_depth4},
        "scratch": {"total": scratch_steps * a.scratch_batch * 3 * f_scratch},
        "training_samples": {"parallel": budget_samples, "merged": budget_samples,
                             "drop": steps2_drop * a.batch2, "scratch": scratch_steps * a.scratch_batch},
        "steps": {"parallel": [a.steps1, a.steps2], "merged": [a.steps1, a.steps2], "drop": [0, steps2_drop],
                  "scratch": scratch_steps},
    }
    print(f"forward GFLOPs/sample: teacher {f_teacher / 1e9:.4f}, depth 4 {f_depth4 / 1e9:.4f}; "
          f"drop arm: {steps2_drop} stage-2 steps; scratch arm: {scratch_steps} steps at batch {a.scratch_batch}")

    models, rows, skipped = {}, {}, {}
    for arm in arms:
        print(f"\n== {arm}: {LABELS[arm]}")
        t0 = time.perf_counter()
        try:
            if arm == "teacher":
                model, info = teacher, {}
            elif arm.endswith("-untrained"):
                torch.manual_seed(a.seed)
                model, info = graftfx.splice(graftfx.select(traced, graftfx.load_rules(RULES[arm[:-10]]))).eval(), {}
            elif arm in ("parallel", "merged"):
                model, info = distill_arm(arm, RULES[arm], latents, labels, a, out, True, a.steps2, progress)
            elif arm == "drop":
                model, info = distill_arm(arm, RULES[arm], latents, labels, a, out, False, steps2_drop,
                                          progress)
            else:
                model, info = scratch_arm(scratch_steps, a, out, progress)
            train_s = time.perf_counter() - t0
            rec = evaluate(model, n_per_class=a.eval_per_class, steps=a.eval_steps, cfg_scale=a.cfg, sampler="ddim",
                           seed=a.seed, config=getattr(model, "config", teacher.config), progress=progress)
        except Exception as e:   # an engine failure skips the arm; the others still run
            traceback.print_exc()
            skipped[arm] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            print(f"  SKIPPED {arm}: {skipped[arm]}")
            continue
        if not arm.endswith("-untrained"):   # the same architecture as the trained arm: timed once, there
            models[arm] = model
        rows[arm] = {"label": LABELS[arm], "fid": rec.fid, "accuracy": rec.accuracy, "params": count_params(model),
                     "train_flops": compute[arm]["total"] if arm in compute else 0.0,
                     "training_samples": compute["training_samples"].get(arm, 0),
                     "train_s": round(train_s, 1), "eval_s": round(time.perf_counter() - t0 - train_s, 1),
                     **info, "eval": rec.to_dict()}
        print(f"  {arm}: Digits-FID {rec.fid:.3f}, accuracy {rec.accuracy:.3f}, {rows[arm]['params']:,} params "
              f"({train_s:.0f}s training)")

    print("\n== CPU latency")
    lat = latency(models, teacher.example_inputs(a.latency_batch), a.latency_rounds)
    for arm, ms in lat.items():
        rows[arm]["latency_ms_per_sample"] = ms
        print(f"  {arm}: {ms:.2f} ms/sample (batch {a.latency_batch})")

    wall = time.perf_counter() - t_all
    command = "python benchmarks/structural_digits.py " + " ".join(shlex.quote(s) for s in (argv or sys.argv[1:]))
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta = {"command": command.strip(), "date": now,
            "device": f"CPU: {cpu_name()}, {torch.get_num_threads()} torch threads", "torch": torch.__version__,
            "wall_s": round(wall, 1), "settings": vars(a), "steps2_drop": steps2_drop, "scratch_steps": scratch_steps}
    record_json = {"meta": meta, "compute": compute, "results": rows, "skipped": skipped}
    atomic_write_json(a.json, record_json)
    atomic_write_text(a.doc, report(record_json, a))
    print(f"\nwrote {a.doc} and {a.json} ({wall:.0f}s)")
    return 0


def report(rec: dict, a) -> str:
    m, c, rows = rec["meta"], rec["compute"], rec["results"]
    t_ms = rows.get("teacher", {}).get("latency_ms_per_sample")
    lines = ["| arm | depth | Digits-FID (lower is better) | class accuracy | parameters | training GFLOPs | "
             "training samples | CPU ms/sample (batch %d) | vs teacher |" % a.latency_batch,
             "|---|---|---|---|---|---|---|---|---|"]
    for arm, r in rows.items():
        ms = r.get("latency_ms_per_sample")
        speed = f"{t_ms / ms:.2f}x" if ms and t_ms else "-"
        ms_text = f"{ms:.2f}" if ms else "(as trained)"
        flops = ("- (pretrained)" if arm == "teacher" else "0" if arm.endswith("-untrained")
                 else f"{r['train_flops'] / 1e9:,.0f}")
        samples = "-" if arm == "teacher" else "0" if arm.endswith("-untrained") else f"{r['training_samples']:,}"
        lines.append(f"| {r['label']} | {8 if arm == 'teacher' else 4} | {r['fid']:.3f} | {r['accuracy']:.3f} | "
                     f"{r['params']:,} | {flops} | {samples} | {ms_text} | {speed} |")
    for arm, why in rec["skipped"].items():
        lines.append(f"| {LABELS[arm]} | - | skipped: {why} | | | | | | |")
    f = c["flops_forward_per_sample"]
    return f"""# Structural rewrites on the bundled digits DiT: results

Made by `benchmarks/structural_digits.py` (the digits experiment of the structural-rewrites issue;
see [structural.md](structural.md) for the rewrites themselves). Every number below was measured by
this one run{" (the latencies by the re-timing command below)" if m.get("latency") else ""}; the JSON
record beside it (`structural-results.json`) holds them all, with the per-class accuracies and
sampler settings.

    {m['command']}

Date {m['date']}; device: {m['device']} (torch {m['torch']}); wall time {m['wall_s'] / 60:.1f} min.
Seed {a.seed} for everything; one seed only (the spread over seeds was not measured).

## Results

{chr(10).join(lines)}

Evaluation: {a.eval_per_class} samples per class ({10 * a.eval_per_class} in all), `{a.eval_steps}`,
classifier-free guidance {a.cfg}, the same noise and labels for every arm; Digits-FID is the
Fréchet distance of the committed digit classifier's 64-d features to all 1,797 real digits, class
accuracy is that classifier's agreement with the requested label. With only
{10 * a.eval_per_class} samples the FID carries a small-sample bias (the same for every arm).
Latency: median of {a.latency_rounds} interleaved rounds at batch {a.latency_batch}, torch.no_grad,
divided by the batch; the eager FX graph of each model, no compilation. GPU latency: not measured
(no GPU in this run).{retimed(m)}

## Budgets and how they are matched

- **parallel** (`digits-parallel-pairs.toml`): teacher cache of {a.samples} calibration samples;
  stage 1 {a.steps1} steps x batch {a.batch1} (lr {a.lr1}, L2 on each pair's output, the four
  pair modules trained on the same batches); stage 2 {a.steps2} steps x batch {a.batch2}
  (lr {a.lr2}, all parameters, the DiT diffusion loss, warm-up 10, EMA {a.ema2}).
- **merged** (`merge_blocks`, weights the mean of the two blocks): exactly the parallel arm's
  budgets.
- **drop** (`digits-drop-every-other.toml`): no stage 1 (nothing new to train); stage 2 with the
  same number of training samples as the parallel arm's two stages together:
  ceil(({a.steps1} x {a.batch1} + {a.steps2} x {a.batch2}) / {a.batch2}) = {m['steps2_drop']} steps
  x batch {a.batch2}, otherwise as above. Matched in samples, not in FLOPs: a stage-1 sample costs
  one pair (2 blocks) per pair module, a stage-2 sample the whole model.
- **scratch** (a depth-4 DiT, width 128, 4 heads, `graftfx pretrain`'s recipe: AdamW lr
  {a.scratch_lr}, warm-up min(100, steps/10), EMA ramped to 0.999, label dropout 0.1): trained for
  the parallel arm's total FLOPs, {m['scratch_steps']} steps x batch {a.scratch_batch}.
- FLOPs: forward FLOPs per sample measured with `torch.utils.flop_counter` (teacher
  {f['teacher'] / 1e6:.1f} MFLOPs, depth-4 model {f['depth4'] / 1e6:.1f}, one block
  {f['block'] / 1e6:.1f}); a training step costs 3x its forward. Parallel arm: cache recording
  {c['parallel']['record'] / 1e9:,.0f} + stage 1 {c['parallel']['stage1'] / 1e9:,.0f} + stage 2
  {c['parallel']['stage2'] / 1e9:,.0f} = {c['parallel']['total'] / 1e9:,.0f} GFLOPs (the parallel
  model keeps the teacher's FLOPs: it halves depth, not work). The teacher's own pretraining
  (2000 steps x batch 64) cost {2000 * 64 * 3 * f['teacher'] / 1e9:,.0f} GFLOPs; the
  distilled arms inherit it, the scratch arm does not.

## Reading

{reading(rec)}
"""


def retimed(m: dict) -> str:
    t = m.get("latency")
    if not t:
        return ""
    return (f" The latencies in the table were re-measured after the run (the machine was shared and loaded during "
            f"it), on {t['date']} ({t['device']}, {t['rounds']} rounds), on untrained models of the same "
            f"architectures (weights do not change the time):\n\n    {t['command']}")


def reading(rec: dict) -> str:
    """A reading generated from the numbers (every comparison it states is computed here)."""
    rows = rec["results"]
    have = [k for k in ("parallel", "merged", "drop", "scratch") if k in rows]
    if not have:
        return "No depth-4 arm produced a result (see the skipped rows)."
    fid = {k: rows[k]["fid"] for k in rows}
    by_fid = sorted(have, key=lambda k: fid[k])
    parts = ["Among the depth-4 models, ordered by Digits-FID (lower is better): " + ", ".join(
        f"{k} {fid[k]:.2f} (accuracy {rows[k]['accuracy']:.2f})" for k in by_fid) + "."]
    if "teacher" in rows:
        parts.append(f"The 8-block teacher scores {fid['teacher']:.2f} (accuracy {rows['teacher']['accuracy']:.2f}); "
                     f"the best depth-4 model, {by_fid[0]}, is {fid[by_fid[0]] - fid['teacher']:+.2f} from it.")
    if "parallel" in rows and "drop" in rows:
        better = "better than" if fid["parallel"] < fid["drop"] else "worse than"
        parts.append(f"At the same number of training samples, parallel pairs are {better} dropping every other "
                     f"block ({fid['parallel']:.2f} vs {fid['drop']:.2f}), the comparison the paper makes; note the "
                     "parallel model keeps all 8 blocks' parameters and FLOPs while the dropped one halves both.")
    for arm in ("parallel", "merged", "drop"):
        if arm in rows and f"{arm}-untrained" in rows:
            parts.append(f"{arm.capitalize()}: {fid[arm + '-untrained']:.2f} right after the rewrite, "
                         f"{fid[arm]:.2f} after training.")
    if all(k in rows for k in ("teacher", "parallel", "parallel-untrained", "drop")):
        gap = fid["parallel-untrained"] - fid["teacher"]
        closed = (fid["parallel-untrained"] - fid["parallel"]) / gap if gap > 0 else float("nan")
        beats = "already beats" if fid["parallel-untrained"] < fid["drop"] else "does not beat"
        parts.append(f"So the parallel rewrite alone {beats} the trained dropped model, and its training closes "
                     f"{closed:.0%} of its remaining gap to the teacher"
                     + (": most of the parallel arm's quality here comes from keeping every pretrained weight (and "
                        "all of the teacher's compute), not from distillation." if beats == "already beats" else "."))
    if "merged" in rows and "drop" in rows:
        start = ""
        if "merged-untrained" in rows and "drop-untrained" in rows:
            start = ("starts further from the teacher than" if fid["merged-untrained"] > fid["drop-untrained"]
                     else "starts closer to the teacher than")
            start = f"Averaging two blocks' weights {start} dropping one of them, and after training "
        else:
            start = "After training, averaging two blocks' weights "
        parts.append(start + ("ends worse than dropping." if fid["merged"] > fid["drop"]
                              else "ends better than dropping."))
    if "scratch" in rows:
        parts.append(f"The depth-4 model trained from scratch on the parallel arm's FLOPs "
                     f"({rec['compute']['steps']['scratch']} steps) reaches {fid['scratch']:.2f}: a budget this small "
                     "is far from the teacher's own pretraining, which the distilled arms inherit for free.")
    lat = {k: r.get("latency_ms_per_sample") for k, r in rows.items()}
    if lat.get("parallel") and lat.get("teacher"):
        ratio = lat["teacher"] / lat["parallel"]
        parts.append(f"On the CPU the parallel model runs {ratio:.2f}x the teacher's speed ({lat['parallel']:.2f} vs "
                     f"{lat['teacher']:.2f} ms/sample) with the same FLOPs: here the branches of a parallel stage "
                     "run one after the other, so halving the depth can only save per-layer overhead; the gain the "
                     "paper means needs the branches run side by side (a fused or batched branch kernel, a GPU)."
                     + (f" The depth-4 dropped model runs {lat['teacher'] / lat['drop']:.2f}x."
                        if lat.get('drop') else ""))
    same = [lat[k] for k in ("merged", "drop", "scratch") if lat.get(k)]
    if len(same) > 1:
        parts.append(f"The depth-4 models of equal FLOPs span {min(same):.2f}-{max(same):.2f} ms/sample, a measure of "
                     "the timing noise and per-graph overhead on this machine.")
    parts.append("One seed and a small evaluation set; the spread of these numbers over seeds was not measured, "
                 "so small differences should not be read as an ordering.")
    return " ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
