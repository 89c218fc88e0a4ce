"""A manifest of N hosts, mixed the way a lab grows (CUDA and ROCm boxes in containers, some on their
own Docker daemon, some on the operator's; Macs with Metal run by an agent; CPU servers as plain
processes on another machine, also through an agent), for the scale tests and bench/scale.py.

Deterministic: the same N gives the same document, so a figure can be reproduced.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

WORKER_PORT = 50052
TOKEN = "fleet-token"

# Four hosts in a row: what each one is. 3 of 4 hosts run Docker (the 750 in 1000).
_KINDS: tuple[tuple[str, str, bool], ...] = (
    # (backend, runtime, its own Docker endpoint)
    ("cuda", "docker", True),
    ("rocm", "docker", True),
    ("cpu", "docker", False),  # the daemon of the machine running Tightwad
    ("metal", "native", False),
)


def host_name(i: int) -> str:
    return f"h{i:05d}"


def host_address(i: int) -> str:
    # 10.0.0.0/8 without .0 or .255 in the last byte: a routable-looking, never-contacted address.
    return f"10.{i // 64516 % 254 + 1}.{i // 254 % 254 + 1}.{i % 254 + 1}"


def host_entry(i: int) -> dict[str, Any]:
    backend, runtime, own_daemon = _KINDS[i % len(_KINDS)]
    if backend == "metal" and i % 8 == 7:
        runtime = "process"  # a process host on another machine: an agent runs it too
    host: dict[str, Any] = {"name": host_name(i), "address": host_address(i), "runtime": runtime}
    if own_daemon:
        host["docker"] = {"endpoint": f"tcp://{host_address(i)}:2376"}
    gpus: list[dict[str, Any]] = [{"backend": backend, "port": WORKER_PORT}]
    if backend == "cuda" and i % 3 == 0:  # some boxes hold two cards
        gpus.append({"backend": "cuda", "index": 1, "port": WORKER_PORT + 1})
    host["gpus"] = gpus
    return host


def fleet_manifest(hosts: int, name: str = "fleet") -> dict[str, Any]:
    """A valid manifest with `hosts` hosts; the engine, a drafter and the proxy live on host 0."""
    if hosts < 1:
        raise ValueError("a fleet has at least one host")
    first = host_name(0)
    return {
        "apiVersion": "tightwad.dev/v1alpha1",
        "kind": "TightwadCluster",
        "metadata": {"name": name},
        "spec": {
            "auth": {"token": TOKEN},
            "models": [
                {"name": "target", "source": "/models/target.gguf"},
                {"name": "draft", "source": "/models/draft.gguf"},
            ],
            "hosts": [host_entry(i) for i in range(hosts)],
            "target": {"model": "target", "host": first},
            "drafters": [
                {"name": "d", "kind": "llama-server", "model": "draft", "host": first, "port": 8081}
            ],
            "proxy": {"host": first},
            "swarm": {"enabled": False},
        },
    }


def fleet_yaml(hosts: int, name: str = "fleet") -> str:
    """The manifest as YAML in block style, as a person (or a generator of theirs) would write it."""
    return yaml.safe_dump(fleet_manifest(hosts, name), sort_keys=False, default_flow_style=False)


def write_fleet(path: Path, hosts: int, name: str = "fleet") -> Path:
    """Write the manifest to `path` the way editors do (a new file renamed over the old one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(fleet_yaml(hosts, name), encoding="utf-8")
    os.replace(tmp, path)
    return path


def edit_fraction(data: dict[str, Any], every: int = 10) -> list[str]:
    """Move the workers of every `every`-th host to other ports: a spec edit that must restart
    exactly those hosts' workers (and nothing else). Returns the edited hosts' names."""
    edited = []
    for i, host in enumerate(data["spec"]["hosts"]):
        if i % every != every - 1:
            continue
        for gpu in host["gpus"]:
            gpu["port"] += 100
        edited.append(host["name"])
    return edited
