"""Pool health (engine/workers.py) on plain loopback sockets standing in for rpc workers."""

from __future__ import annotations

import socket
import time

from tightwad.engine.workers import PoolMonitor, connect_probe
from tightwad.launch import free_port


def test_our_connection_is_watched_and_a_closed_peer_is_reported() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    endpoint = f"127.0.0.1:{server.getsockname()[1]}"
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    monitor = PoolMonitor([endpoint])
    try:
        monitor.attach()
        assert [(s.endpoint, s.alive, s.detail) for s in monitor.check(0)] == [(endpoint, True, "connected")]
        started = time.perf_counter()
        for _ in range(1000):
            monitor.check(0)
        assert time.perf_counter() - started < 0.5, "a check must be cheap enough for every decode step"
        peer.close()  # the worker process exits: the kernel closes its end
        time.sleep(0.05)
        (status,) = monitor.dead(0)
        assert status.endpoint == endpoint and "closed its connection" in status.detail
    finally:
        monitor.close()
        client.close()
        server.close()


def test_without_a_connection_a_refused_connect_means_dead() -> None:
    dead = f"127.0.0.1:{free_port()}"
    assert not connect_probe(dead).alive
    monitor = PoolMonitor([dead])
    monitor.attach()
    (status,) = monitor.dead(0)
    assert "refused" in status.detail


def test_health_answers_are_cached_for_the_ttl() -> None:
    dead = f"127.0.0.1:{free_port()}"
    monitor = PoolMonitor([dead], ttl=60)
    first = monitor.check()
    assert monitor.check() is first
