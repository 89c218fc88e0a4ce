"""TCP ports on this machine: the socket table, who holds a port, and whether a listener can take it.

Linux hands ports 32768-60999 to outgoing connections (`net.ipv4.ip_local_port_range`), so a
server whose port lies there can find it taken by some unrelated client; Tightwad assigns ports
below that range, and before a unit starts on this machine it checks its port and names the holder.
Reading other processes' file descriptors needs the same user or root; without that the holder is
reported as unknown, never guessed.
"""

from __future__ import annotations

import errno
import os
import random
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

EPHEMERAL_START = 32768  # the kernel's default lower bound for outgoing connections' ports
TCP_LISTEN = "0A"
TCP_ESTABLISHED = "01"

_PROC = Path("/proc")


@dataclass(frozen=True)
class Socket:
    """One line of /proc/net/tcp{,6}."""

    local_address: str
    local_port: int
    remote_port: int
    state: str
    rx_queue: int
    inode: int


@dataclass(frozen=True)
class Holder:
    """A process that has a socket on a port."""

    pid: int
    name: str

    def __str__(self) -> str:
        return f"pid {self.pid}, {self.name}"


def parse_socket_table(text: str) -> Iterator[Socket]:
    """The sockets of one /proc/net/tcp or tcp6 file (pure: tests feed it text)."""
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        local, remote, state, queues = fields[1], fields[2], fields[3], fields[4]
        address, port = local.rsplit(":", 1)
        yield Socket(
            local_address=_address(address),
            local_port=int(port, 16),
            remote_port=int(remote.rsplit(":", 1)[1], 16),
            state=state,
            rx_queue=int(queues.split(":")[1], 16),
            inode=int(fields[9]),
        )


def _address(hex_address: str) -> str:
    """/proc/net/tcp writes addresses as host-order 32-bit words in hex."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        return socket.inet_ntop(socket.AF_INET, words)
    if words[:12] == b"\0" * 10 + b"\xff\xff":  # an IPv4-mapped IPv6 address
        return socket.inet_ntop(socket.AF_INET, words[12:])
    return socket.inet_ntop(socket.AF_INET6, words)


def sockets() -> Iterator[Socket]:
    """Every TCP socket on this machine (this network namespace)."""
    for name in ("net/tcp", "net/tcp6"):
        try:
            text = (_PROC / name).read_text()
        except OSError:
            continue
        yield from parse_socket_table(text)


def _overlaps(bound: str, host: str) -> bool:
    wildcard = ("0.0.0.0", "::")
    return bound == host or bound in wildcard or host in wildcard


def sockets_on(host: str, port: int, table: Iterable[Socket] | None = None) -> list[Socket]:
    """The sockets whose local end is `port` on an address that conflicts with binding `host`."""
    return [
        s
        for s in (sockets() if table is None else table)
        if s.local_port == port and _overlaps(s.local_address, host)
    ]


def holders(inodes: set[int]) -> list[Holder]:
    """The processes whose open file descriptors include one of these socket inodes."""
    wanted = {f"socket:[{inode}]" for inode in inodes}
    found: list[Holder] = []
    for proc in _PROC.iterdir():
        if not proc.name.isdigit():
            continue
        if not wanted.isdisjoint(_fd_targets(proc)):
            try:
                name = (proc / "comm").read_text().strip()
            except OSError:
                name = "?"
            found.append(Holder(int(proc.name), name))
    return sorted(found, key=lambda holder: holder.pid)


def _fd_targets(proc: Path) -> set[str]:
    try:
        fds = list((proc / "fd").iterdir())
    except OSError:
        return set()  # gone, or not ours to read
    targets = set()
    for fd in fds:
        try:
            targets.add(os.readlink(fd))
        except OSError:
            continue  # closed while we looked
    return targets


def can_listen(host: str, port: int) -> bool:
    """Whether a server could bind host:port right now (as servers do, with SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            if exc.errno == errno.EADDRNOTAVAIL:
                return True  # not this machine's address: nothing holds it here; the server says why
            raise
    return True


def free_port_below_ephemeral(host: str = "127.0.0.1", low: int = 20000) -> int:
    """A port nothing holds now, outside the range the kernel gives to outgoing connections (for
    tests and ad-hoc runs: a listener there cannot later lose its port to a client)."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(low, EPHEMERAL_START)
        if can_listen(host, port):
            return port
    raise OSError(errno.EADDRINUSE, f"no free port on {host} between {low} and {EPHEMERAL_START}")


def in_use(host: str, port: int) -> str | None:
    """None when host:port can be listened on; otherwise the plain sentence that says who holds it:
    `port 50152 on 127.0.0.1 is in use (held by pid 4242, kube-apiserver)`."""
    if can_listen(host, port):
        return None
    found = holders({s.inode for s in sockets_on(host, port) if s.inode})
    who = "; ".join(map(str, found)) if found else "by a process this user cannot see"
    prefix = "held by " if found else "held "
    return f"port {port} on {host} is in use ({prefix}{who})"
