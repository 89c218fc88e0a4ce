"""A unit that cannot start says why, in words a user can act on.

The real process driver runs the real `ggml-rpc-server`. A port held by someone else is refused
before the start, naming the holder; a server that exits during start-up is a failure whatever its
exit code (ggml-rpc-server exits 0 when it cannot listen), and its status shows the log line that
says what went wrong, not the last line. `tightwad up` refuses to start anything when a port it
needs is taken, with one line naming the port and what holds it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from support.plans import desired
from support.procs import default_signals
from support.reconcile import local_manifest, write_manifest

from tightwad.operator.modelcheck import ModelChecker
from tightwad.operator.observed import Health, UnitState
from tightwad.operator.process import ProcessDriver
from tightwad.operator.reconcile import pinned_binaries
from tightwad.operator.units import Unit
from tightwad.toolchain import Toolchain

pytestmark = pytest.mark.integration


@pytest.fixture
def driver(toolchain: Toolchain, tmp_path: Path) -> Iterator[ProcessDriver]:
    d = ProcessDriver(tmp_path / "state", ModelChecker(tmp_path), pinned_binaries(), stop_timeout=5)
    yield d
    d.stop_all()
    d.close()


@pytest.fixture
def held_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def worker(**spec: object) -> Unit:
    unit = desired().units[0]
    assert unit.name == "worker-box-0"
    return replace(unit, spec={**unit.spec, **spec})


def settled(driver: ProcessDriver, name: str, timeout: float = 20.0) -> UnitState:
    deadline = time.monotonic() + timeout
    while True:
        state = driver.observe(time.time())[name]
        if not state.running or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def test_a_unit_whose_port_is_taken_reports_the_holder(driver: ProcessDriver, held_port: int) -> None:
    unit = worker(port=held_port)
    driver.start(unit, "created")
    state = settled(driver, unit.name)
    assert not state.running and state.health is Health.DOWN
    comm = Path(f"/proc/{os.getpid()}/comm").read_text().strip()
    assert state.error == f"port {held_port} on 127.0.0.1 is in use (held by pid {os.getpid()}, {comm})"


def test_a_worker_that_exits_0_at_start_up_is_failed_with_its_real_error_line(driver: ProcessDriver) -> None:
    # An address that is not this machine's: the real ggml-rpc-server cannot listen, says so, prints
    # one more line, and exits with code 0.
    unit = worker(bind="192.0.2.1")
    driver.start(unit, "created")
    state = settled(driver, unit.name)
    assert not state.running and state.health is Health.DOWN
    assert state.exit_code == 0
    assert state.error == "Failed to create server socket"


def test_up_refuses_to_start_when_a_port_it_needs_is_taken(tmp_path: Path, held_port: int) -> None:
    data = local_manifest("porttaken")
    data["spec"]["proxy"]["port"] = held_port
    manifest = tmp_path / "cluster.yaml"
    write_manifest(manifest, data)
    done = subprocess.run(
        [sys.executable, "-m", "tightwad.cli", "up", str(manifest)],
        env={**os.environ, "TIGHTWAD_STATE_DIR": str(tmp_path / "state")},
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=default_signals,
    )
    assert done.returncode == 1, done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert error, done.stderr
    assert f"proxy: port {held_port} on 127.0.0.1 is in use (held by pid {os.getpid()}," in error[0]
    assert "stop that process or choose another port" in done.stderr
    assert "start " not in done.stderr  # nothing was started
    assert not list((tmp_path / "state").rglob("units/*.json"))
