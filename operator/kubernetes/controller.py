"""`tightwad operator`: the reconcile loop for TightwadCluster custom resources, in-cluster.

The same pure `plan(desired, observed)` as `tightwad up`, with the kubernetes driver: every change
the watch reports (and a resync every few seconds, for pods becoming ready) reconciles that cluster:

1. a CR being deleted: remove what the cluster runs (owner references would too) and run the
   cleanup hooks for what lives outside the cluster, then drop our finalizer;
2. make sure our finalizer is on the CR (read-modify-write; a 409 is answered by a retry);
3. the CR as a manifest: the full JSON Schema and the semantic checks. A bad one keeps the last
   good one in force (nothing running is torn down) and says why in a Degraded condition;
4. observe, plan, execute the actions;
5. write status (conditions with observedGeneration) through the status subresource, as a merge
   patch carrying the resourceVersion it planned from: when the CR changed meanwhile (409), read it
   again and plan again, so status never describes a spec it did not see;
6. write Events for what people look for with `kubectl describe` (kubernetes/events.py).

Only the replica holding the Lease acts; the others wait for it (kubernetes/lease.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import posixpath
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from kubernetes_asyncio import client

from tightwad.manifest import Manifest, ManifestError, load_manifest
from tightwad.operator.desired import Desired, desired_state
from tightwad.operator.kubernetes.api import Conflict, Rest, connect, merge_patch_between, update_with_retry
from tightwad.operator.kubernetes.cr import (
    FINALIZER,
    ClusterRef,
    api_path,
    cluster_manifest,
    same_status,
    status_document,
)
from tightwad.operator.kubernetes.events import EventRecorder, Note, events_for
from tightwad.operator.kubernetes.lease import CoordinationLeases, LeaderElector
from tightwad.operator.kubernetes.render import (
    CONFIG_DIR,
    CONFIG_FILE,
    DEFAULT_MODEL_DIR,
    CannotRender,
    Images,
    Owner,
    RenderSettings,
    render_all,
)
from tightwad.operator.kubernetes.watch import ClusterWatch
from tightwad.operator.kubernetes.workloads import Context, KubernetesWorkloads, Workloads, kubernetes_hosts
from tightwad.operator.observed import Observed
from tightwad.operator.plan import Fault, PlannerPolicy, plan

log = logging.getLogger("tightwad.operator.kubernetes")

MANIFEST_IN_POD = f"{CONFIG_DIR}/{CONFIG_FILE}"
LAST_GOOD = "the last good one stays in force"
Cleanup = Callable[[ClusterRef, dict[str, Any]], Awaitable[None]]


async def note_native_hosts(cluster: ClusterRef, obj: dict[str, Any]) -> None:
    """The default cleanup for what lives outside the cluster: agents on native hosts run their
    units themselves, so say which hosts keep running and how to stop them."""
    hosts = [h.get("name") for h in obj.get("spec", {}).get("hosts", []) if h.get("runtime") == "native"]
    if hosts:
        log.info(
            "%s deleted; native hosts %s keep their agents: stop `nix run .#worker` there",
            cluster.key,
            ", ".join(map(str, hosts)),
        )


@dataclass
class Counters:
    passes: int = 0
    conflicts: int = 0  # stale writes answered by a re-read and a retry
    status_writes: int = 0
    finalized: int = 0


@dataclass
class Options:
    namespace: str | None = None  # watch only this namespace (None: all)
    resync: float = 10.0  # seconds between passes over every cluster, changed or not
    watch_timeout: int = 300
    policy: PlannerPolicy = field(default_factory=PlannerPolicy)


class Operator:
    def __init__(
        self,
        api: client.ApiClient,
        workloads: Workloads,
        *,
        token: str | None = None,
        options: Options | None = None,
        elector: LeaderElector | None = None,
        cleanup: Sequence[Cleanup] = (note_native_hosts,),
        recorder: EventRecorder | None = None,
    ) -> None:
        self.rest = Rest(api)
        self.workloads = workloads
        self.token = token
        self.options = options or Options()
        self.elector = elector
        self.cleanup = list(cleanup)
        self.counters = Counters()
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.queued: set[str] = set()
        self.last_good: dict[str, tuple[Manifest, Desired]] = {}
        self.events: list[str] = []  # what was done, newest last (bounded)
        self.recorder = recorder or EventRecorder(self.rest)
        self.notes: dict[str, list[Note]] = {}  # the last pass's Events to write, per cluster
        self.served: dict[str, str] = {}  # the model each cluster served last
        # CRs whose finalizer this operator already ran: until the watch reports one gone, its cached
        # copy still carries our finalizer, and a resync must not run the cleanup a second time.
        self.finalized_uids: dict[str, None] = {}
        self.watch = ClusterWatch(
            api, self.enqueue, namespace=self.options.namespace, watch_timeout=self.options.watch_timeout
        )

    # -- the queue -------------------------------------------------------------------------------

    async def enqueue(self, key: str) -> None:
        if key not in self.queued:
            self.queued.add(key)
            await self.queue.put(key)

    async def _work(self) -> None:
        while True:
            key = await self.queue.get()
            self.queued.discard(key)
            try:
                await self.reconcile(key)
            except (client.ApiException, OSError) as exc:
                log.warning("reconciling %s failed (%s); retrying on the next resync", key, exc)
            except Exception:  # a bug must not stop every other cluster's reconciling
                log.exception("reconciling %s failed; retrying on the next resync", key)

    async def _resync(self, halt: asyncio.Event) -> None:
        while not halt.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(halt.wait(), timeout=self.options.resync)
            for key in list(self.watch.objects):
                await self.enqueue(key)

    def _event(self, line: str) -> None:
        log.info("%s", line)
        self.events = [*self.events[-199:], line]

    # -- one cluster -----------------------------------------------------------------------------

    async def reconcile(self, key: str) -> None:
        obj = self.watch.objects.get(key)
        if obj is None:
            self.last_good.pop(key, None)
            self.served.pop(key, None)
            self.recorder.forget(key)
            return
        cluster = ClusterRef.of(obj)
        path = api_path(cluster.namespace, cluster.name)
        finalizers = obj["metadata"].get("finalizers", [])
        if obj["metadata"].get("deletionTimestamp"):
            if FINALIZER in finalizers and cluster.uid not in self.finalized_uids:
                await self.finalize(cluster, obj, path)
            return
        if FINALIZER not in finalizers:
            updated = await update_with_retry(self.rest, path, _add_finalizer, on_conflict=self._conflict)
            if updated is None:
                return
            obj = updated
        try:
            await self._reconcile_status(key, obj, path)
        finally:
            await self.recorder.record(ClusterRef.of(obj), self.notes.pop(key, []))

    async def _reconcile_status(self, key: str, obj: dict[str, Any], path: str) -> None:
        for _ in range(5):
            status = await self.pass_once(obj)
            if same_status(obj.get("status"), status):
                return
            # Carries the resourceVersion planned from: a 409 when the CR changed since.
            patch = {
                "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
                "status": merge_patch_between(obj.get("status") or {}, status),
            }
            try:
                await self.rest.merge_patch(f"{path}/status", patch)
                self.counters.status_writes += 1
                return
            except Conflict:
                self._conflict()
                fresh = await self.rest.get(path)
                if fresh is None:
                    return
                obj = fresh
        log.warning("%s kept changing while its status was written; trying again later", key)

    def _conflict(self) -> None:
        self.counters.conflicts += 1

    async def finalize(self, cluster: ClusterRef, obj: dict[str, Any], path: str) -> None:
        removed = await self.workloads.remove_all(cluster)
        self._event(f"{cluster.key} deleted: removed {len(removed)} object(s)")
        for hook in self.cleanup:
            await hook(cluster, obj)
        await update_with_retry(self.rest, path, _remove_finalizer, on_conflict=self._conflict)
        self.last_good.pop(cluster.key, None)
        self.recorder.forget(cluster.key)
        self.counters.finalized += 1
        self.finalized_uids[cluster.uid] = None
        while len(self.finalized_uids) > 1000:  # bounded: the oldest go first
            del self.finalized_uids[next(iter(self.finalized_uids))]

    async def pass_once(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Validate, observe, plan, act; the status this pass leads to."""
        self.counters.passes += 1
        cluster = ClusterRef.of(obj)
        generation = int(obj["metadata"].get("generation", 0))
        error: str | None = None
        try:
            manifest = cluster_manifest(obj, self.token)
            self.last_good[cluster.key] = (manifest, desired_state(manifest, manifest_path=MANIFEST_IN_POD))
        except ManifestError as exc:
            error = "; ".join(p.format(exc.source) for p in exc.problems[:5])
        good = self.last_good.get(cluster.key)  # a bad manifest keeps the last good one in force
        now = time.time()
        refused = [("ManifestInvalid", f"the manifest is invalid; {LAST_GOOD}: {error}")] if error else []
        if good is None:
            status = status_document(
                generation=generation,
                previous=obj.get("status"),
                desired=None,
                observed=Observed(now=now),
                plan=None,
                manifest_error=error,
            )
            self.notes[cluster.key] = events_for(obj.get("status"), status, refused, None)
            return status
        manifest, desired = good
        owner = Owner(cluster.name, cluster.namespace, cluster.uid, dict(obj["metadata"].get("labels", {})))
        context = Context(cluster, owner, manifest, desired)
        observed = await self.workloads.observe(context, now)
        result = plan(desired, observed, scope=kubernetes_hosts(manifest), policy=self.options.policy)
        failures: list[Fault] = []
        for action in result.actions:
            try:
                self._event(f"{cluster.key}: {await self.workloads.execute(context, action)}")
            except CannotRender as exc:
                failures.append(Fault("CannotRun", str(exc)))
            except client.ApiException as exc:
                failures.append(
                    Fault("ApiError", f"{type(action).__name__.lower()}: HTTP {exc.status} {exc.reason}")
                )
        if failures:
            result = dataclasses.replace(result, problems=(*result.problems, *failures), converged=False)
        status = status_document(
            generation=generation,
            previous=obj.get("status"),
            desired=desired,
            observed=observed,
            plan=result,
            manifest_error=error,
        )
        problems = [*refused, *((p.reason, p.message) for p in result.problems)]
        served = status.get("model", {}).get("serving")
        self.notes[cluster.key] = events_for(
            obj.get("status"), status, problems, observed, self.served.get(cluster.key)
        )
        if served:
            self.served[cluster.key] = served
        return status

    # -- the loop --------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Lead (when elected), watch and reconcile until `stop`; on a lost lease, stop acting and
        stand for election again."""
        while not stop.is_set():
            if self.elector is not None and not await self.elector.acquire(stop):
                break
            halt = asyncio.Event()
            tasks = [
                asyncio.create_task(self.watch.run(halt)),
                asyncio.create_task(self._work()),
                asyncio.create_task(self._resync(halt)),
            ]
            waiters = [asyncio.create_task(stop.wait())]
            if self.elector is not None:
                waiters.append(asyncio.create_task(self.elector.hold(stop)))
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            halt.set()
            for task in [*tasks, *waiters]:
                task.cancel()
            await asyncio.gather(*tasks, *waiters, return_exceptions=True)
            self.queued.clear()
            self.queue = asyncio.Queue()
            self.watch.resource_version = None  # a new term starts from a fresh list
        if self.elector is not None:
            with contextlib.suppress(client.ApiException, OSError):
                await self.elector.release()


def _add_finalizer(obj: dict[str, Any]) -> bool:
    finalizers = obj["metadata"].setdefault("finalizers", [])
    if FINALIZER in finalizers:
        return False
    finalizers.append(FINALIZER)
    return True


def _remove_finalizer(obj: dict[str, Any]) -> bool:
    finalizers = obj["metadata"].get("finalizers", [])
    if FINALIZER not in finalizers:
        return False
    obj["metadata"]["finalizers"] = [f for f in finalizers if f != FINALIZER]
    return True


# -- the command line -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    images = Images()
    p = argparse.ArgumentParser(
        prog="tightwad operator",
        description="Reconcile TightwadCluster custom resources (in a pod, or with a kubeconfig).",
    )
    p.add_argument("--kubeconfig", help="default: in-cluster credentials, else ~/.kube/config")
    p.add_argument("--context", help="kubeconfig context")
    p.add_argument("--namespace", help="watch only this namespace (default: every namespace)")
    p.add_argument("--resync", type=float, default=10.0, help="seconds between full passes (default 10)")
    p.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "default"))
    p.add_argument("--lease-name", default="tightwad-operator")
    p.add_argument("--identity", default=os.environ.get("POD_NAME") or socket.gethostname())
    p.add_argument("--no-leader-election", action="store_true", help="act without holding the Lease")
    p.add_argument("--image-tightwad", default=images.tightwad)
    p.add_argument("--image-worker-cuda", default=images.worker_cuda)
    p.add_argument("--image-worker-rocm", default=images.worker_rocm)
    p.add_argument("--image-worker-cpu", default=images.worker_cpu)
    p.add_argument("--image-pull-policy", default=images.pull_policy)
    p.add_argument("--model-claim", help="PersistentVolumeClaim for the model volume (default: hostPath)")
    p.add_argument("--token-secret", help="Secret holding the bearer token the pods read")
    p.add_argument("--token-key", default="token")
    p.add_argument(
        "--allowed-host-path",
        action="append",
        default=None,
        metavar="FOLDER",
        help=f"a node folder TightwadClusters may mount, and below it (repeat; default {DEFAULT_MODEL_DIR})",
    )
    p.add_argument(
        "--render",
        metavar="CR_FILE",
        help="print the objects a TightwadCluster file becomes (all units started) and exit; no API",
    )
    return p


def settings_from(args: argparse.Namespace) -> RenderSettings:
    images = Images(
        worker_cuda=args.image_worker_cuda,
        worker_rocm=args.image_worker_rocm,
        worker_cpu=args.image_worker_cpu,
        tightwad=args.image_tightwad,
        pull_policy=args.image_pull_policy,
    )
    return RenderSettings(
        images=images,
        model_claim=args.model_claim,
        token_secret=args.token_secret,
        token_key=args.token_key,
        allowed_host_paths=allowed_host_paths(args.allowed_host_path or [DEFAULT_MODEL_DIR]),
    )


def allowed_host_paths(folders: Sequence[str]) -> tuple[str, ...]:
    for folder in folders:
        if not folder.startswith("/") or posixpath.normpath(folder) == "/":
            raise SystemExit(
                f"--allowed-host-path {folder!r}: give an absolute folder other than /, "
                f"e.g. {DEFAULT_MODEL_DIR} (the chart's hostPaths.allowed)"
            )
    return tuple(folders)


def render_file(path: str, settings: RenderSettings) -> str:
    """Every object of the cluster in `path` once all its in-cluster units run (first engine port)."""
    manifest = load_manifest(path)
    desired = desired_state(manifest, manifest_path=MANIFEST_IN_POD)
    scope = kubernetes_hosts(manifest)
    engine = desired.engine.with_spec(port=desired.engine_ports[0])
    units = [u for u in (*desired.units, engine) if u.host in scope]
    owner = Owner(
        manifest.name,
        manifest.metadata.namespace or "default",
        "00000000-0000-0000-0000-000000000000",
        manifest.metadata.labels,
    )
    return yaml.safe_dump_all(render_all(units, manifest, owner, settings), sort_keys=False)


async def _serve(args: argparse.Namespace) -> int:
    api = await connect(args.kubeconfig, args.context)
    rest = Rest(api)
    elector = None
    if not args.no_leader_election:
        store = CoordinationLeases(api, args.lease_namespace, args.lease_name)
        elector = LeaderElector(store, args.identity)
    operator = Operator(
        api,
        KubernetesWorkloads(rest, settings_from(args)),
        token=os.environ.get("TIGHTWAD_TOKEN") or None,
        options=Options(namespace=args.namespace, resync=args.resync),
        elector=elector,
        recorder=EventRecorder(rest, args.identity),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await operator.run(stop)
    finally:
        await api.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.render:
        sys.stdout.write(render_file(args.render, settings_from(args)))
        return 0
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
