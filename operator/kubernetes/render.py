"""Kubernetes objects for units: pure rendering, no API calls.

Each unit becomes what Kubernetes runs best for it: an rpc worker a Pod pinned to its node (a GPU
node by node selector and an `nvidia.com/gpu` / `amd.com/gpu` request), the engine, the engine
router, drafters and the proxy a one-replica Deployment (the proxy also a Service), and the swarm
sidecars one DaemonSet over the cluster's nodes with the model volume. Units are placed on the node
named like their host and use the host network, so every address the plan wrote (`host:port`) is
where the unit really listens, for in-cluster units and for Macs outside the cluster alike.

Every object carries the unit as it was created (annotation `tightwad.dev/unit`, JSON), so the driver
can hand `plan` the observed unit to compare with the desired one, and an owner reference to its
TightwadCluster, so deleting the CR garbage-collects everything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import yaml

from tightwad.crd import GROUP, VERSION
from tightwad.errors import TightwadError
from tightwad.manifest import KIND, Manifest
from tightwad.manifest_views import Host
from tightwad.models import CATALOG_PREFIX, catalog_model
from tightwad.operator.commands import LLAMA_API_KEY_ENV, Binaries, command, exact_environment
from tightwad.operator.units import Kind, ModelRef, Unit

LABEL_CLUSTER = "tightwad.dev/cluster"
LABEL_UNIT = "tightwad.dev/unit"
LABEL_KIND = "tightwad.dev/kind"
ANNOTATION_UNIT = "tightwad.dev/unit"  # the unit as created, JSON (no secrets)
ANNOTATION_SPEC_HASH = "tightwad.dev/spec-hash"
MANAGED_BY = "tightwad-operator"
DEFAULT_MODEL_DIR = "/var/lib/tightwad/models"
CONFIG_DIR = "/etc/tightwad"
CONFIG_FILE = "cluster.yaml"
TOKEN_PLACEHOLDER = "${TIGHTWAD_TOKEN}"
GPU_RESOURCES = {"cuda": "nvidia.com/gpu", "rocm": "amd.com/gpu"}
SWARM_UNITS = "tightwad.dev/units"  # on the DaemonSet: every swarm unit it runs, JSON list
UNPRIVILEGED = 10001  # the images' user and group (docker/runtime-stage.sh)
# Of a CPU worker's threads and memory, what its pod requests: a swap runs two stacks' workers on
# the host at once (the new one loading beside the serving one), with the drafter and the swarm
# sidecar beside them, all within what the host lends.
WORKER_REQUEST_SHARE = 0.25

# Programs as the images put them on PATH (the worker images: ggml-rpc-server, llama-server; the
# tightwad image: python with tightwad and the pinned libllama).
IMAGE_BINARIES = Binaries(python=("python", "-m"), rpc_server="ggml-rpc-server", llama_server="llama-server")


class CannotRender(TightwadError, ValueError):
    """A unit that cannot run on Kubernetes as written; the message says what to change."""


@dataclass(frozen=True)
class Images:
    """Container images; the chart's values.yaml sets them."""

    worker_cuda: str = "ghcr.io/tightwad/worker-cuda:0.1.0"
    worker_rocm: str = "ghcr.io/tightwad/worker-rocm:0.1.0"
    worker_cpu: str = "ghcr.io/tightwad/worker-cpu:0.1.0"
    tightwad: str = "ghcr.io/tightwad/tightwad:0.1.0"  # engine, router, proxy, swarm sidecar
    pull_policy: str = "IfNotPresent"

    def for_unit(self, unit: Unit) -> str:
        if unit.kind is Kind.WORKER:
            return {"cuda": self.worker_cuda, "rocm": self.worker_rocm}.get(
                unit.spec["backend"], self.worker_cpu
            )
        if unit.kind is Kind.DRAFTER:
            return self.worker_cpu  # llama-server; GPUs are the workers' (a device plugin lends each once)
        return self.tightwad


@dataclass(frozen=True)
class RenderSettings:
    """How this installation runs units: images, where models live, the token's Secret."""

    images: Images = field(default_factory=Images)
    model_claim: str | None = None  # a PersistentVolumeClaim for every host's modelDir; None: hostPath
    token_secret: str | None = None  # Secret with the bearer token under `token_key`
    token_key: str = "token"
    # The only node folders (and what is below them) a TightwadCluster may mount: a CR's author
    # need not be a node's admin. The chart's hostPaths.allowed.
    allowed_host_paths: tuple[str, ...] = (DEFAULT_MODEL_DIR,)


@dataclass(frozen=True)
class Owner:
    """The TightwadCluster object everything of one cluster belongs to."""

    name: str
    namespace: str
    uid: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def object_name(*parts: str) -> str:
    """A DNS-1035 label from `parts` (what Services need, so fine for everything): lowercase, at
    most 63 characters, starting with a letter; long names keep a hash of the whole."""
    name = re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"tw-{name}"
    if len(name) > 63:
        name = f"{name[:52].rstrip('-')}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"
    return name


def workload_name(owner: Owner, unit: Unit) -> str:
    return object_name(owner.name, unit.name)


def selector(owner: Owner, unit_name: str) -> dict[str, str]:
    return {LABEL_CLUSTER: owner.name, LABEL_UNIT: unit_name}


def _labels(owner: Owner, unit_name: str, kind: Kind, extra: Mapping[str, str] = {}) -> dict[str, str]:
    return {
        **owner.labels,
        **extra,
        "app.kubernetes.io/name": "tightwad",
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/component": kind.value,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_KIND: kind.value,
        **selector(owner, unit_name),
    }


def _metadata(
    owner: Owner, name: str, labels: Mapping[str, str], annotations: Mapping[str, str]
) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": dict(labels),
        "annotations": dict(annotations),
        "ownerReferences": [owner.reference()],
    }


def _unit_annotations(unit: Unit) -> dict[str, str]:
    return {ANNOTATION_UNIT: json.dumps(unit.to_json(), sort_keys=True), ANNOTATION_SPEC_HASH: unit.spec_hash}


# -- models ---------------------------------------------------------------------------------------


def model_dir(unit: Unit) -> str:
    folder = unit.spec.get("modelDir") or DEFAULT_MODEL_DIR
    if not folder.startswith("/"):
        raise CannotRender(
            f"{unit.name}: modelDir {folder!r} of host {unit.host!r} is not absolute; on Kubernetes the "
            "model volume is mounted at an absolute path, e.g. /var/lib/tightwad/models"
        )
    return posixpath.normpath(folder)  # `..` resolved here, before it is judged and mounted


def _model_dir_field(unit: Unit, hosts: Mapping[str, Host]) -> str:
    names = list(hosts)
    return f"spec.hosts[{names.index(unit.host)}].modelDir" if unit.host in names else "modelDir"


def check_host_path(path: str, field: str, settings: RenderSettings) -> None:
    """Refuse a node folder outside the chart's hostPaths.allowed (`path` is normalized)."""
    for allowed in settings.allowed_host_paths:
        root = posixpath.normpath(allowed)
        if path == root or path.startswith(root.rstrip("/") + "/"):
            return
    raise CannotRender(
        f"{field}: {path} is outside the node folders this installation lets a TightwadCluster mount "
        f"({', '.join(settings.allowed_host_paths)}); use a folder below one of them, or have the "
        "chart's installer add it to hostPaths.allowed"
    )


def model_path(ref: ModelRef, folder: str) -> str:
    """Where `ref` is inside the pod: in the model volume (which the swarm fills), or at its own
    absolute path on the node."""
    if ref.source.startswith(CATALOG_PREFIX):
        return posixpath.join(folder, catalog_model(ref.source.removeprefix(CATALOG_PREFIX)).filename)
    if re.match(r"^https?://", ref.source, flags=re.IGNORECASE):
        return posixpath.join(folder, posixpath.basename(urlparse(ref.source).path))
    if ref.source.startswith("/"):
        return posixpath.normpath(ref.source)
    # Normalized: a relative source with `..` must not count as inside the model volume.
    return posixpath.normpath(posixpath.join(folder, ref.source.removeprefix("~/").removeprefix("./")))


def model_sha256(ref: ModelRef) -> str | None:
    if ref.sha256:
        return ref.sha256
    if ref.source.startswith(CATALOG_PREFIX):
        return catalog_model(ref.source.removeprefix(CATALOG_PREFIX)).sha256
    return None


# -- pieces of a pod ------------------------------------------------------------------------------


def _token_env(unit: Unit, settings: RenderSettings) -> list[dict[str, Any]]:
    if not unit.secrets.get("TIGHTWAD_TOKEN") or settings.token_secret is None:
        return []
    # A drafter (llama-server) reads its API key as LLAMA_API_KEY: the name the image's build knows.
    names = ["TIGHTWAD_TOKEN", LLAMA_API_KEY_ENV] if unit.kind is Kind.DRAFTER else ["TIGHTWAD_TOKEN"]
    ref = {"name": settings.token_secret, "key": settings.token_key}
    return [{"name": name, "valueFrom": {"secretKeyRef": dict(ref)}} for name in names]


def _exact_env(unit: Unit) -> list[dict[str, Any]]:
    return [{"name": name, "value": value} for name, value in exact_environment(unit).items()]


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    return True


def _http_probe(unit: Unit, path: str, period: int, failures: int) -> dict[str, Any]:
    get: dict[str, Any] = {"path": path, "port": unit.port}
    if _is_ip(unit.address) and unit.spec.get("bind") not in ("0.0.0.0", "::"):
        get["host"] = unit.address.strip("[]")  # it listens on the host's address only
    return {"httpGet": get, "periodSeconds": period, "timeoutSeconds": 3, "failureThreshold": failures}


def _listening_probe(port: int) -> dict[str, Any]:
    """Ready when something listens on `port`, judged from the socket table: an rpc worker serves one
    client at a time with a backlog of 1, so a probe that connects could lock the engine out."""
    pattern = f":{port:04X} [0-9A-F]*:0000 0A "
    script = f"grep -q '{pattern}' /proc/net/tcp /proc/net/tcp6"
    return {"exec": {"command": ["sh", "-c", script]}, "periodSeconds": 5, "failureThreshold": 3}


def _probes(unit: Unit) -> dict[str, Any]:
    match unit.kind:
        case Kind.WORKER:
            return {"readinessProbe": _listening_probe(unit.port or 0)}
        case Kind.ENGINE:
            # Loading a big target over the network takes long: 15 minutes before it counts as stuck.
            return {
                "startupProbe": _http_probe(unit, "/health", 10, 90),
                "readinessProbe": _http_probe(unit, "/health", 5, 3),
            }
        case Kind.DRAFTER:
            return {
                "startupProbe": _http_probe(unit, "/health", 5, 60),
                "readinessProbe": _http_probe(unit, "/health", 5, 3),
            }
        case Kind.ROUTER:
            return {"readinessProbe": _http_probe(unit, "/_tightwad/health", 5, 3)}
        case Kind.PROXY if unit.spec.get("impl") == "router":
            return {"readinessProbe": _http_probe(unit, "/_tightwad/health", 5, 3)}
        case _:
            return {
                "readinessProbe": _http_probe(unit, "/health", 5, 3),
                "livenessProbe": _http_probe(unit, "/health", 10, 6),
            }


def _resources(unit: Unit) -> dict[str, Any]:
    spec = unit.spec
    if unit.kind is not Kind.WORKER:
        return {"requests": {"cpu": "100m", "memory": "128Mi"}}
    if spec["backend"] in GPU_RESOURCES:
        # The device plugin gives each worker one whole GPU, visible in the container as device 0.
        gpu = GPU_RESOURCES[spec["backend"]]
        return {"requests": {"cpu": "250m", gpu: "1"}, "limits": {gpu: "1"}}
    if spec["backend"] == "metal":
        raise CannotRender(
            f"{unit.name}: Metal is not reachable from a container; give host {unit.host!r} runtime: native"
        )
    # A CPU host's threads and RAM are the most the worker may use, not what it must hold: requests
    # that claimed all of them would leave no room on the node for the drafter, the swarm sidecar or
    # the engine the manifest also places there. So the request is a share (what the scheduler
    # reserves) and the CPU limit is every thread (what it may use while it computes). No memory
    # limit: one compute buffer past it would OOM-kill the worker holding the model's weights.
    threads = int(spec.get("threads") or 1)
    requests: dict[str, str] = {"cpu": _millicores(threads * WORKER_REQUEST_SHARE)}
    if spec.get("memory"):
        # The RAM this worker lends the pool.
        requests["memory"] = str(int(int(spec["memory"]) * WORKER_REQUEST_SHARE))
    return {"requests": requests, "limits": {"cpu": str(threads)}}


def _millicores(cpus: float) -> str:
    return f"{max(100, int(cpus * 1000))}m"


def _tolerations(unit: Unit) -> list[dict[str, Any]]:
    if unit.kind is Kind.WORKER and unit.spec["backend"] in GPU_RESOURCES:
        key = GPU_RESOURCES[unit.spec["backend"]]
        return [{"key": key, "operator": "Exists", "effect": "NoSchedule"}]
    return []


def _model_init(unit: Unit, image: str, settings: RenderSettings, folder: str) -> list[dict[str, Any]]:
    """One init container per model: wait until the file is in the volume, then check its SHA-256."""
    script = (
        'until [ -f "$MODEL" ]; do echo "waiting for $MODEL (the swarm sidecar fetches it)"; sleep 5; done; '
        '[ -z "$SHA256" ] || echo "$SHA256  $MODEL" | sha256sum -c -'
    )
    inits = []
    for i, ref in enumerate(unit.models):
        inits.append(
            {
                "name": f"model-{i}",
                "image": image,
                "imagePullPolicy": settings.images.pull_policy,
                "command": ["sh", "-c", script],
                "env": [
                    {"name": "MODEL", "value": model_path(ref, folder)},
                    {"name": "SHA256", "value": model_sha256(ref) or ""},
                ],
                "volumeMounts": [{"name": "models", "mountPath": folder, "readOnly": True}],
            }
        )
    return inits


def _model_volume(folder: str, settings: RenderSettings) -> dict[str, Any]:
    if settings.model_claim:
        return {"name": "models", "persistentVolumeClaim": {"claimName": settings.model_claim}}
    return {"name": "models", "hostPath": {"path": folder, "type": "DirectoryOrCreate"}}


def _outside_files(unit: Unit, folder: str, settings: RenderSettings) -> list[str]:
    """Folders of models given by an absolute path outside the model volume, each one allowed."""
    dirs = []
    for ref in unit.models:
        path = model_path(ref, folder)
        if not path.startswith(folder.rstrip("/") + "/"):
            check_host_path(posixpath.dirname(path), f"spec.models[].source of model {ref.name!r}", settings)
            dirs.append(posixpath.dirname(path))
    return sorted(set(dirs))


def node_selector(unit: Unit, hosts: Mapping[str, Host]) -> dict[str, str]:
    """The node named like the unit's host, and the host's labels."""
    return {"kubernetes.io/hostname": unit.host, **_host_labels(unit, hosts)}


def pod_spec(unit: Unit, owner: Owner, settings: RenderSettings, hosts: Mapping[str, Host]) -> dict[str, Any]:
    image = settings.images.for_unit(unit)
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    models: dict[str, str] = {}
    inits: list[dict[str, Any]] = []
    if unit.models:
        folder = model_dir(unit)
        if not settings.model_claim:
            check_host_path(folder, _model_dir_field(unit, hosts), settings)
        volumes.append(_model_volume(folder, settings))
        mounts.append({"name": "models", "mountPath": folder, "readOnly": True})
        for i, outside in enumerate(_outside_files(unit, folder, settings)):
            volumes.append({"name": f"files-{i}", "hostPath": {"path": outside, "type": "Directory"}})
            mounts.append({"name": f"files-{i}", "mountPath": outside, "readOnly": True})
        models = {ref.name: model_path(ref, folder) for ref in unit.models}
        inits = _model_init(unit, image, settings, folder)
    if unit.spec.get("manifest"):
        volumes.append({"name": "config", "configMap": {"name": config_name(owner)}})
        mounts.append({"name": "config", "mountPath": CONFIG_DIR, "readOnly": True})
    shown = unit
    if unit.kind is Kind.WORKER and unit.spec["backend"] in GPU_RESOURCES:
        shown = unit.with_spec(index=0)  # the one GPU the device plugin lends is device 0 in the pod
    argv = command(shown, IMAGE_BINARIES, models)
    container: dict[str, Any] = {
        "name": unit.kind.value,
        "image": image,
        "imagePullPolicy": settings.images.pull_policy,
        "command": argv[:1],
        "args": argv[1:],
        "env": [*_exact_env(unit), *_token_env(unit, settings)],
        "ports": [{"name": "serve", "containerPort": unit.port, "protocol": "TCP"}] if unit.port else [],
        "resources": _resources(unit),
        "volumeMounts": mounts,
        "securityContext": {"allowPrivilegeEscalation": False},
        **_probes(unit),
    }
    spec: dict[str, Any] = {
        "hostNetwork": True,  # units listen on their host's address, as the plan wrote it
        "dnsPolicy": "ClusterFirstWithHostNet",
        "nodeSelector": node_selector(unit, hosts),
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": 30,
        "enableServiceLinks": False,
    }
    if inits:
        spec["initContainers"] = inits
    tolerations = _tolerations(unit)
    if tolerations:
        spec["tolerations"] = tolerations
    return spec


# -- a model's check --------------------------------------------------------------------------------

CHECK_KIND = "model-check"  # the LABEL_KIND of check pods (not a unit: nothing serves in them)
ANNOTATION_MODEL = "tightwad.dev/model"  # on a check pod: {"host": ..., "model": ModelRef JSON}
CHECK_CONTAINER = "check"

# Waits for the file (the swarm sidecar may still be fetching it), then checks it as the process
# driver does: GGUF magic, SHA-256. Its termination message is the answer the operator reads: the
# file's size in bytes, or why the file cannot be used (exit 1).
_CHECK_SCRIPT = (
    'until [ -f "$MODEL" ]; do echo "waiting for $MODEL (the swarm sidecar fetches it)"; sleep 5; done; '
    'no() { echo "$1" >/dev/termination-log; echo "$1" >&2; exit 1; }; '
    '[ "$(head -c 4 "$MODEL")" = GGUF ] || no "$MODEL is not a GGUF file"; '
    'if [ -n "$SHA256" ]; then actual="$(sha256sum "$MODEL" | cut -d" " -f1)"; '
    '[ "$actual" = "$SHA256" ] || no "sha256 of $MODEL is $actual, the manifest says $SHA256; '
    'fix spec.models[].sha256 or replace the file"; fi; '
    'stat -c %s "$MODEL" >/dev/termination-log'
)


def check_name(owner: Owner, host: str, model: ModelRef) -> str:
    return object_name(owner.name, "check", model.name, host)


def render_model_check(
    unit: Unit, model: ModelRef, owner: Owner, settings: RenderSettings, hosts: Mapping[str, Host]
) -> dict[str, Any]:
    """A Pod that checks `model` on `unit`'s host (where `unit` will read it) and ends: what the
    plan's VerifyModel is on Kubernetes. Its size decides whether a new model loads beside the
    serving one; a bad file is refused before anything running is touched."""
    folder = model_dir(unit)
    if not settings.model_claim:
        check_host_path(folder, _model_dir_field(unit, hosts), settings)
    volumes = [_model_volume(folder, settings)]
    mounts = [{"name": "models", "mountPath": folder, "readOnly": True}]
    for i, outside in enumerate(_outside_files(dataclasses.replace(unit, models=(model,)), folder, settings)):
        volumes.append({"name": f"files-{i}", "hostPath": {"path": outside, "type": "Directory"}})
        mounts.append({"name": f"files-{i}", "mountPath": outside, "readOnly": True})
    labels = {
        **owner.labels,
        "app.kubernetes.io/name": "tightwad",
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/component": CHECK_KIND,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_CLUSTER: owner.name,
        LABEL_KIND: CHECK_KIND,
    }
    record = json.dumps({"host": unit.host, "model": model.to_json()}, sort_keys=True)
    container = {
        "name": CHECK_CONTAINER,
        "image": settings.images.tightwad,
        "imagePullPolicy": settings.images.pull_policy,
        "command": ["sh", "-c", _CHECK_SCRIPT],
        "env": [
            {"name": "MODEL", "value": model_path(model, folder)},
            {"name": "SHA256", "value": model_sha256(model) or ""},
        ],
        "resources": {"requests": {"cpu": "100m", "memory": "32Mi"}},
        "volumeMounts": mounts,
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(owner, check_name(owner, unit.host, model), labels, {ANNOTATION_MODEL: record}),
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": node_selector(unit, hosts),
            "tolerations": [{"operator": "Exists", "effect": "NoSchedule"}],  # GPU nodes too
            "containers": [container],
            "volumes": volumes,
            "enableServiceLinks": False,
        },
    }


# -- whole objects --------------------------------------------------------------------------------


def config_name(owner: Owner) -> str:
    return object_name(owner.name, "manifest")


def _host_labels(unit: Unit, hosts: Mapping[str, Host]) -> dict[str, str]:
    host = hosts.get(unit.host)
    return dict(host.labels) if host is not None else {}


def render_unit(
    unit: Unit, owner: Owner, settings: RenderSettings, hosts: Mapping[str, Host]
) -> list[dict[str, Any]]:
    """The objects that run `unit` (the swarm's: see `render_swarm`)."""
    if unit.kind is Kind.SWARM:
        raise CannotRender("swarm sidecars share one DaemonSet; render them with render_swarm()")
    name = workload_name(owner, unit)
    labels = _labels(owner, unit.name, unit.kind, _host_labels(unit, hosts))
    pod = pod_spec(unit, owner, settings, hosts)
    annotations = _unit_annotations(unit)
    if unit.kind is Kind.WORKER:
        pod["restartPolicy"] = "Always"
        return [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": _metadata(owner, name, labels, annotations),
                "spec": pod,
            }
        ]
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, name, labels, annotations),
        "spec": {
            "replicas": 1,
            # Never two at once: they would share the host's port (host network) and its GPU memory.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector(owner, unit.name)},
            "template": {
                "metadata": {"labels": labels, "annotations": {ANNOTATION_SPEC_HASH: unit.spec_hash}},
                "spec": pod,
            },
        },
    }
    objects = [deployment]
    if unit.kind is Kind.PROXY:
        objects.append(render_proxy_service(unit, owner, settings, labels))
    return objects


def render_proxy_service(
    unit: Unit, owner: Owner, settings: RenderSettings, labels: Mapping[str, str]
) -> dict[str, Any]:
    """The cluster's front door inside the cluster (ClusterIP). The chart's `proxyService` exposes one
    cluster's proxy outside it (LoadBalancer, NodePort) with the annotations a site needs."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(
            owner, object_name(owner.name, "proxy"), labels, {ANNOTATION_SPEC_HASH: unit.spec_hash}
        ),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(owner, unit.name),
            "ports": [{"name": "http", "port": unit.port, "targetPort": unit.port, "protocol": "TCP"}],
        },
    }


def swarm_name(owner: Owner) -> str:
    return object_name(owner.name, "swarm")


def render_swarm(
    units: Sequence[Unit], owner: Owner, settings: RenderSettings, hosts: Mapping[str, Host]
) -> dict[str, Any]:
    """One DaemonSet for every swarm sidecar of the cluster, on exactly the nodes of their hosts.
    Each pod finds its host in the manifest by its node's name."""
    if not units:
        raise CannotRender("no swarm units to render")
    first = units[0]
    if not settings.model_claim:
        for unit in units:
            check_host_path(model_dir(unit), _model_dir_field(unit, hosts), settings)
    folders = {model_dir(u) for u in units}
    if len(folders) > 1 and not settings.model_claim:
        # One pod template: one hostPath. Hosts with different modelDirs need a volume of their own.
        raise CannotRender(
            f"the swarm's hosts use different modelDirs ({', '.join(sorted(folders))}); give every "
            "kubernetes host the same modelDir"
        )
    folder = folders.pop()
    labels = _labels(owner, "swarm", Kind.SWARM)
    record = json.dumps([u.to_json() for u in units], sort_keys=True)
    annotations = {
        SWARM_UNITS: record,
        ANNOTATION_SPEC_HASH: hashlib.sha256(record.encode()).hexdigest()[:16],
    }
    config = posixpath.join(CONFIG_DIR, CONFIG_FILE)
    argv = ["python", "-m", "tightwad.cli", "swarm", "sidecar", config, "--host", "$(NODE_NAME)"]
    container = {
        "name": "swarm-sidecar",
        "image": settings.images.tightwad,
        "imagePullPolicy": settings.images.pull_policy,
        "command": argv[:1],
        "args": argv[1:],
        "env": [
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            *_token_env(first, settings),
        ],
        "ports": [{"name": "pieces", "containerPort": first.port, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
        "volumeMounts": [
            {"name": "models", "mountPath": folder},
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "runAsUser": UNPRIVILEGED,
            "runAsGroup": UNPRIVILEGED,
            "runAsNonRoot": True,
        },
        "readinessProbe": {"httpGet": {"path": "/health", "port": first.port}, "periodSeconds": 10},
    }
    nodes = sorted({u.host for u in units})
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": "kubernetes.io/hostname", "operator": "In", "values": nodes}
                        ]
                    }
                ]
            }
        }
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _metadata(owner, swarm_name(owner), labels, annotations),
        "spec": {
            "selector": {"matchLabels": selector(owner, "swarm")},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {ANNOTATION_SPEC_HASH: annotations[ANNOTATION_SPEC_HASH]},
                },
                "spec": {
                    "hostNetwork": True,
                    "dnsPolicy": "ClusterFirstWithHostNet",
                    "affinity": affinity,
                    "tolerations": [{"operator": "Exists", "effect": "NoSchedule"}],  # GPU nodes too
                    **_model_folder_owner(folder, settings),
                    "containers": [container],
                    "volumes": [
                        _model_volume(folder, settings),
                        {"name": "config", "configMap": {"name": config_name(owner)}},
                    ],
                    "enableServiceLinks": False,
                },
            },
        },
    }


def _literal(value: Any) -> Any:
    """`value` with every `${` written `$${`, which the pods' manifest loader reads back as `${`."""
    if isinstance(value, str):
        return value.replace("${", "$${")
    if isinstance(value, dict):
        return {k: _literal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_literal(v) for v in value]
    return value


def _model_folder_owner(folder: str, settings: RenderSettings) -> dict[str, Any]:
    """What makes the model folder writable by the sidecar, which runs unprivileged.

    A claim: fsGroup, which the kubelet applies to volumes that support ownership (only when the
    root does not match). A hostPath: the kubelet creates it root-owned and never applies fsGroup
    there, so a short init container chowns that one folder (not what is in it): root, but with
    CHOWN as its only capability, no privilege escalation, and nothing else mounted."""
    if settings.model_claim:
        return {"securityContext": {"fsGroup": UNPRIVILEGED, "fsGroupChangePolicy": "OnRootMismatch"}}
    owner = f"{UNPRIVILEGED}:{UNPRIVILEGED}"
    script = f'[ "$(stat -c %u:%g "$MODEL_DIR")" = "{owner}" ] || chown {owner} "$MODEL_DIR"'
    init = {
        "name": "model-folder",
        "image": settings.images.tightwad,
        "imagePullPolicy": settings.images.pull_policy,
        "command": ["sh", "-c", script],
        "env": [{"name": "MODEL_DIR", "value": folder}],
        "volumeMounts": [{"name": "models", "mountPath": folder}],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]},
        },
    }
    return {"initContainers": [init]}


def manifest_text(manifest: Manifest) -> str:
    """The manifest as the pods read it: the token stays in the Secret, referenced as a variable.

    The pods interpolate `${VAR}` from their environment, which holds the token; a CR's author may
    not read that Secret. So only spec.auth.token names a variable, and every other `${` the CR
    wrote (a drafter's apiKey, a URL, a swarm peer) stays literal text, as the operator saw it."""
    data = _literal(json.loads(json.dumps(manifest.data)))
    data.pop("status", None)
    meta = data.get("metadata", {})
    data["metadata"] = {k: meta[k] for k in ("name", "labels") if k in meta}
    if data["spec"].get("auth", {}).get("token"):
        data["spec"]["auth"]["token"] = TOKEN_PLACEHOLDER
    return yaml.safe_dump(data, sort_keys=False)


def render_config(manifest: Manifest, owner: Owner) -> dict[str, Any]:
    """The ConfigMap the proxy and the swarm sidecars read the manifest from."""
    labels = _labels(owner, "manifest", Kind.PROXY)
    labels["app.kubernetes.io/component"] = "manifest"
    labels.pop(LABEL_KIND)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, config_name(owner), labels, {}),
        "data": {CONFIG_FILE: manifest_text(manifest)},
    }


def render_all(
    units: Iterable[Unit], manifest: Manifest, owner: Owner, settings: RenderSettings
) -> list[dict[str, Any]]:
    """Every object for `units` of `manifest`: for whole-cluster checks and `tightwad operator --render`."""
    hosts = {h.name: h for h in manifest.hosts}
    units = list(units)
    objects = [render_config(manifest, owner)]
    for unit in units:
        if unit.kind is not Kind.SWARM:
            objects += render_unit(unit, owner, settings, hosts)
    swarm = [u for u in units if u.kind is Kind.SWARM]
    if swarm:
        objects.append(render_swarm(swarm, owner, settings, hosts))
    return objects
