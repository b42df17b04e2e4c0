"""Ship a grafted model: ``model.safetensors`` (its full state) and ``graft.json`` (the manifest:
base model id/hash, rules, the selected regions, operator configs, training settings, metrics,
and the weights file's size and sha256).

``export_grafted`` writes both files into a temporary folder that replaces the export folder in
one rename (a crash or a full disk leaves the earlier export as it was).

``load_grafted(base_model, folder)`` checks the manifest (format, types, the example inputs'
sizes) and the weights file (checksum, names, shapes, dtypes) before anything is built, traces
the base model again, re-applies the rules pinned to the exact regions of the manifest with the
operator configs it recorded (every option, the defaults of the day included, so a changed
default never changes a reloaded model), and loads the state strictly into the grafted model's
own copies of the base's modules: the same model comes back, and ``base_model`` is never changed.

Structural rules (parallel pairs, merged and dropped blocks) are recorded under ``structure``:
one entry per rewritten group with its rule, its blocks and its config; ``regions`` then lists
the operator regions only (an operator that moved into a pair's module carries ``inside``, the
pair's path). Such a manifest is format 3; one without structure stays format 2, and formats 1
and 2 read as before. ``load_grafted`` pins each structural rule to its recorded blocks.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import torch

from graftfx._version import __version__
from graftfx.errors import GraftError, first_line
from graftfx.io import atomic_write_json, file_sha256, temp_name
from graftfx.rules import Rule, RuleSet, Select
from graftfx.select.select import select
from graftfx.splice.splice import GraftedModule, build_operator, make_inputs, splice
from graftfx.state import check_state, detach_from, dtypes_of, safetensors_header, shapes_of, tied_names
from graftfx.trace.tracer import trace

MANIFEST = "graft.json"
WEIGHTS = "model.safetensors"
FORMAT = 2          # 2: regions carry "config" (dataclasses.asdict of the operator config); 1: rule options
FORMAT_STRUCTURE = 3   # 3: format 2 plus "structure" (structural rewrites: parallel pairs, merged/dropped blocks)
TRACERS = ("auto", "fx", "export")
INPUT_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a model's state (names, shapes, dtypes, bytes; meta tensors: no bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if not t.is_meta:
            h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def preflight(plan) -> None:
    """Build every operator of ``plan`` on the meta device (no memory): options that only a real
    region refuses, and operators over the size ceiling (``graftfx.limits``), are errors before
    anything is allocated. The CLI, ``distill_plan`` and ``load_grafted`` run it before splicing."""
    for rule, region in plan.selected:
        build_operator(rule, region, device="meta")


def export_grafted(grafted: GraftedModule, folder, *, base_id: str = "", base_hash: str = "",
                   settings: dict | None = None, metrics: dict | None = None) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/graft.json``; the folder is replaced as a
    whole (files of a user's own in it stay, moved over into the new folder)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise GraftError(f"export folder {folder} is a file; give a folder path")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(folder)
    try:
        tmp.mkdir()
        grafted.save_state(tmp / WEIGHTS)
        structure = list(getattr(grafted, "structure", []) or [])
        regions = [g.as_dict() for g in grafted.grafts if not g.structural]
        for edit in structure:
            regions += [{**r.as_dict(), "inside": edit.path} for r in edit.inner]
        manifest = {
            "format": FORMAT_STRUCTURE if structure else FORMAT,
            "graftfx": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "base": {"id": base_id, "hash": base_hash},
            "tracer": grafted.tracer,
            "inputs": grafted.input_spec,
            "rules": [r.to_dict() for r in grafted.rules],
            "regions": regions,
            "weights": {"file": WEIGHTS, "bytes": (tmp / WEIGHTS).stat().st_size,
                        "sha256": file_sha256(tmp / WEIGHTS)},
            "settings": settings or {},
            "metrics": metrics or {},
        }
        if structure:
            manifest["structure"] = [e.as_dict() for e in structure]
        atomic_write_json(tmp / MANIFEST, manifest)
        swap_folder(tmp, folder, own=(WEIGHTS, MANIFEST))
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, GraftError) or not _is_io_error(e):
            raise
        raise GraftError(f"export to {folder} failed: {_io_reason(e)}; the earlier export there (if any) is "
                         "unchanged: free space or pick another folder and export again") from None
    return folder


def swap_folder(tmp: Path, folder: Path, own: tuple[str, ...]) -> None:
    """Make the finished folder ``tmp`` the ``folder``: what else the user put in the old folder
    (every entry but the names in ``own``) is carried over, then two renames swap them."""
    if not folder.is_dir():
        os.replace(tmp, folder)
        return
    for entry in folder.iterdir():
        if entry.name not in own and not (tmp / entry.name).exists():
            _carry_over(entry, tmp / entry.name)
    old = temp_name(folder).with_suffix(".old")
    os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _carry_over(src: Path, dst: Path) -> None:
    """A file or folder of the user's into the new export folder (a hard link where possible)."""
    if src.is_dir():
        shutil.copytree(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _is_io_error(e: BaseException) -> bool:
    from safetensors import SafetensorError

    return isinstance(e, (OSError, SafetensorError)) or "No space left" in str(e) or "IoError" in str(e)


def _io_reason(e: BaseException) -> str:
    text = str(e)
    if "No space left" in text or getattr(e, "errno", None) == 28 or "StorageFull" in text:
        return "no space left on the device"
    return getattr(e, "strerror", None) or first_line(e)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

def read_manifest(folder) -> dict:
    """``folder/graft.json``, parsed and checked field by field (never executes anything)."""
    from graftfx.limits import MAX_MANIFEST_BYTES

    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise GraftError(f"{folder} holds no {MANIFEST}; export one with graftfx export or graftfx distill")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise GraftError(f"{path}: {size:,} bytes, more than a manifest may hold ({MAX_MANIFEST_BYTES:,}); is it the "
                         "right file?")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise GraftError(f"{path} is not valid JSON ({first_line(e) if not isinstance(e, RecursionError) else 'nested too deeply'}); "
                         "export the model again") from None
    check_manifest(manifest, path)
    return manifest


def check_manifest(m, path) -> None:
    """Every field a loader reads, typed and bounded; a GraftError naming the file and the field."""
    from graftfx.limits import max_input_elements

    def bad(field: str, want: str):
        return GraftError(f"{path}: {field} must be {want}; the manifest is damaged: export the model again")

    if not isinstance(m, dict):
        raise bad("the document", "a JSON object")
    fmt = m.get("format")
    if not _is_int(fmt) or fmt not in (1, FORMAT, FORMAT_STRUCTURE):
        raise GraftError(f"{path} has format {fmt!r}; this graftfx reads formats 1 and {FORMAT} ({FORMAT_STRUCTURE} with "
                         "structural rewrites): upgrade graftfx or export the model again")
    base = m.get("base", {})
    if not isinstance(base, dict) or not isinstance(base.get("hash", ""), str) or not isinstance(base.get("id", ""), str):
        raise bad("base", 'an object {"id": "...", "hash": "..."}')
    if m.get("tracer", "auto") not in TRACERS:
        raise bad("tracer", " or ".join(TRACERS))
    rules = m.get("rules")
    if not isinstance(rules, list) or not rules or not all(
            isinstance(r, dict) and all(isinstance(r.get(k), str) for k in ("name", "pattern", "operator"))
            and isinstance(r.get("options", {}), dict) for r in rules):
        raise bad("rules", "a list of rule objects with name, pattern and operator strings")
    names = {r["name"] for r in rules}
    structure = m.get("structure", [])
    if not isinstance(structure, list) or not all(
            isinstance(e, dict) and isinstance(e.get("rule"), str) and e["rule"] in names
            and isinstance(e.get("blocks"), list) and e["blocks"] and all(isinstance(b, str) for b in e["blocks"])
            and isinstance(e.get("config", {}), dict) for e in structure) or (structure and fmt != FORMAT_STRUCTURE):
        raise bad("structure", "a list of objects with a rule of the manifest, a list of block paths and a config "
                  "(format 3)")
    regions = m.get("regions")
    if not isinstance(regions, list) or not (regions or structure) or not all(
            isinstance(r, dict) and isinstance(r.get("rule"), str) and isinstance(r.get("path"), str)
            and isinstance(r.get("config", {}), dict) for r in regions):
        raise bad("regions", "a list of region objects with rule and path strings and a config object")
    for r in regions:
        if r["rule"] not in names:
            raise bad(f"region {r['path']!r}'s rule {r['rule']!r}", f"one of the manifest's rules ({', '.join(sorted(names))})")
    paths = [r["path"] for r in regions]
    if len(set(paths)) != len(paths):
        raise bad("regions", "distinct paths (a region is listed twice)")
    weights = m.get("weights")
    if weights is not None and not (isinstance(weights, dict) and _is_int(weights.get("bytes"))
                                    and isinstance(weights.get("sha256"), str)):
        raise bad("weights", 'an object {"file", "bytes", "sha256"}')
    inputs = m.get("inputs")
    if not isinstance(inputs, dict) or not isinstance(inputs.get("args"), list) \
            or not isinstance(inputs.get("kwargs", {}), dict):
        raise bad("inputs", 'an object {"args": [...], "kwargs": {...}}')
    total = 0
    entries = [*inputs["args"], *inputs.get("kwargs", {}).values()]
    for spec in list(entries):   # a dict input (one level): its entries are checked like the others
        if isinstance(spec, dict) and set(spec) == {"dict"}:
            if not isinstance(spec["dict"], dict) or any(isinstance(v, dict) and "dict" in v
                                                         for v in spec["dict"].values()):
                raise bad("inputs", "dict entries one level deep")
            entries.extend(spec["dict"].values())
    entries = [e for e in entries if not (isinstance(e, dict) and set(e) == {"dict"})]
    for i, spec in enumerate(entries):
        where = f"inputs entry {i + 1}"
        if not isinstance(spec, dict) or len(spec) not in (1, 2):
            raise bad(where, 'an object {"tensor": [shape], "dtype": "..."} or {"value": ...}')
        if "tensor" in spec:
            shape = spec["tensor"]
            if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and 0 <= d < 1 << 40 for d in shape):
                raise bad(f"{where}'s tensor", "a shape: a list of at most 8 non-negative integers")
            if spec.get("dtype") not in INPUT_DTYPES:
                raise bad(f"{where}'s dtype", "one of " + ", ".join(INPUT_DTYPES))
            total += math.prod(shape)
        elif "value" in spec:
            value = spec["value"]
            plain = (bool, int, float, str)
            if isinstance(value, dict):   # {"resolution": null, ...}: a dict of plain values (added_cond_kwargs)
                if len(value) > 64 or not all(u is None or isinstance(u, plain) for u in value.values()):
                    raise bad(f"{where}'s value", "a number, string, boolean, null, or an object of those")
            elif not (value is None or isinstance(value, plain)):
                raise bad(f"{where}'s value", "a number, string, boolean or null")
        else:
            raise bad(where, 'an object {"tensor": [shape], "dtype": "..."} or {"value": ...}')
    if total > max_input_elements():
        raise GraftError(f"{path}: its example inputs ask for {total:,} elements, more than the ceiling of "
                         f"{max_input_elements():,} (GRAFTFX_MAX_INPUT_ELEMENTS); the manifest is damaged, or raise "
                         "the ceiling")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def load_grafted(base_model: torch.nn.Module, folder, *, check_hash: bool = True) -> GraftedModule:
    """Rebuild the grafted model of ``folder`` from ``base_model`` and load its weights; the
    returned model owns its weights (``base_model`` is left exactly as it was)."""
    folder = Path(folder)
    manifest = read_manifest(folder)                 # cheap checks first: the manifest, the weights file
    where = f"{folder}/{MANIFEST}"
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise GraftError(f"{folder} holds {MANIFEST} but no {WEIGHTS}; export the model again")
    record = manifest.get("weights")
    if record is not None:
        size = weights.stat().st_size
        if size != record["bytes"] or file_sha256(weights) != record["sha256"]:
            raise GraftError(f"{weights} is not the file {MANIFEST} was written with (size or sha256 differ): the "
                             "export is damaged or was interrupted; export the model again")
    saved_shapes, saved_dtypes = safetensors_header(weights, f"{weights}")
    want = manifest.get("base", {}).get("hash")
    if check_hash and want:
        have = fingerprint(base_model)
        if have != want:
            raise GraftError(f"{folder} was grafted onto base model {want}, not this one ({have}); pass the same "
                             "base model or check_hash=False")
    # Re-apply each rule pinned to the exact region it replaced, with the recorded config.
    by_name = {r["name"]: r for r in manifest["rules"]}
    rules = []
    for region in manifest["regions"]:
        r = by_name[region["rule"]]
        options = region["config"] if "config" in region else r.get("options", {})
        try:
            rule = Rule(pattern=r["pattern"], operator=r["operator"], select=Select(paths=[region["path"]]),
                        options=dict(options), name=r["name"], loss=r.get("loss"),
                        source=f"{where}: region {region['path']}")
        except (TypeError, ValueError) as e:
            raise GraftError(f"{where}: region {region['path']}: {first_line(e)}") from None
        rule.validate()                              # import paths refused: a manifest never imports code
        rules.append(rule)
    for edit in manifest.get("structure", []):       # structural rules pinned to their blocks
        r = by_name[edit["rule"]]
        try:
            rule = Rule(pattern=r["pattern"], operator=r["operator"], select=Select(paths=list(edit["blocks"])),
                        options=dict(edit.get("config", r.get("options", {}))), name=r["name"], loss=r.get("loss"),
                        source=f"{where}: structure {'+'.join(edit['blocks'])}")
        except (TypeError, ValueError) as e:
            raise GraftError(f"{where}: structure {edit['blocks']}: {first_line(e)}") from None
        rule.validate()
        if not rule.structural:
            raise GraftError(f"{where}: structure {edit['blocks']}: {r['operator']!r} is not a structural operator; "
                             "the manifest is damaged: export the model again")
        rules.append(rule)
    args, kwargs = make_inputs(manifest["inputs"])
    try:
        traced = trace(base_model, args, kwargs, tracer=manifest.get("tracer", "auto"))
    except GraftError:
        raise
    except Exception as e:  # noqa: BLE001 - the manifest's inputs do not fit this model
        raise GraftError(f"{where}: the base model cannot run at the manifest's example inputs "
                         f"({first_line(e)}); is it the same base model, and the manifest intact?") from None
    plan = select(traced, RuleSet(rules, str(folder)))
    preflight(plan)
    got = sorted(r.path for _, r in plan.selected)
    if got != sorted(r["path"] for r in manifest["regions"]):
        raise GraftError(f"{folder}: the base model's regions {got} differ from the manifest's; is it the same model?")
    groups = sorted([r.path for r in group] for _, group in plan.structural)
    if groups != sorted(list(e["blocks"]) for e in manifest.get("structure", [])):
        raise GraftError(f"{folder}: the base model's blocks {groups} differ from the manifest's structure; is it the "
                         "same model?")
    grafted = splice(plan)
    detach_from(grafted, base_model)                 # load into copies, never into the caller's model
    own = grafted.state_dict()
    tied = {k for k, others in tied_names(grafted).items() if others & set(saved_shapes)}
    check_state(shapes_of(own), saved_shapes, what=f"{weights} (grafted model state)", optional=tied,
                fix="export the model again from the same base model and rules", own_dtypes=dtypes_of(own),
                saved_dtypes=saved_dtypes)
    grafted.load_state(weights)
    return grafted.eval()
