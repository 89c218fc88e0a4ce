"""Who holds a port: the socket table, the holder's pid and name, and the sentence a user reads."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tightwad import ports

SAMPLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:C3E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 51234 1
   1: 0100007F:D0F8 0100007F:0979 01 00000000:00000003 00:00000000 00000000     0        0 51240 1
"""


def test_the_socket_table_is_read_as_the_kernel_writes_it() -> None:
    listening, connected = ports.parse_socket_table(SAMPLE)
    assert (listening.local_address, listening.local_port, listening.state) == ("127.0.0.1", 50152, "0A")
    assert listening.inode == 51234
    assert (connected.local_port, connected.remote_port, connected.rx_queue) == (53496, 2425, 3)
    assert ports.sockets_on("0.0.0.0", 50152, [listening, connected]) == [listening]
    assert ports.sockets_on("10.0.0.1", 50152, [listening, connected]) == []


@pytest.fixture
def listener() -> Iterator[int]:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_a_listening_port_names_its_holder(listener: int) -> None:
    comm = Path(f"/proc/{os.getpid()}/comm").read_text().strip()
    assert ports.in_use("127.0.0.1", listener) == (
        f"port {listener} on 127.0.0.1 is in use (held by pid {os.getpid()}, {comm})"
    )


def test_an_outgoing_connection_holding_the_port_is_found_too(listener: int) -> None:
    """The case that bit users: a client was handed the port a worker wanted to listen on."""
    with socket.socket() as client:
        client.bind(("127.0.0.1", 0))
        port = int(client.getsockname()[1])
        client.connect(("127.0.0.1", listener))
        assert not ports.can_listen("127.0.0.1", port)
        message = ports.in_use("127.0.0.1", port)
        assert message is not None and message.startswith(f"port {port} on 127.0.0.1 is in use (held by pid ")


def test_a_restarted_server_can_take_its_port_back_while_old_connections_linger() -> None:
    """Connections the old server closed sit in TIME_WAIT on its port; they must not count as taken."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = int(server.getsockname()[1])
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            accepted.close()  # the server closes first: its side goes to TIME_WAIT
            client.recv(1)
    assert ports.in_use("127.0.0.1", port) is None


def test_a_free_port_is_free() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    assert ports.in_use("127.0.0.1", port) is None
