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

import asyncio
import contextlib
import json
import re
import ssl
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tightwad.operator.kubernetes.render import ANNOTATION_MODEL, CHECK_CONTAINER, CHECK_KIND, LABEL_KIND

from . import ROOT, kubelocal


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
    kubeconfig = kubelocal.start(
        "start-full-kube.sh",
        folder,
        [node.spec() for node in nodes],
        what="the full Kubernetes control plane",
        build="scripts/build-full-kube.sh",
        timeout=240,
    )
    kube = FullKube(folder, kubeconfig, (folder / "apiserver.url").read_text().strip())
    for node in nodes:
        kube.advertise_gpus(node)
    return kube


def stop(folder: Path) -> None:
    kubelocal.stop("start-full-kube.sh", folder)


def without_cel(node: Any) -> Any:
    """A CRD (or any part of it) without its CEL rules, which Kubernetes 1.20's schema lacks."""
    if isinstance(node, dict):
        return {k: without_cel(v) for k, v in node.items() if k != "x-kubernetes-validations"}
    if isinstance(node, list):
        return [without_cel(v) for v in node]
    return node


def install_crd(kube: FullKube) -> None:
    """The chart's TightwadCluster CRD without its CEL rules (1.20 would drop them anyway; they are
    tested on the current apiextensions-apiserver), established before this returns."""
    from tightwad.crd import PLURAL, crd

    body = without_cel(crd())
    kube.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", body)
    path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{body['metadata']['name']}"
    for _ in range(100):
        conditions = kube.request("GET", path).get("status", {}).get("conditions") or []
        if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
            return
        time.sleep(0.1)
    raise AssertionError(f"the {PLURAL} CRD was not established")


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


def nodes_of(cluster: Mapping[str, Any], gpu_share: int = 2) -> list[HollowNode]:
    """A node per `runtime: kubernetes` host, named like it, with its labels and its GPUs, each
    offered `gpu_share` times (what a device plugin with time-slicing, `replicas: 2`, advertises:
    a model swap loads the new stack beside the serving one on the same GPUs). A host
    that lends CPU threads and RAM gets a node exactly that big (a CPU host lends the machine, and
    its worker must leave room for the drafter and sidecar placed beside it); a GPU-only host gets
    ROOM for its pods."""
    nodes = []
    for host in cluster["spec"]["hosts"]:
        if host.get("runtime") != "kubernetes":
            continue
        gpus: dict[str, int] = {}
        cpus, memory = 0, 0
        for gpu in host.get("gpus", []):
            if gpu["backend"] in GPU_RESOURCES:
                resource = GPU_RESOURCES[gpu["backend"]]
                gpus[resource] = gpus.get(resource, 0) + gpu_share
            else:
                cpus += int(gpu.get("threads", 1))
                memory += size_bytes(gpu.get("memory", "0B"))
        size = (cpus, memory) if cpus and memory else (ROOM_CPUS, ROOM_MEMORY)
        nodes.append(HollowNode(host["name"], dict(host.get("labels", {})), gpus, *size))
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


@contextlib.asynccontextmanager
async def model_check_stand_in(
    kube: FullKube, namespace: str, sizes: Mapping[str, int]
) -> AsyncIterator[list[str]]:
    """The model check pods' containers, which a hollow node never runs (its fake runtime does not
    complete them): each one finishes with its model's size (`sizes`, by model name) as its
    termination message, what a kubelet reads from the container's /dev/termination-log, reported
    through the pod's status (again if the hollow kubelet reports it running meanwhile, until the
    operator has read and deleted the pod). Yields the models checked, in order."""
    checked: list[str] = []
    listing = f"/api/v1/namespaces/{namespace}/pods?labelSelector={LABEL_KIND}%3D{CHECK_KIND}"

    async def report() -> None:
        while True:
            for pod in (await asyncio.to_thread(kube.request, "GET", listing))["items"]:
                if pod["status"].get("phase") == "Succeeded" or not pod["spec"].get("nodeName"):
                    continue
                model = json.loads(pod["metadata"]["annotations"][ANNOTATION_MODEL])["model"]["name"]
                now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                ended = {"exitCode": 0, "reason": "Completed", "message": str(sizes[model])}
                container = {
                    "name": CHECK_CONTAINER,
                    "image": pod["spec"]["containers"][0]["image"],
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"terminated": {**ended, "startedAt": now, "finishedAt": now}},
                }
                path = f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}/status"
                body = {"status": {"phase": "Succeeded", "containerStatuses": [container]}}
                with contextlib.suppress(OSError):  # deleted meanwhile (urllib's HTTPError too)
                    await asyncio.to_thread(kube.request, "PATCH", path, body, "application/merge-patch+json")
                    checked.append(model)
            await asyncio.sleep(0.1)

    task = asyncio.create_task(report())
    try:
        yield checked
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
