"""docs/coverage.md is what benchmarks/coverage.py writes for the zoo: every client has its row,
and a row computed now says what the zoo tests assert (checked on the fastest model)."""
import importlib.util
from pathlib import Path

import pytest

from .zoo import CLIENTS

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("graftfx_coverage", ROOT / "benchmarks" / "coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_table_lists_every_client():
    text = (ROOT / "docs" / "coverage.md").read_text(encoding="utf-8")
    assert "benchmarks/coverage.py" in text
    for name in CLIENTS:
        assert f"| `{name}` |" in text, name


def test_a_row_says_what_the_model_has():
    if not CLIENTS["timm:vit"].available():
        pytest.skip("timm is not installed")
    gen = _generator()
    row = gen.row(gen._zoo(), "timm:vit")
    assert row["tracer"] == "fx" and row["kinds"] == {"self_attention": 2, "mlp": 2}
    assert row["diff"] < 1e-5 and row["unmatched"] == []
    assert "mha (2)" in row["applies"] and "hyena_x (2)" in row["applies"]
    assert not any(a.startswith("nat2d") for a in row["applies"])    # 17 tokens with the class token: no grid
    line = gen.render([row]).splitlines()
    assert any(l.startswith("| `timm:vit` | VisionTransformer | fx |") and "self 2, mlp 2" in l for l in line)
