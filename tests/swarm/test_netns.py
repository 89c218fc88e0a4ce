"""The swarm across hosts that are network namespaces (scripts/netns-hosts.sh), with capped uplinks:
peers find each other through the origin's tracker, trade pieces, and every request carries the token
because namespace addresses are beyond loopback. Skipped only when namespaces cannot be created."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.procs import Processes
from support.synth import random_file
from support.testnet import Host, Hosts, namespaces_unavailable, sweep_stale

pytestmark = pytest.mark.system  # needs root and network namespaces

MIB = 1024 * 1024
SIZE = 16 * MIB
RATE_BYTES = 50e6 / 8  # 50mbit
PORT = 8089
TOKEN = {"TIGHTWAD_TOKEN": "netns-test-token"}


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "tightwad.swarm.cli", *map(str, args)]


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(f"network namespaces are unavailable here: {reason}")
    sweep_stale("tws")
    with Hosts(f"tws{os.getpid()}", 3, rate="50mbit", subnet="10.233.0") as made:
        yield made


def test_hosts_share_pieces_through_the_tracker_with_the_token(
    hosts: list[Host], processes: Processes, tmp_path: Path
) -> None:
    origin, *peers = hosts
    (tmp_path / "origin").mkdir()
    file = random_file(tmp_path / "origin" / "model.bin", SIZE, seed=9)
    sha = hashlib.sha256(file.read_bytes()).hexdigest()
    url = f"http://{origin.address}:{PORT}"

    # A namespace address is beyond loopback: no token, no server.
    refused = subprocess.run(
        origin.command(cli("seed", file, "--bind", origin.address, "--port", PORT)),
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "TIGHTWAD_TOKEN"},
    )
    assert refused.returncode == 1 and "beyond loopback" in refused.stderr

    seed = cli("seed", file, "--bind", origin.address, "--port", PORT, "--piece-size", "256KiB")
    _, log = processes.start("origin", origin.command(seed), TOKEN)
    wait_until(lambda: "seeding" in log.read_text(), 60, "the origin")
    status = subprocess.run(
        peers[0].command(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{url}/swarm/v1/files"]),
        capture_output=True,
        text=True,
    )
    assert status.stdout == "401"

    pulls = []
    for i, host in enumerate(peers):
        argv = cli(
            "pull", sha, "--peer", url, "--tracker", url, "--dir", tmp_path / f"peer{i}",
            "--serve", f"{host.address}:{PORT}", "--linger", -1, "--json", "--refresh", 0.3,
            "--events", tmp_path / f"peer{i}.events",
        )  # fmt: skip
        pulls.append(processes.start(f"peer{i}", host.command(argv), TOKEN))
    began = time.monotonic()

    def reports() -> list[dict[str, Any]]:
        found = []
        for _, out in pulls:
            lines = [line for line in out.read_text().splitlines() if line.startswith("{")]
            found += [json.loads(lines[-1])] if lines else []
        return found

    wait_until(lambda: len(reports()) == len(peers), 90, "both peers")
    elapsed = time.monotonic() - began
    done = reports()
    for i in range(len(peers)):
        assert hashlib.sha256((tmp_path / f"peer{i}" / "model.bin").read_bytes()).hexdigest() == sha
    from_origin = sum(r["peers"][url]["bytes"] for r in done if url in r["peers"])
    from_peers = sum(p["bytes"] for r in done for u, p in r["peers"].items() if u != url)
    assert (
        from_peers > 0 and from_origin < 2 * SIZE
    )  # the peers traded pieces instead of both asking the origin
    assert elapsed > 0.8 * from_origin / RATE_BYTES  # the origin's uplink really is capped
