"""Ship a grafted model: ``model.safetensors`` (its full state) and ``graft.json`` (the manifest:
base model id/hash, rules, the selected regions, operator configs, training settings, metrics).

``load_grafted(base_model, folder)`` traces the base model again, re-applies the rules pinned
to the exact regions of the manifest, and loads the state strictly: the same model comes back.
"""
from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

import torch

import graftfx
from graftfx.errors import GraftError
from graftfx.io import atomic_write_json
from graftfx.rewrites.rules import Rule, RuleSet, Select
from graftfx.splice.splice import GraftedModule, make_inputs

MANIFEST = "graft.json"
WEIGHTS = "model.safetensors"


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
        "format": 1,
        "graftfx": graftfx.__version__,
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
    # Re-apply each rule pinned to the exact regions it replaced.
    chosen: dict[str, list[str]] = {}
    for region in manifest["regions"]:
        chosen.setdefault(region["rule"], []).append(region["path"])
    rules = []
    for r in manifest["rules"]:
        if r["name"] in chosen:
            rules.append(Rule(pattern=r["pattern"], operator=r["operator"], select=Select(paths=chosen[r["name"]]),
                              options=r.get("options", {}), name=r["name"], loss=r.get("loss")))
    args, kwargs = make_inputs(manifest["inputs"])
    grafted = graftfx.graft(base_model, RuleSet(rules, str(folder)), args, kwargs, tracer=manifest.get("tracer", "auto"))
    got = sorted(g.region.path for g in grafted.grafts)
    if got != sorted(r["path"] for r in manifest["regions"]):
        raise GraftError(f"{folder}: the base model's regions {got} differ from the manifest's; is it the same model?")
    grafted.load_state(folder / WEIGHTS)
    return grafted.eval()
