"""End to end on a FULL Kubernetes control plane (support/kubefull.py: kube-apiserver, controller
manager, scheduler, and a kubemark hollow node per Kubernetes host of examples/cluster-cr.yaml):
`helm install` the chart, run the operator with the chart's ServiceAccount and RBAC (a permission
the chart forgot fails the test), `kubectl apply -f examples/cluster-cr.yaml`, then follow it:
every rendered object created by the real API server, pods scheduled onto the right nodes (node
pinning, GPU resources), status Ready, a new target model rolled out, a bad edit refused in status,
and deletion through the finalizer and garbage collection.

Nothing runs inside the pods (the hollow kubelet's runtime is fake), so the test stands in for the
two servers the operator itself talks to: the engine router (the real one, `python -m
tightwad.operator.router`) and the Mac's rpc worker outside the cluster (a HELLO answer). The host
addresses become loopback addresses for that, nothing else of the example changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client
from support import ROOT
from support.kubefull import FullKube, example_cluster, kubeconfig_for_token, token_for
from support.procs import Processes

from tightwad.crd import PLURAL
from tightwad.operator.desired import desired_state
from tightwad.operator.kubernetes.api import Rest, connect
from tightwad.operator.kubernetes.controller import (
    MANIFEST_IN_POD,
    Operator,
    Options,
    _parser,
    settings_from,
)
from tightwad.operator.kubernetes.cr import FINALIZER, api_path, cluster_manifest
from tightwad.operator.kubernetes.lease import CoordinationLeases, LeaderElector
from tightwad.operator.kubernetes.render import ANNOTATION_UNIT, LABEL_CLUSTER, LABEL_KIND, LABEL_UNIT
from tightwad.operator.kubernetes.workloads import KubernetesWorkloads
from tightwad.operator.units import Kind

pytestmark = pytest.mark.system  # needs the Kubernetes build, etcd and helm

NS = "default"
NAME = "homelab"
KINDS = ("Pod", "Deployment", "DaemonSet", "Service", "ConfigMap")
# Each host's address, on loopback so the test can stand in for what listens there.
ADDRESSES = {"rtx4070": "127.0.0.1", "radeon": "127.0.0.3", "xeon": "127.0.0.4", "macbook": "127.0.0.2"}


def helm_binary() -> str:
    script = ROOT / "scripts" / "fetch-helm.sh"
    path = Path(subprocess.run([script, "--print-path"], capture_output=True, text=True).stdout.strip())
    assert path.is_file(), f"no helm at {path}: run `make kube`"
    return str(path)


def cluster_yaml() -> dict[str, Any]:
    body = example_cluster()
    for host in body["spec"]["hosts"]:
        host["address"] = ADDRESSES[host["name"]]
    body["spec"]["target"]["port"] = free_port()  # the router's, which the test runs on loopback
    return body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def install_chart(kube: FullKube, tmp: Path, token: str) -> None:
    """The chart as it is, but for two concessions to Kubernetes 1.20: its kubeVersion floor (1.27,
    for the CRD's CEL rules) is lowered, and the CRD goes in without those rules (helm refuses a
    field 1.20's schema lacks; 1.20 would drop them anyway). The CEL rules are tested on the current
    apiextensions-apiserver (test_kube_operator.py)."""
    chart = tmp / "tightwad"
    shutil.copytree(ROOT / "charts" / "tightwad", chart)
    meta = chart / "Chart.yaml"
    meta.write_text(meta.read_text().replace('kubeVersion: ">=1.27.0-0"', 'kubeVersion: ">=1.20.0-0"'))
    crd = without_cel(yaml.safe_load((chart / "crds" / f"{PLURAL}.yaml").read_text()))
    kube.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    kube.tool(
        helm_binary(),
        "install",
        "tightwad",
        str(chart),
        "--skip-crds",
        "--namespace",
        NS,
        "--set",
        f"token.value={token}",
        "--wait",
        "--timeout",
        "120s",
    )


def without_cel(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: without_cel(v) for k, v in node.items() if k != "x-kubernetes-validations"}
    if isinstance(node, list):
        return [without_cel(v) for v in node]
    return node


async def until(check: Callable[[], Awaitable[Any]], *, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for: {what}")
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def rpc_worker_stand_in(address: str, port: int) -> AsyncIterator[None]:
    """The Mac's ggml-rpc-server as the operator's probe sees it: a HELLO answered with a version."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await reader.readexactly(9)
            writer.write(struct.pack("<Q", 3) + bytes([3, 0, 0]))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, address, port)
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def http_stand_in(address: str, port: int) -> AsyncIterator[None]:
    """A server of the Mac's (its swarm sidecar) as a health probe sees it: 200 and an empty body."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            body = b"{}"
            head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            writer.write(head.encode() + b"connection: close\r\n\r\n" + body)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, address, port)
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


class Cluster:
    """What the admin sees through the API."""

    def __init__(self, api: client.ApiClient) -> None:
        self.rest = Rest(api)

    async def cr(self) -> dict[str, Any] | None:
        return await self.rest.get(api_path(NS, NAME))

    async def objects(self) -> dict[tuple[str, str], dict[str, Any]]:
        found = {}
        for kind in KINDS:
            for obj in await self.rest.list(kind, NS, {LABEL_CLUSTER: NAME}):
                found[(kind, obj["metadata"]["name"])] = {**obj, "kind": kind}
        return found

    async def engines(self) -> dict[str, tuple[str, bool]]:
        """Engine unit -> (its model, a pod of it Ready)."""
        labels = {LABEL_CLUSTER: NAME, LABEL_KIND: Kind.ENGINE.value}
        pods = await self.rest.list("Pod", NS, labels)
        found = {}
        for deployment in await self.rest.list("Deployment", NS, labels):
            unit = json.loads(deployment["metadata"]["annotations"][ANNOTATION_UNIT])
            own = [p for p in pods if p["metadata"]["labels"].get(LABEL_UNIT) == unit["name"]]
            found[unit["name"]] = (str(unit["spec"]["model"]), any(ready(p) for p in own))
        return found

    async def condition(self, kind: str) -> dict[str, Any]:
        obj = await self.cr() or {}
        return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})


async def explain(cluster: Cluster, operator: Operator) -> None:
    """What the cluster looked like when a step timed out: the CR's status, every object, the
    operator's last actions."""
    obj = await cluster.cr() or {}
    print("\nstatus:", json.dumps(obj.get("status"), indent=1))
    for (kind, name), found in sorted((await cluster.objects()).items()):
        phase = found.get("status", {}).get("phase", "")
        print(f"{kind}/{name} {phase} node={found.get('spec', {}).get('nodeName')}", found.get("status", {}))
    print("operator:", *operator.events[-20:], sep="\n  ")


def ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def test_kubectl_apply_of_the_example_cluster_end_to_end(
    full_kube: FullKube, tmp_path: Path, processes: Processes
) -> None:
    token = secrets.token_hex(32)
    install_chart(full_kube, tmp_path, token)
    kubectl = str(Path(helm_binary()).parent / "kubectl")

    # The operator runs here, as the chart's Deployment would run it: its arguments, its
    # ServiceAccount's token (so only the chart's RBAC lets it act), the token from the Secret.
    deployment = full_kube.request("GET", f"/apis/apps/v1/namespaces/{NS}/deployments/tightwad-operator")
    pod_spec = deployment["spec"]["template"]["spec"]
    args = _parser().parse_args(pod_spec["containers"][0]["args"])
    operator_config = kubeconfig_for_token(
        full_kube, token_for(full_kube, NS, pod_spec["serviceAccountName"]), tmp_path / "operator.kubeconfig"
    )
    assert deployment["status"].get("readyReplicas") == 2, "the chart's own operator pods: scheduled, Ready"

    cr_file = tmp_path / "cluster-cr.yaml"
    cr_file.write_text(yaml.safe_dump(cluster_yaml()))
    timings: dict[str, float] = {}

    async def scenario() -> None:
        async with (
            await connect(str(operator_config)) as operator_api,
            await connect(str(full_kube.kubeconfig)) as admin_api,
        ):
            elector = LeaderElector(
                CoordinationLeases(operator_api, args.lease_namespace, args.lease_name), "test-operator"
            )
            operator = Operator(
                operator_api,
                KubernetesWorkloads(Rest(operator_api), settings_from(args)),
                token=token,
                options=Options(namespace=args.namespace, resync=0.5),
                elector=elector,
            )
            stop = asyncio.Event()
            running = asyncio.create_task(operator.run(stop))
            try:
                await lifecycle(
                    Cluster(admin_api), operator, full_kube, kubectl, cr_file, token, processes, timings
                )
            except AssertionError:
                await explain(Cluster(admin_api), operator)
                raise
            finally:
                stop.set()
                await asyncio.wait_for(running, timeout=15)

    asyncio.run(scenario())
    print(
        "\nfull control plane: apply -> Ready {apply:.1f}s, edit -> new engine Ready {swap:.1f}s, "
        "delete -> all gone {delete:.1f}s".format(**timings)
    )


async def lifecycle(
    cluster: Cluster,
    operator: Operator,
    kube: FullKube,
    kubectl: str,
    cr_file: Path,
    token: str,
    processes: Processes,
    timings: dict[str, float],
) -> None:
    started = time.monotonic()
    kube.tool(kubectl, "apply", "-f", str(cr_file))
    created = await until(cluster.cr, what="the CR")
    desired = desired_state(cluster_manifest(created, token), manifest_path=MANIFEST_IN_POD)
    router = next(u for u in desired.units if u.kind is Kind.ROUTER)
    mac_worker = next(u for u in desired.units if u.kind is Kind.WORKER and u.host == "macbook")
    mac_swarm = next(u for u in desired.units if u.kind is Kind.SWARM and u.host == "macbook")
    processes.start(
        "router",
        [
            sys.executable,
            "-m",
            "tightwad.operator.router",
            "--host",
            router.address,
            "--port",
            str(router.port),
        ],
        env={"TIGHTWAD_TOKEN": token},
    )
    async with (
        rpc_worker_stand_in(mac_worker.address, mac_worker.port or 0),
        http_stand_in(mac_swarm.address, mac_swarm.port or 0),
    ):

        async def ready_at(generation: int) -> dict[str, Any] | None:
            obj = await cluster.cr() or {}
            status = obj.get("status", {})
            conditions = {c["type"]: c for c in status.get("conditions", [])}
            done = conditions.get("Ready", {}).get("status") == "True"
            return obj if done and status.get("observedGeneration") == generation else None

        obj = await until(lambda: ready_at(1), what="Ready=True for generation 1")
        timings["apply"] = time.monotonic() - started
        status = obj["status"]
        assert FINALIZER in obj["metadata"]["finalizers"]
        assert status["workers"] == "4/4"
        assert all(c["observedGeneration"] == 1 for c in status["conditions"])
        assert status["model"] == {"desired": "qwen2.5-32b", "serving": "qwen2.5-32b"}

        objects = await cluster.objects()
        kinds = sorted({kind for kind, _ in objects})
        assert kinds == sorted(KINDS), kinds
        await check_placement(objects)
        service = kube.request("GET", f"/api/v1/namespaces/{NS}/endpoints/{NAME}-proxy")
        assert service["subsets"][0]["addresses"], "the proxy Service has its pod as an endpoint"

        # A new target model: the new engine loads beside the old one, which serves until the new
        # one is Ready; then the router switches and the old one goes.
        started = time.monotonic()
        kube.tool(kubectl, "patch", "tightwadcluster", NAME, "--type", "merge", "-p", SWAP)
        timeline: list[dict[str, tuple[str, bool]]] = []

        async def swapped() -> dict[str, Any] | None:
            timeline.append(await cluster.engines())
            obj = await ready_at(2)  # Ready all along: the old model serves until the switch
            return obj if obj and obj["status"]["model"].get("serving") == "qwen2.5-0.5b" else None

        obj = await until(swapped, what="Ready=True for generation 2, serving the new model")
        timings["swap"] = time.monotonic() - started
        assert obj["status"]["model"] == {"desired": "qwen2.5-0.5b", "serving": "qwen2.5-0.5b"}
        check_rollout(timeline, operator.events)
        print("\nswap:", *(line for line in operator.events if "engine" in line), sep="\n  ")

        async def settled() -> dict[tuple[str, str], dict[str, Any]] | None:
            # The swarm DaemonSet rolls too (its sidecars fetch the new model).
            found = await cluster.objects()
            pods = [o for (kind, _), o in found.items() if kind == "Pod"]
            return found if all(ready(p) for p in pods) else None

        objects = await until(settled, what="every pod Ready after the swap")
        await check_placement(objects)

        # A bad edit (schema-valid, no such model): status says why; nothing changes.
        before = {key: obj["metadata"]["uid"] for key, obj in objects.items()}
        kube.tool(kubectl, "patch", "tightwadcluster", NAME, "--type", "merge", "-p", BAD)

        async def degraded() -> dict[str, Any] | None:
            c = await cluster.condition("Degraded")
            return c if c.get("status") == "True" and c.get("observedGeneration") == 3 else None

        condition = await until(degraded, what="Degraded=True for generation 3")
        assert condition["reason"] == "ManifestInvalid"
        assert "'no-such-model' is not in spec.models" in condition["message"]
        await asyncio.sleep(2.0)  # a few more passes
        after = {key: obj["metadata"]["uid"] for key, obj in (await cluster.objects()).items()}
        assert after == before
        assert (await cluster.cr() or {})["status"]["model"]["serving"] == "qwen2.5-0.5b"

    # Deletion: the finalizer removes what the cluster runs, garbage collection the rest (the
    # ReplicaSets and their pods), then the CR goes.
    started = time.monotonic()
    kube.tool(kubectl, "delete", "tightwadcluster", NAME, "--wait=false")

    async def all_gone() -> bool:
        if await cluster.cr() is not None or await cluster.objects():
            return False
        selector = f"labelSelector={LABEL_CLUSTER}%3D{NAME}"
        return not kube.request("GET", f"/apis/apps/v1/namespaces/{NS}/replicasets?{selector}")["items"]

    await until(all_gone, what="the CR and everything it ran gone")
    timings["delete"] = time.monotonic() - started
    # (A resync can reconcile the deleted CR once more before the watch reports it gone: the
    # finalizer's work is idempotent, the second run finds nothing left.)
    assert operator.counters.finalized >= 1


SWAP = json.dumps({"spec": {"target": {"model": "qwen2.5-0.5b"}}})
BAD = json.dumps({"spec": {"target": {"model": "no-such-model"}}})


def check_rollout(timeline: list[dict[str, tuple[str, bool]]], events: list[str]) -> None:
    """The old engine stays until the new one is Ready, unless the operator announced a short
    switch (no room known for both: requests fail meanwhile). The Kubernetes driver learns no
    model sizes (the pods verify the files), so today every swap here is the announced switch."""
    assert timeline
    announced = any("not enough memory to load both" in line for line in events)
    new_ready = False
    for sample in timeline:
        models = {model for model, ok in sample.values() if ok}
        new_ready = new_ready or "qwen2.5-0.5b" in models
        if not new_ready and not announced:
            assert "qwen2.5-32b" in models, f"the old engine went before the new one was Ready: {timeline}"
    assert new_ready
    # Either way, never two engines of one model, and the old one is gone at the end.
    assert set(timeline[-1]) == {name for name, (model, _) in timeline[-1].items() if model == "qwen2.5-0.5b"}


async def check_placement(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Every pod Ready on the node its host names; GPU workers request their GPU."""
    pods = [o for (kind, _), o in objects.items() if kind == "Pod"]
    assert pods
    for pod in pods:
        unit = pod["metadata"]["labels"][LABEL_UNIT]
        assert ready(pod), f"{unit}: {pod['status']}"
        node = pod["spec"]["nodeName"]
        if unit == "swarm":
            continue  # the DaemonSet's: node affinity, one per Kubernetes host
        assert pod["spec"]["nodeSelector"]["kubernetes.io/hostname"] == node
        if unit.startswith("worker"):
            limits = pod["spec"]["containers"][0]["resources"].get("limits", {})
            want = {"rtx4070": "nvidia.com/gpu", "radeon": "amd.com/gpu"}.get(node)
            if want:
                assert limits.get(want) == "1", (unit, limits)
    swarm_nodes = sorted(
        p["spec"]["nodeName"] for p in pods if p["metadata"]["labels"][LABEL_UNIT] == "swarm"
    )
    assert swarm_nodes == ["radeon", "rtx4070", "xeon"]
