"""The process driver under the real reconcile loop: `tightwad up` on real llama.cpp processes.

One cluster (2 rpc workers, the engine behind its router, a llama-server drafter, the proxy) serves
the whole module, in order: converge; kill -9 a worker and watch it repaired; a broken manifest edit
tears nothing down; a bad new model is refused while the old one serves; a hot-swap under a steady
stream of requests fails none; and an operator killed with -9 is replaced by one that adopts every
unit instead of starting duplicates.
"""

from __future__ import annotations

import copy
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.reconcile import Operator, answers_again, chat, local_manifest, pids_alive, write_manifest

from tightwad.toolchain import Toolchain

pytestmark = pytest.mark.integration

F32, Q4 = "smollm2-135m-f32", "smollm2-135m-q4"
Cluster = tuple[Operator, dict[str, Any]]


@pytest.fixture(scope="module")
def cluster(toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("operator-process")
    data = local_manifest("optest")
    manifest = folder / "cluster.yaml"
    write_manifest(manifest, data)
    op = Operator(manifest, folder / "state", folder / "up.log")
    op.start()
    try:
        yield op, data
    finally:
        pids = [u["pid"] for u in op.units().values() if u.get("pid")]
        if op.process is not None and op.process.poll() is None:
            assert op.interrupt() == 0, op.log()
        else:  # a test killed it: let the CLI clean up
            op.cli("down", str(manifest))
        assert pids_alive(pids) == [], op.log()


def endpoint(op: Operator) -> str:
    return str(op.status()["endpoint"])


def test_converges_in_order_and_serves(cluster: Cluster) -> None:
    op, data = cluster
    began = time.monotonic()
    doc = op.wait_ready()
    print(f"\ncold start to Ready: {time.monotonic() - began:.1f}s")
    assert doc["observedGeneration"] == doc["generation"] == 1
    assert op.condition("Progressing", doc)["reason"] in ("Converged", "Reconciling")
    assert op.condition("Degraded", doc)["status"] == "False"
    assert doc["endpoint"] == f"http://127.0.0.1:{data['spec']['proxy']['port']}/v1"
    assert chat(endpoint(op)).strip()
    units = op.units(doc)
    assert {u["kind"] for u in units.values()} == {"rpc-worker", "engine", "router", "drafter", "proxy"}
    assert all(u["observed"] == "running" for u in units.values()), units
    # The order of the events: both workers before the engine, the route before the proxy.
    log = op.log()
    engine = next(n for n, u in units.items() if u["kind"] == "engine")
    assert log.index(f"start {engine}") > log.index("start worker-local-1")
    assert log.index("start proxy") > log.index(f"route engine-router -> {engine}")
    assert "Tightwad is up: " + doc["endpoint"] in log
    table = op.cli("status", str(op.manifest))
    assert table.returncode == 0, table.stderr
    assert "Ready" in table.stdout and "worker-local-0" in table.stdout and "Serving" in table.stdout


def test_a_killed_worker_is_restored_and_the_endpoint_answers_again(
    cluster: Cluster,
) -> None:
    op, _ = cluster
    op.wait_ready()
    worker = op.units()["worker-local-0"]
    killed_at = time.monotonic()
    os.kill(worker["pid"], signal.SIGKILL)
    op.wait(
        "the worker to be replaced",
        lambda d: op.units(d)["worker-local-0"].get("pid") not in (None, worker["pid"]),
    )
    op.wait_ready(timeout=120)
    answers_again(endpoint(op))
    print(f"\nkill -9 of an rpc worker -> endpoint answering again: {time.monotonic() - killed_at:.1f}s")
    log = op.log()
    assert "restart: exited" in log and "worker-local-0" in log


def test_a_broken_manifest_edit_keeps_everything_running(cluster: Cluster) -> None:
    op, data = cluster
    before = op.wait_ready()
    pids = {n: u.get("pid") for n, u in op.units(before).items()}
    op.manifest.write_text(op.manifest.read_text().replace("spec:", "spec:\n  nonsense: [", 1))
    doc = op.wait(
        "Degraded: ManifestInvalid", lambda d: op.condition("Degraded", d).get("reason") == "ManifestInvalid"
    )
    assert doc["generation"] == before["generation"] + 1 == doc["observedGeneration"]
    assert op.condition("Ready", doc)["status"] == "True"
    assert {n: u.get("pid") for n, u in op.units(doc).items()} == pids
    assert chat(endpoint(op)).strip()
    write_manifest(op.manifest, data)
    doc = op.wait("Degraded cleared", lambda d: op.condition("Degraded", d).get("status") == "False")
    assert {n: u.get("pid") for n, u in op.units(doc).items()} == pids


def test_a_bad_new_model_is_refused_and_the_old_one_keeps_serving(
    cluster: Cluster,
) -> None:
    op, data = cluster
    before = op.wait_ready(serving=F32)
    engine = next(u for u in op.units(before).values() if u["kind"] == "engine")
    bad = copy.deepcopy(data)
    bad["spec"]["models"].append(
        {"name": "corrupt", "source": "catalog:smollm2-135m-q4_1", "sha256": "ab" * 32}
    )
    bad["spec"]["target"]["model"] = "corrupt"
    write_manifest(op.manifest, bad)
    doc = op.wait("ModelRejected", lambda d: op.condition("Degraded", d).get("reason") == "ModelRejected")
    message = op.condition("Degraded", doc)["message"]
    assert "sha256" in message and f"{F32} keeps serving" in message
    assert doc["model"] == {"desired": "corrupt", "serving": F32}
    assert op.units(doc)[engine["name"]]["pid"] == engine["pid"]
    assert chat(endpoint(op)).strip()
    write_manifest(op.manifest, data)
    op.wait("Degraded cleared", lambda d: op.condition("Degraded", d).get("status") == "False")


def test_hot_swap_under_load_fails_no_request(cluster: Cluster) -> None:
    op, data = cluster
    before = op.wait_ready(serving=F32)
    old = next(u for u in op.units(before).values() if u["kind"] == "engine")
    workers = {n: u["pid"] for n, u in op.units(before).items() if u["kind"] == "rpc-worker"}
    url = endpoint(op)
    stop = threading.Event()
    done: list[float] = []
    failures: list[str] = []

    def client(stream: bool) -> None:
        while not stop.is_set():
            try:
                chat(url, "Count to five.", max_tokens=12, stream=stream)
                done.append(time.monotonic())
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in (False, True)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    swapped = copy.deepcopy(data)
    swapped["spec"]["target"]["model"] = Q4
    edited = time.monotonic()
    write_manifest(op.manifest, swapped)
    doc = op.wait_ready(timeout=180, serving=Q4)
    serving = time.monotonic()
    op.wait("the old engine stopped", lambda d: old["name"] not in op.units(d))
    time.sleep(2)  # and a few requests more on the new engine
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    after = [t for t in done if t > serving]
    print(
        f"\nhot-swap {F32} -> {Q4}: edit to new engine serving {serving - edited:.1f}s; "
        f"{len(done)} requests during the run, {len(failures)} failed, {len(after)} after the switch"
    )
    assert failures == [], failures[:5]
    assert after, "no request finished after the switch"
    assert "hot-swap: loading" in op.log()  # beside the old one: memory allowed it
    router = next(u for u in op.units(doc).values() if u["kind"] == "router")
    models = httpx.get(f"http://127.0.0.1:{router['port']}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [Q4]
    # rpc workers serve one engine each: the new engine loaded on a second set, the old set is gone.
    units = op.units()
    assert sorted(n for n, u in units.items() if u["kind"] == "rpc-worker") == sorted(
        f"{n}-b" for n in workers
    )
    data["spec"]["target"]["model"] = Q4  # later tests start from here


def test_a_new_operator_adopts_everything_instead_of_duplicating(
    cluster: Cluster,
) -> None:
    op, _ = cluster
    before = op.wait_ready()
    pids = {n: u["pid"] for n, u in op.units(before).items()}
    op.kill9()
    assert sorted(pids_alive(list(pids.values()))) == sorted(pids.values())  # units outlive it
    op.start()
    new_pid = op.process.pid if op.process else None

    def adopted(doc: dict[str, Any]) -> bool:
        units = op.units(doc)
        return (
            doc.get("operator", {}).get("pid") == new_pid
            and bool(units)
            and all(u.get("adopted") for u in units.values())
        )

    op.wait("every unit adopted", adopted)
    doc = op.wait_ready()
    assert {n: u["pid"] for n, u in op.units(doc).items()} == pids
    assert "start " not in op.log().rsplit("converging cluster", 1)[1]  # nothing started twice
    busy = op.cli("reconcile", str(op.manifest), "--once")
    assert busy.returncode == 1 and "already managed by operator pid" in busy.stderr
    assert chat(endpoint(op)).strip()


def test_the_status_file_sits_beside_the_manifest(cluster: Cluster) -> None:
    op, _ = cluster
    assert op.status_path == Path(op.manifest).with_name("cluster.status.json") and op.status_path.exists()
    shown = op.cli("status", str(op.status_path), "--json")
    assert shown.returncode == 0 and '"observedGeneration"' in shown.stdout
