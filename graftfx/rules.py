"""Rules: which pattern, which replacement operator, which layers, which options (the engine's
vocabulary; the bundled rule files live in ``graftfx.rewrites``).

A rule file is TOML and never runs code:

    version = 1
    description = "DiT-XL/2: MHA -> Hyena-X on the paper's 50% layer set"

    [[rule]]
    name = "attn-hyena_x"
    pattern = "self_attention"
    operator = "hyena_x"
    select = { preset = "paper-50" }
    options = { }

Selection keys (combined by AND): ``preset`` ("paper-50": odd blocks 1,3,5,...; "paper-75":
all blocks but 0,4,8,...; "all"), ``fraction`` (0.5 and 0.75 are the presets, other values
pick evenly spaced blocks), ``every_other`` (true: blocks 1,3,5,...; ``offset`` = 0 for
0,2,4,...), ``indices`` (block indices; negative counts from the end), ``range`` ([start, stop):
blocks start..stop-1, Python-style, negative counts from the end), ``paths`` and ``exclude``
(module-path globs such as "blocks.*.attn"). Index-based selections apply to the regions that
sit in a numbered block; ``paths`` alone may reach any region.

Structural rules (``pattern = "block"`` with ``parallel_pairs``, ``drop_blocks`` or
``merge_blocks``: ``rewrites/operators/structural.py``, docs/structural.md) select blocks with
the same keys and share a file with operator rules. Selections always count the original
model's blocks.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import hashlib
import importlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graftfx.errors import GraftError, first_line

from .registry import LOSSES, OPERATORS, get_operator, get_pattern, get_structural, is_structural, register_operator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESETS = ("paper-50", "paper-75", "all")
_FILE_KEYS = {"version": "rule-file format version (1)", "description": "free text",
              "model": "the model the file was written for (free text)", "rule": "the [[rule]] tables"}
_RULE_KEYS = ("name", "pattern", "operator", "select", "options", "loss")
_SELECT_KEYS = ("preset", "fraction", "every_other", "offset", "indices", "range", "paths", "exclude")
BLOCK_PATTERN = "block"


@dataclass
class Select:
    preset: str | None = None
    fraction: float | None = None
    every_other: bool = False
    offset: int = 1
    indices: list[int] | None = None
    range: list[int] | None = None      # [start, stop): blocks start..stop-1
    paths: list[str] | None = None
    exclude: list[str] | None = None

    def __post_init__(self):
        # Types are checked strictly (TOML has them): true is not 1, "0" is not false, 1 is not a path.
        if self.preset is not None and (not isinstance(self.preset, str) or self.preset not in PRESETS):
            raise ValueError(f"select.preset {self.preset!r} is not one of {', '.join(PRESETS)}")
        if self.fraction is not None and not (_is_number(self.fraction) and 0 < self.fraction <= 1):
            raise ValueError(f"select.fraction must be a number in (0, 1], got {self.fraction!r}")
        if not isinstance(self.every_other, bool):
            raise ValueError(f"select.every_other must be true or false, got {self.every_other!r}")
        if not _is_int(self.offset) or self.offset not in (0, 1):
            raise ValueError(f"select.offset must be the integer 0 or 1, got {self.offset!r}")
        for key in ("indices", "paths", "exclude"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, (list, tuple)):
                raise ValueError(f"select.{key} must be a list, got {value!r}")
        if self.indices is not None and not all(_is_int(i) for i in self.indices):
            raise ValueError(f"select.indices must be a list of integers, got {self.indices!r}")
        if self.range is not None and not (isinstance(self.range, (list, tuple)) and len(self.range) == 2
                                           and all(_is_int(i) for i in self.range)):
            raise ValueError(f"select.range must be [start, stop], two integers, got {self.range!r}")
        for key in ("paths", "exclude"):
            value = getattr(self, key)
            if value is not None and not all(isinstance(g, str) for g in value):
                raise ValueError(f"select.{key} must be a list of module-path globs (strings), got {value!r}")

    @property
    def by_index(self) -> bool:
        return bool(self.preset or self.fraction is not None or self.every_other or self.indices is not None
                    or self.range is not None)

    def blocks(self, depth: int) -> set[int]:
        """Block indices this selection keeps out of ``range(depth)``."""
        keep = set(range(depth))
        if self.preset:
            keep &= preset_blocks(self.preset, depth)
        if self.fraction is not None:
            keep &= fraction_blocks(float(self.fraction), depth)
        if self.every_other:
            keep &= set(range(self.offset, depth, 2))
        if self.indices is not None:
            bad = [i for i in self.indices if not -depth <= i < depth]
            if bad:
                raise GraftError(f"select.indices {bad} out of range for a model with {depth} blocks")
            keep &= {i % depth for i in self.indices}
        if self.range is not None:
            start, stop = (i + depth if i < 0 else i for i in self.range)
            if not 0 <= start < stop <= depth:
                raise GraftError(f"select.range {list(self.range)} names no blocks of a model with {depth} blocks; "
                                 f"give [start, stop] with 0 <= start < stop <= {depth}")
            keep &= set(range(start, stop))
        return keep

    def admits_path(self, path: str) -> bool:
        if self.paths is not None and not any(fnmatch.fnmatchcase(path, p) for p in self.paths):
            return False
        return not (self.exclude and any(fnmatch.fnmatchcase(path, p) for p in self.exclude))


def preset_blocks(preset: str, depth: int) -> set[int]:
    """The paper's layer sets, scaled to ``depth`` blocks (DiT-XL/2 has 28)."""
    if preset == "paper-50":
        return set(range(1, depth, 2))
    if preset == "paper-75":
        return {i for i in range(depth) if i % 4 != 0}
    return set(range(depth))


def fraction_blocks(fraction: float, depth: int) -> set[int]:
    if math.isclose(fraction, 0.5):
        return preset_blocks("paper-50", depth)
    if math.isclose(fraction, 0.75):
        return preset_blocks("paper-75", depth)
    if math.isclose(fraction, 1.0):
        return set(range(depth))
    count = max(1, round(fraction * depth))
    return {min(depth - 1, int((i + 0.5) * depth / count)) for i in range(count)}


@dataclass
class Rule:
    pattern: str
    operator: str
    select: Select = field(default_factory=Select)
    options: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    loss: str | None = None
    source: str = ""               # where the rule was written: "rules.toml: rule 2", for errors

    def __post_init__(self):
        for key in ("pattern", "operator"):
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"{key} must be a string (a registered name), got {getattr(self, key)!r}")
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a string, got {self.name!r}")
        if isinstance(self.select, dict):
            unknown = [k for k in self.select if k not in _SELECT_KEYS]
            if unknown:
                raise ValueError(f"unknown select key {unknown[0]!r}; valid keys: {', '.join(_SELECT_KEYS)}")
            self.select = Select(**self.select)
        if not isinstance(self.select, Select):
            raise ValueError(f"select must be a table, e.g. select = {{ preset = \"paper-50\" }}, got {self.select!r}")
        if not isinstance(self.options, dict):
            raise ValueError(f"options must be a table, got {self.options!r}")
        if not self.name:
            self.name = f"{self.pattern}->{self.operator}"
        if self.loss is not None and (not isinstance(self.loss, str) or self.loss not in LOSSES):
            raise ValueError(f"loss {self.loss!r} is not one of {', '.join(LOSSES)}")

    @property
    def where(self) -> str:
        """The prefix of every error about this rule: its file and place, else its name."""
        return f"{self.source} ({self.name}): " if self.source else f"rule {self.name!r}: "

    def validate(self, allow_imports: bool = False) -> None:
        """Check the pattern, operator and options exist; raise GraftError naming what is wrong."""
        get_pattern(self.pattern, self.where)
        if self.structural or self.pattern == BLOCK_PATTERN:
            from .registry import structurals

            if not self.structural:
                raise GraftError(f"{self.where}pattern {BLOCK_PATTERN!r} takes a structural operator "
                                 f"({', '.join(sorted(structurals()))}), not {self.operator!r}")
            if self.pattern != BLOCK_PATTERN:
                raise GraftError(f"{self.where}operator {self.operator!r} rewrites whole blocks: use "
                                 f"pattern = {BLOCK_PATTERN!r}, not {self.pattern!r}")
            get_structural(self.operator, self.where).make_config(dict(self.options), self.where)
            return
        if isinstance(self.operator, str) and (":" in self.operator or "." in self.operator):
            if not allow_imports:
                raise GraftError(f"{self.where}operator {self.operator!r} is an import path; rule files never "
                                 "import code. Register the operator in Python, or opt in with allow_imports=True")
            _import_operator(self.operator, self.where)
        get_operator(self.operator, self.where).make_config(dict(self.options), self.where)

    def config(self):
        """The operator's validated config object for this rule's options."""
        if self.structural:
            return get_structural(self.operator, self.where).make_config(dict(self.options), self.where)
        return get_operator(self.operator, self.where).make_config(dict(self.options), self.where)

    @property
    def structural(self) -> bool:
        """A structural rule (parallel_pairs, drop_blocks, merge_blocks): it rewrites whole blocks."""
        return is_structural(self.operator)

    @property
    def effective_loss(self) -> str:
        if self.structural:
            return self.loss or get_structural(self.operator, self.where).loss
        return self.loss or get_operator(self.operator, self.where).loss

    def to_dict(self) -> dict:
        sel = {k: v for k, v in dataclasses.asdict(self.select).items()
               if v is not None and v is not False and not (k == "offset" and v == 1)}
        out = {"name": self.name, "pattern": self.pattern, "operator": self.operator, "select": sel,
               "options": dict(self.options)}
        if self.loss:
            out["loss"] = self.loss
        return out


@dataclass
class RuleSet:
    rules: list[Rule]
    source: str = "<python>"
    description: str = ""

    def digest(self) -> str:
        """A stable hash of what the rules do (for caches and manifests)."""
        blob = json.dumps([r.to_dict() for r in self.rules], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __iter__(self):
        return iter(self.rules)

    def __len__(self):
        return len(self.rules)


def load_rules(source, *, allow_imports: bool = False) -> RuleSet:
    """A RuleSet from a TOML file path (or a bundled rule file's name), a Rule or a list of Rules."""
    if isinstance(source, RuleSet):
        return source
    if isinstance(source, Rule):
        source = [source]
    if isinstance(source, (list, tuple)):
        rules = list(source)
        for i, r in enumerate(rules):
            if not isinstance(r, Rule):
                raise GraftError(f"rule {i} is a {type(r).__name__}, not a graftfx Rule")
            r.validate(allow_imports)
        return RuleSet(rules)
    if not isinstance(source, (str, Path)) or not str(source).strip():
        raise GraftError(f"the rule file path is empty ({source!r}); give a TOML rule file or a bundled one's name")
    path = Path(source)
    if path.is_dir():
        raise GraftError(f"rule file {source} is a folder; give a TOML rule file")
    if not path.is_file():
        near = builtin_rule_files()
        if path.name in near:
            path = near[path.name]
        else:
            hint = difflib.get_close_matches(path.name, near, n=1)
            raise GraftError(f"rule file {source} not found" + (f" (did you mean {hint[0]}?)" if hint else
                             f"; bundled rule files: {', '.join(sorted(near)) or 'none'}"))
    return parse_rules(read_toml(path, "rule file"), str(path), allow_imports=allow_imports)


def read_toml(path: Path, what: str) -> dict:
    """A small TOML file, parsed and bounded (``graftfx.limits``): size, encoding, syntax, nesting,
    string, list and integer sizes are each a one-line GraftError naming the file."""
    from graftfx.limits import MAX_TOML_BYTES, check_toml_shape

    path = Path(path)
    size = path.stat().st_size
    if size > MAX_TOML_BYTES:
        raise GraftError(f"{path}: {size:,} bytes is more than a {what} may hold ({MAX_TOML_BYTES:,}); is it the "
                         "right file?")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GraftError(f"{path}: not a text file (byte {e.start} is not UTF-8); a {what} is TOML text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise GraftError(f"{path}: not valid TOML: {first_line(e)}") from None
    except RecursionError:
        raise GraftError(f"{path}: not valid TOML here: nested far too deeply; a {what} is flat tables of short "
                         "values") from None
    except ValueError as e:  # e.g. an integer of more than 4,300 digits
        raise GraftError(f"{path}: not valid TOML here: {first_line(e).split(';')[0]}") from None
    check_toml_shape(data, str(path))
    return data


def parse_rules(data: dict, where: str = "<toml>", *, allow_imports: bool = False) -> RuleSet:
    from graftfx.limits import MAX_RULES

    if not isinstance(data, dict):
        raise GraftError(f"{where}: a rule file is a TOML document of tables, got {type(data).__name__}")
    _check_keys(data, _FILE_KEYS, f"{where}: unknown top-level key")
    version = data.get("version", 1)
    if not _is_int(version) or version != 1:
        raise GraftError(f"{where}: version {version!r} is not supported (only the integer 1)")
    for key in ("description", "model"):
        if key in data and not isinstance(data[key], str):
            raise GraftError(f"{where}: {key} must be a string, got {data[key]!r}")
    tables = data.get("rule")
    if not isinstance(tables, list) or not tables:
        raise GraftError(f"{where}: no [[rule]] tables; a rule file needs at least one")
    if len(tables) > MAX_RULES:
        raise GraftError(f"{where}: {len(tables)} rules, more than {MAX_RULES}; split the file")
    rules = []
    for i, table in enumerate(tables):
        source = f"{where}: rule {i + 1}"
        name = table.get("name") if isinstance(table, dict) else None
        label = source + (f" ({name})" if isinstance(name, str) and name else "")
        if not isinstance(table, dict):
            raise GraftError(f"{label}: a [[rule]] must be a table with pattern and operator keys, got {table!r}")
        _check_keys(table, _RULE_KEYS, f"{label}: unknown key")
        for key in ("pattern", "operator"):
            if key not in table:
                raise GraftError(f"{label}: missing key {key!r}")
        for key in ("name", "pattern", "operator", "loss"):
            if key in table and not isinstance(table[key], str):
                raise GraftError(f"{label}: {key} must be a string, got {table[key]!r}")
        select = table.get("select", {})
        if not isinstance(select, dict):
            raise GraftError(f"{label}: select must be a table, e.g. select = {{ preset = \"paper-50\" }}")
        _check_keys(select, _SELECT_KEYS, f"{label}: unknown select key")
        options = table.get("options", {})
        if not isinstance(options, dict):
            raise GraftError(f"{label}: options must be a table, got {options!r}")
        try:
            rule = Rule(pattern=table["pattern"], operator=table["operator"], select=Select(**select),
                        options=options, name=table.get("name", ""), loss=table.get("loss"), source=source)
        except (TypeError, ValueError) as e:
            raise GraftError(f"{label}: {first_line(e)}") from None
        rule.validate(allow_imports)
        rules.append(rule)
    return RuleSet(rules, where, str(data.get("description", "")))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return isinstance(v, int) or math.isfinite(v)


def _check_keys(table: dict, valid, what: str) -> None:
    for key in table:
        if key not in valid:
            raise GraftError(f"{what} {key!r}; valid keys: {', '.join(valid)}")


def _import_operator(dotted: str, where: str = "") -> None:
    """Opt-in only: import ``module:Class`` (or module.Class) and register it under that name."""
    if dotted in OPERATORS:
        return
    module, _, attr = dotted.partition(":") if ":" in dotted else dotted.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise GraftError(f"{where}operator {dotted!r} could not be imported: {e}") from None
    config = getattr(cls, "config_class", None) or getattr(cls, "Config", None)
    if config is None:
        raise GraftError(f"{where}operator {dotted!r} has no config dataclass (config_class); register it with "
                         "@graftfx.registry.register_operator instead")
    try:
        register_operator(dotted, config=config, kinds=getattr(cls, "kinds", ("self_attention", "mlp")))(cls)
    except TypeError as e:
        raise GraftError(f"{where}operator {dotted!r} does not follow the operator protocol: {e}") from None


def builtin_rule_files() -> dict[str, Path]:
    """The rule files bundled in ``graftfx.rewrites`` (``rewrites/rules/``), by file name."""
    from graftfx.rewrites import RULES_DIR

    return {p.name: p for p in sorted(RULES_DIR.glob("*.toml"))}
