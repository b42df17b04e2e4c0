"""The ``mlp`` operator: init="copy" from matched MLPs is the original exactly (DiT's, and a
gated SwiGLU), other ratios start fresh, the options, and FLOPs against torch's FLOP counter."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graftfx.errors import GraftError
from graftfx.models.dit import Mlp
from graftfx.registry import get_operator

from ._support import build, flop_count, traced_region

WIDTH, TOKENS = 16, 9


class SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w3 = nn.Linear(WIDTH, 24, bias=False), nn.Linear(WIDTH, 24, bias=False)
        self.w2 = nn.Linear(24, WIDTH, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _original(module):
    torch.manual_seed(2)
    module = module()
    x = torch.randn(2, TOKENS, WIDTH)
    return module, traced_region(module, x, kind="mlp"), x


@pytest.mark.parametrize("module,gated", [(lambda: Mlp(WIDTH, 4 * WIDTH), False), (SwiGLU, True)],
                         ids=["dit", "swiglu"])
def test_copy_is_the_original_exactly(module, gated):
    original, r, x = _original(module)
    op = build("mlp", r)
    assert op.config.init == "auto" and (op.gate is not None) == gated
    torch.testing.assert_close(op(x), original(x), rtol=0, atol=0)
    # torch counts the linears; the matched region counts the same
    assert op.flops(TOKENS) == flop_count(op, x[:1]) == r.flops


def test_other_ratios_start_fresh():
    original, r, x = _original(lambda: Mlp(WIDTH, 4 * WIDTH))
    op = build("mlp", r, ratio=3)
    assert op.fc1.weight.shape == (48, WIDTH) and op.config.ratio == 3
    assert (op(x) - original(x)).abs().max() > 1e-2
    # 2*9*16*48 + 2*9*48*16 = 27648
    assert op.flops(TOKENS) == flop_count(op, x[:1]) == 27648
    with pytest.raises(ValueError, match="init='copy' needs the original hidden width 64, got 48"):
        build("mlp", r, ratio=3, init="copy")


def test_activation_option():
    original, r, x = _original(lambda: Mlp(WIDTH, 4 * WIDTH))
    op = build("mlp", r, activation="relu", init="copy")
    torch.testing.assert_close(op(x), original.fc2(F.relu(original.fc1(x))))
    with pytest.raises(GraftError, match="activation must be one of"):
        get_operator("mlp").make_config({"activation": "swish"})
