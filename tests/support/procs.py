"""Real processes for tests: started with their output in log files, always reaped.

Each process gets its own process group, so stopping it ends everything it started too (a
supervisor's children, a shell's pipeline). Stopping is SIGTERM to the group, then SIGKILL after a
grace period. `preexec` restores the default SIGINT and SIGTERM dispositions: a test run launched
from a background job (`make test &`, nohup, some CI runners) has SIGINT ignored, and children
would inherit that.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tightwad.launch import free_port, rpc_worker_command, wait_for_port
from tightwad.toolchain import Toolchain

GRACE_SECONDS = 10.0


def default_signals() -> None:
    """In the child, before exec: the default dispositions, whatever the test runner inherited."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def stop_group(process: subprocess.Popen[bytes], grace: float = GRACE_SECONDS) -> None:
    """SIGTERM the process's group, then SIGKILL what is left of the group after `grace` seconds.

    The whole group gets the grace period, not just its leader: `make up` exits at once on SIGTERM
    while the `tightwad up` below it is still stopping its units in order."""
    _signal_group(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        process.poll()  # reap the leader, or its zombie keeps the group alive
        if not _group_alive(process.pid):
            break
        time.sleep(0.05)
    _signal_group(process.pid, signal.SIGKILL)
    process.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


class Processes:
    """Starts real processes with their output in log files and stops them all at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, cmd: Sequence[str], env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                list(cmd),
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
                preexec_fn=default_signals,
            )
        self.running.append(process)
        return process, log

    def stop_all(self) -> None:
        # Signal every group first so they wind down together, then wait for each in turn.
        for process in self.running:
            if process.poll() is None:
                _signal_group(process.pid, signal.SIGTERM)
        for process in self.running:
            stop_group(process)


def start_rpc_workers(procs: Processes, toolchain: Toolchain, count: int) -> list[str]:
    """`count` real ggml-rpc-server workers on loopback; returns their host:port endpoints."""
    endpoints = []
    for _ in range(count):
        port = free_port()
        process, log = procs.start(f"rpc-{port}", rpc_worker_command(toolchain, port, threads=1))
        wait_for_port("127.0.0.1", port, process=process, log=log)
        endpoints.append(f"127.0.0.1:{port}")
    return endpoints
