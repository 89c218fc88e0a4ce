"""The operator against a REAL Kubernetes API server (apiextensions-apiserver + etcd, started here):
the CRD from the chart, schema validation of CRs, the watch reacting to a CR's life (status and
observedGeneration, a spec edit re-planned, a semantically bad edit Degraded without tearing
anything down, a stale write retried, an expired watch relisted, deletion through the finalizer),
server-side apply, and leader election on the coordination.k8s.io Lease API."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client
from support.kubeapi import ROOT, RecordingWorkloads, Server, start_server, stop_server

from tightwad.crd import CRD_NAME, GROUP, PLURAL, VERSION
from tightwad.operator.kubernetes.api import Rest, connect
from tightwad.operator.kubernetes.controller import Operator, Options
from tightwad.operator.kubernetes.cr import FINALIZER, api_path
from tightwad.operator.kubernetes.lease import CoordinationLeases, LeaderElector
from tightwad.operator.kubernetes.watch import Backoff
from tightwad.operator.kubernetes.workloads import Context
from tightwad.operator.plan import PlannerPolicy
from tightwad.operator.units import Kind

pytestmark = pytest.mark.system  # needs the Kubernetes API server and etcd

NS = "default"
CHART_CRD = ROOT / "charts" / "tightwad" / "crds" / f"{PLURAL}.yaml"
LEASE_CRD: dict[str, Any] = {
    # The CRD-only server has no built-in Lease API: serve coordination.k8s.io/v1 leases through a
    # CRD of the same shape, so the operator's real Lease client runs against real 409s.
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {
        "name": "leases.coordination.k8s.io",
        "annotations": {"api-approved.kubernetes.io": "unapproved, test stand-in for the built-in Lease API"},
    },
    "spec": {
        "group": "coordination.k8s.io",
        "scope": "Namespaced",
        "names": {"kind": "Lease", "listKind": "LeaseList", "plural": "leases", "singular": "lease"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {
                                    "holderIdentity": {"type": "string"},
                                    "leaseDurationSeconds": {"type": "integer"},
                                    "acquireTime": {"type": "string", "format": "date-time"},
                                    "renewTime": {"type": "string", "format": "date-time"},
                                    "leaseTransitions": {"type": "integer"},
                                },
                            }
                        },
                    }
                },
            }
        ],
    },
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("kube-apiserver"))
    try:
        asyncio.run(_install_crds(server))
        yield server
    finally:
        stop_server(server)


async def _install_crds(server: Server) -> None:
    async with await connect(str(server.kubeconfig)) as api:
        extensions = client.ApiextensionsV1Api(api)
        bodies: list[Any] = [yaml.safe_load(CHART_CRD.read_text()), LEASE_CRD]
        for body in bodies:
            await extensions.create_custom_resource_definition(body)
        for name in (CRD_NAME, str(LEASE_CRD["metadata"]["name"])):

            async def established(name: str = name) -> bool:
                return await _established(extensions, name)

            await until(established, what=f"CRD {name} established")


async def _established(extensions: client.ApiextensionsV1Api, name: str) -> bool:
    crd = await extensions.read_custom_resource_definition(name)
    return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])


async def until(check: Callable[[], Awaitable[Any]], *, what: str, timeout: float = 20.0) -> Any:
    """Poll `check` until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for: {what}")
        await asyncio.sleep(0.1)


def sample_cr(name: str = "homelab") -> dict[str, Any]:
    body = yaml.safe_load((ROOT / "examples" / "cluster-cr.yaml").read_text())
    body["metadata"] |= {"name": name, "namespace": NS}
    return body


class Clusters:
    """The TightwadCluster API, as a user (kubectl) would use it."""

    def __init__(self, api: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.rest = Rest(api)

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)

    async def get(self, name: str) -> dict[str, Any] | None:
        try:
            return await self.custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def edit(self, name: str, spec_patch: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch of the spec, as `kubectl patch --type merge` sends it."""
        return await self.rest.merge_patch(api_path(NS, name), {"spec": spec_patch})

    async def delete(self, name: str) -> None:
        await self.custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)

    async def condition(self, name: str, kind: str) -> dict[str, Any] | None:
        obj = await self.get(name)
        for c in (obj or {}).get("status", {}).get("conditions", []):
            if c["type"] == kind:
                return c
        return None


def test_crd_from_the_chart_is_served_with_its_columns(server: Server) -> None:
    async def scenario() -> None:
        async with await connect(str(server.kubeconfig)) as api:
            crd = await client.ApiextensionsV1Api(api).read_custom_resource_definition(CRD_NAME)
            version = crd.spec.versions[0]
            assert [c.name for c in version.additional_printer_columns] == [
                "Ready",
                "Model",
                "Workers",
                "Age",
            ]
            assert version.subresources.status is not None
            assert crd.spec.names.short_names == ["twc", "tightwad"]

    asyncio.run(scenario())


def rejected(server: Server, body: dict[str, Any]) -> dict[str, str]:
    """The field -> message causes of the API server's 422 for creating `body`."""

    async def scenario() -> dict[str, str]:
        async with await connect(str(server.kubeconfig)) as api:
            with pytest.raises(client.ApiException) as caught:
                await Clusters(api).create(body)
        assert caught.value.status == 422
        causes = json.loads(caught.value.body or "{}")["details"]["causes"]
        return {c["field"]: c["message"] for c in causes}

    return asyncio.run(scenario())


def test_a_schema_invalid_cr_is_rejected_with_the_schemas_messages(server: Server) -> None:
    bad = sample_cr("bad")
    bad["spec"]["hosts"][0]["gpus"][0]["backend"] = "nvidia"
    bad["spec"]["hosts"][0]["name"] = "RTX 4070"
    causes = rejected(server, bad)
    assert 'supported values: "cuda", "rocm", "metal", "cpu"' in causes["spec.hosts[0].gpus[0].backend"]
    assert "should match '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'" in causes["spec.hosts[0].name"]

    # The rules the JSON Schema states with if/then and anyOf (CEL rules in the CRD) run once the
    # plain schema passes, each with the schema's own words.
    bad = sample_cr("bad")
    bad["spec"]["models"][0].pop("sha256")
    bad["spec"]["proxy"]["maxDraftTokens"] = 100
    bad["spec"]["drafters"][0].pop("host")
    causes = rejected(server, bad)
    assert "add sha256 (`sha256sum FILE`)" in causes["spec.models[0]"]
    assert "must be 'auto' or a whole number from 1 to 64" in causes["spec.proxy.maxDraftTokens"]
    drafter = causes["spec.drafters[0]"]
    assert "a llama-server drafter runs a model of spec.models on a host of spec.hosts" in drafter


def test_the_operator_follows_a_cluster_through_its_life(server: Server) -> None:
    workloads = RecordingWorkloads()
    stats: dict[str, Any] = {}

    async def scenario() -> None:
        async with (
            await connect(str(server.kubeconfig)) as api,
            await connect(str(server.kubeconfig)) as user_api,
        ):
            users = Clusters(user_api)
            operator = Operator(
                api,
                workloads,
                token="test-token",
                options=Options(namespace=NS, resync=0.3, watch_timeout=2, policy=PlannerPolicy()),
            )
            operator.watch.backoff = Backoff(base=0.1, cap=0.5)
            stop = asyncio.Event()
            running = asyncio.create_task(operator.run(stop))
            try:
                await lifecycle(users, operator, workloads, server, stats)
            finally:
                stop.set()
                await asyncio.wait_for(running, timeout=10)

    asyncio.run(scenario())
    assert stats["conflicts"] >= 1
    assert stats["expired"] >= 1


async def lifecycle(
    users: Clusters, operator: Operator, workloads: RecordingWorkloads, server: Server, stats: dict[str, Any]
) -> None:
    name = "homelab"
    created = await users.create(sample_cr(name))
    assert created["metadata"]["generation"] == 1

    # The watch reacts: finalizer, then status for generation 1 that converges to Ready.
    async def ready() -> dict[str, Any] | None:
        obj = await users.get(name)
        status = (obj or {}).get("status", {})
        conditions = {c["type"]: c for c in status.get("conditions", [])}
        return obj if conditions.get("Ready", {}).get("status") == "True" else None

    obj = await until(ready, what="Ready=True")
    assert FINALIZER in obj["metadata"]["finalizers"]
    status = obj["status"]
    assert status["observedGeneration"] == 1
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])
    assert status["workers"] == "4/4"  # three in-cluster workers, and the Mac's, reached over the network
    assert status["model"] == {"desired": "qwen2.5-32b", "serving": "qwen2.5-32b"}
    hosts = {u.host for u in workloads.running.values()}
    assert "macbook" not in hosts, "a native host is reached over the network, never scheduled"
    assert ("DaemonSet", "homelab-swarm") in workloads.objects
    assert ("Service", "homelab-proxy") in workloads.objects

    # A spec edit is planned again: a new engine for the new target, status for generation 2.
    await users.edit(name, {"target": {"model": "qwen2.5-0.5b"}})

    async def swapped() -> dict[str, Any] | None:
        obj = await users.get(name)
        status = (obj or {}).get("status", {})
        done = (
            status.get("observedGeneration") == 2 and status.get("model", {}).get("serving") == "qwen2.5-0.5b"
        )
        return obj if done else None

    await until(swapped, what="the swap to qwen2.5-0.5b served at generation 2")
    assert {u.spec["model"] for u in workloads.started(Kind.ENGINE)} == {"qwen2.5-32b", "qwen2.5-0.5b"}

    # A stale write is answered by a retry: while the operator plans generation 3, another writer
    # edits the spec again (generation 4). Its status write carries the resourceVersion it planned
    # from, gets 409, and it reads the CR again and plans generation 4 instead of writing status
    # that describes a spec no longer there.
    conflicts_before = operator.counters.conflicts

    async def someone_else_edits(context: Context) -> bool:
        if context.manifest.target.max_conversations != 2:
            return False  # not the pass that plans generation 3
        await users.edit(name, {"proxy": {"maxDraftTokens": 8}})
        return True

    workloads.interfere = someone_else_edits
    await users.edit(name, {"target": {"maxConversations": 2}})
    await until(lambda: _generation_observed(users, name, 4), what="status for generation 4")
    assert operator.counters.conflicts > conflicts_before
    stats["conflicts"] = operator.counters.conflicts - conflicts_before

    # A semantically bad edit (schema-valid, but no such model) keeps the last good manifest in
    # force: Degraded says why, nothing running is torn down.
    running_before = dict(workloads.running)
    stops_before = len(workloads.stops())
    await users.edit(name, {"target": {"model": "no-such-model"}})

    async def degraded() -> dict[str, Any] | None:
        c = await users.condition(name, "Degraded")
        return c if c and c["status"] == "True" and c["observedGeneration"] == 5 else None

    condition = await until(degraded, what="Degraded=True for generation 5")
    assert condition["reason"] == "ManifestInvalid"
    assert "'no-such-model' is not in spec.models" in condition["message"]
    await asyncio.sleep(1.0)  # a few more passes
    assert workloads.running == running_before
    assert len(workloads.stops()) == stops_before
    await users.edit(name, {"target": {"model": "qwen2.5-0.5b"}})
    await until(lambda: _generation_observed(users, name, 6), what="status for generation 6")

    # An expired watch is relisted: once the operator is quiet, writes elsewhere move etcd's revision
    # on and etcd compacts past the operator's resourceVersion; its next watch gets 410 and it lists
    # again. (Compacted again while it still writes, as its own writes move its resourceVersion on.)
    async def converged() -> bool:
        c = await users.condition(name, "Progressing")
        return bool(c and c["status"] == "False" and c["observedGeneration"] == 6)

    await until(converged, what="generation 6 converged")
    expired_before, lists_before = operator.watch.counters.expired, operator.watch.counters.lists

    attempts: list[int] = []

    async def relisted() -> bool:
        counters = operator.watch.counters
        if counters.expired > expired_before and counters.lists > lists_before:
            return True
        attempts.append(len(attempts))
        other = sample_cr(f"elsewhere-{len(attempts)}")
        other["metadata"]["namespace"] = "elsewhere"
        await users.custom.create_namespaced_custom_object(GROUP, VERSION, "elsewhere", PLURAL, other)
        server.compact()
        await asyncio.sleep(1.0)
        return False

    await until(relisted, what="a 410 answered by a relist", timeout=20)
    stats["expired"] = operator.watch.counters.expired - expired_before
    # ...and the watch still reacts after the relist.
    await users.edit(name, {"proxy": {"mode": "speculate"}})
    await until(lambda: _generation_observed(users, name, 7), what="status for generation 7 after the relist")

    # Deletion goes through the finalizer: the operator cleans up, then lets the object go.
    await users.delete(name)

    async def gone() -> bool:
        return await users.get(name) is None

    await until(gone, what="the CR deleted once its finalizer is done")
    assert [c.name for c in workloads.removed] == [name]
    assert operator.counters.finalized == 1


async def _generation_observed(users: Clusters, name: str, generation: int) -> bool:
    obj = await users.get(name) or {}
    return bool(obj.get("status", {}).get("observedGeneration") == generation)


def test_server_side_apply_of_a_rendered_object(server: Server) -> None:
    async def scenario() -> None:
        async with await connect(str(server.kubeconfig)) as api:
            rest = Rest(api)
            body = sample_cr("applied")
            first = await rest.apply(body)
            assert [m["manager"] for m in first["metadata"]["managedFields"]] == ["tightwad-operator"]
            changed = copy.deepcopy(body)
            changed["spec"]["target"]["maxConversations"] = 3
            second = await rest.apply(changed)
            assert second["spec"]["target"]["maxConversations"] == 3
            assert second["metadata"]["generation"] == 2
            third = await rest.apply(changed)  # nothing changed: no new generation
            assert third["metadata"]["generation"] == 2

    asyncio.run(scenario())


def test_leader_election_on_the_lease_api_never_has_two_leaders(server: Server) -> None:
    async def scenario() -> None:
        async with await connect(str(server.kubeconfig)) as api:
            timing = {"lease_duration": 3.0, "renew_deadline": 2.0, "retry_period": 0.25}
            a = LeaderElector(CoordinationLeases(api, NS, "tightwad-test"), "replica-a", **timing)
            b = LeaderElector(CoordinationLeases(api, NS, "tightwad-test"), "replica-b", **timing)
            stop_a, stop_b = asyncio.Event(), asyncio.Event()
            assert await a.acquire(stop_a)
            holding_a = asyncio.create_task(a.hold(stop_a))
            waiting_b = asyncio.create_task(b.acquire(stop_b))
            both = 0
            for _ in range(15):  # 3 s: b keeps seeing a renew, so it never takes over
                await asyncio.sleep(0.2)
                both += a.is_leader and b.is_leader
            assert a.is_leader and not waiting_b.done() and both == 0
            lease = await CoordinationLeases(api, NS, "tightwad-test").get()
            assert lease is not None and lease.holder == "replica-a"

            # a stops renewing (a crashed replica): b takes over once the lease runs out by its clock.
            holding_a.cancel()
            a.is_leader = False
            assert await asyncio.wait_for(waiting_b, timeout=10)
            lease = await CoordinationLeases(api, NS, "tightwad-test").get()
            assert lease is not None and lease.holder == "replica-b" and lease.transitions == 1

            # A graceful release hands over at once.
            await b.release()
            assert await asyncio.wait_for(a.acquire(stop_a), timeout=5)

    asyncio.run(scenario())
