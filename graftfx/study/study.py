"""``graftfx study``: sweep rule experiments on one model and report them in the paper's shape.

A study file (TOML, validated, never runs code) names the model, the data, the layer fractions,
the settings, and ``[[experiment]]`` tables (pattern, operator, options, loss). For each
experiment x fraction: graft, stage 1 from a shared teacher cache (one cache per pattern,
recorded once for every region of that pattern), a short stage 2, then Digits-FID, class
accuracy, parameters, FLOPs and measured CPU latency. Results land in ``results.json`` after
every experiment, so a rerun skips what is done.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from graftfx.errors import GraftError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FRACTIONS = {"paper-50": "50%", "paper-75": "75%", "all": "100%"}
_TOP = ("version", "description", "model", "data", "fractions", "settings", "experiment")
_EXP = ("name", "pattern", "operator", "options", "loss", "fractions", "paper")


@dataclass
class StudySettings:
    samples: int = 1024
    steps1: int = 400
    batch1: int = 8
    steps2: int = 100
    batch2: int = 16
    eval_per_class: int = 20
    eval_steps: str = "ddim20"
    cfg_scale: float = 1.5
    latency_batch: int = 16
    seed: int = 0


@dataclass
class Experiment:
    name: str
    pattern: str
    operator: str
    options: dict = field(default_factory=dict)
    loss: str | None = None
    fractions: list[str] | None = None
    paper: dict = field(default_factory=dict)   # the paper's DiT-XL/2 FIDs by fraction, for reference


@dataclass
class Study:
    path: str
    description: str
    model: str
    data: str
    fractions: list[str]
    settings: StudySettings
    experiments: list[Experiment]

    def runs(self) -> list[tuple[Experiment, str]]:
        return [(e, f) for e in self.experiments for f in (e.fractions or self.fractions)]


_INT_SETTINGS = ("samples", "steps1", "batch1", "steps2", "batch2", "eval_per_class", "latency_batch")


def load_study(path, *, check_model: bool = True) -> Study:
    """A study file, parsed, typed strictly and checked; with ``check_model`` every experiment's
    operator is also built (on the meta device) for every region of every fraction it runs at, so
    a bad option or an operator over the size ceiling is refused before anything runs."""
    from graftfx.rewrites import STUDIES_DIR
    from graftfx.rules import Rule, Select, read_toml

    path = Path(path)
    if not path.is_file():
        bundled = STUDIES_DIR / path.name
        if not bundled.is_file():
            raise GraftError(f"study file {path} not found (bundled studies live in rewrites/studies/)")
        path = bundled
    data = read_toml(path, "study file")
    _keys(data, _TOP, f"{path}: unknown top-level key")
    version = data.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version != 1:
        raise GraftError(f"{path}: version {version!r} is not supported (only the integer 1)")
    for key in ("description", "model", "data"):
        if key in data and not isinstance(data[key], str):
            raise GraftError(f"{path}: {key} must be a string, got {data[key]!r}")
    settings = data.get("settings", {})
    if not isinstance(settings, dict):
        raise GraftError(f"{path}: settings must be a table ([settings])")
    _keys(settings, [f.name for f in StudySettings.__dataclass_fields__.values()], f"{path}: unknown settings key")
    _check_settings(settings, path)
    fractions = _fractions(data.get("fractions", list(FRACTIONS)), f"{path}: fractions")
    tables = data.get("experiment", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise GraftError(f"{path}: experiment must be [[experiment]] tables")
    exps = []
    for i, t in enumerate(tables):
        where = f"{path}: experiment {i + 1}"
        _keys(t, _EXP, f"{where}: unknown key")
        for key in ("name", "pattern", "operator"):
            if not isinstance(t.get(key), str) or not t[key]:
                raise GraftError(f"{where}: {key} must be a non-empty string, got {t.get(key)!r}")
        if not isinstance(t.get("options", {}), dict):
            raise GraftError(f"{where} ({t['name']}): options must be a table")
        if t.get("loss") is not None and not isinstance(t["loss"], str):
            raise GraftError(f"{where} ({t['name']}): loss must be a string, got {t['loss']!r}")
        paper = t.get("paper", {})
        if not isinstance(paper, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in paper.values()):
            raise GraftError(f"{where} ({t['name']}): paper must be a table of FIDs, e.g. paper = {{ \"50%\" = 2.7 }}")
        exp = Experiment(**t)
        if exp.fractions is not None:
            exp.fractions = _fractions(exp.fractions, f"{where} ({exp.name}): fractions")
        try:
            rule = Rule(exp.pattern, exp.operator, Select(preset="all"), exp.options, name=exp.name, loss=exp.loss,
                        source=where)
        except (TypeError, ValueError) as e:
            raise GraftError(f"{where} ({exp.name}): {e}") from None
        rule.validate()
        exps.append(exp)
    if not exps:
        raise GraftError(f"{path}: no [[experiment]] tables")
    study = Study(str(path), data.get("description", ""), data.get("model", "digits"), data.get("data", "digits"),
                  fractions, StudySettings(**settings), exps)
    if check_model:
        _check_against_model(study)
    return study


def _fractions(value, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(f, str) for f in value):
        raise GraftError(f"{where} must be a non-empty list of {', '.join(FRACTIONS)}, got {value!r}")
    for f in value:
        if f not in FRACTIONS:
            raise GraftError(f"{where}: fraction {f!r} is not one of {', '.join(FRACTIONS)}")
    return value


def _check_settings(settings: dict, path) -> None:
    from graftfx.models.respace import space_timesteps

    for key, value in settings.items():
        if key in _INT_SETTINGS or key == "seed":
            lo = 0 if key == "seed" else 1
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value < 2**63:
                raise GraftError(f"{path}: settings.{key} must be an integer >= {lo}, got {value!r}")
        elif key == "cfg_scale":
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value or abs(value) > 1e6:
                raise GraftError(f"{path}: settings.cfg_scale must be a finite number, got {value!r}")
        elif key == "eval_steps":
            try:
                if not isinstance(value, str):
                    raise ValueError("it must be a string such as \"ddim20\" or \"250\"")
                space_timesteps(1000, value)
            except ValueError as e:
                raise GraftError(f"{path}: settings.eval_steps {value!r}: {e}") from None


def _check_against_model(study: Study) -> None:
    """Every experiment x fraction selected and built on the meta device against the study's model."""
    import graftfx
    from graftfx.export import preflight
    from graftfx.models.zoo import resolve_model
    from graftfx.rules import Rule, Select

    model, ex_args, ex_kwargs = resolve_model(study.model, meta=True, batch=2, seed=study.settings.seed)
    traced = graftfx.trace(model, ex_args, ex_kwargs)
    for i, exp in enumerate(study.experiments):
        for fraction in exp.fractions or study.fractions:
            rule = Rule(exp.pattern, exp.operator, Select(preset=fraction, paths=["blocks.*"]), dict(exp.options),
                        name=exp.name, loss=exp.loss, source=f"{study.path}: experiment {i + 1} at {fraction}")
            preflight(graftfx.select(traced, [rule]))


def _keys(table: dict, valid, what: str) -> None:
    for k in table:
        if k not in valid:
            raise GraftError(f"{what} {k!r}; valid keys: {', '.join(valid)}")


def run_study(study: Study, out, *, only: str | None = None, progress: bool = True, log=print) -> dict:
    import graftfx
    from graftfx.distill import CacheSpec, CalibrationSet, Tap, data_fingerprint, load_data, write_cache
    from graftfx.export import fingerprint
    from graftfx.models.zoo import resolve_model
    from graftfx.rules import Rule, RuleSet, Select

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = study.settings
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": {}}
    results.update(study=study.path, description=study.description, settings=asdict(s), model=study.model)
    torch.manual_seed(s.seed)
    teacher, ex_args, _ = resolve_model(study.model, batch=2, seed=s.seed)
    teacher.requires_grad_(False)
    latents, labels = load_data(study.data)
    traced = graftfx.trace(teacher, ex_args)
    # one cache per pattern, holding every region of that pattern; each run reads its subset
    caches = {}
    spec = CacheSpec(s.samples, 256, "float16", s.seed, fingerprint(teacher), data_fingerprint(latents, labels))
    for pattern in sorted({e.pattern for e in study.experiments}):
        every = RuleSet([Rule(pattern, "mha" if "attention" in pattern else "mlp", Select(preset="all"))])
        taps = [Tap.of(r) for _, r in graftfx.select(traced, every).selected]
        caches[pattern] = write_cache(out / "cache" / pattern, traced, taps,
                                      CalibrationSet(latents, labels, s.samples, seed=s.seed), spec,
                                      progress=progress, log=log)
    if "teacher" not in results:
        log("evaluating the teacher")
        results["teacher"] = _measure(teacher, teacher, s, traced, None, progress)
        _write(out, results, study)
    todo = [(e, f) for e, f in study.runs() if (only is None or only in e.name)]
    for n, (exp, fraction) in enumerate(todo, 1):
        key = f"{exp.name} @ {FRACTIONS[fraction]}"
        if key in results["runs"]:
            log(f"[{n}/{len(todo)}] {key}: done earlier, skipped")
            continue
        log(f"[{n}/{len(todo)}] {key}")
        start = time.perf_counter()
        results["runs"][key] = _one(exp, fraction, traced, caches[exp.pattern], latents, labels, s, out, progress)
        results["runs"][key]["seconds"] = time.perf_counter() - start
        results["runs"][key].update(experiment=exp.name, fraction=FRACTIONS[fraction], operator=exp.operator,
                                    pattern=exp.pattern, paper_fid=exp.paper.get(FRACTIONS[fraction]))
        _write(out, results, study)
    if todo:
        log("timing every configuration again, interleaved, in one pass")
        latency_pass(study, results, teacher, traced)
        _write(out, results, study)
    return results


def latency_pass(study: Study, results: dict, teacher, traced, rounds: int = 5) -> None:
    """Re-measure CPU latency of the teacher and every run in interleaved rounds, so that every
    number comes from the same quiet stretch of time (latency does not depend on weight values,
    so each run's graft is rebuilt untrained). Overwrites ``latency_ms``."""
    import graftfx
    from graftfx.rules import Rule, Select

    s = study.settings
    models = {"teacher": teacher}
    inv = {v: k for k, v in FRACTIONS.items()}
    for exp, fraction in study.runs():
        key = f"{exp.name} @ {FRACTIONS[fraction]}"
        if key in results["runs"]:
            rule = Rule(exp.pattern, exp.operator, Select(preset=inv[FRACTIONS[fraction]], paths=["blocks.*"]),
                        dict(exp.options), name=exp.name, loss=exp.loss)
            torch.manual_seed(s.seed)
            models[key] = graftfx.splice(graftfx.select(traced, [rule])).eval()
    x = teacher.example_inputs(s.latency_batch)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(*x)
        for _ in range(rounds):
            for key, m in models.items():
                t0 = time.perf_counter()
                m(*x)
                times[key].append(time.perf_counter() - t0)
    for key, ts in times.items():
        ms = sorted(ts)[len(ts) // 2] * 1e3
        (results["teacher"] if key == "teacher" else results["runs"][key])["latency_ms"] = ms


def _one(exp: Experiment, fraction: str, traced, cache, latents, labels, s: StudySettings, out: Path, progress):
    """One run: the distillation pipeline on this experiment's plan, fed by the pattern's cache."""
    import graftfx
    from graftfx.distill import DistillSettings, Stage1Config, Stage2Config, distill_plan
    from graftfx.rules import Rule, Select

    teacher = traced.model
    rule = Rule(exp.pattern, exp.operator, Select(preset=fraction, paths=["blocks.*"]), dict(exp.options),
                name=exp.name, loss=exp.loss)
    plan = graftfx.select(traced, [rule])
    settings = DistillSettings(
        stage="both", samples=s.samples, export=False,
        stage1=Stage1Config(steps=s.steps1, batch_size=s.batch1, seed=s.seed, ckpt_every=10**9),
        stage2=Stage2Config(steps=s.steps2, batch_size=s.batch2, seed=s.seed, warmup=10, ckpt_every=10**9,
                            num_classes=teacher.config.num_classes))
    work = out / "runs" / f"{exp.operator}-{exp.loss or 'default'}-{fraction}"
    torch.manual_seed(s.seed)
    result = distill_plan(plan, latents, labels, work, settings, cache=cache, progress=progress, log=lambda *a: None)
    grafted = result.grafted
    record = _measure(grafted, teacher, s, traced, [rule], progress)
    record.update(regions=[g.region.path for g in grafted.grafts],
                  loss=grafted.grafts[0].rule.effective_loss if grafted.grafts else None,
                  stage1_loss=result.stage1["losses"], stage2_loss=result.stage2["loss"])
    return record


def _measure(model, teacher, s: StudySettings, traced, rules, progress) -> dict:
    from graftfx.eval import evaluate
    from graftfx.inspect import inspect

    rec = evaluate(model, n_per_class=s.eval_per_class, steps=s.eval_steps, cfg_scale=s.cfg_scale, sampler="ddim",
                   seed=s.seed, config=teacher.config, progress=progress)
    totals = inspect(teacher, rules, traced=traced, render=False).totals
    from graftfx.bench.harness import time_callable

    x = teacher.example_inputs(s.latency_batch)
    with torch.no_grad():  # provisional: latency_pass re-times every run together at the end
        latency = time_callable(lambda: model(*x), x[0].device).ms
    return {"fid": rec.fid, "accuracy": rec.accuracy, "eval": rec.to_dict(),
            "params": totals.get("params_after", totals["params_before"]),
            "gflops": totals.get("flops_after", totals["flops_before"]) / 1e9,
            "latency_ms": latency}


def _write(out: Path, results: dict, study: Study) -> None:
    from graftfx.io import atomic_write_text as atomic_write

    from .report import plot, table

    atomic_write(out / "results.json", json.dumps(results, indent=1, default=str))
    atomic_write(out / "table.md", table(results, study))
    plot(results, out / "quality-vs-latency.png")
