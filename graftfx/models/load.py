"""``load_dit(path)``: a DiT from a checkpoint in the public DiT key layout, strictly checked.

``.pt``/``.pth`` load through ``torch.load(..., weights_only=True)`` (a bare state dict, or one
under ``ema``/``model``/``state_dict``); ``.safetensors`` through safetensors. The config is
read off the key shapes unless given.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from graftfx.errors import GraftError, first_line
from graftfx.state import check_state, shapes_of

from .dit import DiT, DiTConfig

# DiT presets' head counts by width (heads are not visible in the weights).
_HEADS = {1152: 16, 1024: 16, 768: 12, 384: 6}


def read_state_dict(path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise GraftError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise GraftError(f"checkpoint {path} is not a readable safetensors file ({first_line(e)}); "
                             "give a complete .safetensors checkpoint") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling refused or corrupt file
        raise GraftError(f"checkpoint {path} could not be read with weights_only=True: {first_line(e)}") from None
    if isinstance(obj, dict):
        for key in ("ema", "model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise GraftError(f"checkpoint {path} holds no state dict (expected a dict of tensors, or one under 'ema'/'model')")


def infer_config(sd: dict[str, torch.Tensor], **overrides) -> DiTConfig:
    """A DiTConfig that fits the tensors of ``sd`` (public DiT key names)."""
    need = ["x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise GraftError(f"checkpoint is not in the DiT key layout: missing {', '.join(missing)} "
                         "(pass config= for other layouts)")
    proj = sd["x_embedder.proj.weight"]            # (D, C, p, p)
    hidden, in_ch, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    grid = math.isqrt(sd["pos_embed"].shape[1])
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    out = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    values = dict(input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden,
                  depth=depth, num_heads=_HEADS.get(hidden, max(1, hidden // 64)),
                  mlp_ratio=(fc1.shape[0] / hidden) if fc1 is not None else 4.0, num_classes=rows - 1,
                  class_dropout_prob=0.1, learn_sigma=out == 2 * in_ch)
    values.update(overrides)
    return DiTConfig(**values)


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Strict key and shape check; one error naming missing, unexpected and mis-shaped keys."""
    check_state(shapes_of(model.state_dict()), shapes_of(sd), what=f"checkpoint {where} ({type(model).__name__})",
                fix="pass the matching config (model size, patch, input size)")


def stored_config(path) -> DiTConfig | None:
    """The DiTConfig a .safetensors file carries in its metadata (key "config", JSON), if any."""
    if Path(path).suffix != ".safetensors":
        return None
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        return None
    try:
        return DiTConfig(**json.loads(meta["config"]))
    except (TypeError, ValueError) as e:
        raise GraftError(f"checkpoint {path}: its metadata config is not a DiTConfig: {e}") from None


def load_dit(path, config: DiTConfig | None = None, *, device="cpu", dtype=None) -> DiT:
    """Load a DiT checkpoint strictly. ``config``: given, else the file's metadata config, else
    inferred from the tensors' shapes (head count from the DiT presets' width -> heads)."""
    sd = read_state_dict(path)
    config = config or stored_config(path) or infer_config(sd)
    with torch.device("meta"):
        model = DiT(config)
    check_state_dict(model, sd, str(path))
    model.load_state_dict(sd, strict=True, assign=True)
    model = model.to(device=device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
