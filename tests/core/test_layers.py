"""The dependency rule: components (engine, proxy, swarm, operator) depend on the core, never the
reverse. The core's command line reaches them by module name only (importlib), so importing any core
module loads no component."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from support import ROOT

COMPONENTS = ("tightwad.engine", "tightwad.proxy", "tightwad.swarm", "tightwad.operator")
CORE = sorted((ROOT / "tightwad").glob("*.py"))


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_the_core_imports_no_component(path: Path) -> None:
    found = sorted(n for n in _imports(path) if n.startswith(COMPONENTS) or n == "tightwad.operator")
    assert not found, f"tightwad/{path.name} imports {', '.join(found)}: move that code into the component"
