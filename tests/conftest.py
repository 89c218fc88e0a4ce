"""Shared fixtures: the real toolchain, the real models, and real processes that are always reaped."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest
from support import ROOT, leftovers
from support.engines import INVARIANT_ENGINE, EngineProcess, LocalDrafter, start_engine
from support.procs import Processes

from tightwad import toolchain as toolchain_module
from tightwad.toolchain import Toolchain


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_subreaper] = leftovers.become_subreaper()
    # A runner that is told to stop (a CI time limit, `kill`) still tears every fixture down, so
    # what the tests started stops with them: SIGTERM becomes the interrupt pytest cleans up after.
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Whatever needs the pinned llama.cpp build or the real models is an integration test, however
    # it gets there (through another fixture, say).
    for item in items:
        if {"toolchain", "fetched_models"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Every fixture has been torn down by now: anything the suite started that still runs leaked."""
    if not session.config.stash.get(_subreaper, False) or hasattr(session.config, "workerinput"):
        return
    found = leftovers.leftovers_after(grace=5.0)
    if not found:
        return
    lines = "\n".join(f"  {leftover}" for leftover in found)
    session.config.get_terminal_writer().line(
        f"\nerror: {len(found)} process(es) started by the tests outlived them (now killed):\n{lines}",
        red=True,
    )
    leftovers.end(found)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


_subreaper = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def _kernel_mode_is_restored() -> Iterator[None]:
    """`tightwad engine`'s main sets GGML_CPU_EXACT for its own process (stock kernels unless
    `--exact on`); a test that runs it in this process must not switch the kernels of every engine
    later tests build here (ggml reads the variable whenever a context makes its CPU backend)."""
    before = os.environ.get("GGML_CPU_EXACT")
    yield
    if before is None:
        os.environ.pop("GGML_CPU_EXACT", None)
    else:
        os.environ["GGML_CPU_EXACT"] = before


@pytest.fixture(scope="session")
def docker_endpoint() -> Iterator[str]:
    """Our own dockerd (scripts/start-dockerd.sh), for this session only: stopped at the end, its
    containers with it, so nothing the suite started outlives it. Missing: a failure."""
    script = str(ROOT / "scripts" / "start-dockerd.sh")
    out = subprocess.run([script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"could not start dockerd: {out.stderr}"
    yield out.stdout.strip().splitlines()[-1]
    subprocess.run([script, "stop"], capture_output=True, text=True, timeout=120, check=False)


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


@pytest.fixture(scope="session")
def session_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    procs = Processes(tmp_path_factory.mktemp("session-procs"))
    yield procs
    procs.stop_all()


@pytest.fixture(scope="session")
def local_engine(toolchain: Toolchain, session_processes: Processes) -> EngineProcess:
    """One real engine process on the F32 SmolLM2 target (local CPU), shared by the engine tests."""
    from tightwad import models

    # n_batch 128: long prompts take several chunks without costing long prompts' time.
    return start_engine(
        session_processes,
        models.resolve("smollm2-135m-f32"),
        parallel=8,
        ctx=4096,
        extra=["--batch", "128", *INVARIANT_ENGINE],
        name="local-engine",
    )


@pytest.fixture(scope="session")
def drafter(toolchain: Toolchain) -> Iterator[LocalDrafter]:
    """The Q4_1 SmolLM2 draft model, in this process."""
    from tightwad import models

    d = LocalDrafter(models.resolve("smollm2-135m-q4_1"))
    yield d
    d.close()
