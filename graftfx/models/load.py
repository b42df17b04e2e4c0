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
from graftfx.state import check_state, dtypes_of, shapes_of

from .dit import DiT, DiTConfig

# DiT presets' head counts by width (heads are not visible in the weights).
_HEADS = {1152: 16, 1024: 16, 768: 12, 384: 6}
# What a DiT's weights may be stored as; anything else is refused by name (an int64 or fp8 file
# would otherwise load "successfully" and compute something else).
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def read_state_dict(path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, by name; every failure is one GraftError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise GraftError(f"{what} {path} is a folder, not a file; give the .safetensors/.pt file itself")
    if not path.is_file():
        raise GraftError(f"{what} {path} not found")
    if path.stat().st_size == 0:
        raise GraftError(f"{what} {path} is empty (0 bytes); was it written completely?")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as e:
            raise GraftError(f"{what} {path} is not a readable safetensors file ({first_line(e)}); "
                             "give a complete .safetensors file") from None
    import pickle

    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: not the user's concern
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise GraftError(f"{what} {path} holds Python objects other than tensors, which graftfx never unpickles "
                         "(weights_only=True); save the state dict alone (torch.save(model.state_dict())) or as "
                         ".safetensors") from None
    except Exception as e:  # noqa: BLE001 - a corrupt or truncated zip/pickle in all its forms
        raise GraftError(f"{what} {path} could not be read with weights_only=True ({first_line(e)}); give a "
                         "complete .pt/.pth file or a .safetensors file") from None
    if isinstance(obj, dict):
        for key in ("ema", "model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) for k in obj) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise GraftError(f"{what} {path} holds no state dict (expected a dict of named tensors, bare or under "
                     "'ema'/'model'/'state_dict')")


def check_weight_dtypes(sd: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor float32/float16/bfloat16 and finite; else a GraftError naming the keys."""
    bad: dict[str, list[str]] = {}
    for k, v in sd.items():
        if v.dtype not in WEIGHT_DTYPES:
            bad.setdefault(str(v.dtype).replace("torch.", ""), []).append(k)
    if bad:
        dtype, keys = next(iter(bad.items()))
        more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
        raise GraftError(f"{where} holds {dtype} tensors ({', '.join(keys[:3])}{more}); DiT weights are float32, "
                         "float16 or bfloat16: convert them (tensor.float()) and save the file again")
    for k, v in sd.items():
        if v.numel() and not bool(torch.isfinite(v).all()):
            raise GraftError(f"{where}: tensor {k} holds NaN or infinite values; a trained checkpoint has none "
                             "(did its training diverge?)")


def _shape(sd, key: str, ndim: int, where: str) -> tuple[int, ...]:
    shape = tuple(sd[key].shape)
    if len(shape) != ndim or not all(0 < d <= 1 << 24 for d in shape):
        raise GraftError(f"{where}: {key} has shape {list(shape)}, not the {ndim}-D shape of a DiT in the public key "
                         "layout; pass config= for other layouts")
    return shape


def block_count(sd: dict, where: str) -> int:
    """How many DiT blocks the keys hold: indices 0..n-1, each present, n <= MAX_DEPTH."""
    from graftfx.limits import MAX_DEPTH

    found = set()
    for k in sd:
        m = _BLOCK.match(k)
        if m:
            if len(m.group(1)) > 6 or (m.group(1).startswith("0") and m.group(1) != "0"):
                raise GraftError(f"{where}: key {k} has block index {m.group(1)[:12]}, not a DiT block number")
            found.add(int(m.group(1)))
    if not found:
        raise GraftError(f"{where} holds no blocks.N.* keys; is it a DiT checkpoint in the public key layout?")
    n = max(found) + 1
    if n > MAX_DEPTH:
        raise GraftError(f"{where}: a block index {n - 1} means {n} blocks, more than a DiT has (at most {MAX_DEPTH})")
    missing = sorted(set(range(n)) - found)
    if missing:
        raise GraftError(f"{where}: blocks {missing[:5]} are missing between blocks.0 and blocks.{n - 1}; "
                         "the checkpoint is incomplete")
    return n


def infer_config(sd: dict[str, torch.Tensor], where: str = "checkpoint", **overrides) -> DiTConfig:
    """A DiTConfig that fits the tensors of ``sd`` (public DiT key names); every shape is checked
    before it is used, so a damaged file is an error naming the tensor."""
    need = ["x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise GraftError(f"{where} is not in the DiT key layout: missing {', '.join(missing)} "
                         "(pass config= for other layouts)")
    hidden, in_ch, patch, patch2 = _shape(sd, "x_embedder.proj.weight", 4, where)     # (D, C, p, p)
    if patch != patch2:
        raise GraftError(f"{where}: x_embedder.proj.weight has a {patch}x{patch2} patch; a DiT's is square")
    _, tokens, width = _shape(sd, "pos_embed", 3, where)                                # (1, T, D)
    grid = math.isqrt(tokens)
    if grid * grid != tokens or width != hidden:
        raise GraftError(f"{where}: pos_embed has shape {list(sd['pos_embed'].shape)}; a DiT of width {hidden} has "
                         "(1, grid*grid, width)")
    rows, width = _shape(sd, "y_embedder.embedding_table.weight", 2, where)
    out, width2 = _shape(sd, "final_layer.linear.weight", 2, where)
    if width != hidden or width2 != hidden or out % (patch * patch) or out // (patch * patch) not in (in_ch, 2 * in_ch):
        raise GraftError(f"{where}: y_embedder.embedding_table.weight {list(sd['y_embedder.embedding_table.weight'].shape)}"
                         f" or final_layer.linear.weight {list(sd['final_layer.linear.weight'].shape)} do not fit a "
                         f"DiT of width {hidden}, patch {patch} and {in_ch} channels")
    depth = block_count(sd, where)
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    ratio = 4.0
    if fc1 is not None:
        ratio = _shape(sd, "blocks.0.mlp.fc1.weight", 2, where)[0] / hidden
    values = dict(input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden,
                  depth=depth, num_heads=_HEADS.get(hidden, max(1, hidden // 64)),
                  mlp_ratio=ratio, num_classes=max(rows - 1, 1),
                  class_dropout_prob=0.1, learn_sigma=out // (patch * patch) == 2 * in_ch)
    values.update(overrides)
    return make_config(values, where)


def make_config(values: dict, where: str) -> DiTConfig:
    """A DiTConfig from plain values (a file's metadata, inferred shapes), each typed and bounded
    first: a config is never allowed to ask for 100,000 blocks or a zero patch."""
    from graftfx.limits import MAX_DEPTH, MAX_SIDE, MAX_WIDTH

    if not isinstance(values, dict):
        raise GraftError(f"{where}: its config is a {type(values).__name__}, not a table of DiTConfig fields")
    fields = DiTConfig.__dataclass_fields__
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise GraftError(f"{where}: config field {unknown[0]!r} is not a DiTConfig field; valid: {', '.join(fields)}")
    bounds = {"input_size": MAX_SIDE, "patch_size": MAX_SIDE, "in_channels": MAX_SIDE, "hidden_size": MAX_WIDTH,
              "depth": MAX_DEPTH, "num_heads": MAX_WIDTH, "num_classes": 1 << 24}
    for k, v in values.items():
        if k in bounds and not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= bounds[k]):
            raise GraftError(f"{where}: config {k}={v!r} must be an integer from 1 to {bounds[k]}")
        if k in ("mlp_ratio", "class_dropout_prob") and not (
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 64):
            raise GraftError(f"{where}: config {k}={v!r} must be a finite number")
        if k == "learn_sigma" and not isinstance(v, bool):
            raise GraftError(f"{where}: config learn_sigma={v!r} must be true or false")
    try:
        config = DiTConfig(**values)
    except (TypeError, ValueError) as e:
        raise GraftError(f"{where}: config does not describe a DiT: {first_line(e)}") from None
    if config.mlp_ratio * config.hidden_size < 1:
        raise GraftError(f"{where}: config mlp_ratio={config.mlp_ratio} leaves no MLP hidden width")
    return config


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Strict key, shape and dtype check; one error naming missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    check_state(shapes_of(own), shapes_of(sd), what=f"checkpoint {where} ({type(model).__name__})",
                fix="pass the matching config (model size, patch, input size)", own_dtypes=dtypes_of(own),
                saved_dtypes=dtypes_of(sd))


def stored_config(path) -> DiTConfig | None:
    """The DiTConfig a .safetensors file carries in its metadata (key "config", JSON), if any."""
    if Path(path).suffix != ".safetensors":
        return None
    import json

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise GraftError(f"checkpoint {path} is not a readable safetensors file ({first_line(e)})") from None
    if "config" not in meta:
        return None
    try:
        values = json.loads(meta["config"])
    except (ValueError, RecursionError):
        raise GraftError(f"checkpoint {path}: its metadata config is not valid JSON; drop it or write "
                         "json.dumps(dataclasses.asdict(config))") from None
    return make_config(values, f"checkpoint {path} (metadata)")


def load_dit(path, config: DiTConfig | None = None, *, device="cpu", dtype=None) -> DiT:
    """Load a DiT checkpoint strictly. ``config``: given, else the file's metadata config, else
    inferred from the tensors' shapes (head count from the DiT presets' width -> heads).

    Before anything is built: every tensor must be float32/float16/bfloat16 and finite, the block
    keys numbered 0..depth-1, and the config's depth the number of blocks the file holds."""
    where = f"checkpoint {path}"
    sd = read_state_dict(path)
    check_weight_dtypes(sd, where)
    config = config or stored_config(path) or infer_config(sd, where)
    blocks = block_count(sd, where)
    if config.depth != blocks:
        raise GraftError(f"{where} holds {blocks} blocks but its config says depth={config.depth}; fix the config")
    with torch.device("meta"):
        model = DiT(config)
    check_state_dict(model, sd, str(path))
    if len({v.dtype for v in sd.values()}) > 1:          # mixed precisions: one model dtype (lossless)
        sd = {k: v.float() for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model = model.to(device=device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
