"""Shared fixtures: the real toolchain, the real models, and real processes that are always reaped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import Processes

from tightwad import toolchain as toolchain_module
from tightwad.toolchain import Toolchain


@pytest.fixture(scope="session")
def toolchain() -> Toolchain:
    """The pinned llama.cpp build. `make test` builds it first; a missing one is a failure, not a
    skip, so CI can never pass without running the real thing."""
    return toolchain_module.find()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()


@pytest.fixture(scope="module")
def module_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    procs = Processes(tmp_path_factory.mktemp("procs"))
    yield procs
    procs.stop_all()
