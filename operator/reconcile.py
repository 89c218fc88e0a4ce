"""The reconcile loop: read the manifest, observe, plan, act, write status; again on every change.

Each pass is complete on its own (level-triggered): it re-reads the manifest, asks every driver what
runs, plans from scratch and executes the actions. A broken manifest never tears anything down: the
last good one stays in force and status says what is wrong. State lives in the drivers' records, so
a new operator (after a crash, a reboot of the operator alone) adopts what runs and carries on.

Hosts are driven by: the process driver (runtime `process` on this machine), the docker driver
(runtime `docker`, one per Docker endpoint), or an agent (runtime `native`, or `process` on another
machine), which runs its units itself and reports them here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tightwad import toolchain
from tightwad.errors import TightwadError
from tightwad.manifest import Manifest, ManifestError, is_loopback, load_manifest
from tightwad.manifest_views import DockerAccess, Host
from tightwad.operator.commands import Binaries
from tightwad.operator.desired import Desired, available_components, desired_state
from tightwad.operator.driver import Driver, DriverUnavailable
from tightwad.operator.modelcheck import ModelChecker
from tightwad.operator.observed import ModelCheck, ModelKey, Observed, UnitState
from tightwad.operator.plan import Action, PlannerPolicy, ReconcilePlan, Route, Start, Stop, VerifyModel, plan
from tightwad.operator.process import ProcessDriver
from tightwad.operator.status import StatusFile, status_path_for
from tightwad.operator.units import Kind, Unit
from tightwad.ports import in_use

if TYPE_CHECKING:  # the docker module (and the docker SDK) is imported only when a host needs it
    from tightwad.operator.docker import DockerClients

Events = Callable[[str], None]


class OperatorBusy(TightwadError):
    """Another operator already manages this cluster."""


def state_root() -> Path:
    explicit = os.environ.get("TIGHTWAD_STATE_DIR")
    return Path(explicit) if explicit else toolchain.cache_root() / "run"


def is_local_address(address: str) -> bool:
    """Loopback, or an address of one of this machine's interfaces (binding to it succeeds)."""
    if is_loopback(address):
        return True
    try:
        infos = socket.getaddrinfo(address.strip("[]"), None)
    except OSError:
        return False
    for family, _, _, _, sockaddr in infos:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((sockaddr[0], 0))
                return True
            except OSError:
                continue
    return False


def host_driver_kind(host: Host) -> str:
    """Who runs a host's units: "process", "docker", "agent" or "kubernetes"."""
    if host.runtime == "process":
        return "process" if is_local_address(host.address) else "agent"
    return "agent" if host.runtime == "native" else host.runtime


def local_free_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def pinned_binaries() -> Binaries:
    """The pinned llama.cpp build's programs, or bare names when it is not built here."""
    try:
        tc = toolchain.find()
    except toolchain.ToolchainMissing:
        return Binaries()
    return Binaries(rpc_server=str(tc.rpc_server), llama_server=str(tc.llama_server), env=tc.env())


@dataclass
class PassResult:
    desired: Desired | None
    observed: Observed
    plan: ReconcilePlan | None
    manifest_error: str | None
    executed: list[str] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)


class Reconciler:
    """Converges the cluster of one manifest file. One per cluster at a time (a lock file says so)."""

    def __init__(
        self,
        manifest_path: str | Path,
        *,
        policy: PlannerPolicy | None = None,
        components: frozenset[str] | None = None,
        events: Events | None = None,
        binaries: Binaries | None = None,
        docker_factory: Callable[[Host, Manifest], Driver] | None = None,
        lock: bool = True,
        dry_run: bool = False,
        router: Callable[[Unit, Unit, str | None], str | None] | None = None,
    ) -> None:
        self.path = Path(manifest_path).resolve()
        self.policy = policy or PlannerPolicy()
        self.components = available_components() if components is None else components
        self.events = events or (lambda line: None)
        self.binaries = binaries or pinned_binaries()
        self.docker_factory = docker_factory
        self.router = router or (lambda r, backend, token: route(r, backend, token=token))
        # A dry run (`tightwad plan`) contacts no Docker daemon and no host: what runs there is
        # not observed, so those hosts stay out of the plan (named in `unobserved`).
        self.dry_run = dry_run
        self.unobserved: set[str] = set()
        self.docker_clients: DockerClients | None = None  # made with the first docker driver
        self.status = StatusFile(status_path_for(self.path))
        self.manifest: Manifest | None = None
        self.desired: Desired | None = None
        self.manifest_error: str | None = None
        self.manifest_digest = ""
        self.host_kinds: dict[str, str] = {}
        self.docker: dict[str, Driver] = {}  # per host; kept after the host leaves, to remove its units
        self.docker_settings: dict[str, DockerAccess | None] = {}
        self.host_errors: dict[str, str] = {}  # docker hosts whose daemon could not be reached at all
        self.unreachable: dict[str, str] = {}  # hosts whose driver could not observe this pass
        self.agent_reports: dict[str, tuple[float, dict[str, UnitState], dict[ModelKey, ModelCheck]]] = {}
        self.agent_lock = threading.Lock()
        self.origin: dict[str, Driver] = {}
        self.origin_hosts: set[str] = set()
        self.last_observed: Observed | None = None  # what the agent API serves
        self.wake = threading.Event()
        self.load()
        cluster = self.manifest.name if self.manifest else self.status.previous.get("cluster")
        if not cluster:
            raise TightwadError(f"{self.path}: {self.manifest_error}")
        self.cluster = str(cluster)
        self.state_dir = state_root() / self.cluster
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._lock() if lock else None
        if not os.access(self.status.path.parent, os.W_OK):  # a manifest in a read-only folder
            self.status = StatusFile(self.state_dir / "status.json")
        if lock:  # an operator, not a dry run: `tightwad status` without a FILE shows this one
            with contextlib.suppress(OSError):
                (state_root() / "last-status").write_text(str(self.status.path))
        checker = ModelChecker(
            self.path.parent, swarm=False, cache_file=self.state_dir / "model-digests.json"
        )
        self.process = ProcessDriver(self.state_dir, checker, self.binaries, manifest_path=str(self.path))
        self._configure()

    # -- the manifest ----------------------------------------------------------------------------

    def _lock(self) -> Any:
        handle = (self.state_dir / "operator.lock").open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise OperatorBusy(
                f"cluster {self.cluster!r} is already managed by operator pid {holder}; "
                "stop it first, or look at it with `tightwad status`"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        return handle

    def load(self) -> bool:
        """Re-read the manifest; True when it changed. A bad one keeps the last good one in force."""
        try:
            text = self.path.read_bytes()
        except OSError as exc:
            text = b""
            error: str | None = f"cannot read {self.path}: {exc.strerror or exc}"
        else:
            error = None
        digest = hashlib.sha256(text).hexdigest()[:16]
        if digest == self.manifest_digest and error is None:
            return False
        self.manifest_digest = digest
        if error is None:
            try:
                manifest = load_manifest(self.path)
            except ManifestError as exc:
                error = "; ".join(p.format(str(self.path)) for p in exc.problems[:5])
            else:
                if self.manifest is not None and manifest.name != self.manifest.name:
                    error = (
                        f"metadata.name changed from {self.manifest.name!r} to {manifest.name!r}; "
                        "a running operator keeps one cluster: `tightwad down` the old one first"
                    )
                else:
                    self.manifest = manifest
                    self.desired = desired_state(
                        manifest, components=self.components, manifest_path=str(self.path)
                    )
        self.manifest_error = error
        if error:
            self.events(f"manifest rejected, keeping the last good one: {error}")
        elif hasattr(self, "process"):
            self._configure()
        return True

    def _configure(self) -> None:
        manifest = self.manifest
        if manifest is None:
            return
        self.host_kinds = {h.name: host_driver_kind(h) for h in manifest.hosts}
        model_dirs: dict[str, str | None] = {h.name: h.model_dir for h in manifest.hosts}
        self.process.checker.configure(self.path.parent, model_dirs, manifest.swarm.enabled)
        self.unobserved = (
            {h for h, kind in self.host_kinds.items() if kind == "docker"} if self.dry_run else set()
        )
        for host in manifest.hosts:
            name = host.name
            if self.host_kinds[name] != "docker" or self.dry_run:
                continue
            if name in self.docker and self.docker_settings.get(name) == host.docker:
                continue
            if name in self.docker:  # a new endpoint: talk to the new daemon from now on
                self.docker.pop(name).close()
            try:
                if self.docker_factory is None:
                    from tightwad.operator.docker import DockerClients, DockerDriver

                    if self.docker_clients is None:
                        self.docker_clients = DockerClients()
                    driver: Driver = DockerDriver.for_host(
                        host, manifest, self.state_dir, self.docker_clients
                    )
                else:
                    driver = self.docker_factory(host, manifest)
            except Exception as exc:  # an unreachable daemon is that host's problem, not the loop's
                self.host_errors[name] = f"host {name}: cannot reach its Docker daemon: {exc}"
                continue
            self.host_errors.pop(name, None)
            self.docker[name] = driver
            self.docker_settings[name] = host.docker

    def ports_taken(self) -> list[str]:
        """Before the first pass: the ports this machine's units need that someone else holds, one
        sentence each. Units a previous operator left running (and this one adopts) hold their own
        ports: those are not in the way."""
        if self.desired is None:
            return []
        records = self.process.records()
        taken = []
        for unit in (*self.desired.units, self.desired.engine):
            if self.host_kinds.get(unit.host) != "process" or unit.port is None:
                continue
            record = records.get(unit.name)
            if record is not None and self.process.alive(unit.name, record):
                continue
            if message := in_use(str(unit.spec.get("bind") or "0.0.0.0"), unit.port):
                taken.append(f"{unit.name}: {message}")
        return taken

    def driver_for(self, host: str) -> Driver | None:
        kind = self.host_kinds.get(host)
        if kind == "process":
            return self.process
        if kind == "docker":
            return self.docker.get(host)
        return None

    def agent_hosts(self) -> list[str]:
        return sorted(h for h, kind in self.host_kinds.items() if kind == "agent")

    def scope(self) -> set[str]:
        """Hosts this operator acts on: its process and docker hosts, and any host it still runs
        units on (one the manifest dropped: its units must go)."""
        ours = {h for h, kind in self.host_kinds.items() if kind in ("process", "docker")}
        ours -= set(self.host_errors) | set(self.unreachable) | self.unobserved
        return (ours | self.origin_hosts) - set(self.unreachable)

    # -- agents ----------------------------------------------------------------------------------

    def report(self, host: str, units: dict[str, UnitState], models: dict[ModelKey, ModelCheck]) -> None:
        """An agent's view of its host, merged into the next pass."""
        with self.agent_lock:
            self.agent_reports[host] = (time.time(), units, models)
        self.wake.set()

    # -- one pass --------------------------------------------------------------------------------

    def observe(self, now: float) -> Observed:
        units: dict[str, UnitState] = {}
        models: dict[ModelKey, ModelCheck] = {}
        self.origin = {}
        self.origin_hosts: set[str] = set()
        self.unreachable = {}
        drivers: list[tuple[str | None, Driver]] = [(None, self.process), *self.docker.items()]
        for host, driver in drivers:
            try:
                seen = driver.observe(now)
            except DriverUnavailable as exc:
                if host is not None:
                    self.unreachable[host] = str(exc)
                continue
            for name, state in seen.items():
                units[name] = state
                self.origin[name] = driver
                self.origin_hosts.add(state.unit.host)
            models |= driver.models()
        with self.agent_lock:
            reports = dict(self.agent_reports)
        for host, (at, reported, checks) in reports.items():
            if self.host_kinds.get(host) != "agent":
                continue
            stale = now - at > 30.0
            for name, state in reported.items():
                units[name] = (
                    state.with_(running=False, error="its agent stopped reporting") if stale else state
                )
            models |= checks
        free = None
        desired = self.desired
        if desired is not None and desired.pool_bytes is None:
            workers = [u for u in desired.units if u.kind is Kind.WORKER]
            if workers and all(
                self.host_kinds.get(u.host) == "process" and u.spec["backend"] == "cpu" for u in workers
            ):
                free = local_free_bytes()
        return Observed(now=now, units=units, models=models, free_bytes=free)

    def pass_once(self) -> PassResult:
        self.load()
        if self.host_errors:
            self._configure()  # try the unreachable daemons again
        now = time.time()
        observed = self.observe(now)
        self.last_observed = observed
        result = PassResult(self.desired, observed, None, self.manifest_error)
        if self.desired is not None:
            result.plan = plan(self.desired, observed, scope=self.scope(), policy=self.policy)
            for action in result.plan.actions:
                result.executed.append(self.execute(action))
        result.status = self.status.write(
            cluster=self.cluster,
            manifest=str(self.path),
            manifest_digest=self.manifest_digest,
            desired=self.desired,
            observed=observed,
            plan=result.plan,
            manifest_error=self.manifest_error,
            problems=[
                ("HostUnreachable", e) for e in (*self.host_errors.values(), *self.unreachable.values())
            ],
            operator={"pid": os.getpid(), "stateDir": str(self.state_dir)},
        )
        return result

    def execute(self, action: Action) -> str:
        """Carry one action out. A driver that fails is that unit's problem, never the loop's: the
        next pass observes the result and plans again."""
        try:
            line = self._execute(action)
        except Exception as exc:
            line = f"{_describe(action)}: failed, will retry: {type(exc).__name__}: {exc}"
        self.events(line)
        return line

    def _execute(self, action: Action) -> str:
        line = _describe(action)
        match action:
            case Start(unit=unit, reason=reason, failed=failed):
                driver = self.driver_for(unit.host)
                if driver is not None:
                    driver.start(unit, reason, failed)
            case Stop(unit=unit, reason=reason):
                driver = self.origin.get(unit.name) or self.driver_for(unit.host)
                if driver is not None:
                    driver.stop(unit, reason)
            case Route(router=router, backend=backend):
                # Observed units carry no secrets; the desired one knows the token.
                wanted = self.desired.by_name.get(router.name) if self.desired else None
                error = self.router(router, backend, wanted.secrets.get("TIGHTWAD_TOKEN") if wanted else None)
                if error:
                    line += f": failed, will retry: {error}"
            case VerifyModel(host=host, model=model):
                driver = self.driver_for(host)
                if driver is not None:
                    driver.verify(host, model)
        return line

    # -- the loop --------------------------------------------------------------------------------

    def watch(self, stop: threading.Event) -> threading.Thread:
        """Wake the loop as soon as the manifest file changes (editors replace it: watch the folder)."""
        import watchfiles

        target = self.path

        def run() -> None:
            with contextlib.suppress(Exception):
                for _ in watchfiles.watch(
                    target.parent,
                    watch_filter=lambda _change, p: Path(p) == target,
                    stop_event=stop,
                    debounce=100,
                    rust_timeout=500,
                ):
                    self.wake.set()

        thread = threading.Thread(target=run, name="manifest-watch", daemon=True)
        thread.start()
        return thread

    def run(
        self,
        stop: threading.Event,
        on_pass: Callable[[PassResult], None] | None = None,
        interval: float = 1.0,
    ) -> None:
        self.watch(stop)
        while not stop.is_set():
            self.wake.clear()
            result = self.pass_once()
            if on_pass:
                on_pass(result)
            # Sooner while things move; a changed manifest or an agent report wakes it at once.
            busy = result.plan is not None and bool(result.plan.actions)
            self.wake.wait(0.2 if busy else interval)

    def stop_all(self, why: str = "the operator stopped every unit") -> list[str]:
        stopped = self.process.stop_all()
        for driver in self.docker.values():
            stopped += driver.stop_all()
        self.status.write_stopped(time.time(), why)
        return stopped

    def close(self) -> None:
        self.process.close()
        for driver in self.docker.values():
            driver.close()
        if self.docker_clients is not None:
            self.docker_clients.close()
        if self._lock_file is not None:
            self._lock_file.close()


def _describe(action: Action) -> str:
    match action:
        case Start(unit=unit, reason=reason):
            return f"start {unit.name} on {unit.host} ({reason})"
        case Stop(unit=unit, reason=reason):
            return f"stop {unit.name} ({reason})"
        case Route(router=router, backend=backend, reason=reason):
            return f"route {router.name} -> {backend.name} ({reason})"
        case VerifyModel(host=host, model=model):
            return f"verify model {model.name} on {host}"
    return str(action)


def route(router: Unit, backend: Unit, token: str | None = None, timeout: float = 5.0) -> str | None:
    """Point a router at a backend; None on success, else why not."""
    import httpx  # here, not at the top: a dry run never routes, and httpx costs a tenth of a second

    from tightwad.operator.router import ROUTE_PATH  # the router module brings the whole web stack

    headers = {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        response = httpx.put(
            router.url + ROUTE_PATH,
            json={"backend": backend.url, "unit": backend.name},
            headers=headers,
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if response.status_code == 200 else f"HTTP {response.status_code}: {response.text[:200]}"
