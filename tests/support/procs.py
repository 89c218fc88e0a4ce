"""Real processes for tests: started with their output in log files, always reaped."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tightwad.launch import free_port, rpc_worker_command, wait_for_port
from tightwad.toolchain import Toolchain


class Processes:
    """Starts real processes with their output in log files and kills them all at teardown."""

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
            )
        self.running.append(process)
        return process, log

    def stop_all(self) -> None:
        for process in self.running:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.running:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def start_rpc_workers(procs: Processes, toolchain: Toolchain, count: int) -> list[str]:
    """`count` real ggml-rpc-server workers on loopback; returns their host:port endpoints."""
    endpoints = []
    for _ in range(count):
        port = free_port()
        process, log = procs.start(f"rpc-{port}", rpc_worker_command(toolchain, port, threads=1))
        wait_for_port("127.0.0.1", port, process=process, log=log)
        endpoints.append(f"127.0.0.1:{port}")
    return endpoints
