"""A FULL Kubernetes control plane for the end-to-end tests, with no container engine.

`start` runs scripts/start-full-kube.sh: etcd, kube-apiserver, kube-controller-manager and
kube-scheduler (Kubernetes 1.20, built by scripts/build-full-kube.sh; `make kube` builds it before
the tests, and a missing build is a test failure, never a skip), and one kubemark hollow node per
host: the real kubelet with a fake container runtime. Deployments get ReplicaSets and Pods, the
scheduler places them, the kubelet reports them Running and Ready; nothing runs inside them and
their IP is made up. GPU nodes get their `nvidia.com/gpu` / `amd.com/gpu` capacity the way a device
plugin would advertise it, through the node's status.

Kubernetes 1.20 ignores CRD CEL rules, so the CRD validation tests stay on the current
apiextensions-apiserver (support/kubeapi.py).
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from . import ROOT

START = ROOT / "scripts" / "start-full-kube.sh"


@dataclass(frozen=True)
class HollowNode:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    gpus: Mapping[str, int] = field(default_factory=dict)  # extended resource -> count
    cpus: int | None = None  # None: kubemark's default machine, 1 CPU and 3.75 GiB
    memory: int | None = None  # bytes

    def spec(self) -> str:
        """start-full-kube.sh's NAME[:LABELS[:CPUS:MEMORY]]."""
        labels = ",".join(f"{k}={v}" for k, v in self.labels.items())
        size = f":{self.cpus}:{self.memory}" if self.cpus and self.memory else ""
        return f"{self.name}:{labels}{size}"


@dataclass(frozen=True)
class FullKube:
    folder: Path
    kubeconfig: Path
    url: str

    @property
    def pki(self) -> Path:
        return self.folder / "pki"

    def _ssl(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        context.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return context

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """One API call as the cluster admin (for setting up; the operator uses its own token)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=10, context=self._ssl()) as response:
            return json.loads(response.read() or b"{}")

    def advertise_gpus(self, node: HollowNode) -> None:
        """What a device plugin does: the node's capacity and allocatable gain its GPUs."""
        if not node.gpus:
            return
        resources = {name: str(count) for name, count in node.gpus.items()}
        self.request(
            "PATCH",
            f"/api/v1/nodes/{node.name}/status",
            {"status": {"capacity": resources, "allocatable": resources}},
            "application/strategic-merge-patch+json",
        )

    def tool(self, binary: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """helm or kubectl against this control plane, as the admin; fails the test on an error."""
        result = subprocess.run(
            [binary, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={"KUBECONFIG": str(self.kubeconfig), "HOME": str(self.folder), "PATH": "/usr/bin:/bin"},
        )
        if result.returncode != 0:
            pytest.fail(f"{Path(binary).name} {' '.join(args)} failed:\n{result.stderr}", pytrace=False)
        return result


def start(folder: Path, nodes: Sequence[HollowNode]) -> FullKube:
    result = subprocess.run(
        [str(START), str(folder), *(node.spec() for node in nodes)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    if result.returncode != 0:
        pytest.fail(
            "could not start the full Kubernetes control plane (build it with `make kube` or "
            f"scripts/build-full-kube.sh):\n{result.stderr}",
            pytrace=False,
        )
    kube = FullKube(
        folder, Path(result.stdout.strip().splitlines()[-1]), (folder / "apiserver.url").read_text().strip()
    )
    for node in nodes:
        kube.advertise_gpus(node)
    return kube


def stop(folder: Path) -> None:
    subprocess.run([str(START), "--stop", str(folder)], check=False, timeout=120)


def token_for(kube: FullKube, namespace: str, service_account: str) -> str:
    """A token of the ServiceAccount (TokenRequest API): what the operator's pod would mount."""
    review = kube.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600},
        },
    )
    return str(review["status"]["token"])


def kubeconfig_for_token(kube: FullKube, token: str, path: Path) -> Path:
    """A kubeconfig that authenticates with `token` only: RBAC decides what it may do."""
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "full-kube",
                        "cluster": {"server": kube.url, "certificate-authority": str(kube.pki / "ca.crt")},
                    }
                ],
                "users": [{"name": "operator", "user": {"token": token}}],
                "contexts": [{"name": "operator", "context": {"cluster": "full-kube", "user": "operator"}}],
                "current-context": "operator",
            }
        )
    )
    return path


GPU_RESOURCES = {"cuda": "nvidia.com/gpu", "rocm": "amd.com/gpu"}


def example_cluster() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "examples" / "cluster-cr.yaml").read_text())


def nodes_of(cluster: Mapping[str, Any]) -> list[HollowNode]:
    """A node per `runtime: kubernetes` host, named like it, with its labels and its GPUs, and as
    big as what the host lends (its CPU devices' threads and memory) plus ROOM for the system and
    the node's other pods."""
    nodes = []
    for host in cluster["spec"]["hosts"]:
        if host.get("runtime") != "kubernetes":
            continue
        gpus: dict[str, int] = {}
        cpus, memory = ROOM_CPUS, ROOM_MEMORY
        for gpu in host.get("gpus", []):
            if gpu["backend"] in GPU_RESOURCES:
                resource = GPU_RESOURCES[gpu["backend"]]
                gpus[resource] = gpus.get(resource, 0) + 1
            else:
                cpus += int(gpu.get("threads", 1))
                memory += size_bytes(gpu.get("memory", "0B"))
        nodes.append(HollowNode(host["name"], dict(host.get("labels", {})), gpus, cpus, memory))
    return nodes


ROOM_CPUS = 4
ROOM_MEMORY = 8 << 30
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def size_bytes(text: str) -> int:
    """The schema's sizes: `32GiB`, `512 MiB`, `1.5GB`."""
    match = re.fullmatch(r"([0-9.]+) ?([KMGT]i?B|B)", text.strip())
    assert match, f"not a size: {text!r}"
    return int(float(match[1]) * _UNITS[match[2]])
