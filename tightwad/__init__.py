"""Tightwad: one OpenAI-compatible endpoint over a pool of mismatched hardware."""

import importlib.machinery as _machinery
import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path

__version__ = "0.1.0"

# tightwad.operator lives in the top-level `operator/` folder, which deliberately has no
# __init__.py: with the repository root on sys.path (`python -m ...` run there) a bare
# `import operator` must still find the standard library. setuptools' editable finder cannot map a
# namespace folder below a regular package, so in a source checkout it is registered here; an
# installed wheel has tightwad/operator/ inside the package and needs nothing.
_operator_dir = _Path(__file__).resolve().parent.parent / "operator"
if not (_Path(__file__).parent / "operator").exists() and (_operator_dir / "README.md").exists():
    _spec = _machinery.ModuleSpec(f"{__name__}.operator", None, is_package=True)
    _spec.submodule_search_locations = [str(_operator_dir)]
    _sys.modules[_spec.name] = operator = _util.module_from_spec(_spec)
