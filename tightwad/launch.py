"""How the llama.cpp processes of a pool are started and waited for.

Command builders are pure (unit-testable, reused by every driver); the waits are the only I/O.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from tightwad.errors import TightwadError
from tightwad.toolchain import Toolchain


class StartupError(TightwadError):
    """A process did not come up; the message says which and where its log is."""


def rpc_worker_command(
    toolchain: Toolchain,
    port: int,
    bind: str = "127.0.0.1",
    threads: int | None = None,
    device: str | None = None,
) -> list[str]:
    """One `ggml-rpc-server` serving one device (a GPU, or this host's CPU) to the coordinator.

    rpc workers have no authentication: bind them to loopback or a trusted network only.
    """
    cmd = [str(toolchain.rpc_server), "--host", bind, "--port", str(port)]
    if threads:
        cmd += ["--threads", str(threads)]
    if device:
        cmd += ["--device", device]
    return cmd


def llama_server_command(
    toolchain: Toolchain,
    model: Path,
    port: int,
    bind: str = "127.0.0.1",
    ctx_size: int = 2048,
    rpc: Sequence[str] = (),
    threads: int | None = None,
    parallel: int = 1,
    extra: Sequence[str] = (),
) -> list[str]:
    """`llama-server` for a drafter, or for the pool before our engine serves it."""
    cmd = [
        str(toolchain.llama_server),
        "--model", str(model),
        "--host", bind,
        "--port", str(port),
        "--ctx-size", str(ctx_size),
        "--parallel", str(parallel),
        "--no-webui",
    ]  # fmt: skip
    if rpc:
        cmd += ["--rpc", ",".join(rpc), "--n-gpu-layers", "999"]
    if threads:
        cmd += ["--threads", str(threads)]
    return [*cmd, *extra]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for tests and ad-hoc runs)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _exited(process: subprocess.Popen[bytes] | None, what: str, log: Path | None) -> None:
    if process is not None and process.poll() is not None:
        tail = ""
        if log and log.exists():
            tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise StartupError(f"{what} exited with code {process.returncode}{tail}")


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 30.0,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Wait until something accepts TCP connections on host:port (or the process dies)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _exited(process, f"the process for {host}:{port}", log)
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise StartupError(f"nothing listened on {host}:{port} after {timeout:.0f}s")


def wait_for_http(
    url: str,
    timeout: float = 120.0,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Wait until GET url answers 200 (llama-server answers 503 while it loads the model)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        _exited(process, f"the server behind {url}", log)
        try:
            response = httpx.get(url, timeout=2.0)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    raise StartupError(f"{url} was not ready after {timeout:.0f}s (last: {last})")
