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
import urllib.error
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client
from support import ROOT
from support.kubefull import (
    FullKube,
    example_cluster,
    install_crd,
    kubeconfig_for_token,
    model_check_stand_in,
    token_for,
)
from support.procs import Processes

from tightwad.operator.desired import desired_state
from tightwad.operator.kubernetes.api import Rest, connect
from tightwad.operator.kubernetes.controller import (
    MANIFEST_IN_POD,
    Operator,
    Options,
    _parser,
    note_native_hosts,
    settings_from,
)
from tightwad.operator.kubernetes.cr import FINALIZER, ClusterRef, api_path, cluster_manifest
from tightwad.operator.kubernetes.events import EventRecorder
from tightwad.operator.kubernetes.lease import CoordinationLeases, LeaderElector
from tightwad.operator.kubernetes.render import (
    ANNOTATION_UNIT,
    CHECK_KIND,
    LABEL_CLUSTER,
    LABEL_KIND,
    LABEL_UNIT,
)
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
    install_crd(kube)
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
        "--set",
        "operator.readNodes=true",  # the GPU nodes offer each GPU twice: swaps load beside
        "--wait",
        "--timeout",
        "120s",
    )


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

    async def objects(self, *, checks: bool = False) -> dict[tuple[str, str], dict[str, Any]]:
        """The cluster's objects; with `checks`, its model check pods too (they come and go)."""
        found = {}
        for kind in KINDS:
            for obj in await self.rest.list(kind, NS, {LABEL_CLUSTER: NAME}):
                if checks or obj["metadata"].get("labels", {}).get(LABEL_KIND) != CHECK_KIND:
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


# The model files as the check pods would find them (bytes).
SIZES = {"qwen2.5-32b": 19_851_335_840, "qwen2.5-0.5b": 491_400_032}


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
            cleaned: list[str] = []

            async def count_cleanups(cluster: ClusterRef, obj: dict[str, Any]) -> None:
                cleaned.append(cluster.key)

            # Two more replicas, here: whichever wins the Lease once the first is gone acts, the
            # other only waits (a short lease, so the takeover is quick).
            leases = CoordinationLeases(operator_api, args.lease_namespace, args.lease_name)
            replicas = [
                Operator(
                    operator_api,
                    KubernetesWorkloads(Rest(operator_api), settings_from(args)),
                    token=token,
                    options=Options(namespace=args.namespace, resync=0.5),
                    elector=LeaderElector(leases, name, lease_duration=4, renew_deadline=3, retry_period=0.5),
                    cleanup=(note_native_hosts, count_cleanups),
                    recorder=EventRecorder(Rest(operator_api), name),
                )
                for name in ("replica-b", "replica-c")
            ]
            stop = asyncio.Event()
            running: list[asyncio.Task[None]] = []

            async def start_replicas() -> None:
                running.extend(asyncio.create_task(r.run(stop)) for r in replicas)

            def leader() -> Operator:
                acting = [r for r in replicas if r.counters.passes]
                assert len(acting) == 1, "exactly one of the two replicas acts"
                return acting[0]

            first = start_first_replica(processes, pod_spec["containers"][0]["args"], operator_config, token)
            try:
                await lifecycle(
                    Cluster(admin_api),
                    leader,
                    full_kube,
                    kubectl,
                    cr_file,
                    token,
                    processes,
                    timings,
                    takeover=(first, start_replicas),
                )
                # The finalizer's cleanup ran exactly once, though resyncs came while the watch had
                # not yet reported the CR gone.
                await asyncio.sleep(1.5)
                assert cleaned == [f"{NS}/{NAME}"] and leader().counters.finalized == 1
            except AssertionError:
                acting = [r for r in replicas if r.counters.passes] or replicas
                await explain(Cluster(admin_api), acting[0])
                raise
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*running), timeout=15)

    asyncio.run(scenario())
    print(
        "\nfull control plane: apply -> Ready {apply:.1f}s, edit -> new engine Ready {swap:.1f}s, "
        "delete -> all gone {delete:.1f}s".format(**timings)
    )


def start_first_replica(
    processes: Processes, chart_args: list[str], kubeconfig: Path, token: str
) -> subprocess.Popen[bytes]:
    """`tightwad operator` as the chart's pod runs it (its arguments, its ServiceAccount's token),
    as a process: it takes the Lease first, before the other replicas start."""
    process, _ = processes.start(
        "operator-replica-a",
        [
            sys.executable,
            "-m",
            "tightwad.operator.kubernetes.controller",
            *chart_args,
            "--kubeconfig",
            str(kubeconfig),
            "--identity",
            "replica-a",
            "--resync",
            "0.5",
        ],
        env={"TIGHTWAD_TOKEN": token},
    )
    return process


async def kill_mid_reconcile(
    cluster: Cluster,
    kube: FullKube,
    first: subprocess.Popen[bytes],
    start_others: Callable[[], Awaitable[None]],
) -> None:
    """Replica A leads and starts reconciling; it is killed (SIGKILL: no lease released, nothing
    finished) once some but not all of the cluster's objects exist; the others start."""

    async def leads() -> bool:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/tightwad-operator"
        try:
            lease = kube.request("GET", path)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return False  # not created yet
            raise
        return lease.get("spec", {}).get("holderIdentity") == "replica-a"

    await until(leads, what="replica A holding the Lease", timeout=30)
    await start_others()

    async def some_objects() -> bool:
        found = await cluster.objects()
        return any(kind == "Pod" and "worker" in name for kind, name in found)

    await until(some_objects, what="replica A creating the first workers", timeout=30)
    first.kill()
    first.wait()


async def lifecycle(
    cluster: Cluster,
    leader: Callable[[], Operator],
    kube: FullKube,
    kubectl: str,
    cr_file: Path,
    token: str,
    processes: Processes,
    timings: dict[str, float],
    *,
    takeover: tuple[subprocess.Popen[bytes], Callable[[], Awaitable[None]]],
) -> None:
    started = time.monotonic()
    kube.tool(kubectl, "apply", "-f", str(cr_file))
    created = await until(cluster.cr, what="the CR")
    desired = desired_state(cluster_manifest(created, token), manifest_path=MANIFEST_IN_POD)
    router = next(u for u in desired.units if u.kind is Kind.ROUTER)
    # The Mac's worker on both stack slots: its agent runs the one a swap loads beside (slot b) too.
    mac_a, mac_b = (
        next(u for u in desired.stacks[slot].workers if u.host == "macbook") for slot in ("a", "b")
    )
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
        rpc_worker_stand_in(mac_a.address, mac_a.port or 0),
        rpc_worker_stand_in(mac_b.address, mac_b.port or 0),
        http_stand_in(mac_swarm.address, mac_swarm.port or 0),
        model_check_stand_in(kube, NS, SIZES) as checked,
    ):

        async def ready_at(generation: int) -> dict[str, Any] | None:
            obj = await cluster.cr() or {}
            status = obj.get("status", {})
            conditions = {c["type"]: c for c in status.get("conditions", [])}
            done = conditions.get("Ready", {}).get("status") == "True"
            return obj if done and status.get("observedGeneration") == generation else None

        await kill_mid_reconcile(cluster, kube, *takeover)
        obj = await until(lambda: ready_at(1), what="Ready=True for generation 1")
        timings["apply"] = time.monotonic() - started
        operator = leader()
        await check_no_duplicates(kube, await cluster.objects())
        # Each model was checked on its host before anything that reads it started.
        assert sorted(set(checked)) == ["qwen2.5-0.5b", "qwen2.5-32b"], checked
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
        check_rollout(timeline)
        assert "qwen2.5-0.5b" in checked
        print("\nswap:", *(line for line in operator.events if "engine" in line), sep="\n  ")

        async def settled() -> dict[tuple[str, str], dict[str, Any]] | None:
            # The swarm DaemonSet rolls too (its sidecars fetch the new model): wait for its rollout.
            found = await cluster.objects()
            pods = [o for (kind, _), o in found.items() if kind == "Pod"]
            swarm = found.get(("DaemonSet", f"{NAME}-swarm"), {})
            rolled = swarm.get("status", {}).get("observedGeneration") == swarm["metadata"]["generation"]
            counts = [swarm["status"].get(k) for k in ("desiredNumberScheduled", "updatedNumberScheduled")]
            rolled = rolled and counts[0] == counts[1] == swarm["status"].get("numberReady")
            return found if rolled and all(ready(p) for p in pods) else None

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
        await check_events(kube, kubectl)
        await asyncio.sleep(2.0)  # a few more passes
        after = {key: obj["metadata"]["uid"] for key, obj in (await cluster.objects()).items()}
        assert after == before
        assert (await cluster.cr() or {})["status"]["model"]["serving"] == "qwen2.5-0.5b"

    # Deletion: the finalizer removes what the cluster runs, garbage collection the rest (the
    # ReplicaSets and their pods), then the CR goes.
    started = time.monotonic()
    kube.tool(kubectl, "delete", "tightwadcluster", NAME, "--wait=false")

    async def all_gone() -> bool:
        if await cluster.cr() is not None or await cluster.objects(checks=True):
            return False
        selector = f"labelSelector={LABEL_CLUSTER}%3D{NAME}"
        return not kube.request("GET", f"/apis/apps/v1/namespaces/{NS}/replicasets?{selector}")["items"]

    await until(all_gone, what="the CR and everything it ran gone")
    timings["delete"] = time.monotonic() - started


async def check_events(kube: FullKube, kubectl: str) -> None:
    """What `kubectl describe tightwadcluster` shows: Ready, the swap started and finished, and the
    refused edit with its reason, each once (the resync passes write nothing new)."""

    async def seen() -> list[tuple[str, ...]]:
        shown = (await asyncio.to_thread(kube.tool, kubectl, "describe", "tightwadcluster", NAME)).stdout
        rows = [row.split(None, 4) for row in shown.split("\nEvents:", 1)[1].splitlines()]
        return [tuple(row) for row in rows if row and row[0] in ("Normal", "Warning")]

    async def refused() -> list[tuple[str, ...]] | None:
        events = await seen()
        return events if any(e[1] == "ManifestInvalid" for e in events) else None

    events = await until(refused, what="the refused edit's Event", timeout=10)
    print("\nkubectl describe tightwadcluster, Events:", *(" ".join(e) for e in events), sep="\n  ")
    reasons = [e[1] for e in events]
    assert reasons.count("Ready") == 1, events  # Ready all along: the swap loaded beside
    assert reasons.count("SwapStarted") == reasons.count("SwapFinished") == 1, events
    assert reasons.count("ManifestInvalid") == 1, events
    warning = next(e for e in events if e[1] == "ManifestInvalid")
    assert warning[0] == "Warning" and "'no-such-model' is not in spec.models" in warning[4], events


SWAP = json.dumps({"spec": {"target": {"model": "qwen2.5-0.5b"}}})
BAD = json.dumps({"spec": {"target": {"model": "no-such-model"}}})


async def check_no_duplicates(kube: FullKube, objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    """After the kill and the takeover: one pod per unit, one ReplicaSet per Deployment."""
    units = [o["metadata"]["labels"][LABEL_UNIT] for (kind, _), o in objects.items() if kind == "Pod"]
    swarm = [u for u in units if u == "swarm"]
    assert sorted(u for u in units if u != "swarm") == sorted(set(units) - {"swarm"}), units
    assert len(swarm) == 3, units
    selector = f"labelSelector={LABEL_CLUSTER}%3D{NAME}"
    sets = kube.request("GET", f"/apis/apps/v1/namespaces/{NS}/replicasets?{selector}")["items"]
    owners = [s["metadata"]["ownerReferences"][0]["name"] for s in sets]
    deployments = sorted(name for kind, name in objects if kind == "Deployment")
    assert sorted(owners) == deployments, (owners, deployments)


def check_rollout(timeline: list[dict[str, tuple[str, bool]]]) -> None:
    """The old engine's pod stays Ready until the new engine's is: both models' sizes are known
    (the check pods) and fit the pool together, and each GPU node offers its GPU twice, so the new
    stack loads beside the serving one."""
    assert timeline
    new_ready = False
    for sample in timeline:
        models = {model for model, ok in sample.values() if ok}
        new_ready = new_ready or "qwen2.5-0.5b" in models
        if not new_ready:
            assert "qwen2.5-32b" in models, f"the old engine went before the new one was Ready: {timeline}"
    assert new_ready
    assert any(len(sample) == 2 for sample in timeline), "two engines at once: the new one beside"
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
