"""The reliability harness: generate what a hostile or careless user would give graftfx, run it,
and classify every outcome.

Outcomes (``OUTCOMES``): ``success`` and ``clean error`` (a one-line GraftError naming the thing,
CLI exit 2) are good; everything in ``BAD`` is a finding:

- ``traceback``: any other exception (or a multi-line message, or a CLI exit that is not 0/2);
- ``vague error``: a one-line error that does not name the input it is about;
- ``hang``: still running at the case's deadline;
- ``silently wrong``: success where the input is invalid (a wrong-typed value accepted, an int64
  checkpoint loaded, a base model changed, files written outside --out);
- ``wrongly refused``: an error for an input that is valid;
- ``data lost``: something the user had is gone or damaged afterwards;
- ``code run``: a sentinel file that only code smuggled into an input can create appeared.

Every generator is seeded (``random.Random(seed)``): case ``i`` of seed ``s`` is always the same
input. The pytest files run a sample (``sample_size``); ``GRAFTFX_RELIABILITY=full`` runs the full
counts, and ``tests/reliability/measure.py`` writes the figures of docs/reliability.md.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import signal
import string
import sys
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

OUTCOMES = ("success", "clean error", "traceback", "vague error", "hang", "silently wrong", "wrongly refused",
            "data lost", "code run")
BAD = OUTCOMES[2:]
FULL = os.environ.get("GRAFTFX_RELIABILITY", "") == "full"
SEED = int(os.environ.get("GRAFTFX_RELIABILITY_SEED", "0"))


def sample_size(full: int, sample: int) -> int:
    return full if FULL else sample


@dataclass
class Case:
    campaign: str
    kind: str                   # what the generator did (for the per-kind table)
    expect: str                 # "valid" | "invalid" | "either"
    payload: object = None      # what the runner needs (a path, an argv list, ...)
    names: tuple = ()           # a clean error must name one of these


@dataclass
class Result:
    case: Case
    outcome: str
    detail: str = ""


EXAMPLES = 5   # example findings kept per (kind, outcome) in a results file


@dataclass
class Tally:
    results: list[Result] = field(default_factory=list)

    def add(self, r: Result) -> None:
        self.results.append(r)

    def counts(self) -> Counter:
        return Counter(r.outcome for r in self.results)

    def bad(self) -> list[Result]:
        return [r for r in self.results if r.outcome in BAD]

    def by_kind(self) -> dict[str, Counter]:
        out: dict[str, Counter] = {}
        for r in self.results:
            out.setdefault(r.case.kind, Counter())[r.outcome] += 1
        return out

    def summary(self, limit: int = 12) -> str:
        lines = [f"{len(self.results)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts().items()))]
        for r in self.bad()[:limit]:
            lines.append(f"  [{r.outcome}] {r.case.campaign}/{r.case.kind}: {r.detail[:400]}")
        return "\n".join(lines)

    def to_json(self, examples: int = EXAMPLES) -> dict:
        """Counts, plus findings grouped by (kind, outcome, what the message says): one example
        and a count per group, at most ``examples`` groups per (kind, outcome) (the rest folded
        into one ``other`` group), so a results file stays small however many cases ran."""
        groups: dict[tuple, dict] = {}
        per: Counter = Counter()
        for r in self.bad():
            key = (r.case.kind, r.outcome, finding_key(r.detail))
            if key not in groups:
                if per[key[:2]] >= examples:
                    key = (r.case.kind, r.outcome, "(other findings of this kind)")
                    groups.setdefault(key, {"kind": key[0], "outcome": key[1], "count": 0,
                                            "detail": "(other findings of this kind)"})
                else:
                    per[key[:2]] += 1
                    groups[key] = {"kind": key[0], "outcome": key[1], "count": 0, "detail": r.detail[:600]}
            groups[key]["count"] += 1
        return {"cases": len(self.results), "outcomes": dict(self.counts()),
                "by_kind": {k: dict(v) for k, v in sorted(self.by_kind().items())},
                "findings": list(groups.values())}



def finding_key(detail: str) -> str:
    """What a finding says, without the case-specific parts (its input, temporary paths)."""
    import re

    text = detail.split(" | ")[0].split(" -> ")[-1]
    text = re.sub(r"/tmp/[^\s'\"]*", "<tmp>", text)
    return text[:140]


class Hang(BaseException):
    """Raised by the deadline alarm (a BaseException: no ``except Exception`` swallows it)."""


@contextlib.contextmanager
def deadline(seconds: float):
    def fire(signum, frame):
        raise Hang(f"still running after {seconds:g}s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def judge_error(case: Case, message: str) -> str:
    if not message or "\n" in message.strip():
        return "traceback"
    if case.names and not any(str(n) in message for n in case.names):
        return "vague error"
    return "wrongly refused" if case.expect == "valid" else "clean error"


def run_case(case: Case, fn, *, timeout: float = 30.0, sentinel: Path | None = None, check=None) -> Result:
    """Run ``fn(case)``; classify. ``check(case, value)`` may return a BAD outcome for a success
    (an oracle: outputs, fingerprints) or None."""
    from graftfx.errors import GraftError

    if sentinel is not None and sentinel.exists():
        sentinel.unlink()
    try:
        with deadline(timeout):
            value = fn(case)
        outcome, detail = "success", ""
        verdict = check(case, value) if check is not None else None
        if verdict:
            outcome, detail = verdict
        elif case.expect == "invalid":
            outcome, detail = "silently wrong", "accepted an invalid input"
    except Hang as e:
        outcome, detail = "hang", str(e)
    except GraftError as e:
        outcome, detail = judge_error(case, str(e)), str(e)
    except RecursionError:
        outcome, detail = "traceback", "RecursionError"
    except Exception as e:  # noqa: BLE001 - exactly what the harness looks for
        tb = traceback.format_exception(type(e), e, e.__traceback__)
        outcome, detail = "traceback", f"{type(e).__name__}: {e} | " + " ".join(tb[-3:]).replace("\n", " ")[:600]
    if sentinel is not None and sentinel.exists():
        outcome, detail = "code run", f"sentinel {sentinel} written; " + detail
    return Result(case, outcome, detail)


# ---------------------------------------------------------------------------------------------
# TOML text (our own emitter: it must be able to write wrong types on purpose)
# ---------------------------------------------------------------------------------------------

class Raw(str):
    """A TOML fragment written as it is (huge integers, deep nesting, bad syntax)."""


def toml_value(v) -> str:
    import datetime

    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (datetime.datetime, datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def toml_key(k: str) -> str:
    return k if k and all(c in string.ascii_letters + string.digits + "_-" for c in k) else json.dumps(k)


def toml_document(doc: dict) -> str:
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in doc.items() if k != "rule"]
    rules = doc.get("rule", [])
    if isinstance(rules, list) and all(isinstance(r, dict) for r in rules):
        for r in rules:
            lines.append("")
            lines.append("[[rule]]")
            lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in r.items()]
    else:
        lines.append(f"rule = {toml_value(rules)}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Campaign 1: rule files
# ---------------------------------------------------------------------------------------------

# The model every rule file is tried on: DiT-S/8 (width 384, 6 heads, 12 blocks, 16 tokens on a
# 4x4 grid), traced on the meta device, as `graftfx inspect DiT-S/8 --rules FILE` does.
DEPTH, WIDTH, HEADS = 12, 384, 6
ATTN_OPS = ("mha", "hyena_x", "hyena_y", "hyena_se", "hyena_x2d", "swa", "nat2d", "linear_attention", "mamba2")
MLP_OPS = ("mlp", "mlp_hyena_x")
VALID_OPTIONS = {
    "mha": [{}, {"init": "fresh"}, {"init": "fresh", "heads": 12}, {"heads": 6}, {"init": "fresh", "heads": 2}],
    "hyena_x": [{}, {"conv_len": 3}, {"conv_len": 8}],
    "hyena_y": [{}, {"inner_len": 2}],
    "hyena_se": [{}, {"conv_len": 2, "inner_len": 3}],
    "hyena_x2d": [{}, {"kernel_size": 3}, {"kernel_size": 1}],
    "swa": [{}, {"window": 2}, {"window": 0}, {"init": "fresh", "heads": 12}, {"backend": "reference"}],
    "nat2d": [{}, {"kernel_size": 3}],
    "linear_attention": [{}, {"feature_map": "relu"}, {"eps": 1e-4}],
    "mamba2": [{}, {"d_state": 16}, {"expand": 1}, {"headdim": 32}, {"chunk_size": 32}],
    "mlp": [{}, {"ratio": 3}, {"ratio": 6}, {"ratio": 2.5}, {"activation": "gelu"}, {"ratio": 8}],
    "mlp_hyena_x": [{}, {"ratio": 2}, {"conv_len": 3}],
}
# Options that pass each check alone but cannot be built for DiT-S/8's regions.
REGION_INVALID = [
    ("swa", {"heads": 5}), ("mha", {"heads": 1, "init": "fresh"}), ("swa", {"heads": 3}),
    ("mamba2", {"ngroups": 5}), ("mamba2", {"headdim": 7}), ("mha", {"heads": 7, "init": "fresh"}),
    ("linear_attention", {"heads": 384 * 2, "init": "fresh"}), ("nat2d", {"heads": 5, "init": "fresh"}),
    ("mha", {"heads": 12}),  # init copy needs the original 6 heads
]
# Absurd sizes: each asks for far more parameters than the region it replaces.
ABSURD = [("mlp", {"ratio": 10000}), ("mlp", {"ratio": 1e6}), ("mamba2", {"expand": 10000}),
          ("mlp_hyena_x", {"ratio": 5000}), ("mamba2", {"d_state": 256, "expand": 4000})]
SELECT_SPEC = {
    "preset": lambda v: isinstance(v, str) and v in ("paper-50", "paper-75", "all"),
    "fraction": lambda v: _number(v) and 0 < v <= 1,
    "every_other": lambda v: isinstance(v, bool),
    "offset": lambda v: _int(v) and v in (0, 1),
    "indices": lambda v: isinstance(v, list) and all(_int(i) and -DEPTH <= i < DEPTH for i in v),
    "paths": lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v),
    "exclude": lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v),
}
TOP_SPEC = {"version": lambda v: _int(v) and v == 1, "description": lambda v: isinstance(v, str),
            "model": lambda v: isinstance(v, str)}
RULE_SPEC = {"name": lambda v: isinstance(v, str), "loss": lambda v: isinstance(v, str) and v in ("l1", "l2", "huber")}


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pool(rng: random.Random):
    """Values of every TOML type, ordinary and awkward."""
    import datetime

    return rng.choice([
        0, 1, -1, 2, 7, 10**18, -(10**18), 0.5, 0.0, -0.25, 1.5, 1e300, float("inf"), float("nan"), True, False,
        "", "0", "1", "true", "paper-50", "all", "x" * 300, "blocks.*", "ünïcode", "\u0000",
        [], [1], [0, -1], [True], ["blocks.1.*"], [1, "a"], [[1]], [{}], {}, {"a": 1}, {"preset": "all"},
        datetime.date(2024, 1, 1), datetime.datetime(2024, 1, 1, 12, 0, 0), datetime.time(12, 0),
    ])


def valid_rule(rng: random.Random) -> dict:
    pattern = rng.choice(["self_attention", "self_attention", "mlp"])
    op = rng.choice(ATTN_OPS if pattern == "self_attention" else MLP_OPS)
    rule = {"pattern": pattern, "operator": op}
    if rng.random() < 0.7:
        rule = {"name": f"r{rng.randrange(1000)}-{op}", **rule}
    select = {}
    for key in rng.sample(list(SELECT_SPEC), rng.randrange(0, 3)):
        select[key] = {
            "preset": lambda: rng.choice(["paper-50", "paper-75", "all"]),
            "fraction": lambda: rng.choice([0.25, 0.5, 0.75, 1.0, 1, 0.1]),
            "every_other": lambda: rng.choice([True, False]),
            "offset": lambda: rng.choice([0, 1]),
            "indices": lambda: rng.sample(range(-DEPTH, DEPTH), rng.randrange(0, 4)),
            "paths": lambda: [rng.choice(["blocks.*", "blocks.1.*", "blocks.[13].*", "*"])],
            "exclude": lambda: [rng.choice(["blocks.0.*", "blocks.1?.*"])],
        }[key]()
    rule["select"] = select
    rule["options"] = dict(rng.choice(VALID_OPTIONS[op]))
    if rng.random() < 0.2:
        rule["loss"] = rng.choice(["l1", "l2", "huber"])
    return rule


def valid_doc(rng: random.Random) -> dict:
    doc = {}
    if rng.random() < 0.8:
        doc["version"] = 1
    if rng.random() < 0.5:
        doc["description"] = rng.choice(["a test", "", "ünïcode ✓"])
    if rng.random() < 0.2:
        doc["model"] = "DiT-S/8"
    # one rule per pattern at most: two rules selecting the same region is a (checked) overlap
    pats = rng.sample(["self_attention", "mlp"], rng.choice([1, 1, 2]))
    rules = []
    for p in pats:
        r = valid_rule(rng)
        while r["pattern"] != p:
            r = valid_rule(rng)
        rules.append(r)
    doc["rule"] = rules
    return doc


def rule_file_case(rng: random.Random, i: int) -> tuple[str, str, bytes]:
    """(kind, expect, file bytes) for case ``i``."""
    doc = valid_doc(rng)
    r0 = doc["rule"][0]
    kind = rng.choice(["valid", "valid", "type:top", "type:rule", "type:select", "type:select", "type:options",
                       "value:select", "unknown-key", "missing-key", "structure", "encoding", "nesting",
                       "huge-number", "size", "import-path", "region", "absurd-size", "syntax", "pattern-operator",
                       "many-rules", "option-value"])
    expect = "invalid"
    if kind == "valid":
        expect = "valid"
    elif kind == "type:top":
        key = rng.choice(list(TOP_SPEC))
        doc[key] = _pool(rng)
        expect = "valid" if TOP_SPEC[key](doc[key]) else "invalid"
    elif kind == "type:rule":
        key = rng.choice(["name", "pattern", "operator", "select", "options", "loss"])
        value = _pool(rng)
        r0[key] = value
        if key in RULE_SPEC:
            expect = "valid" if RULE_SPEC[key](value) else "invalid"
        elif key == "select":
            ok = isinstance(value, dict) and all(k in SELECT_SPEC and SELECT_SPEC[k](v) for k, v in value.items())
            expect = "valid" if ok else "invalid"
        elif key == "options":
            expect = "valid" if value == {} else "invalid"
        else:
            expect = "invalid"
    elif kind == "type:options":
        r0["options"] = _pool(rng)
        expect = "valid" if r0["options"] == {} else "invalid"
    elif kind in ("type:select", "value:select"):
        key = rng.choice(list(SELECT_SPEC))
        if kind == "type:select":
            value = _pool(rng)
        else:
            value = rng.choice({
                "preset": ["paper-60", "ALL", "paper50", ""], "fraction": [0, -0.5, 1.0000001, 2, 1e-300, 0.999],
                "every_other": [True, False], "offset": [2, -1, 0, 1],
                "indices": [[DEPTH], [-DEPTH - 1], [10**18], [], [0, 0, 0], [-DEPTH], list(range(DEPTH))],
                "paths": [[], ["["], ["blocks.**"], ["x" * 5000]], "exclude": [["*"], [], ["]["]]}[key])
        r0["select"][key] = value
        expect = "valid" if SELECT_SPEC[key](value) else "invalid"
    elif kind == "unknown-key":
        where = rng.choice(["top", "rule", "select", "options"])
        key = rng.choice(["colour", "Pattern", "operators", "heads2", "", " ", "ü"])
        target = {"top": doc, "rule": r0, "select": r0["select"], "options": r0["options"]}[where]
        target[key] = _pool(rng)
    elif kind == "missing-key":
        r0.pop(rng.choice(["pattern", "operator"]))
    elif kind == "structure":
        doc["rule"] = rng.choice([1, "x", [1], [[]], {}, [], [{"pattern": "mlp", "operator": "mlp"}, 3], True])
        if doc["rule"] == [] or not isinstance(doc["rule"], list):
            pass
    elif kind == "encoding":
        text = toml_document(doc).encode()
        return kind, "invalid", rng.choice([
            text.replace(b"self_attention", b"self_\xe9ttention").replace(b"mlp", b"ml\xff"),
            os.urandom(rng.randrange(1, 4000)) if False else bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000))),
            b"\x00" * 100 + text, "\ufeff".encode("utf-16") + text.decode().encode("utf-16-le"),
            text.replace(b"\n", b"\x00\n", 1), b"\x89PNG\r\n\x1a\n" + bytes(200),
        ])
    elif kind == "nesting":
        depth = rng.choice([20, 100, 500, 5000, 50000])
        inner = Raw("[" * depth + "1" + "]" * depth) if rng.random() < 0.5 else \
            Raw("{ a = " * depth + "1" + " }" * depth)
        r0["options"] = {"x": inner} if rng.random() < 0.5 else inner
        if not isinstance(r0["options"], dict):
            r0["options"] = Raw(r0["options"])
    elif kind == "huge-number":
        digits = rng.choice([19, 25, 400, 4301, 20000])
        big = Raw("1" + "0" * (digits - 1))
        where = rng.choice(["version", "indices", "fraction", "option", "offset"])
        if where == "version":
            doc["version"] = big
        elif where == "indices":
            r0["select"]["indices"] = [big]
        elif where == "fraction":
            r0["select"]["fraction"] = big
        elif where == "offset":
            r0["select"]["offset"] = big
        else:
            r0["operator"], r0["pattern"] = "mlp", "mlp"
            r0["options"] = {"ratio": big}
    elif kind == "size":
        choice = rng.choice(["description", "rules", "name"])
        if choice == "description":
            doc["description"] = "d" * rng.choice([2 * 2**20, 5 * 2**20])
        elif choice == "name":
            r0["name"] = "n" * (2 * 2**20)
        else:
            doc["rule"] = [dict(valid_rule(rng), select={"paths": [f"no.such.{k}"]}) for k in range(5000)]
    elif kind == "import-path":
        r0["operator"] = rng.choice(["graftfx_evil_operator:Op", "graftfx_evil_operator.Op", "os:system",
                                     "subprocess.Popen", "builtins:exec"])
    elif kind == "region":
        op, options = rng.choice(REGION_INVALID)
        doc["rule"] = [{"pattern": "self_attention", "operator": op, "select": {"preset": "all"}, "options": options}]
    elif kind == "absurd-size":
        op, options = rng.choice(ABSURD)
        pattern = "mlp" if op.startswith("mlp") else "self_attention"
        doc["rule"] = [{"pattern": pattern, "operator": op, "select": {"preset": "paper-50"}, "options": options}]
    elif kind == "syntax":
        text = toml_document(doc)
        cut = rng.randrange(1, len(text))
        return kind, "either", rng.choice([
            text[:cut].encode(), (text + "\n[[rule]]\npattern = \n").encode(), (text + text).encode(),
            text.replace("=", "==", 1).encode(), text.replace("[[rule]]", "[[rule]", 1).encode(),
            (text + 'version = 1\n').encode(), text.replace('"', "'''", 1).encode(),
        ])
    elif kind == "pattern-operator":
        r0["pattern"], r0["operator"] = rng.choice([("mlp", "mha"), ("self_attention", "mlp"), ("mlp", "swa"),
                                                    ("cross_attention", "hyena_x"), ("self_atention", "mha"),
                                                    ("self_attention", "MHA")])
        r0["options"] = {}
    elif kind == "many-rules":
        n = rng.choice([50, 300, 1000])
        doc["rule"] = [{"pattern": "mlp", "operator": "mlp", "select": {"paths": [f"blocks.{k}.mlp"]}}
                       for k in range(n)]
        expect = "valid" if n <= DEPTH else "either"   # more rules than regions: later ones select nothing
    elif kind == "option-value":
        op = r0["operator"]
        value = _pool(rng)
        from graftfx.registry import get_operator

        names = get_operator(op).option_names()
        name = rng.choice(names) if names else "x"
        r0["options"] = {name: value}
        expect = "either"   # the operator's own checks decide; the outcome must still be clean
    if expect == "valid":
        verdicts = [selects_something(r) for r in doc["rule"]]
        if False in verdicts:
            expect = "invalid"   # a rule that selects nothing is an error (naming the rule and its regions)
        elif None in verdicts:
            expect = "either"
    return kind, expect, toml_document(doc).encode()


def selects_something(rule: dict) -> bool | None:
    """Whether a rule that passes the spec selects at least one region of DiT-S/8 (None: it
    depends on the operator: mlp_hyena_x on t_embedder.mlp, which has no token grid)."""
    import fnmatch

    from graftfx.rules import fraction_blocks, preset_blocks

    sel = rule.get("select", {})
    kind = "attn" if rule["pattern"] == "self_attention" else "mlp"
    regions = {f"blocks.{i}.{kind}": i for i in range(DEPTH)}
    if kind == "mlp":
        regions["t_embedder.mlp"] = None
    by_index = bool(sel.get("preset") or sel.get("fraction") is not None or sel.get("every_other")
                    or sel.get("indices") is not None)
    keep = set(range(DEPTH))
    if sel.get("preset"):
        keep &= preset_blocks(sel["preset"], DEPTH)
    if sel.get("fraction") is not None:
        keep &= fraction_blocks(float(sel["fraction"]), DEPTH)
    if sel.get("every_other"):
        keep &= set(range(sel.get("offset", 1), DEPTH, 2))
    if sel.get("indices") is not None:
        keep &= {i % DEPTH for i in sel["indices"]}
    chosen = [p for p, i in regions.items() if not by_index or (i is not None and i in keep)]
    if sel.get("paths") is not None:
        chosen = [p for p in chosen if any(fnmatch.fnmatchcase(p, g) for g in sel["paths"])]
    if sel.get("exclude"):
        chosen = [p for p in chosen if not any(fnmatch.fnmatchcase(p, g) for g in sel["exclude"])]
    if not chosen:
        return False
    if rule["operator"] == "mlp_hyena_x" and "t_embedder.mlp" in chosen:
        return None
    return True


def make_evil_module(folder: Path, sentinel: Path) -> None:
    """A module that writes ``sentinel`` when imported: a rule file naming it must never run it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "graftfx_evil_operator.py").write_text(
        f"open({str(sentinel)!r}, 'w').write('imported')\nclass Op:\n    pass\n")


class RuleFileRunner:
    """`graftfx inspect DiT-S/8 --rules FILE` without the trace each time: parse, validate,
    select, build every operator (on the meta device, as inspect and explain do)."""

    def __init__(self, work: Path):
        import graftfx
        from graftfx.models.zoo import resolve_model

        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.sentinel = work / "CODE_RAN"
        make_evil_module(work / "evil", self.sentinel)
        sys.path.insert(0, str(work / "evil"))
        model, args, _ = resolve_model("DiT-S/8", meta=True, batch=2)
        self.traced = graftfx.trace(model, args)

    def run(self, case: Case) -> Result:
        def go(c):
            from graftfx.rules import load_rules
            from graftfx.select.select import select
            from graftfx.splice.splice import splice

            return splice(select(self.traced, load_rules(c.payload)))

        return run_case(case, go, timeout=60, sentinel=self.sentinel)

    def case(self, rng: random.Random, i: int) -> Case:
        kind, expect, data = rule_file_case(rng, i)
        path = self.work / f"rules-{i % 50}.toml"
        path.write_bytes(data)
        return Case("rule files", kind, expect, path, names=(str(path),))


def run_rule_files(work: Path, n: int, seed: int = SEED, log=None) -> Tally:
    runner = RuleFileRunner(work)
    tally = Tally()
    rng = random.Random(seed)
    for i in range(n):
        tally.add(runner.run(runner.case(rng, i)))
        if log and (i + 1) % 500 == 0:
            log(f"rule files: {i + 1}/{n}")
    return tally


# ---------------------------------------------------------------------------------------------
# Campaign 2: checkpoints, manifests, data files
# ---------------------------------------------------------------------------------------------

def tiny_dit(seed: int = 0, **over):
    import torch

    from graftfx.models import DiT, DiTConfig

    torch.manual_seed(seed)
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4, num_classes=10)
    cfg.update(over)
    m = DiT(DiTConfig(**cfg))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for b in m.blocks:
            b.adaLN_modulation[1].weight.copy_(torch.randn(b.adaLN_modulation[1].weight.shape, generator=g) * 0.05)
        m.final_layer.linear.weight.copy_(torch.randn(m.final_layer.linear.weight.shape, generator=g) * 0.05)
    return m.eval()


class Evil:
    """Unpickling this runs code (writes the sentinel): weights_only loads must refuse it."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (exec, (f"open({self.sentinel!r}, 'w').write('unpickled')",))


def _safetensors_bytes(tensors: dict, metadata=None) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def _raw_safetensors(header: dict, data: bytes = b"") -> bytes:
    import struct

    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


def checkpoint_case(rng: random.Random, i: int, work: Path, sd: dict, sentinel: Path) -> tuple[str, str, Path]:
    """(kind, expect, path) of a generated DiT checkpoint file."""
    import torch

    kind = rng.choice(["valid", "valid-variant", "truncated", "garbage", "header", "dtype", "dtype", "shape",
                       "keys", "depth", "metadata", "pickle", "pt-structure", "empty", "nan"])
    expect = "invalid"
    path = work / f"ckpt-{i % 40}.safetensors"
    data = None
    state = {k: v.clone() for k, v in sd.items()}
    if kind == "valid":
        expect = "valid"
        if rng.random() < 0.5:
            path = path.with_suffix(".pt")
            torch.save(rng.choice([state, {"ema": state}, {"model": state}, {"state_dict": state}]), path)
            return kind, expect, path
        data = _safetensors_bytes(state)
    elif kind == "valid-variant":
        expect = "valid"
        dtype = rng.choice([torch.float16, torch.bfloat16])
        data = _safetensors_bytes({k: v.to(dtype) for k, v in state.items()})
    elif kind == "truncated":
        full = _safetensors_bytes(state)
        data = full[: rng.randrange(0, len(full))]
        if rng.random() < 0.3:
            path = path.with_suffix(".pt")
            buf = io.BytesIO()
            torch.save(state, buf)
            data = buf.getvalue()[: rng.randrange(0, len(buf.getvalue()))]
    elif kind == "garbage":
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 5000)))
        if rng.random() < 0.5:
            path = path.with_suffix(rng.choice([".pt", ".pth"]))
    elif kind == "header":
        name = next(iter(state))
        data = rng.choice([
            _raw_safetensors({name: {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}),
            _raw_safetensors({name: {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\x00" * 8),
            b"\xff" * 8 + b"{}",
            (2**40).to_bytes(8, "little") + b"{}",
            _raw_safetensors({"__metadata__": {"config": "{" * 10000}}),
            _raw_safetensors({name: {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 4),
            _raw_safetensors([1, 2, 3]),
        ])
    elif kind == "dtype":
        dtype = rng.choice([torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.float64,
                            torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64])
        keys = rng.sample(list(state), rng.choice([1, 3, len(state)]))
        for k in keys:
            state[k] = (state[k] * 10).to(dtype) if dtype != torch.complex64 else state[k].to(dtype)
        data = _safetensors_bytes(state)
        if rng.random() < 0.3:
            path = path.with_suffix(".pt")
            torch.save(state, path)
            return kind, expect, path
    elif kind == "shape":
        k = rng.choice(["x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
                        "final_layer.linear.weight", "blocks.0.mlp.fc1.weight", "blocks.1.attn.qkv.weight"])
        state[k] = rng.choice([torch.zeros(0), torch.zeros(()), torch.zeros(3), torch.zeros(1, 0, 3),
                               torch.zeros(64, 4, 2), torch.zeros(7, 7, 7, 7), torch.zeros(1, 5, 64),
                               torch.zeros(0, 4, 2, 2), torch.zeros(64, 4, 0, 0)])
        data = _safetensors_bytes(state)
    elif kind == "keys":
        choice = rng.choice(["huge-index", "drop", "extra", "gap", "only-one", "no-blocks", "weird-index"])
        if choice == "huge-index":
            state["blocks.1000000.attn.qkv.weight"] = torch.zeros(1)
        elif choice == "weird-index":
            state["blocks.00000000000000000000000000009.x"] = torch.zeros(1)
        elif choice == "drop":
            state.pop(rng.choice(list(state)))
        elif choice == "extra":
            state["something.else"] = torch.zeros(2)
        elif choice == "gap":
            for k in [k for k in state if k.startswith("blocks.1.")]:
                state[k.replace("blocks.1.", "blocks.9.")] = state.pop(k)
        elif choice == "only-one":
            state = {"x_embedder.proj.weight": state["x_embedder.proj.weight"]}
        else:
            state = {k: v for k, v in state.items() if not k.startswith("blocks.")}
        data = _safetensors_bytes(state)
    elif kind == "depth":
        cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=rng.choice([100000, 10**9, 0, -1]),
                   num_heads=4, num_classes=10)
        data = _safetensors_bytes(state, {"config": json.dumps(cfg)})
    elif kind == "metadata":
        cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4, num_classes=10)
        mutation = rng.choice(["not-json", "list", "wrong-type", "unknown", "hidden", "heads", "patch", "nested"])
        if mutation == "not-json":
            meta = "{not json"
        elif mutation == "list":
            meta = "[1, 2]"
        elif mutation == "wrong-type":
            meta = json.dumps({**cfg, "depth": "four"})
        elif mutation == "unknown":
            meta = json.dumps({**cfg, "colour": 1})
        elif mutation == "hidden":
            meta = json.dumps({**cfg, "hidden_size": 10**9})
        elif mutation == "heads":
            meta = json.dumps({**cfg, "num_heads": 0})
        elif mutation == "patch":
            meta = json.dumps({**cfg, "patch_size": 0})
        else:
            meta = "[" * 100000 + "]" * 100000
        data = _safetensors_bytes(state, {"config": meta})
    elif kind == "pickle":
        import pickle

        path = path.with_suffix(rng.choice([".pt", ".pth"]))
        evil = Evil(sentinel)
        if rng.random() < 0.5:
            torch.save({"ema": state, "extra": evil}, path)
        else:
            path.write_bytes(pickle.dumps({"model": evil}))
        return kind, expect, path
    elif kind == "pt-structure":
        path = path.with_suffix(".pt")
        torch.save(rng.choice([[1, 2], 3, "x", {"ema": 5}, {"a": {"b": state}}, {1: torch.zeros(1)},
                               {"ema": {"x": 1}}, (state,), None, {}]), path)
        return kind, expect, path
    elif kind == "empty":
        path = path.with_suffix(rng.choice([".pt", ".safetensors", ".pth"]))
        data = b""
    elif kind == "nan":
        k = rng.choice(list(state))
        state[k] = torch.full_like(state[k], float(rng.choice(["nan", "inf"])))
        data = _safetensors_bytes(state)
        expect = "either"
    if data is not None:
        path.write_bytes(data)
    return kind, expect, path


class CheckpointRunner:
    def __init__(self, work: Path):
        from graftfx.models.load import read_state_dict  # noqa: F401 - import cost outside the deadline

        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.sentinel = work / "CODE_RAN"
        self.model = tiny_dit()
        self.sd = self.model.state_dict()

    def case(self, rng, i) -> Case:
        kind, expect, path = checkpoint_case(rng, i, self.work, self.sd, self.sentinel)
        return Case("checkpoints", kind, expect, path, names=(str(path),))

    def run(self, case: Case) -> Result:
        import torch

        def go(c):
            from graftfx.models.load import load_dit

            return load_dit(c.payload)

        def check(c, model):
            if c.expect != "valid":
                return None
            x = self.model.example_inputs(2)
            with torch.no_grad():
                try:
                    a, b = self.model(*x), model(*(t.to(next(model.parameters()).dtype) if t.is_floating_point()
                                                    else t for t in x)).float()
                except Exception as e:  # noqa: BLE001
                    return "traceback", f"loaded but forward failed: {type(e).__name__}: {e}"
            if not torch.allclose(a, b, atol=5e-2, rtol=5e-2):
                return "silently wrong", f"outputs differ by {(a - b).abs().max().item():.3g}"
            return None

        return run_case(case, go, timeout=30, sentinel=self.sentinel, check=check)


def run_checkpoints(work: Path, n: int, seed: int = SEED) -> Tally:
    runner = CheckpointRunner(work)
    rng = random.Random(seed + 1)
    tally = Tally()
    for i in range(n):
        tally.add(runner.run(runner.case(rng, i)))
    return tally


MANIFEST_RULES = [("self_attention", "mha", {"init": "fresh"}), ("mlp", "mlp", {"ratio": 3})]


class ManifestRunner:
    """``load_grafted(base, folder)`` on mutated export folders; the base model must never change
    and a valid folder must give the exported model's outputs."""

    def __init__(self, work: Path):
        import torch

        import graftfx
        from graftfx.rules import Rule, Select

        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.sentinel = work / "CODE_RAN"
        make_evil_module(work / "evil", self.sentinel)
        if str(work / "evil") not in sys.path:
            sys.path.insert(0, str(work / "evil"))
        self.base = tiny_dit()
        self.pristine = {k: v.clone() for k, v in self.base.state_dict().items()}
        rules = [Rule(p, o, Select(preset="paper-50"), dict(opt)) for p, o, opt in MANIFEST_RULES]
        # as after stage 2 (train=all): every weight moved, the base's unreplaced modules included
        import copy

        g = graftfx.graft(copy.deepcopy(self.base), rules, self.base.example_inputs(2))
        with torch.no_grad():
            for p in g.parameters():
                p.add_(0.01)
        self.folder = work / "pristine"
        graftfx.export_grafted(g, self.folder, base_id="tiny", base_hash=graftfx.export.fingerprint(self.base))
        self.inputs = self.base.example_inputs(3)
        with torch.no_grad():
            self.want = g(*self.inputs)
        self.hash = graftfx.export.fingerprint(self.base)

    def case(self, rng: random.Random, i: int) -> Case:
        import shutil

        import torch

        folder = self.work / f"m{i % 20}"
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(self.folder, folder)
        manifest = json.loads((folder / "graft.json").read_text())
        kind = rng.choice(["valid", "json", "format", "base", "rules", "regions", "inputs", "inputs", "config",
                           "import-path", "weights", "weights-dtype", "tracer"])
        expect = "invalid"
        text = None
        if kind == "valid":
            expect = "valid"
            if rng.random() < 0.5:
                manifest["metrics"] = {"fid": 1.0, "note": "x"}
        elif kind == "json":
            text = rng.choice(["", "{", "[]", "null", "1", '"x"', "{" * 100000, json.dumps(manifest)[:-5],
                               "\xff\xfe garbage"])
        elif kind == "format":
            manifest["format"] = rng.choice([99, 0, "2", None, True, 2.5, [2]])
            if rng.random() < 0.3:
                manifest.pop("format")
        elif kind == "base":
            manifest["base"] = rng.choice([None, [], "x", {"hash": 5}, {"hash": "0" * 16}])
            expect = "invalid"
        elif kind == "rules":
            manifest["rules"] = rng.choice([None, {}, [], [1], [{"name": "x"}], "x"])
        elif kind == "regions":
            choice = rng.choice(["none", "dict", "unknown-rule", "path", "missing-path", "dup", "int"])
            if choice == "none":
                manifest["regions"] = None
            elif choice == "dict":
                manifest["regions"] = {}
            elif choice == "unknown-rule":
                manifest["regions"][0]["rule"] = "nobody"
            elif choice == "path":
                manifest["regions"][0]["path"] = rng.choice(["blocks.99.attn", "", "*", "blocks.1.mlp"])
            elif choice == "missing-path":
                manifest["regions"][0].pop("path")
            elif choice == "dup":
                manifest["regions"].append(dict(manifest["regions"][0]))
            else:
                manifest["regions"] = [1, 2]
        elif kind == "inputs":
            spec = manifest["inputs"]
            choice = rng.choice(["huge", "negative", "dtype", "dtype-evil", "nested", "missing", "not-list", "value",
                                 "rank"])
            if choice == "huge":
                spec["args"][0]["tensor"] = rng.choice([[400000, 1000, 1000, 1], [2**40, 4, 8, 8], [10**12]])
            elif choice == "negative":
                spec["args"][0]["tensor"] = [-2, 4, 8, 8]
            elif choice == "dtype":
                spec["args"][0]["dtype"] = rng.choice(["int64", "float64", "bool", "complex64"])
            elif choice == "dtype-evil":
                spec["args"][0]["dtype"] = rng.choice(["__class__", "load", "nn", "Tensor", "os"])
            elif choice == "nested":
                spec["args"][0]["tensor"] = [[2], 4]
            elif choice == "missing":
                manifest.pop("inputs")
            elif choice == "not-list":
                spec["args"] = "x"
            elif choice == "value":
                spec["args"][0] = {"value": "x" * 10}
            else:
                spec["args"][0]["tensor"] = [2, 4, 8, 8, 1, 1]
        elif kind == "config":
            region = manifest["regions"][rng.randrange(len(manifest["regions"]))]
            region["config"] = rng.choice([{"ratio": 10000, "activation": None, "init": "auto"}, {"bogus": 1}, "x",
                                           {"ratio": "3"}, {"heads": 5, "init": "fresh"}, None,
                                           {"ratio": 1e9, "activation": None, "init": "auto"}])
        elif kind == "import-path":
            manifest["rules"][0]["operator"] = rng.choice(["graftfx_evil_operator:Op", "os:system"])
        elif kind == "tracer":
            manifest["tracer"] = rng.choice(["bogus", 5, None])
        elif kind in ("weights", "weights-dtype"):
            from safetensors.torch import load_file, save_file

            path = folder / "model.safetensors"
            state = load_file(str(path))
            if kind == "weights-dtype":
                dtype = rng.choice([torch.int64, torch.int32, torch.float64, torch.float8_e4m3fn, torch.bool])
                for k in rng.sample(list(state), rng.choice([1, len(state)])):
                    state[k] = (state[k] * 10).to(dtype)
                save_file(state, str(path))
            else:
                choice = rng.choice(["truncate", "garbage", "drop", "extra", "shape", "missing-file"])
                if choice == "truncate":
                    data = path.read_bytes()
                    path.write_bytes(data[: rng.randrange(len(data))])
                elif choice == "garbage":
                    path.write_bytes(bytes(rng.randrange(256) for _ in range(1000)))
                elif choice == "drop":
                    state.pop(next(k for k in state if "blocks.1.attn" in k))
                    save_file(state, str(path))
                elif choice == "extra":
                    state["not.a.key"] = torch.zeros(1)
                    save_file(state, str(path))
                elif choice == "shape":
                    k = next(k for k in state if k.endswith("mlp.fc1.weight"))
                    state[k] = torch.zeros(3, 3)
                    save_file(state, str(path))
                else:
                    path.unlink()
        if kind not in ("weights", "weights-dtype"):
            (folder / "graft.json").write_text(text if text is not None else json.dumps(manifest))
        return Case("manifests", kind, expect, folder, names=(str(folder),))

    def run(self, case: Case) -> Result:
        import torch

        import graftfx

        def go(c):
            return graftfx.load_grafted(self.base, c.payload)

        def check(c, model):
            if graftfx.export.fingerprint(self.base) != self.hash:
                return "silently wrong", "load_grafted changed the base model's weights"
            if c.expect == "valid":
                with torch.no_grad():
                    got = model(*self.inputs)
                if not torch.equal(got, self.want):
                    return "silently wrong", "the reloaded model's outputs differ from the exported one's"
            return None

        result = run_case(case, go, timeout=60, sentinel=self.sentinel, check=check)
        if graftfx.export.fingerprint(self.base) != self.hash:   # an error may have changed it too
            if result.outcome in ("success", "clean error"):
                result = Result(case, "silently wrong", "the base model's weights changed: " + result.detail)
            self.base.load_state_dict(self.pristine)
        return result


def run_manifests(work: Path, n: int, seed: int = SEED) -> Tally:
    runner = ManifestRunner(work)
    rng = random.Random(seed + 2)
    tally = Tally()
    for i in range(n):
        tally.add(runner.run(runner.case(rng, i)))
    return tally


# ---------------------------------------------------------------------------------------------
# Campaign 3: CLI argument lists (in-process ``graftfx.cli.main``; exit 2 must be one line)
# ---------------------------------------------------------------------------------------------

class CliRunner:
    """Fixtures once (rule files, checkpoints, data files, a trained stage-1 checkpoint), then
    argument lists from a per-command grammar; each choice is labelled valid or invalid."""

    def __init__(self, work: Path):
        import torch
        from safetensors.torch import save_file

        from graftfx.models import load_bundled_digits_dit

        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.sentinel = work / "CODE_RAN"
        f = work / "fixtures"
        f.mkdir(exist_ok=True)
        self.f = f
        (f / "good.toml").write_text('version = 1\n[[rule]]\npattern = "self_attention"\noperator = "hyena_x"\n'
                                     'select = { preset = "paper-50" }\n')
        (f / "heads5.toml").write_text('version = 1\n[[rule]]\npattern = "self_attention"\noperator = "swa"\n'
                                       'select = { preset = "paper-50" }\noptions = { heads = 5 }\n')
        (f / "absurd.toml").write_text('version = 1\n[[rule]]\npattern = "mlp"\noperator = "mlp"\n'
                                       'select = { preset = "paper-50" }\noptions = { ratio = 100000 }\n')
        (f / "binary.toml").write_bytes(bytes(range(256)) * 4)
        (f / "typed.toml").write_text('version = 1\n[[rule]]\npattern = "mlp"\noperator = "mlp"\n'
                                      'select = { every_other = "0" }\n')
        (f / "bad.toml").write_text("[[rule]\n")
        digits = load_bundled_digits_dit()
        sd = digits.state_dict()
        save_file({k: v.contiguous() for k, v in sd.items()}, str(f / "digits.safetensors"))
        save_file({k: (v * 10).to(torch.int64) for k, v in sd.items()}, str(f / "int64.safetensors"))
        save_file({k: v.double() for k, v in sd.items()}, str(f / "fp64.safetensors"))
        (f / "garbage.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"not json")
        (f / "empty.pt").write_bytes(b"")
        import pickle

        (f / "evil.pt").write_bytes(pickle.dumps({"model": Evil(self.sentinel)}))
        torch.save({"ema": sd}, f / "ema.pt")
        x = torch.randn(40, 1, 8, 8)
        y = torch.randint(0, 10, (40,))
        save_file({"latents": x, "labels": y}, str(f / "data.safetensors"))
        save_file({"latents": x.to(torch.int64), "labels": y}, str(f / "data-int.safetensors"))
        save_file({"latents": torch.randn(40, 3, 16, 16), "labels": y}, str(f / "data-shape.safetensors"))
        save_file({"latents": x, "labels": y + 50}, str(f / "data-labels.safetensors"))
        save_file({"latents": x, "labels": y[:7]}, str(f / "data-count.safetensors"))
        save_file({"latents": x[:0], "labels": y[:0]}, str(f / "data-empty.safetensors"))
        save_file({"latents": x.flatten(1), "labels": y}, str(f / "data-ndim.safetensors"))
        save_file({"latents": x, "labels": y.float() + 0.5}, str(f / "data-float-labels.safetensors"))
        save_file({"images": x}, str(f / "data-keys.safetensors"))
        (f / "a-file").write_text("not a folder")
        # a real stage-1 checkpoint folder for export --weights
        from graftfx.distill import DistillSettings, Stage1Config, load_data, run_distill

        settings = DistillSettings(stage="1", online=True, samples=8, export=False,
                                   stage1=Stage1Config(steps=2, batch_size=2, ckpt_every=2))
        lx, ly = load_data("digits")
        with contextlib.redirect_stderr(io.StringIO()):
            run_distill(digits, digits.example_inputs(2), "digits-mha-hyena_x-50p.toml", lx[:16], ly[:16], f / "run",
                        settings, progress=False, log=lambda *a: None)
        self.stage1 = f / "run" / "stage1" / "checkpoint"
        from graftfx.training import CheckpointStore

        p = CheckpointStore(self.stage1).require().tensors("params")
        save_file({k: (v * 100).to(torch.int64) for k, v in p.items()}, str(f / "weights-int64.safetensors"))
        save_file({"no.such.key": torch.zeros(2)}, str(f / "weights-nomatch.safetensors"))
        save_file({k: v.to(torch.float16) for k, v in p.items()}, str(f / "weights-fp16.safetensors"))
        self.count = 0

    def weights_label(self, rules: list[str], choice: tuple[str, str]) -> tuple[str, str]:
        """The stage-1 checkpoint was trained for the bundled digits-mha-hyena_x-50p.toml; good.toml
        is the same rule (pattern, operator, selection, options; only the name differs), so its
        grafted model has exactly the checkpoint's keys and loading it is valid. Any other rule
        file makes it invalid."""
        same = (["digits-mha-hyena_x-50p.toml"], [str(self.f / "good.toml")])
        if choice[0] == str(self.stage1) and rules not in same:
            return choice[0], "invalid"
        return choice

    def _pick(self, rng, options):
        """One labelled choice; in a 'valid' case (a third of them) only the valid ones."""
        if getattr(self, "_valid", False):
            valid = [o for o in options if o[1] == "valid"]
            options = valid or options
        return rng.choice(options)

    # each entry: (argv fragment, "valid" | "invalid" | "either")
    def _rules(self, rng, bundled="digits-mha-hyena_x-50p.toml"):
        f = self.f
        return self._pick(rng, [([bundled], "valid"), ([str(f / "good.toml")], "valid"), (["nope.toml"], "invalid"),
                           ([str(f / "binary.toml")], "invalid"), ([str(f / "bad.toml")], "invalid"),
                           ([str(f / "typed.toml")], "invalid"), ([str(f / "absurd.toml")], "invalid"),
                           ([str(f / "heads5.toml")], "invalid"), ([""], "invalid"), ([str(f)], "invalid")])

    def _model(self, rng, kind="digits"):
        f = self.f
        good = [(["digits"], "valid"), ([str(f / "digits.safetensors")], "valid"), ([str(f / "ema.pt")], "valid")]
        if kind == "any":
            good += [(["DiT-S/8"], "valid")]
        return self._pick(rng, good * 3 + [
            (["DiT-Q/2"], "invalid"), ([""], "invalid"), (["nope.pt"], "invalid"),
            ([str(f / "garbage.safetensors")], "invalid"), ([str(f / "int64.safetensors")], "invalid"),
            ([str(f / "fp64.safetensors")], "invalid"), ([str(f / "empty.pt")], "invalid"),
            ([str(f / "evil.pt")], "invalid"), ([str(f / "fixtures")], "invalid"), (["diffusers:nope"], "invalid"),
            ([str(f / "good.toml")], "invalid")])

    def _out(self, rng, case_dir: Path):
        f = self.f
        return self._pick(rng, [([str(case_dir / "out")], "valid")] * 6 + [
            ([""], "invalid"), ([str(f / "a-file")], "invalid"), ([str(f / "a-file" / "sub")], "invalid"),
            (["/proc/graftfx-no"], "invalid")])

    def _int(self, rng, good, bad=("0", "-1", "x", "1e3", "", "99999999999999999999999")):
        return self._pick(rng, [(str(g), "valid") for g in good] * 3 + [(b, "invalid") for b in bad])

    def _float(self, rng, good, bad=("0", "-1", "nan", "inf", "-inf", "x", "")):
        return self._pick(rng, [(str(g), "valid") for g in good] * 3 + [(b, "invalid") for b in bad])

    def _device(self, rng):
        return self._pick(rng, [("cpu", "valid")] * 6 + [("ALL", "invalid"), ("cuda", "invalid"), ("cuda:7", "invalid"),
                                                    ("", "invalid"), ("meta", "invalid"), ("tpu", "invalid")])

    def case(self, rng: random.Random, i: int) -> Case:
        import shutil

        case_dir = self.work / f"case-{i % 10}"
        if case_dir.exists():
            shutil.rmtree(case_dir)
        case_dir.mkdir()
        cmd = rng.choice(["inspect", "explain", "rules", "distill", "distill", "distill", "export", "export", "eval",
                          "study", "top", "argparse"])
        self._valid = rng.random() < (0.12 if cmd == "distill" else 0.3)
        parts: list[tuple[list[str], str]] = []
        names: list[str] = []

        def flag(name, choice, p=0.5, required=False):
            if self._valid and choice[1] == "invalid" and not required:
                return
            if required or rng.random() < p:
                value, label = choice
                value = value if isinstance(value, list) else [value]
                parts.append(([name, *value], label))
                if label == "invalid":
                    names.extend([name] + _names(value))

        if cmd == "top":
            argv = rng.choice([[], ["--help"], ["nosuchcommand"], ["-x"], ["inspect"], ["distill"], ["export"],
                               ["eval"], ["eval", "nosuch"], ["--version"]])
            expect = {(): "invalid", ("--help",): "valid"}.get(tuple(argv), "invalid")
            return Case("cli", "top-level", expect, (argv, case_dir, []), names=tuple(argv) or ("graftfx",))
        if cmd == "argparse":
            sub = rng.choice(["inspect", "distill", "export", "explain"])
            argv = [sub] + rng.choice([["--frobnicate"], ["--steps1"], ["--out"], ["a", "b", "c", "d"],
                                       ["--samples", "many"], ["--help"]])
            expect = "valid" if argv[-1] == "--help" else "invalid"
            return Case("cli", f"argparse:{sub}", expect, (argv, case_dir, []), names=tuple(argv))
        if cmd in ("inspect", "explain"):
            model, label = self._model(rng, "any")
            parts.append((model, label))
            if label == "invalid":
                names.extend(_names(model))
            flag("--rules", self._rules(rng, "dit-xl2-mha-swa-50p.toml"), p=0.7, required=cmd == "explain")
            if cmd == "inspect":
                flag("--out", self._out(rng, case_dir), p=0.3)
                flag("--materialize", ([], "valid"), p=0.1)
        elif cmd == "rules":
            if rng.random() < 0.3:
                parts.append((["extra"], "invalid"))
                names.append("extra")
        elif cmd == "distill":
            rules, label = self._rules(rng)
            parts.append((rules, label))
            if label == "invalid":
                names.extend(_names(rules))
            flag("--model", self._model(rng), required=True)
            flag("--out", self._out(rng, case_dir), required=True)
            flag("--data", self._pick(rng, [("digits", "valid")] * 4 + [(str(self.f / "data.safetensors"), "valid")] * 2 +
                                      [(str(self.f / n), "invalid") for n in (
                                          "data-int.safetensors", "data-shape.safetensors", "data-labels.safetensors",
                                          "data-count.safetensors", "data-empty.safetensors", "data-ndim.safetensors",
                                          "data-float-labels.safetensors", "data-keys.safetensors", "evil.pt",
                                          "garbage.safetensors", "nope.bin")]), p=0.5)
            stage = self._pick(rng, [("1", "valid"), ("1", "valid"), ("2", "valid"), ("both", "valid"), ("3", "invalid")])
            parts.append((["--stage", stage[0]], stage[1]))
            if stage[1] == "invalid":
                names.append("--stage")
            src = rng.random()
            if src < 0.5:
                parts.append((["--online"], "valid"))
            elif src < 0.8:
                flag("--cache", self._pick(rng, [(str(case_dir / "cache"), "valid")] * 4 + [("", "invalid"),
                                            (str(self.f / "a-file"), "invalid")]), required=True)
            flag("--samples", self._int(rng, (8, 12), ("0", "-4", "x", "10000000000000")), required=True)
            flag("--shard-size", self._int(rng, (4, 8)), p=0.3)
            flag("--steps1", self._int(rng, (1, 2)), required=True)
            flag("--steps2", self._int(rng, (1, 2)), required=True)
            flag("--batch1", self._int(rng, (2, 4)), required=True)
            flag("--batch2", self._int(rng, (2, 4)), required=True)
            flag("--lr1", self._float(rng, (1e-3, 5e-4)), p=0.2)
            flag("--lr2", self._float(rng, (1e-4,)), p=0.2)
            flag("--ema", self._float(rng, (0.9, 0.0), ("1", "1.5", "-0.1", "nan")), p=0.2)
            flag("--warmup1", self._int(rng, (0, 1), ("-1", "x")), p=0.1)
            flag("--warmup2", self._int(rng, (0, 1), ("-1", "x")), p=0.1)
            flag("--ckpt-every", self._int(rng, (1, 5)), p=0.2)
            flag("--log-every", self._int(rng, (1, 5)), p=0.2)
            flag("--seed", self._int(rng, (0, 3, 2**31), ("x", "-1", str(2**70))), p=0.2)
            flag("--device", self._device(rng), p=0.3)
            flag("--loss", self._pick(rng, [("l1", "valid"), ("l2", "valid"), ("l3", "invalid")]), p=0.1)
            flag("--train", self._pick(rng, [("all", "valid"), ("spliced", "valid"), ("none", "invalid")]), p=0.1)
            flag("--objective", self._pick(rng, [("diffusion", "valid"), ("distill", "valid"), ("x", "invalid")]), p=0.1)
            flag("--resume", ([], "invalid"), p=0.05)   # a fresh --out has no checkpoint to resume
            parts.append((["--no-progress"], "valid"))
        elif cmd == "export":
            rules, label = self._rules(rng)
            parts.append((rules, label))
            if label == "invalid":
                names.extend(_names(rules))
            flag("--model", self._model(rng), required=True)
            flag("--out", self._out(rng, case_dir), required=True)
            w = rng.random()
            if w < 0.6:
                partial = rng.random() < 0.7
                choice = self._pick(rng, [(str(self.stage1), "valid" if partial else "invalid"),
                                     (str(self.f / "weights-int64.safetensors"), "invalid"),
                                     (str(self.f / "weights-nomatch.safetensors"), "invalid"),
                                     (str(self.f / "weights-fp16.safetensors"), "valid" if partial else "invalid"),
                                     (str(self.f / "garbage.safetensors"), "invalid"), ("nope.safetensors", "invalid"),
                                     (str(self.f / "evil.pt"), "invalid"), (str(self.f), "invalid")])
                choice = self.weights_label(rules, choice)
                flag("--weights", choice, required=True)
                if partial:
                    parts.append((["--partial"], "valid"))
        elif cmd == "eval":
            parts.append((["digits"], "valid"))
            m = rng.random()
            if m < 0.3:
                model, label = self._pick(rng, [([str(self.f / "digits.safetensors")], "valid"), (["nope.safetensors"], "invalid"),
                                           ([str(self.f / "int64.safetensors")], "invalid"),
                                           ([str(self.f / "garbage.safetensors")], "invalid"),
                                           ([str(self.f / "evil.pt")], "invalid")])
                parts.append((model, label))
                if label == "invalid":
                    names.extend(model)
            flag("--n-per-class", self._int(rng, (1,)), required=True)
            flag("--steps", self._pick(rng, [("2", "valid"), ("ddim2", "valid"), ("0", "invalid"), ("abc", "invalid"),
                                        ("-3", "invalid"), ("ddim0", "invalid")]), required=True)
            flag("--batch-size", self._int(rng, (10, 64)), p=0.3)
            flag("--cfg", self._float(rng, (1.0, 1.5), ("nan", "inf", "x")), p=0.3)
            flag("--num-heads", self._int(rng, (4, 2), ("3", "0", "-1", "x")), p=0.2)
            flag("--device", self._device(rng), p=0.2)
            flag("--json", self._pick(rng, [(str(case_dir / "r.json"), "valid"), (str(self.f / "a-file" / "x.json"), "invalid")]),
                 p=0.2)
            parts.append((["--quiet"], "valid"))
        elif cmd == "study":
            study = case_dir / "s.toml"
            content, label = rng.choice([
                (b"\xff\xfe\x00garbage" * 10, "invalid"), (b"[[experiment]\n", "invalid"), (b"", "invalid"),
                (b'model = 5\n[[experiment]]\nname = "a"\npattern = "mlp"\noperator = "mlp"\n', "invalid"),
                (b'[settings]\nsamples = "many"\n[[experiment]]\nname = "a"\npattern = "mlp"\noperator = "mlp"\n',
                 "invalid"),
                (b'[settings]\nsamples = -5\n[[experiment]]\nname = "a"\npattern = "mlp"\noperator = "mlp"\n', "invalid"),
                (b'[[experiment]]\nname = "a"\npattern = "mlp"\noperator = "mlp"\nfractions = "all"\n', "invalid"),
                (b'[[experiment]]\nname = "a"\npattern = "mlp"\noperator = "mlp"\noptions = { ratio = 100000 }\n',
                 "invalid"),
                (b'experiment = 3\n', "invalid"), (b'[[experiment]]\nname = 1\npattern = "mlp"\noperator = "mlp"\n',
                                                   "invalid"),
                (b'[[experiment]]\npattern = "mlp"\n', "invalid"),
                (b'[[experiment]]\nname = "a"\npattern = "mlp"\noperator = "mlp"\ncolour = 2\n', "invalid"),
            ])
            study.write_bytes(content)
            parts.append(([str(study)], label))
            names.append(str(study))
            parts.append((["--out", str(case_dir / "out")], "valid"))
        argv = [cmd] + [a for p, _ in parts for a in p]
        labels = [lab for _, lab in parts]
        expect = "invalid" if "invalid" in labels else "either" if "either" in labels else "valid"
        if cmd == "distill" and expect == "valid" and "--online" not in argv:
            expect = "valid"
        return Case("cli", cmd, expect, (argv, case_dir, names), names=tuple(names) or (cmd,))

    def run(self, case: Case) -> Result:
        argv, case_dir, _ = case.payload
        before = set(os.listdir(case_dir))
        old = os.getcwd()
        os.chdir(case_dir)
        if self.sentinel.exists():
            self.sentinel.unlink()
        out, err = io.StringIO(), io.StringIO()
        try:
            with deadline(300), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                from graftfx.cli import main

                try:
                    code = main(list(argv))
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
            message = err.getvalue()
            lines = [ln for ln in message.splitlines() if ln.strip() and not _progress_line(ln)]
            if code == 0:
                outcome, detail = "success", ""
                if case.expect == "invalid":
                    outcome, detail = "silently wrong", f"exit 0 for an invalid argument list {argv}"
            elif code == 2:
                if len(lines) != 1 or "Traceback" in message:
                    outcome, detail = "traceback", message[-800:]
                else:
                    outcome, detail = judge_error(case, lines[0]), lines[0]
                    if outcome == "vague error" and not case.names:
                        outcome = "clean error"
            else:
                outcome, detail = "traceback", f"exit {code}: {message[-600:]}"
        except Hang as e:
            outcome, detail = "hang", str(e)
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            outcome, detail = "traceback", f"{type(e).__name__}: {e} | " + " ".join(
                traceback.format_exception(type(e), e, e.__traceback__)[-3:]).replace("\n", " ")[:600]
        finally:
            os.chdir(old)
        stray = sorted(set(os.listdir(case_dir)) - before - {"out", "cache", "r.json", "s.toml"})
        if stray and outcome in ("success", "clean error"):
            outcome, detail = "silently wrong", f"wrote {stray} into the working folder, outside --out"
        if self.sentinel.exists():
            outcome, detail = "code run", detail
        return Result(case, outcome, f"{' '.join(argv)} -> {detail}")


def _names(values: list[str]) -> list[str]:
    """How an error may name a value: itself, '' for an empty one, the folder of diffusers:FOLDER."""
    out = []
    for v in values:
        out += [v] if v else ["''", "empty"]
        if v.startswith("diffusers:"):
            out.append(v.split(":", 1)[1])
    return out


def _progress_line(line: str) -> bool:
    return "it/s]" in line or "s/it]" in line or line.startswith(("stage ", "teacher cache", "\r"))


def run_cli(work: Path, n: int, seed: int = SEED, log=None) -> Tally:
    runner = CliRunner(work)
    rng = random.Random(seed + 3)
    tally = Tally()
    for i in range(n):
        tally.add(runner.run(runner.case(rng, i)))
        if log and (i + 1) % 100 == 0:
            log(f"cli: {i + 1}/{n}")
    return tally
