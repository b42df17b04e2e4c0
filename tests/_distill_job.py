"""What the distillation tests share: the tiny digits DiT teacher (16 tokens, blocks that are not
identities), the 50% mha/mlp rule set, as objects and as a TOML file, and a job folder holding
both (``teacher.safetensors`` + ``rules.toml``) for ``graftfx distill`` subprocesses."""
from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=2, num_classes=10)

RULES = """version = 1
[[rule]]
pattern = "self_attention"
operator = "mha"
select = { preset = "paper-50" }
options = { init = "fresh" }
[[rule]]
pattern = "mlp"
operator = "mlp"
select = { preset = "paper-50" }
options = { ratio = 3 }
"""


def tiny_digits_dit():
    """The tiny digits-shaped DiT, seeded, with random non-zero adaLN so no block is an identity."""
    from graftfx.models import DiT, DiTConfig

    torch.manual_seed(0)
    m = DiT(DiTConfig(**TINY))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in m.blocks:
            b.adaLN_modulation[1].weight.copy_(torch.randn(b.adaLN_modulation[1].weight.shape, generator=g) * 0.05)
    return m.eval()


def tiny_rules():
    """RULES as Rule objects."""
    from graftfx import Rule, Select

    return [Rule("self_attention", "mha", Select(preset="paper-50"), {"init": "fresh"}),
            Rule("mlp", "mlp", Select(preset="paper-50"), {"ratio": 3})]


def make_job(folder: Path) -> Path:
    """``folder`` with the teacher (safetensors) and RULES (rules.toml)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tiny_digits_dit().state_dict(), str(folder / "teacher.safetensors"))
    (folder / "rules.toml").write_text(RULES)
    return folder
