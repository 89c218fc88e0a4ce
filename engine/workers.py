"""Is each rpc worker of the pool still there? Answered without disturbing the workers.

Facts this is built on (measured with the pinned build):

- `ggml-rpc-server` serves ONE client at a time and listens with a backlog of 1. While the engine is
  connected, a second connection is queued by the kernel and never answered, so the protocol's
  HELLO probe (`tightwad.rpcprobe.hello`) times out on a healthy, busy worker. It is the right check
  before loading (nobody is connected yet), never after.
- When a worker process dies, the kernel closes its end of the engine's connection at once: our socket
  leaves ESTABLISHED (CLOSE_WAIT). That is the signal used here. At attach time the engine's own
  sockets to each worker are found once (/proc/self/net/tcp + /proc/self/fd) and duplicated; a check
  then reads each socket's state with getsockopt(TCP_INFO): microseconds, no traffic, no /proc read,
  so it runs before every decode step. (Reading /proc/net/tcp costs ~1 ms here, too slow for that.)
- Where /proc is not available (not Linux), a plain TCP connect stands in: "connection refused"
  means nothing listens there any more; a connect that is queued or slow proves nothing either way.

A worker whose HOST vanishes without closing the connection (power loss, cable) is not seen here
until the next decode tries to reach it; libggml then aborts, which the engine's abort trap turns
into the same 503 (see core.py).
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


@dataclass(frozen=True)
class WorkerStatus:
    endpoint: str
    alive: bool
    detail: str

    def to_json(self) -> dict[str, object]:
        return {"endpoint": self.endpoint, "status": "ok" if self.alive else "dead", "detail": self.detail}


def _split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def _addresses(host: str) -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except OSError:
        return set()


def _decode_address(hex_address: str) -> tuple[str, int]:
    """/proc/net/tcp{,6} "0100007F:1F90" -> ("127.0.0.1", 8080); IPv4-mapped v6 becomes v4."""
    address, port = hex_address.split(":")
    raw = bytes.fromhex(address)
    # The kernel prints each 32-bit word in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        host = socket.inet_ntop(socket.AF_INET, words)
    else:
        host = socket.inet_ntop(socket.AF_INET6, words)
        if host.startswith("::ffff:") and "." in host:
            host = host.removeprefix("::ffff:")
    return host, int(port, 16)


def _proc_sockets() -> dict[int, tuple[tuple[str, int], str]] | None:
    """inode -> (remote address, state) for every TCP socket in this network namespace."""
    table: dict[int, tuple[tuple[str, int], str]] = {}
    found = False
    for name in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        found = True
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            inode = int(fields[9])
            if inode:
                table[inode] = (_decode_address(fields[2]), _TCP_STATES.get(fields[3], fields[3]))
    return table if found else None


def _own_socket_fds() -> dict[int, int]:
    """socket inode -> one of our file descriptors for it."""
    fds: dict[int, int] = {}
    try:
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                fds.setdefault(int(target[8:-1]), int(fd))
    except OSError:
        pass
    return fds


def describe_loss(dead: Sequence[WorkerStatus]) -> str:
    """What to tell a client when workers are gone (the engine cannot recover in-process)."""
    return (
        "; ".join(s.detail for s in dead)
        + ". The model's layers on that worker are gone: restart the engine once the worker is back"
    )


def connect_probe(endpoint: str, timeout: float = 1.0) -> WorkerStatus:
    """A TCP connect: refused/unreachable is dead; anything else is not evidence of death."""
    host, port = _split(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return WorkerStatus(endpoint, True, "port open")
    except OSError as exc:
        code = getattr(exc, "errno", None)
        if code in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
            return WorkerStatus(endpoint, False, f"rpc worker {endpoint} refused the connection ({exc})")
        return WorkerStatus(endpoint, True, f"no answer to a connect ({exc}); presumed busy")


class PoolMonitor:
    """Watches the engine's connections to its rpc workers. Thread-safe."""

    def __init__(self, endpoints: Sequence[str], ttl: float = 1.0) -> None:
        self.endpoints = list(endpoints)
        self.ttl = ttl
        self._sockets: dict[str, list[socket.socket]] = {}
        self._lock = threading.Lock()
        self._cached: tuple[float, list[WorkerStatus]] | None = None
        self._probed: dict[str, tuple[float, WorkerStatus]] = {}

    def attach(self) -> None:
        """Find and duplicate our sockets to each worker; call once the model is loaded."""
        table = _proc_sockets() or {}
        fds = _own_socket_fds()
        for endpoint in self.endpoints:
            host, port = _split(endpoint)
            addresses = _addresses(host)
            inodes = [
                inode
                for inode, (remote, state) in table.items()
                if inode in fds and remote[1] == port and remote[0] in addresses and state == "ESTABLISHED"
            ]
            # A duplicate shares the connection (closing it later does not close libggml's fd).
            self._sockets[endpoint] = [socket.socket(fileno=os.dup(fds[i])) for i in inodes]

    def close(self) -> None:
        for sockets in self._sockets.values():
            for sock in sockets:
                sock.close()
        self._sockets.clear()

    def check(self, max_age: float | None = None) -> list[WorkerStatus]:
        """Status of every worker, at most `max_age` (default: ttl) seconds old."""
        max_age = self.ttl if max_age is None else max_age
        now = time.monotonic()
        with self._lock:
            if self._cached and now - self._cached[0] <= max_age:
                return self._cached[1]
        statuses = [self._check_one(endpoint) for endpoint in self.endpoints]
        with self._lock:
            self._cached = (time.monotonic(), statuses)
        return statuses

    def dead(self, max_age: float | None = None) -> list[WorkerStatus]:
        return [s for s in self.check(max_age) if not s.alive]

    def _check_one(self, endpoint: str) -> WorkerStatus:
        sockets = self._sockets.get(endpoint)
        if not sockets or not hasattr(socket, "TCP_INFO"):
            # The fallback costs a connect: never more often than ttl, whatever the caller asks.
            cached = self._probed.get(endpoint)
            if cached and time.monotonic() - cached[0] < self.ttl:
                return cached[1]
            status = connect_probe(endpoint, timeout=0.3)
            self._probed[endpoint] = (time.monotonic(), status)
            return status
        states = [_socket_state(sock) for sock in sockets]
        if all(state == "ESTABLISHED" for state in states):
            return WorkerStatus(endpoint, True, "connected")
        return WorkerStatus(
            endpoint,
            False,
            f"rpc worker {endpoint} closed its connection (socket {'/'.join(states)}): "
            "the worker process exited or restarted",
        )


def _socket_state(sock: socket.socket) -> str:
    try:
        code = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except OSError:
        return "CLOSED"
    return _TCP_STATES.get(f"{code:02X}", str(code))
