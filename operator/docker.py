"""The docker driver: one host's units as containers, through the Docker Engine API (docker SDK).

Every container carries labels (cluster, host, unit, kind, spec hash, and the unit itself), so the
driver needs no records of its own: what runs is read back from the daemon, and a new operator
adopts it by label. Containers use host networking (units listen on the host's address, as the
manifest says), a restart policy (the daemon revives them even while no operator runs), the
host's model volume at /models, and for GPUs: NVIDIA through a device request, AMD through
/dev/kfd + /dev/dri and the video/render groups.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import DeviceRequest

import docker
from tightwad import __version__, models
from tightwad.manifest import Manifest
from tightwad.manifest_views import Host
from tightwad.operator import health
from tightwad.operator.commands import Binaries, CannotRun, command, environment
from tightwad.operator.driver import DriverUnavailable
from tightwad.operator.observed import Health, ModelCheck, ModelKey, ModelState, UnitState
from tightwad.operator.units import ENGINE_ROUTER, KIND_ORDER, Kind, ModelRef, Unit

LABEL = "tightwad.dev"
MODEL_MOUNT = "/models"
IN_IMAGE = Binaries(python=("python", "-m"), rpc_server="ggml-rpc-server", llama_server="llama-server")
RECHECK_MISSING_S = 15.0


@dataclass(frozen=True)
class Images:
    """Which image runs which unit; `TIGHTWAD_IMAGE_*` variables override the defaults."""

    app: str = f"tightwad/tightwad:{__version__}"  # python units: engine, router, proxy, swarm
    worker_cpu: str = f"tightwad/worker-cpu:{__version__}"  # ggml-rpc-server + llama-server
    worker_cuda: str = f"tightwad/worker-cuda:{__version__}"
    worker_rocm: str = f"tightwad/worker-rocm:{__version__}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Images:
        env = os.environ if environ is None else environ
        defaults = cls()
        return cls(
            app=env.get("TIGHTWAD_IMAGE_APP", defaults.app),
            worker_cpu=env.get("TIGHTWAD_IMAGE_WORKER_CPU", defaults.worker_cpu),
            worker_cuda=env.get("TIGHTWAD_IMAGE_WORKER_CUDA", defaults.worker_cuda),
            worker_rocm=env.get("TIGHTWAD_IMAGE_WORKER_ROCM", defaults.worker_rocm),
        )

    def for_unit(self, unit: Unit) -> str:
        if unit.kind is Kind.WORKER:
            return {"cuda": self.worker_cuda, "rocm": self.worker_rocm}.get(
                unit.spec["backend"], self.worker_cpu
            )
        if unit.kind is Kind.DRAFTER:
            return self.worker_cpu  # llama-server, from the same llama.cpp build
        return self.app


def model_file(ref: ModelRef) -> str:
    """The file name a model has in a host's model volume (what the swarm sidecar puts there)."""
    if ref.source.startswith(models.CATALOG_PREFIX):
        return models.catalog_model(ref.source.removeprefix(models.CATALOG_PREFIX)).filename
    return PurePosixPath(ref.source.split("?", 1)[0]).name


def container_name(cluster: str, unit: str) -> str:
    return f"tightwad-{cluster}-{unit}"


def container_config(
    unit: Unit, cluster: str, images: Images, model_dir: str | None, failures: int = 0
) -> dict[str, Any]:
    """Keyword arguments for `containers.run` (pure: unit-tested without a daemon)."""
    paths = {ref.name: f"{MODEL_MOUNT}/{model_file(ref)}" for ref in unit.models}
    config: dict[str, Any] = {
        "image": images.for_unit(unit),
        "command": command(unit, IN_IMAGE, paths),
        "name": container_name(cluster, unit.name),
        "labels": {
            f"{LABEL}/cluster": cluster,
            f"{LABEL}/host": unit.host,
            f"{LABEL}/unit": unit.name,
            f"{LABEL}/kind": unit.kind.value,
            f"{LABEL}/spec-hash": unit.spec_hash,
            f"{LABEL}/failures": str(failures),
            f"{LABEL}/unit-json": json.dumps(unit.to_json(), sort_keys=True),
        },
        "environment": {k: v for k, v in environment(unit, IN_IMAGE).items() if k != "LLAMA_CPP_LIB_PATH"},
        "network_mode": "host",
        "restart_policy": {"Name": "unless-stopped"},
        "detach": True,
    }
    if unit.models or unit.kind is Kind.SWARM:
        if not model_dir:
            raise CannotRun(f"{unit.name} needs host {unit.host}'s modelDir for its model volume")
        mode = "rw" if unit.kind is Kind.SWARM else "ro"
        config["volumes"] = {model_dir: {"bind": MODEL_MOUNT, "mode": mode}}
    if unit.kind is Kind.WORKER:
        backend, index = unit.spec["backend"], int(unit.spec.get("index", 0))
        if backend == "cuda":
            config["device_requests"] = [DeviceRequest(device_ids=[str(index)], capabilities=[["gpu"]])]
        elif backend == "rocm":
            config["devices"] = ["/dev/kfd:/dev/kfd:rwm", "/dev/dri:/dev/dri:rwm"]
            config["group_add"] = ["video", "render"]
            config["security_opt"] = ["seccomp=unconfined"]  # ROCm's allocator needs it (AMD's docs)
        elif backend == "metal":
            raise CannotRun("Metal is not reachable from a container; give this host runtime: native")
    return config


def _client(host: Host) -> docker.DockerClient:
    access = host.docker
    if access is None:
        return docker.from_env()
    tls: Any = False
    if access.tls is not None:
        t = access.tls
        tls = docker.tls.TLSConfig(client_cert=(t.cert, t.key), ca_cert=t.ca, verify=True)
    endpoint = access.endpoint
    return docker.DockerClient(base_url=endpoint, tls=tls, use_ssh_client=endpoint.startswith("ssh://"))


def endpoint_key(host: Host) -> tuple[str, ...]:
    """What makes two hosts' daemons the same: the endpoint and the client TLS it is reached with
    (no `docker` section: this machine's daemon, as the environment names it)."""
    access = host.docker
    if access is None:
        return ("env",)
    tls = access.tls
    return (access.endpoint, *((tls.ca, tls.cert, tls.key) if tls is not None else ()))


class DockerClients:
    """One Docker client per endpoint, made on its first real use and shared by every host behind
    it. Making a client asks the daemon for its API version, so making them up front (750 hosts,
    750 round trips) cost seconds even for a dry run that needs none of them."""

    def __init__(self, connect: Callable[[Host], docker.DockerClient] = _client) -> None:
        self.connect = connect
        self._clients: dict[tuple[str, ...], docker.DockerClient] = {}
        self._lock = threading.Lock()

    def get(self, host: Host) -> docker.DockerClient:
        """The client for `host`'s daemon; DockerException when it cannot be reached (tried again
        on the next call: nothing is remembered of a failure)."""
        key = endpoint_key(host)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = self.connect(host)
            return client

    def made(self) -> int:
        """How many clients exist (each one a daemon contacted)."""
        return len(self._clients)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()


def _shares_our_network(host: Host) -> bool:
    """A daemon on a unix socket here runs host-network containers in our network namespace."""
    endpoint = host.docker.endpoint if host.docker is not None else "unix://"
    return endpoint.startswith("unix://")


@dataclass
class _Failed:
    unit: Unit
    error: str
    at: float
    failures: int


@dataclass
class _ModelChecks:
    results: dict[ModelKey, ModelCheck] = field(default_factory=dict)
    asked: dict[ModelKey, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class DockerDriver:
    """Runs one host's units on that host's Docker daemon."""

    runtime = "docker"

    def __init__(
        self,
        client: docker.DockerClient | None,
        host: Host,
        cluster: str,
        *,
        clients: DockerClients | None = None,
        images: Images | None = None,
        local_network: bool | None = None,
        probe: Callable[[Unit], health.Probe] | None = None,
        stop_timeout: int = 15,
        swarm: bool = False,
    ) -> None:
        if client is None and clients is None:
            raise ValueError("a DockerDriver needs a client, or the DockerClients to get one from")
        self._client = client  # given, or got from `clients` on first use (shared: not ours to close)
        self.clients = clients
        self.host = host
        self.name = host.name
        self.cluster = cluster
        self.images = images or Images.from_env()
        self.local = _shares_our_network(host) if local_network is None else local_network
        self.probe = probe or (lambda unit: health.probe(unit, local=self.local))
        self.stop_timeout = stop_timeout
        self.swarm = swarm
        self.failed: dict[str, _Failed] = {}
        self.pulls: dict[str, str] = {}  # image -> what became of its pull
        self.checks = _ModelChecks()
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"docker-{self.name}")
        self.health: dict[str, tuple[Health, float]] = {}

    @classmethod
    def for_host(
        cls, host: Host, manifest: Manifest, state_dir: Path, clients: DockerClients | None = None
    ) -> DockerDriver:
        """The driver for `host`; its daemon is first contacted when the driver first needs it."""
        return cls(
            None, host, manifest.name, clients=clients or DockerClients(), swarm=manifest.swarm.enabled
        )

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            assert self.clients is not None
            try:
                self._client = self.clients.get(self.host)
            except (DockerException, OSError) as exc:
                raise DriverUnavailable(f"host {self.name}: cannot reach its Docker daemon: {exc}") from None
        return self._client

    def _filters(self) -> dict[str, Any]:
        return {"label": [f"{LABEL}/cluster={self.cluster}", f"{LABEL}/host={self.name}"]}

    def containers(self) -> list[Any]:
        return list(self.client.containers.list(all=True, filters=self._filters()))

    # -- observe ---------------------------------------------------------------------------------

    def observe(self, now: float) -> dict[str, UnitState]:
        try:
            found = self.containers()
        except (DockerException, OSError) as exc:
            # Seeing nothing is not "nothing runs": the loop must not start duplicates meanwhile.
            raise DriverUnavailable(f"host {self.name}: its Docker daemon does not answer: {exc}") from None
        states: dict[str, UnitState] = {}
        running = []
        for container in found:
            labels = container.labels
            try:
                unit = Unit.from_json(json.loads(labels[f"{LABEL}/unit-json"]))
            except (KeyError, ValueError):
                continue  # not one of ours after all
            state = container.attrs.get("State", {})
            started = _timestamp(state.get("StartedAt"))
            base = UnitState(
                unit=unit,
                running=container.status == "running",
                health=Health.DOWN,
                started_at=started,
                failures=int(labels.get(f"{LABEL}/failures", "0"))
                + int(container.attrs.get("RestartCount", 0)),
                adopted=True,
                detail={
                    "container": container.short_id,
                    "image": container.attrs.get("Config", {}).get("Image"),
                },
            )
            if base.running:
                running.append((unit, base))
            else:
                error = state.get("Error") or _last_log_line(container)
                states[unit.name] = base.with_(
                    exit_code=state.get("ExitCode"),
                    exited_at=_timestamp(state.get("FinishedAt")) or now,
                    error=error,
                )
        probes = list(self.pool.map(self.probe, [unit for unit, _ in running]))
        for (unit, base), result in zip(running, probes, strict=True):
            previous = self.health.get(unit.name)
            if previous is None or previous[0] is not result.health:
                self.health[unit.name] = (result.health, now)
            is_router = unit.name == ENGINE_ROUTER
            states[unit.name] = base.with_(
                health=result.health,
                since=self.health[unit.name][1],
                error=result.error if result.health is not Health.OK else None,
                route=result.body.get("unit") if is_router else None,
                inflight=dict(result.body.get("inflight") or {}) if is_router else {},
            )
        for name, failed in self.failed.items():
            if name not in states:
                states[name] = UnitState(
                    unit=failed.unit,
                    running=False,
                    health=Health.DOWN,
                    failures=failed.failures,
                    exited_at=failed.at,
                    error=failed.error,
                )
        return states

    # -- act -------------------------------------------------------------------------------------

    def start(self, unit: Unit, reason: str, failed: bool = False) -> None:
        previous = self._find(unit.name)
        failures = 0
        if failed:
            if previous is not None:
                failures = int(previous.labels.get(f"{LABEL}/failures", "0")) + 1
            elif unit.name in self.failed:
                failures = self.failed[unit.name].failures + 1
            else:
                failures = 1
        try:
            if previous is not None:
                self._remove(previous)
            config = container_config(unit, self.cluster, self.images, self.host.model_dir, failures)
            if not self._have_image(config["image"]):
                self._fail(unit, self.pulls.get(config["image"], "pulling"), failures)
                return
            self.client.containers.run(**config)
        except (CannotRun, APIError, DockerException) as exc:
            self._fail(unit, str(exc), failures)
            return
        self.failed.pop(unit.name, None)
        self.health.pop(unit.name, None)

    def _have_image(self, image: str) -> bool:
        """Is `image` on the host? If not, pull it in the background (the plan retries the start)."""
        try:
            self.client.images.get(image)
            return True
        except ImageNotFound:
            pass
        if image not in self.pulls:
            self.pulls[image] = f"pulling image {image} on host {self.name}"
            self.pool.submit(self._pull, image)
        return False

    def _pull(self, image: str) -> None:
        try:
            self.client.images.pull(image)
            self.pulls.pop(image, None)
        except DockerException as exc:
            detail = str(exc).split("(", 1)[-1].rstrip(")") if "(" in str(exc) else str(exc)
            self.pulls[image] = (
                f"image {image} is not on host {self.name} and could not be pulled ({detail[:200]}); "
                "build or load it there"
            )

    def _fail(self, unit: Unit, error: str, failures: int) -> None:
        self.failed[unit.name] = _Failed(unit, error, time.time(), failures)

    def stop(self, unit: Unit, reason: str = "") -> None:
        self.failed.pop(unit.name, None)
        self.health.pop(unit.name, None)
        container = self._find(unit.name)
        if container is not None:
            self._remove(container)

    def _find(self, name: str) -> Any | None:
        try:
            return self.client.containers.get(container_name(self.cluster, name))
        except NotFound:
            return None

    def _remove(self, container: Any) -> None:
        with contextlib.suppress(NotFound, APIError):
            container.stop(timeout=self.stop_timeout)
        try:
            container.remove(force=True)
        except NotFound:
            return
        except APIError as exc:
            if exc.status_code != 409:  # 409: someone else is removing it already; wait for that
                raise
        deadline = time.monotonic() + self.stop_timeout
        while time.monotonic() < deadline:
            try:
                container.reload()
            except NotFound:
                return
            time.sleep(0.1)

    def stop_all(self) -> list[str]:
        found = []
        for container in self.containers():
            kind = container.labels.get(f"{LABEL}/kind", Kind.WORKER.value)
            found.append(
                (
                    KIND_ORDER.get(Kind(kind), 0),
                    container.labels.get(f"{LABEL}/unit", container.name),
                    container,
                )
            )
        found.sort(key=lambda item: -item[0])
        for _, _, container in found:
            self._remove(container)
        self.failed.clear()
        return [name for _, name, _ in found]

    # -- models: checked where they will be read, in a throwaway container with the volume --------

    def verify(self, host: str, model: ModelRef) -> None:
        key = (host, model)
        with self.checks.lock:
            if key in self.checks.results and self.checks.results[key].state is not ModelState.MISSING:
                return
            self.checks.results.setdefault(key, ModelCheck(ModelState.CHECKING))
        self.pool.submit(self._check, key)

    def models(self) -> dict[ModelKey, ModelCheck]:
        now = time.monotonic()
        with self.checks.lock:
            results = dict(self.checks.results)
        for key, check in results.items():
            if (
                check.state is ModelState.MISSING
                and now - self.checks.asked.get(key, 0.0) > RECHECK_MISSING_S
            ):
                self.checks.asked[key] = now
                self.pool.submit(self._check, key)
        return results

    def _check(self, key: ModelKey) -> None:
        _, ref = key
        self.checks.asked[key] = time.monotonic()
        try:
            check = self._check_in_container(ref)
        except Exception as exc:  # an answer must always come back
            check = ModelCheck(ModelState.BAD, reason=f"could not check it on {self.name}: {exc}")
        with self.checks.lock:
            self.checks.results[key] = check

    def _check_in_container(self, ref: ModelRef) -> ModelCheck:
        folder = self.host.model_dir
        if not folder:
            return ModelCheck(ModelState.MISSING, reason=f"host {self.name} has no modelDir")
        name = model_file(ref)
        path = f"{MODEL_MOUNT}/{name}"
        script = (
            f'f="{path}"; [ -f "$f" ] || {{ echo missing; exit 0; }}; '
            'echo "size $(stat -c %s "$f")"; echo "magic $(head -c 4 "$f")"; '
            + ('echo "sha $(sha256sum "$f" | cut -d" " -f1)"' if ref.sha256 else "true")
        )
        output = self.client.containers.run(
            self.images.worker_cpu,
            ["sh", "-c", script],
            remove=True,
            network_mode="none",
            volumes={folder: {"bind": MODEL_MOUNT, "mode": "ro"}},
            labels={f"{LABEL}/cluster": self.cluster, f"{LABEL}/check": "model"},
        ).decode(errors="replace")
        facts = dict(line.split(" ", 1) for line in output.strip().splitlines() if " " in line)
        if output.strip() == "missing" or "size" not in facts:
            how = "the swarm sidecar is fetching it" if self.swarm else "enable spec.swarm or copy it there"
            return ModelCheck(
                ModelState.MISSING, reason=f"{name} is not in {folder} on {self.name} yet; {how}"
            )
        size = int(facts["size"])
        shown = f"{folder}/{name} on {self.name}"
        if facts.get("magic") != "GGUF":
            return ModelCheck(ModelState.BAD, size=size, path=shown, reason=f"{shown} is not a GGUF file")
        if ref.sha256 and facts.get("sha") != ref.sha256:
            reason = (
                f"sha256 of {shown} is {facts.get('sha', '?')[:12]}…, the manifest says {ref.sha256[:12]}…"
            )
            return ModelCheck(ModelState.BAD, size=size, path=shown, reason=reason)
        return ModelCheck(ModelState.OK, size=size, path=shown)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.clients is None and self._client is not None:  # a shared client is closed by its owner
            with contextlib.suppress(Exception):
                self._client.close()


def _timestamp(value: str | None) -> float | None:
    if not value or value.startswith("0001-"):
        return None
    text = value.rstrip("Z")
    if "." in text:  # Docker writes nanoseconds; Python takes microseconds
        head, frac = text.split(".", 1)
        text = f"{head}.{frac[:6]}"
    try:
        return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None


def _last_log_line(container: Any) -> str | None:
    try:
        lines = container.logs(tail=5).decode(errors="replace").strip().splitlines()
    except (DockerException, OSError):
        return None
    return lines[-1][:300] if lines else None
