"""Several hosts on one machine, for tests and benchmarks: network namespaces on a bridge, built by
scripts/netns-hosts.sh (which nothing here duplicates). Only meaningful in a checkout, as root; the
swarm tests and bench/swarm.py use it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "netns-hosts.sh"


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can (checked by making one)."""
    if not SCRIPT.is_file():
        return f"{SCRIPT} is missing (run from a tightwad checkout)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed: apt-get install iproute2"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    probe = f"twprobe{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def sweep_stale(prefix: str) -> None:
    """Delete namespace sets `PREFIX<pid>-*` left by processes that died without cleaning up."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in {m.group(1) for m in re.finditer(rf"^({re.escape(prefix)}(\d+))-", listed, re.M)}:
        pid = int(name.removeprefix(prefix))
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            subprocess.run([str(SCRIPT), "down", name], capture_output=True)


class Hosts:
    """`count` hosts NAME-1..NAME-count (uplinks capped at `rate`, and delayed by `delay` ± `jitter`
    with tc netem, when given); removed on exit."""

    def __init__(
        self,
        name: str,
        count: int,
        rate: str | None = None,
        subnet: str = "10.231.0",
        delay: str | None = None,
        jitter: str | None = None,
    ) -> None:
        self.name = name
        self.count = count
        self.rate = rate
        self.subnet = subnet
        self.delay = delay
        self.jitter = jitter
        self.hosts: list[Host] = []

    def __enter__(self) -> list[Host]:
        argv = [str(SCRIPT), "up", self.name, str(self.count), "--subnet", self.subnet]
        if self.rate:
            argv += ["--rate", self.rate]
        if self.delay:
            argv += ["--delay", self.delay, *(["--jitter", self.jitter] if self.jitter else [])]
        made = subprocess.run(argv, capture_output=True, text=True)
        if made.returncode != 0:
            raise RuntimeError(f"netns-hosts.sh up failed: {made.stderr.strip()}")
        self.hosts = [Host(*line.split()) for line in made.stdout.splitlines() if line.strip()]
        return self.hosts

    def __exit__(self, *exc: object) -> None:
        subprocess.run([str(SCRIPT), "down", self.name], capture_output=True)
