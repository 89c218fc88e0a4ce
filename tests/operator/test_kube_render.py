"""The kubernetes driver's objects: every rendered workload validated against the real Kubernetes
schemas (kubernetes-validate, strict) and checked for what matters: GPU requests and node pinning,
probes that never lock an rpc worker, the model volume, the token only through the Secret, owner
references; and the objects read back into the plan's unit states."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from support.kubeapi import ROOT, validate

from tightwad.manifest import Manifest, load_manifest, parse_manifest
from tightwad.operator.desired import desired_state
from tightwad.operator.kubernetes.controller import MANIFEST_IN_POD, main
from tightwad.operator.kubernetes.render import (
    ANNOTATION_UNIT,
    Owner,
    RenderSettings,
    render_all,
    render_model_check,
)
from tightwad.operator.kubernetes.workloads import (
    check_key,
    check_result,
    kubernetes_hosts,
    room_for_a_second_stack,
    states_from_objects,
)
from tightwad.operator.observed import Health, ModelCheck, ModelState
from tightwad.operator.units import Kind, Unit

TOKEN = "s3cret-token-for-tests"
OWNER = Owner("homelab", "default", "6f1c9d1e-0000-4000-8000-000000000001", {"owner": "alex"})
EXAMPLE = ROOT / "examples" / "cluster-cr.yaml"


def manifest() -> Manifest:
    return load_manifest(EXAMPLE, environ={"TIGHTWAD_TOKEN": TOKEN})


def in_cluster_units(m: Manifest) -> list[Unit]:
    desired = desired_state(m, manifest_path=MANIFEST_IN_POD)
    engine = desired.engine.with_spec(port=desired.engine_ports[0])
    return [u for u in (*desired.units, engine) if u.host in kubernetes_hosts(m)]


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict[str, Any]]:
    rendered = render_all(
        in_cluster_units(manifest()), manifest(), OWNER, RenderSettings(token_secret="tightwad-token")
    )
    return {(o["kind"], o["metadata"]["name"]): o for o in rendered}


def container(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]["template"]["spec"] if "template" in obj["spec"] else obj["spec"]
    return spec["containers"][0]


def engine_of(objects: dict[tuple[str, str], Any]) -> dict[str, Any]:
    return next(o for o in objects.values() if o["metadata"]["labels"].get("tightwad.dev/kind") == "engine")


def pod(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"] if "template" in obj["spec"] else obj["spec"]


def test_every_object_is_valid_against_the_real_kubernetes_schemas(
    objects: dict[tuple[str, str], Any],
) -> None:
    for obj in objects.values():
        validate(obj)
    engine = next(n for _, n in objects if n.startswith("homelab-engine-") and n != "homelab-engine-router")
    assert set(objects) == {
        ("ConfigMap", "homelab-manifest"),
        ("DaemonSet", "homelab-swarm"),
        ("Deployment", "homelab-drafter-small"),
        ("Deployment", "homelab-engine-router"),
        ("Deployment", engine),
        ("Deployment", "homelab-proxy"),
        ("Pod", "homelab-worker-radeon-0"),
        ("Pod", "homelab-worker-rtx4070-0"),
        ("Pod", "homelab-worker-xeon-0"),
        ("Service", "homelab-proxy"),
    }


def test_the_native_mac_is_never_scheduled(objects: dict[tuple[str, str], Any]) -> None:
    assert not any("macbook" in name for _, name in objects)
    engine = engine_of(objects)
    args = container(engine)["args"]
    rpc = args[args.index("--rpc") + 1].split(",")
    assert "192.168.1.20:18052" in rpc, "the engine reaches the Mac's worker over the network"
    assert len(rpc) == 4


def test_gpu_workers_are_pinned_to_their_node_and_request_their_gpu(
    objects: dict[tuple[str, str], Any],
) -> None:
    cuda = objects[("Pod", "homelab-worker-rtx4070-0")]
    assert pod(cuda)["nodeSelector"] == {"kubernetes.io/hostname": "rtx4070"}
    assert container(cuda)["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod(cuda)["tolerations"]
    args = container(cuda)["args"]
    assert args[args.index("--device") + 1] == "CUDA0"
    assert args[args.index("--host") + 1] == "192.168.1.10" and args[args.index("--port") + 1] == "18052"
    assert pod(cuda)["hostNetwork"] is True and pod(cuda)["restartPolicy"] == "Always"

    rocm = objects[("Pod", "homelab-worker-radeon-0")]
    assert pod(rocm)["nodeSelector"] == {"kubernetes.io/hostname": "radeon", "tightwad.dev/gpu": "rx6800"}
    assert container(rocm)["resources"]["limits"] == {"amd.com/gpu": "1"}
    assert container(rocm)["image"].endswith("worker-rocm:0.1.0")

    # The xeon lends 16 threads and 32 GiB: the worker requests a quarter (a swap runs a second
    # worker beside it, and the drafter and the swarm sidecar are placed there too) and may use
    # every thread.
    cpu = objects[("Pod", "homelab-worker-xeon-0")]
    assert container(cpu)["resources"] == {
        "requests": {"cpu": "4000m", "memory": str(8 * 2**30)},
        "limits": {"cpu": "16"},
    }


def test_everything_placed_on_the_cpu_host_fits_what_it_lends(objects: dict[tuple[str, str], Any]) -> None:
    """On a node exactly as big as the xeon lends (16 threads, 32 GiB), the scheduler can place the
    worker, the one a swap starts beside it, the drafter and the swarm sidecar together."""

    def cpus(text: str) -> float:
        return int(text[:-1]) / 1000 if text.endswith("m") else float(text)

    def size(text: str) -> int:
        return int(text[:-2]) * 2**20 if text.endswith("Mi") else int(text)

    workloads = [o for o in objects.values() if o["kind"] in ("Pod", "Deployment", "DaemonSet")]
    on_xeon = [
        pod(o)
        for o in workloads
        if o["kind"] == "DaemonSet" or pod(o)["nodeSelector"].get("kubernetes.io/hostname") == "xeon"
    ]
    assert len(on_xeon) == 3  # worker, drafter, swarm sidecar
    on_xeon.append(pod(objects[("Pod", "homelab-worker-xeon-0")]))  # a swap's second worker
    requests = [c.get("resources", {}).get("requests", {}) for p in on_xeon for c in p["containers"]]
    assert sum(cpus(r.get("cpu", "0")) for r in requests) <= 16
    assert sum(size(r.get("memory", "0")) for r in requests) <= 32 * 2**30


def test_rpc_worker_readiness_never_connects_to_the_worker(objects: dict[tuple[str, str], Any]) -> None:
    probe = container(objects[("Pod", "homelab-worker-rtx4070-0")])["readinessProbe"]
    assert "httpGet" not in probe and "tcpSocket" not in probe
    script = probe["exec"]["command"][-1]
    assert "/proc/net/tcp" in script and ":4684 " in script and " 0A " in script  # 18052, LISTEN


def test_engine_waits_for_its_verified_model_and_has_a_long_startup(
    objects: dict[tuple[str, str], Any],
) -> None:
    engine = engine_of(objects)
    spec = engine["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    c = container(engine)
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == "/health" and startup["httpGet"]["port"] == 8081
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 900
    assert c["readinessProbe"]["httpGet"]["host"] == "192.168.1.10"
    model = "/var/lib/tightwad/models/Qwen2.5-32B-Instruct-Q4_K_M.gguf"
    assert c["args"][c["args"].index("--model") + 1] == model
    (init,) = pod(engine)["initContainers"]
    assert {e["name"]: e["value"] for e in init["env"]} == {"MODEL": model, "SHA256": "2" * 64}
    assert "sha256sum -c" in init["command"][-1]
    volumes = {v["name"]: v for v in pod(engine)["volumes"]}
    assert volumes["models"]["hostPath"] == {"path": "/var/lib/tightwad/models", "type": "DirectoryOrCreate"}
    assert {"name": "models", "mountPath": "/var/lib/tightwad/models", "readOnly": True} in c["volumeMounts"]


def test_the_token_only_travels_through_the_secret(objects: dict[tuple[str, str], Any]) -> None:
    assert TOKEN not in json.dumps(list(objects.values()))
    drafter = container(objects[("Deployment", "homelab-drafter-small")])
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in drafter["env"]}
    assert refs == {
        n: {"name": "tightwad-token", "key": "token"} for n in ("TIGHTWAD_TOKEN", "LLAMA_API_KEY")
    }
    config = objects[("ConfigMap", "homelab-manifest")]["data"]["cluster.yaml"]
    assert "${TIGHTWAD_TOKEN}" in config
    again = parse_manifest(config, environ={"TIGHTWAD_TOKEN": TOKEN})
    assert again.spec == manifest().spec, "the pods read the same manifest"


def test_proxy_service_and_swarm_daemonset(objects: dict[tuple[str, str], Any]) -> None:
    service = objects[("Service", "homelab-proxy")]
    assert service["spec"]["selector"] == {"tightwad.dev/cluster": "homelab", "tightwad.dev/unit": "proxy"}
    assert service["spec"]["ports"][0]["port"] == 8088
    proxy = objects[("Deployment", "homelab-proxy")]
    assert proxy["spec"]["template"]["metadata"]["labels"]["tightwad.dev/unit"] == "proxy"
    assert container(proxy)["livenessProbe"]["httpGet"]["path"] == "/health"

    swarm = objects[("DaemonSet", "homelab-swarm")]
    terms = pod(swarm)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["radeon", "rtx4070", "xeon"]
    volumes = {v["name"]: v for v in pod(swarm)["volumes"]}
    assert volumes["models"]["hostPath"]["path"] == "/var/lib/tightwad/models"
    assert volumes["config"]["configMap"]["name"] == "homelab-manifest"
    assert container(swarm)["args"][-2:] == ["--host", "$(NODE_NAME)"]


def test_every_object_belongs_to_its_cluster(objects: dict[tuple[str, str], Any]) -> None:
    for obj in objects.values():
        meta = obj["metadata"]
        assert meta["ownerReferences"] == [OWNER.reference()]
        assert meta["labels"]["tightwad.dev/cluster"] == "homelab" and meta["labels"]["owner"] == "alex"


def test_a_persistent_volume_claim_replaces_host_paths() -> None:
    m = manifest()
    rendered = render_all(
        in_cluster_units(m), m, OWNER, RenderSettings(token_secret="t", model_claim="models")
    )
    for obj in rendered:
        validate(obj)
        if (
            obj["kind"] in ("Deployment", "DaemonSet")
            and obj["metadata"]["labels"]["tightwad.dev/kind"] != "router"
        ):
            volumes = {v["name"]: v for v in pod(obj)["volumes"]}
            if "models" in volumes:
                assert volumes["models"] == {
                    "name": "models",
                    "persistentVolumeClaim": {"claimName": "models"},
                }


def _pod(
    unit: str, *, ready: bool, restarts: int = 0, waiting: str | None = None, node: str = "n"
) -> dict[str, Any]:
    state = {"waiting": {"reason": waiting, "message": "back-off 40s"}} if waiting else {"running": {}}
    return {
        "kind": "Pod",
        "metadata": {
            "name": f"{unit}-abc",
            "labels": {"tightwad.dev/unit": unit},
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"nodeName": node},
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": "Ready", "status": str(ready), "lastTransitionTime": "2026-01-01T00:01:00Z"}
            ],
            "containerStatuses": [{"name": "engine", "restartCount": restarts, "state": state}],
        },
    }


def test_objects_read_back_into_unit_states(objects: dict[tuple[str, str], Any]) -> None:
    engine = engine_of(objects)
    router = objects[("Deployment", "homelab-engine-router")]
    worker = objects[("Pod", "homelab-worker-xeon-0")]
    worker = {**worker, "status": {"phase": "Pending", "conditions": [{"type": "Ready", "status": "False"}]}}
    engine_unit = Unit.from_json(json.loads(engine["metadata"]["annotations"][ANNOTATION_UNIT]))
    states = states_from_objects(
        [engine, router, worker, objects[("DaemonSet", "homelab-swarm")]],
        [
            _pod(engine_unit.name, ready=False, restarts=4, waiting="CrashLoopBackOff"),
            _pod("engine-router", ready=True),
            _pod("swarm", ready=True, node="rtx4070"),
        ],
    )
    assert states[engine_unit.name].unit.spec_hash == engine_unit.spec_hash
    assert states[engine_unit.name].health is Health.FAILING and states[engine_unit.name].failures == 4
    assert "CrashLoopBackOff" in (states[engine_unit.name].error or "")
    assert states["engine-router"].healthy
    assert states["worker-xeon-0"].health is Health.STARTING and states["worker-xeon-0"].running
    assert states["swarm-rtx4070"].healthy and not states["swarm-radeon"].healthy
    assert {s.unit.kind for s in states.values()} >= {Kind.ENGINE, Kind.ROUTER, Kind.WORKER, Kind.SWARM}


def test_operator_render_command_prints_valid_objects(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIGHTWAD_TOKEN", TOKEN)
    assert main(["--render", str(EXAMPLE), "--token-secret", "tightwad-token"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert len(docs) == 10
    for doc in docs:
        validate(doc)


def test_a_model_check_pod_runs_where_its_unit_reads_the_model_and_reports_the_size() -> None:
    m = manifest()
    desired = desired_state(m, manifest_path=MANIFEST_IN_POD)
    engine = desired.engine
    pod = render_model_check(engine, engine.models[0], OWNER, RenderSettings(), {h.name: h for h in m.hosts})
    validate(pod)
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["nodeSelector"] == {"kubernetes.io/hostname": engine.host}
    assert pod["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    check = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in check["env"]}
    assert env["MODEL"] == "/var/lib/tightwad/models/Qwen2.5-32B-Instruct-Q4_K_M.gguf"
    assert env["SHA256"] == "2" * 64
    assert "/dev/termination-log" in check["command"][-1]
    assert check_key(pod) == (engine.host, engine.models[0])


def _check_pod(phase: str, message: str | None = None, code: int = 0) -> dict[str, Any]:
    """A check pod as a kubelet reports it."""
    state = {"terminated": {"exitCode": code, "message": message}} if phase != "Running" else {"running": {}}
    return {"status": {"phase": phase, "containerStatuses": [{"name": "check", "state": state}]}}


def test_a_check_pods_answer_is_the_size_or_the_reason() -> None:
    assert check_result(_check_pod("Succeeded", "19851335840\n")) == ModelCheck(
        ModelState.OK, size=19851335840
    )
    assert check_result(_check_pod("Succeeded")).size is None  # a runtime without termination messages
    bad = check_result(_check_pod("Failed", "sha256 of /m/x.gguf is abc, the manifest says def", 1))
    assert bad.state is ModelState.BAD and "the manifest says def" in (bad.reason or "")
    assert check_result(_check_pod("Running")).state is ModelState.CHECKING


def test_a_second_stack_needs_every_gpu_of_the_stack_offered_twice() -> None:
    desired = desired_state(manifest(), manifest_path=MANIFEST_IN_POD)
    scope = kubernetes_hosts(manifest())

    def node(resource: str, count: int) -> dict[str, Any]:
        return {"status": {"allocatable": {resource: str(count), "cpu": "4"}}}

    shared = {"rtx4070": node("nvidia.com/gpu", 2), "radeon": node("amd.com/gpu", 2)}
    assert room_for_a_second_stack(desired, scope, shared) is None  # the plan judges by sizes
    exclusive = {**shared, "radeon": node("amd.com/gpu", 1)}
    assert room_for_a_second_stack(desired, scope, exclusive) == 0  # the announced switch
    assert room_for_a_second_stack(desired, scope, {"rtx4070": shared["rtx4070"], "radeon": None}) == 0
