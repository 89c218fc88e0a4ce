"""Talk to a llama.cpp rpc worker just enough to know it is there and which protocol it speaks.

libggml aborts the whole process when `ggml_backend_rpc_add_server` cannot connect, so the
coordinator (and health checks) probe each worker first with the protocol's own HELLO exchange:
the command byte, a u64 length, the client's connection capabilities (all zero: plain TCP), then
the worker's u64 length and `{major, minor, patch, pad, caps[24]}`.
"""

from __future__ import annotations

import re
import socket
import struct
from pathlib import Path

from tightwad.errors import TightwadError

RPC_CMD_HELLO = 14
CONN_CAPS_SIZE = 24
Version = tuple[int, int, int]


class WorkerUnreachable(TightwadError):
    """An rpc worker did not answer, or answered with something that is not the RPC protocol."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed during the handshake")
        data += chunk
    return data


def hello(endpoint: str, timeout: float = 3.0) -> Version:
    """The RPC protocol version a worker at `host:port` speaks."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            sock.sendall(struct.pack("<BQ", RPC_CMD_HELLO, CONN_CAPS_SIZE) + bytes(CONN_CAPS_SIZE))
            (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
            if size != 4 + CONN_CAPS_SIZE:
                raise WorkerUnreachable(f"rpc worker {endpoint} answered HELLO with {size} bytes")
            major, minor, patch = _recv_exact(sock, size)[:3]
            return major, minor, patch
    except (OSError, ValueError) as exc:
        raise WorkerUnreachable(f"rpc worker {endpoint} is unreachable ({exc})") from exc


def protocol_version(header: Path) -> Version:
    """RPC_PROTO_{MAJOR,MINOR,PATCH}_VERSION from a build's ggml-rpc.h."""
    text = header.read_text()
    parts = [re.search(rf"RPC_PROTO_{p}_VERSION\s+(\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        raise TightwadError(f"{header} does not define the RPC protocol version")
    major, minor, patch = (int(m.group(1)) for m in parts if m)
    return major, minor, patch


def compatible(ours: Version, theirs: Version) -> bool:
    """ggml's own rule: same major, and the worker's minor no newer than ours."""
    return theirs[0] == ours[0] and theirs[1] <= ours[1]
