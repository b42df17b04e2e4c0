import os

# Kernel tests run the Triton code through its interpreter on the CPU. Set before any kernel
# module is imported: @triton.jit decides at decoration time.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _activate(model, seed=1):
    """Random non-zero adaLN and final layer, so every block changes the output (adaLN-Zero
    initialisation would make the blocks identities and hide splicing mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            w = block.adaLN_modulation[1].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.05)
        w = model.final_layer.linear.weight
        w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture
def dit_s2():
    from graftfx.models import DiT_models

    torch.manual_seed(0)
    return _activate(DiT_models["DiT-S/2"]())


@pytest.fixture
def tiny_dit():
    from graftfx.models import DiT, DiTConfig

    torch.manual_seed(0)
    return _activate(DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4,
                                   num_heads=4, num_classes=10)))


# The distillation tests' teacher, rules and data (tests/_distill_job.py holds the pieces, which
# the tests that start graftfx distill processes also use).
@pytest.fixture
def digits_dit():
    from ._distill_job import tiny_digits_dit

    return tiny_digits_dit()


@pytest.fixture
def rules():
    from ._distill_job import tiny_rules

    return tiny_rules()


@pytest.fixture
def digits():
    from graftfx.distill import load_data

    x, y = load_data("digits")
    return x[:256], y[:256]
