"""Make ``graftfx.kernels`` and ``graftfx.rewrites`` importable from a source checkout.

An installed graftfx (wheel or editable) maps them through ``package_dir``; a bare checkout on
``sys.path`` does not, so this finder maps exactly those two names onto the sibling folders.
It is appended to ``sys.meta_path``: any real installation wins. Nothing else becomes
importable, and the repository root never goes on ``sys.path``.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
_FOLDERS = {"graftfx.kernels": _ROOT / "kernels", "graftfx.rewrites": _ROOT / "rewrites"}


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        folder = _FOLDERS.get(fullname)
        if folder is None or not (folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def install() -> None:
    if not any(isinstance(f, _SourceTreeFinder) for f in sys.meta_path):
        sys.meta_path.append(_SourceTreeFinder())
