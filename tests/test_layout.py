"""The three import names, and never a top-level ``kernels`` from this repository."""
import importlib.util
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_names_map_to_folders():
    import graftfx
    import graftfx.kernels
    import graftfx.rewrites

    assert Path(graftfx.__file__).parent == ROOT / "graftfx"
    assert Path(graftfx.kernels.__file__).parent == ROOT / "kernels"
    assert Path(graftfx.rewrites.__file__).parent == ROOT / "rewrites"
    assert graftfx.kernels.__name__ == "graftfx.kernels"


def test_no_top_level_kernels_from_this_repo():
    spec = importlib.util.find_spec("kernels")
    if spec is not None and spec.origin:
        assert ROOT not in Path(spec.origin).resolve().parents, "repo root leaked onto sys.path"


def test_sources_never_import_top_level_kernels():
    offenders = []
    for path in list(ROOT.glob("graftfx/**/*.py")) + list(ROOT.glob("kernels/**/*.py")) + list(ROOT.glob("rewrites/**/*.py")):
        for line in path.read_text().splitlines():
            s = line.strip()
            if s.startswith("import kernels") or s.startswith("from kernels"):
                offenders.append(f"{path}: {s}")
    assert not offenders, offenders


@pytest.mark.slow
def test_wheel_contains_and_imports_the_three_names(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("graftfx-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "graftfx/kernels/__init__.py" in names
    assert "graftfx/registry.py" in names and "graftfx/rewrites/operators/swa.py" in names
    assert any(n.startswith("graftfx/rewrites/rules/") and n.endswith(".toml") for n in names)
    assert not any(n.startswith("kernels/") for n in names), "a top-level kernels package in the wheel"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in type(f).__name__ "
            "and '__editable__' not in type(f).__module__]; "
            "import graftfx, graftfx.kernels, graftfx.rewrites; "
            "print(graftfx.__file__); print(graftfx.kernels.__file__); print(graftfx.rewrites.__file__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    for line in res.stdout.split():
        assert line.startswith(str(site)), res.stdout


def test_readme_layout_table_matches_the_folders():
    text = (ROOT / "README.md").read_text(encoding="utf-8").split("## Layout", 1)[1]
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    listed = {p.strip("/") for row in rows for p in re.findall(r"`([^`]+)`", row.split("|")[1])}
    for path in listed:
        assert (ROOT / path).exists(), f"README's layout table lists {path}, which does not exist"
    inside = {f"graftfx/{p.name}" for p in (ROOT / "graftfx").iterdir()
              if (p.is_dir() and (p / "__init__.py").exists())
              or (p.suffix == ".py" and not p.name.startswith("_"))}
    missing = sorted(inside - listed)
    assert not missing, f"README's layout table does not list {missing}"
    assert {"kernels", "rewrites", "benchmarks", "docs"} <= listed
