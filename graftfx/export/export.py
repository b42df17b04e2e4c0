"""Ship a grafted model: ``model.safetensors`` (its full state) and ``graft.json`` (the manifest:
base model id/hash, rules, the selected regions, operator configs, training settings, metrics).

``load_grafted(base_model, folder)`` traces the base model again, re-applies the rules pinned
to the exact regions of the manifest with the operator configs it recorded (every option, the
defaults of the day included, so a changed default never changes a reloaded model), and loads
the state strictly: the same model comes back.
"""
from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

import torch

from graftfx._version import __version__
from graftfx.api import graft
from graftfx.errors import GraftError
from graftfx.io import atomic_write_json
from graftfx.rules import Rule, RuleSet, Select
from graftfx.splice.splice import GraftedModule, make_inputs

MANIFEST = "graft.json"
WEIGHTS = "model.safetensors"
FORMAT = 2          # 2: regions carry "config" (dataclasses.asdict of the operator config); 1: rule options


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a model's state (names, shapes, dtypes, bytes; meta tensors: no bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if not t.is_meta:
            h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def export_grafted(grafted: GraftedModule, folder, *, base_id: str = "", base_hash: str = "",
                   settings: dict | None = None, metrics: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    grafted.save_state(folder / WEIGHTS)
    manifest = {
        "format": FORMAT,
        "graftfx": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base": {"id": base_id, "hash": base_hash},
        "tracer": grafted.tracer,
        "inputs": grafted.input_spec,
        "rules": [r.to_dict() for r in grafted.rules],
        "regions": [g.as_dict() for g in grafted.grafts],
        "settings": settings or {},
        "metrics": metrics or {},
    }
    atomic_write_json(folder / MANIFEST, manifest)
    return folder


def read_manifest(folder) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise GraftError(f"{folder} holds no {MANIFEST}; export one with graftfx export or graftfx distill")
    return json.loads(path.read_text())


def load_grafted(base_model: torch.nn.Module, folder, *, check_hash: bool = True) -> GraftedModule:
    """Rebuild the grafted model of ``folder`` from ``base_model`` and load its weights."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    want = manifest["base"].get("hash")
    if check_hash and want:
        have = fingerprint(base_model)
        if have != want:
            raise GraftError(f"{folder} was grafted onto base model {want}, not this one ({have}); pass the same "
                             "base model or check_hash=False")
    if manifest.get("format") not in (1, FORMAT):
        raise GraftError(f"{folder}/{MANIFEST} has format {manifest.get('format')!r}; this graftfx reads formats 1 "
                         f"and {FORMAT}: upgrade graftfx or export the model again")
    # Re-apply each rule pinned to the exact region it replaced, with the recorded config.
    by_name = {r["name"]: r for r in manifest["rules"]}
    rules = []
    for region in manifest["regions"]:
        r = by_name[region["rule"]]
        options = region["config"] if "config" in region else r.get("options", {})
        rules.append(Rule(pattern=r["pattern"], operator=r["operator"], select=Select(paths=[region["path"]]),
                          options=dict(options), name=r["name"], loss=r.get("loss"),
                          source=f"{folder}/{MANIFEST}: region {region['path']}"))
    args, kwargs = make_inputs(manifest["inputs"])
    grafted = graft(base_model, RuleSet(rules, str(folder)), args, kwargs, tracer=manifest.get("tracer", "auto"))
    got = sorted(g.region.path for g in grafted.grafts)
    if got != sorted(r["path"] for r in manifest["regions"]):
        raise GraftError(f"{folder}: the base model's regions {got} differ from the manifest's; is it the same model?")
    grafted.load_state(folder / WEIGHTS)
    return grafted.eval()
