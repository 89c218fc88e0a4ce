"""Health probes: is a unit's server there, and does it say it can serve?

An rpc worker serves ONE client at a time and its listen backlog is 1, so a connection while the
engine is attached waits in the kernel's queue, and a few such probes fill it: then nobody, not even
a restarted engine, can connect. So a local worker is judged from the socket table (listening; a
client attached) and gets a HELLO only when nobody is attached; a remote one is judged by its
container or agent, never by connecting.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tightwad.operator.observed import Health
from tightwad.operator.units import Kind, Unit
from tightwad.rpcprobe import CONN_CAPS_SIZE, RPC_CMD_HELLO

if TYPE_CHECKING:  # httpx is imported on the first probe: a dry run never probes over HTTP
    import httpx

_TCP_LISTEN = "0A"
_TCP_ESTABLISHED = "01"


@dataclass(frozen=True)
class Probe:
    health: Health
    error: str | None = None
    body: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Socket:
    local_port: int
    remote_port: int
    state: str
    rx_queue: int


def _sockets() -> Iterator[_Socket]:
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 5:
                continue
            local, remote, state, queues = fields[1], fields[2], fields[3], fields[4]
            rx = int(queues.split(":")[1], 16)
            yield _Socket(int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state, rx)


def local_worker(address: str, port: int, expected: tuple[int, int, int] | None = None) -> Probe:
    """A worker on this machine (or in a host-network container on it)."""
    sockets = [s for s in _sockets() if s.local_port == port]
    listening = [s for s in sockets if s.state == _TCP_LISTEN]
    if not listening:
        return Probe(Health.STARTING, f"nothing listens on port {port} yet")
    if any(s.state == _TCP_ESTABLISHED for s in sockets) or any(s.rx_queue for s in listening):
        return Probe(Health.OK, body={"busy": True})  # a client (the engine) is attached
    try:
        version = hello(address, port)
    except TimeoutError:
        return Probe(Health.OK, body={"busy": True})  # someone attached between the two looks
    except OSError as exc:
        return Probe(Health.STARTING, f"rpc worker {address}:{port}: {exc}")
    if expected is not None and (version[0] != expected[0] or version[1] > expected[1]):
        theirs, ours = ".".join(map(str, version)), ".".join(map(str, expected))
        return Probe(
            Health.FAILING,
            f"rpc worker speaks protocol {theirs}, the engine {ours}; run one llama.cpp build everywhere",
        )
    return Probe(Health.OK, body={"version": list(version)})


def hello(address: str, port: int, timeout: float = 1.0) -> tuple[int, int, int]:
    """The protocol version a worker reports; TimeoutError when it is busy with another client."""
    with socket.create_connection((address.strip("[]"), port), timeout=timeout) as sock:
        sock.sendall(struct.pack("<BQ", RPC_CMD_HELLO, CONN_CAPS_SIZE) + bytes(CONN_CAPS_SIZE))
        data = b""
        while len(data) < 8 + 3:
            chunk = sock.recv(64)
            if not chunk:
                raise ConnectionError("closed during HELLO")
            data += chunk
        return data[8], data[9], data[10]


# Where each HTTP kind says how it is, and what a 503 from it means.
_HTTP_PATHS = {
    Kind.ENGINE: "/health",
    Kind.DRAFTER: "/health",
    Kind.ROUTER: "/_tightwad/health",  # open; /_tightwad/route needs the token
    Kind.PROXY: "/health",
    Kind.SWARM: "/swarm/v1/health",
}


def http_path(unit: Unit) -> str:
    if unit.kind is Kind.PROXY and unit.spec.get("impl") == "router":
        return _HTTP_PATHS[Kind.ROUTER]
    return _HTTP_PATHS[unit.kind]


_client: httpx.Client | None = None
_client_lock = threading.Lock()


def _http() -> httpx.Client:
    """One pooled client for every probe: a new connection per probe per second adds up."""
    import httpx

    global _client
    with _client_lock:
        if _client is None:
            _client = httpx.Client(limits=httpx.Limits(max_keepalive_connections=32))
        return _client


def http_unit(unit: Unit, timeout: float = 2.0) -> Probe:
    """An HTTP server's own verdict. A 503 while loading (llama-server) is STARTING; from the
    engine, which only listens once loaded, it is FAILING (e.g. it lost a worker)."""
    # With the token an engine's /health says which worker failed; without it, only that one did.
    import httpx

    token = unit.secrets.get("TIGHTWAD_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = _http().get(unit.url + http_path(unit), timeout=timeout, headers=headers)
    except httpx.TimeoutException:
        return Probe(Health.FAILING, "health check timed out")
    except httpx.HTTPError:
        return Probe(Health.STARTING, "not answering yet")
    try:
        body = response.json() if response.content else {}
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    if response.status_code == 200:
        return Probe(Health.OK, body=body)
    if response.status_code == 503 and unit.kind is Kind.DRAFTER:
        return Probe(Health.STARTING, "loading the model")
    return Probe(Health.FAILING, _message(body) or f"HTTP {response.status_code}", body)


def _message(body: dict[str, Any]) -> str | None:
    error = body.get("error")
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    for value in (body.get("message"), error):
        if isinstance(value, str) and value:
            return value
    return None


def tcp_unit(unit: Unit, timeout: float = 1.0) -> Probe:
    try:
        with socket.create_connection((unit.address.strip("[]"), unit.port or 0), timeout=timeout):
            return Probe(Health.OK)
    except OSError as exc:
        return Probe(Health.STARTING, f"not listening yet ({exc.strerror or exc})")


def probe(unit: Unit, *, local: bool) -> Probe:
    """The verdict for `unit`, whose process or container is known to be running."""
    if unit.kind is Kind.WORKER:
        if local:
            return local_worker(unit.address, unit.port or 0)
        return Probe(Health.OK)  # remote: the container's or agent's own state is the verdict
    return http_unit(unit)
