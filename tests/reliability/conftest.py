import pytest
import torch

from graftfx import Rule, Select
from graftfx.models import DiT, DiTConfig


@pytest.fixture
def digits_dit():
    """A tiny digits-shaped DiT (16 tokens) whose blocks are not identities."""
    torch.manual_seed(0)
    m = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=2, num_classes=10))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in m.blocks:
            b.adaLN_modulation[1].weight.copy_(torch.randn(b.adaLN_modulation[1].weight.shape, generator=g) * 0.05)
    return m.eval()


@pytest.fixture
def rules():
    return [Rule("self_attention", "mha", Select(preset="paper-50"), {"init": "fresh"}),
            Rule("mlp", "mlp", Select(preset="paper-50"), {"ratio": 3})]


@pytest.fixture
def digits():
    from graftfx.distill import load_data

    x, y = load_data("digits")
    return x[:256], y[:256]
