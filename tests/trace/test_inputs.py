"""Tracing what real models take: optional arguments under FX, tuple/dict inputs and tensors whose
dim 0 is not the batch under export, constants passed through **kwargs."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graftfx

D, H = 16, 2


class OptionalMask(nn.Module):
    """timm's style: ``attn_mask=None`` and ``is_causal=False`` defaults, a branch on them."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        if attn_mask is not None:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


def test_fx_keeps_none_defaults_concrete():
    model = OptionalMask().eval()
    traced = graftfx.trace(model, (torch.randn(2, 9, D),), tracer="fx")
    assert traced.tracer == "fx"
    regions = graftfx.match(traced, "self_attention").regions
    assert len(regions) == 1 and regions[0].features == ()        # the unmasked branch, no mask input
    x = torch.randn(3, 9, D)
    torch.testing.assert_close(traced.gm(x), model(x), rtol=0, atol=0)


class Rotary(nn.Module):
    """Inputs as Flux/HunyuanDiT take them: a (cos, sin) tuple of (L, Dh) tables and a dict."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x, rope, extra):
        B, N, C = x.shape
        q, k, v = self.qkv(x + extra["shift"]).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        cos, sin = rope
        rot = lambda t: torch.cat([-t[..., C // H // 2:], t[..., : C // H // 2]], dim=-1)   # noqa: E731
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


def _tables(n):
    angle = torch.arange(n)[:, None] * torch.rand(D // H)[None]
    return angle.cos(), angle.sin()


def test_export_batch_dim_dynamic_only_where_it_is_the_batch():
    model = Rotary().eval()
    cos, sin = _tables(9)                     # (L, Dh): dim 0 is tokens, never the batch
    inputs = (torch.randn(2, 9, D), (cos, sin), {"shift": torch.randn(2, 1, D)})
    traced = graftfx.trace(model, inputs, tracer="export")
    r = graftfx.match(traced, "self_attention").regions[0]
    assert r.features == ("rope",) and r.details["rope"] == {"style": "half", "layout": "BHLD", "k": True}
    for batch in (1, 5):
        x, shift = torch.randn(batch, 9, D), torch.randn(batch, 1, D)
        torch.testing.assert_close(traced.gm(x, (cos, sin), {"shift": shift}), model(x, (cos, sin), {"shift": shift}))
    grafted = graftfx.splice(graftfx.select(traced, [graftfx.Rule("self_attention", "mha")]))
    x, shift = torch.randn(3, 9, D), torch.randn(3, 1, D)
    with torch.no_grad():
        assert (grafted(x, (cos, sin), {"shift": shift}) - model(x, (cos, sin), {"shift": shift})).abs().max() < 1e-5


class Kwargs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x, **kwargs):
        y = self.lin(x)
        return y if kwargs.get("return_dict", True) else (y,)


def test_constants_given_to_var_keyword_are_fixed_and_said_so():
    model = Kwargs().eval()
    traced = graftfx.trace(model, (torch.randn(2, 4, D),), {"return_dict": False}, tracer="export")
    assert any("return_dict=False" in n for n in traced.notes)
    x = torch.randn(3, 4, D)
    out = traced.gm(x)
    assert isinstance(out, tuple) and torch.equal(out[0], model(x, return_dict=False)[0])
    with pytest.raises(graftfx.GraftError, match=r"tensor keyword inputs y go to \*\*kwargs"):
        graftfx.trace(model, (torch.randn(2, 4, D),), {"y": torch.randn(2, 4, D)}, tracer="export")
