"""The client zoo: tiny random configs of timm, transformers and diffusers models, as a new user
would bring them (tests/clients and benchmarks/coverage.py share it).

Each entry builds a model (seeded, random weights scaled so every block changes the output),
example inputs at a batch size, and says which tracer to use and what the output is. Nothing
here knows what graftfx matches: the tests state the expectations.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch

from ._torchvision import import_timm


@dataclass
class Client:
    name: str                                  # e.g. "timm:vit"
    library: str                               # timm | transformers | diffusers
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int], tuple[tuple, dict]]  # batch -> (args, kwargs)
    tracer: str = "auto"
    grid: tuple[int, int] | None = None        # the user's grid=, when the model does not say
    output: Callable = field(default=lambda out: out)   # the tensor to compare

    def available(self) -> bool:
        return importlib.util.find_spec(self.library) is not None


def _randomise(model: torch.nn.Module, seed: int = 3, std: float = 0.1) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised adaLN/gates would hide splicing mistakes);
    norm weights stay near 1 so activations keep a sane scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if "norm" in name.lower() and name.endswith("weight") and p.dim() == 1:
                p.copy_(1 + noise)
            else:
                p.copy_(noise)
    return model.eval()


def _first(out):
    if isinstance(out, (tuple, list)):
        return out[0]
    for key in ("last_hidden_state", "logits", "sample"):
        if hasattr(out, key):
            return getattr(out, key)
    return out


# ------------------------------------------------------------------------ timm, transformers
# The models are graftfx's own small specs (graftfx.models.zoo: the CLI's timm:/transformers:
# models), with random weights at a scale where every block changes the output.

def _timm(kind):
    def build():
        import_timm()                      # timm through the torchvision stand-in where needed
        from graftfx.models.zoo import small_timm

        torch.manual_seed(0)
        return _randomise(small_timm(kind))

    return build


def _image(batch):
    from graftfx.models.zoo import image_batch

    return (image_batch(batch),), {}


def _transformers(kind):
    def build():
        from graftfx.models.zoo import small_transformers

        torch.manual_seed(0)
        return _randomise(small_transformers(kind))

    return build


def _pixels(batch):
    return (), {"pixel_values": _image(batch)[0][0]}


def _tokens(batch):
    from graftfx.models.zoo import token_batch

    return token_batch(batch)


def bert_inputs(batch):
    return (), {"input_ids": _tokens(batch)}


def bert_padded_inputs(batch):
    """A real key-padding mask: the last sample's last three tokens are padding."""
    mask = torch.ones(batch, 8, dtype=torch.long)
    mask[-1, -3:] = 0
    return (), {"input_ids": _tokens(batch), "attention_mask": mask}


llama_inputs = bert_inputs


# ---------------------------------------------------------------------------------- diffusers

def _diffusers(kind):
    from graftfx.models.zoo import small_diffusers

    torch.manual_seed(0)
    return _randomise(small_diffusers(kind))


def _diffusers_inputs(kind):
    def inputs(batch):
        from graftfx.models.zoo import small_diffusers_inputs

        return (), small_diffusers_inputs(kind, batch)

    return inputs


def _diffusers_client(kind: str, name: str, grid=None) -> Client:
    return Client(f"diffusers:{kind}", "diffusers", lambda: _diffusers(kind), _diffusers_inputs(kind),
                  grid=grid, output=_first)


CLIENTS: dict[str, Client] = {c.name: c for c in [
    Client("timm:vit", "timm", _timm("vit"), _image, tracer="fx"),
    Client("timm:vit-export", "timm", _timm("vit"), _image, tracer="export"),
    Client("timm:swin", "timm", _timm("swin"), _image),
    Client("transformers:vit", "transformers", _transformers("vit"), _pixels, output=_first),
    Client("transformers:clip", "transformers", _transformers("clip"), _pixels, output=_first),
    Client("transformers:bert", "transformers", _transformers("bert"), bert_inputs, output=_first),
    Client("transformers:bert-padded", "transformers", _transformers("bert"), bert_padded_inputs, output=_first),
    Client("transformers:llama", "transformers", _transformers("llama"), llama_inputs, output=_first),
    _diffusers_client("pixart", "PixArtTransformer2DModel"),
    _diffusers_client("dit", "DiTTransformer2DModel"),
    _diffusers_client("unet", "UNet2DConditionModel"),
    _diffusers_client("hunyuan", "HunyuanDiT2DModel"),
    _diffusers_client("sd3", "SD3Transformer2DModel"),
    _diffusers_client("flux", "FluxTransformer2DModel", grid=(4, 4)),   # packed latents: the user says
    _diffusers_client("stable_audio", "StableAudioDiTModel"),
]}


# ------------------------------------------------------------------- shared traces and checks

@functools.lru_cache(maxsize=None)
def traced(name: str):
    """(client, model, TracedGraph) at batch 2, once per process (every test shares it)."""
    import graftfx

    client = CLIENTS[name]
    model = client.build()
    args, kwargs = client.inputs(2)
    return client, model, graftfx.trace(model, args, kwargs, tracer=client.tracer, grid=client.grid)


ATTENTION_KINDS = ("self_attention", "causal_self_attention", "cross_attention", "joint_attention")


def regions_by_kind(tg) -> dict[str, int]:
    import graftfx

    return {kind: len(graftfx.match(tg, kind).regions) for kind in ATTENTION_KINDS + ("mlp",)
            if graftfx.match(tg, kind).regions}


def self_graft_rules(tg):
    """``mha`` (copy) on every matched attention region and ``mlp`` on every matched MLP: one
    rule set (invariant 3)."""
    from graftfx import Rule, Select

    return [Rule(kind, "mlp" if kind == "mlp" else "mha", Select(paths=["*"]), name=f"self-{kind}")
            for kind in regions_by_kind(tg)]


def max_diff(client, model, grafted, batch: int) -> float:
    args, kwargs = client.inputs(batch)
    with torch.no_grad():
        return float((client.output(grafted(*args, **kwargs)) - client.output(model(*args, **kwargs))).abs().max())


def attention_cores(gm) -> list:
    """Every attention core of a graph, found independently of the patterns: SDPA nodes, and
    softmaxes whose output (through views/dropout/casts) is the left operand of a matmul."""
    from graftfx.trace.ops import SHAPE_OPS, op_kind

    found = []
    for node in gm.graph.nodes:
        kind = op_kind(node, gm)
        if kind in ("sdpa", "sdpa_tuple"):
            found.append(node)
        elif kind == "softmax":
            n = node
            while len(n.users) == 1:
                u = next(iter(n.users))
                if op_kind(u, gm) == "matmul" and u.args[0] is n:
                    found.append(node)
                    break
                if op_kind(u, gm) not in SHAPE_OPS:
                    break
                n = u
    return found
