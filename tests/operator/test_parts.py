"""The operator's smaller parts: command lines, the router, model checks, status, swap, the CLI."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from support.plans import BASE, Sim, manifest_data
from support.servers import ThreadServer

from tightwad import models
from tightwad.launch import free_port
from tightwad.manifest import manifest_from_dict
from tightwad.manifest_views import Host
from tightwad.operator import router as router_module
from tightwad.operator.cli import main as operator_main
from tightwad.operator.commands import Binaries, CannotRun, command, environment
from tightwad.operator.desired import desired_state
from tightwad.operator.driver import DriverUnavailable
from tightwad.operator.modelcheck import ModelChecker
from tightwad.operator.observed import (
    Health,
    ModelCheck,
    ModelState,
    Observed,
    UnitState,
    state_from_json,
    state_to_json,
)
from tightwad.operator.plan import plan
from tightwad.operator.show import render
from tightwad.operator.status import StatusFile, conditions
from tightwad.operator.swap import swap_text
from tightwad.operator.units import ModelRef

BIN = Binaries(python=("py", "-m"), rpc_server="rpc", llama_server="ls")


def test_command_lines_follow_the_specs() -> None:
    d = desired_state(
        manifest_from_dict(manifest_data(auth={"token": "t0k"})), components=frozenset({"proxy"})
    )
    worker, engine = d.stacks["a"].workers[0], d.stacks["a"].engine
    assert command(worker, BIN, {}) == [
        "rpc", "--host", "127.0.0.1", "--port", "18100", "--device", "CPU", "--threads", "1",
    ]  # fmt: skip
    argv = command(engine, BIN, {"big": "/m/big.gguf"})
    assert argv[:5] == ["py", "-m", "tightwad.cli", "engine", "--model"] and "/m/big.gguf" in argv
    assert argv[argv.index("--rpc") + 1] == "127.0.0.1:18100,127.0.0.1:18101"
    assert argv[argv.index("--port") + 1] == "9002" and argv[argv.index("--ctx") + 1] == "2048"
    assert "t0k" not in " ".join(argv) and environment(engine, BIN)["TIGHTWAD_TOKEN"] == "t0k"
    proxy = d.by_name["proxy"]
    assert command(proxy, BIN, {}, "/srv/cluster.yaml")[5:9] == [
        "--target", "http://127.0.0.1:9000", "--manifest", "/srv/cluster.yaml",
    ]  # fmt: skip
    no_file = command(proxy, BIN, {})
    assert no_file[no_file.index("--draft") + 1] == "http://127.0.0.1:9001"
    router = d.by_name["engine-router"]
    assert command(router, BIN, {}) == [
        "py",
        "-m",
        "tightwad.operator.router",
        "--host",
        "127.0.0.1",
        "--port",
        "9000",
    ]


def test_the_swarm_sidecar_needs_the_component_and_the_manifest_file() -> None:
    data = manifest_data(swarm={"enabled": True, "port": 9089})
    sidecar = desired_state(manifest_from_dict(data), components=frozenset()).by_name["swarm-box"]
    with pytest.raises(CannotRun, match="not installed"):
        command(sidecar, BIN, {}, "/srv/c.yaml")
    sidecar = desired_state(manifest_from_dict(data), components=frozenset({"swarm"})).by_name["swarm-box"]
    assert command(sidecar, BIN, {}, "/srv/c.yaml")[3:] == [
        "swarm",
        "sidecar",
        "/srv/c.yaml",
        "--host",
        "box",
        "--bind",
        "127.0.0.1",
    ]
    with pytest.raises(CannotRun, match="manifest file"):
        command(sidecar, BIN, {})


# ------------------------------------------------------------------------------------------------
# the router


def backend(name: str, gate: threading.Event | None = None) -> Starlette:
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "backend": name,
                "body": (await request.body()).decode(),
                "auth": request.headers.get("authorization"),
            }
        )

    async def slow(request: Request) -> StreamingResponse:
        async def chunks() -> Iterator[bytes]:  # type: ignore[misc]
            for i in range(5):
                while gate is not None and not gate.is_set():
                    await asyncio.sleep(0.01)
                yield f"data: {name} {i}\n\n".encode()

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/stream", slow)])


@pytest.fixture
def routed() -> Iterator[tuple[str, ThreadServer, ThreadServer, threading.Event]]:
    gate = threading.Event()
    with ThreadServer(backend("one", gate)) as one, ThreadServer(backend("two")) as two:
        router = router_module.Router(None, token="route-token")
        with ThreadServer(router_module.create_app(router), token="route-token") as front:  # type: ignore[arg-type]
            yield front.url, one, two, gate


ROUTE_AUTH = {"Authorization": "Bearer route-token"}  # reading the route needs the token too


def put_route(url: str, backend_url: str, unit: str, token: str = "route-token") -> httpx.Response:
    return httpx.put(
        f"{url}/_tightwad/route",
        json={"backend": backend_url, "unit": unit},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


def test_the_router_answers_503_until_it_has_a_backend_then_forwards(
    routed: tuple[str, ThreadServer, ThreadServer, threading.Event],
) -> None:
    url, one, _, _ = routed
    response = httpx.post(f"{url}/echo", content=b"hi", timeout=10)
    assert response.status_code == 503 and response.json()["error"]["code"] == "no_backend"
    assert put_route(url, one.url, "engine-1", token="wrong").status_code == 401
    assert put_route(url, one.url, "engine-1").status_code == 200
    response = httpx.post(
        f"{url}/echo", content=b"hi", headers={"Authorization": "Bearer client"}, timeout=10
    )
    assert response.json() == {
        "backend": "one",
        "body": "hi",
        "auth": "Bearer client",
    }  # the engine checks tokens
    assert response.headers["x-tightwad-engine"] == "engine-1"
    assert httpx.get(f"{url}/_tightwad/route", headers=ROUTE_AUTH, timeout=10).json() == {
        "backend": one.url,
        "unit": "engine-1",
        "inflight": {},
    }


def test_requests_finish_where_they_started_and_inflight_counts_them(
    routed: tuple[str, ThreadServer, ThreadServer, threading.Event],
) -> None:
    url, one, two, gate = routed
    put_route(url, one.url, "engine-1")
    lines: list[str] = []

    def stream() -> None:
        with httpx.stream("GET", f"{url}/stream", timeout=30) as response:
            lines.extend(line for line in response.iter_lines() if line)

    thread = threading.Thread(target=stream)
    thread.start()
    deadline = time.monotonic() + 10
    route = f"{url}/_tightwad/route"
    while httpx.get(route, headers=ROUTE_AUTH, timeout=5).json()["inflight"] != {"engine-1": 1}:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    put_route(url, two.url, "engine-2")  # switch while a reply is streaming
    assert httpx.post(f"{url}/echo", timeout=10).json()["backend"] == "two"
    status = httpx.get(f"{url}/_tightwad/route", headers=ROUTE_AUTH, timeout=5).json()
    assert status == {"backend": two.url, "unit": "engine-2", "inflight": {"engine-1": 1}}
    gate.set()
    thread.join(timeout=10)
    assert lines == [f"data: one {i}" for i in range(5)]
    assert httpx.get(f"{url}/_tightwad/route", headers=ROUTE_AUTH, timeout=5).json()["inflight"] == {}


def test_a_dead_backend_is_a_502_in_openai_shape(
    routed: tuple[str, ThreadServer, ThreadServer, threading.Event],
) -> None:
    url, _, _, _ = routed
    put_route(url, f"http://127.0.0.1:{free_port()}", "engine-gone")
    response = httpx.post(f"{url}/echo", timeout=10)
    assert response.status_code == 502 and response.json()["error"]["code"] == "bad_gateway"
    assert httpx.get(f"{url}/_tightwad/route", headers=ROUTE_AUTH, timeout=5).json()["inflight"] == {}


# ------------------------------------------------------------------------------------------------
# model checks


def wait_checked(checker: ModelChecker, key: tuple[str, ModelRef]) -> ModelState:
    deadline = time.monotonic() + 60
    while (check := checker.results().get(key)) is None or check.state is ModelState.CHECKING:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return check.state


def test_model_checks_find_verify_and_reject(tmp_path: Path) -> None:
    good = tmp_path / "good.gguf"
    good.write_bytes(b"GGUF" + b"\0" * 100)
    digest = models.sha256_file(good)
    (tmp_path / "text.gguf").write_text("not a model")
    checker = ModelChecker(tmp_path, cache_file=tmp_path / "digests.json")
    cases = {
        ModelRef("ok", "good.gguf", digest): ModelState.OK,
        ModelRef("wrong-sum", "good.gguf", "0" * 64): ModelState.BAD,
        ModelRef("not-gguf", "text.gguf"): ModelState.BAD,
        ModelRef("absent", "absent.gguf"): ModelState.MISSING,
        ModelRef("url", "https://example.com/x/model.gguf", digest): ModelState.MISSING,
    }
    for ref in cases:
        checker.request("box", ref)
    assert {ref.name: wait_checked(checker, ("box", ref)) for ref in cases} == {
        r.name: s for r, s in cases.items()
    }
    results = checker.results()
    assert "the manifest says 000000000000" in (
        results[("box", ModelRef("wrong-sum", "good.gguf", "0" * 64))].reason or ""
    )
    assert results[("box", ModelRef("ok", "good.gguf", digest))].size == 104
    assert json.loads((tmp_path / "digests.json").read_text())  # remembered across restarts
    good.write_bytes(b"GGUF" + b"\1" * 100)  # the file changes: its answer no longer stands
    assert ("box", ModelRef("ok", "good.gguf", digest)) not in checker.results()
    checker.close()


# ------------------------------------------------------------------------------------------------
# status, swap, CLI


def test_conditions_tell_ready_progressing_degraded() -> None:
    d = desired_state(manifest_from_dict(BASE), components=frozenset({"proxy"}))
    sim = Sim()
    p = sim.converge(d)
    ready, progressing, degraded = conditions(d, sim.observed(), p, None)
    assert (ready.status, ready.reason) == (
        True,
        "Serving",
    ) and "big at http://127.0.0.1:9088/v1" in ready.message
    assert (progressing.status, progressing.reason, degraded.status) == (False, "Converged", False)
    ready, _, degraded = conditions(d, sim.observed(), p, "cluster.yaml:3:1: bad")
    assert ready.status and (degraded.reason, degraded.status) == ("ManifestInvalid", True)
    observed = sim.observed()
    engine = next(s for s in observed.units.values() if s.unit.kind.value == "engine")
    broken = Observed(observed.now, {**observed.units, engine.name: engine.with_(health=Health.FAILING)})
    ready, progressing, _ = conditions(d, broken, plan(d, broken), None)
    assert not ready.status and progressing.status


def test_the_status_file_counts_generations_and_keeps_transition_times(tmp_path: Path) -> None:
    d = desired_state(manifest_from_dict(BASE), components=frozenset({"proxy"}))
    sim = Sim()
    p = sim.converge(d)
    store = StatusFile(tmp_path / "c.status.json")
    kw = {"cluster": "test", "manifest": "c.yaml", "desired": d, "plan": p, "manifest_error": None}
    first = store.write(manifest_digest="aaa", observed=sim.observed(), **kw)
    sim.now += 30
    again = StatusFile(tmp_path / "c.status.json").write(manifest_digest="aaa", observed=sim.observed(), **kw)
    assert first["generation"] == again["generation"] == 1 == again["observedGeneration"]
    assert first["conditions"][0]["lastTransitionTime"] == again["conditions"][0]["lastTransitionTime"]
    edited = store.write(manifest_digest="bbb", observed=sim.observed(), **kw)
    assert edited["generation"] == 2
    text = str(render(edited).renderables)  # the table renders without a terminal
    assert "Ready" in text or edited["units"]
    assert {u["name"] for u in edited["units"]} >= {"worker-box-0", "engine-router", "proxy"}


def test_unit_states_survive_the_wire() -> None:
    d = desired_state(manifest_from_dict(BASE))
    state = UnitState(
        d.engine, True, Health.OK, started_at=1.0, route=None, inflight={"x": 1}, detail={"pid": 7}
    )
    assert state_from_json(json.loads(json.dumps(state_to_json(state)))) == state


def test_swap_edits_only_the_value_and_refuses_unknown_models() -> None:
    text = (Path(__file__).resolve().parents[2] / "examples" / "local.yaml").read_text()
    edited = swap_text(text, "smollm2-135m-q4")
    assert edited.count("\n") == text.count("\n") and "# The target: the model whose output" in edited
    assert "model: smollm2-135m-q4\n    host: local" in edited
    with pytest.raises(Exception, match="missing target model"):
        swap_text(text, "no-such-model")


def test_cli_swap_then_plan_dry_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIGHTWAD_STATE_DIR", str(tmp_path / "state"))
    path = tmp_path / "cluster.yaml"
    path.write_text((Path(__file__).resolve().parents[2] / "examples" / "local.yaml").read_text())
    assert operator_main(["swap", "smollm2-135m-q4", str(path)]) == 0
    assert operator_main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "start  worker-local-0" in out and "verify smollm2-135m-q4" in out
    assert operator_main(["status", str(path)]) == 1  # nothing has run it yet: says so


# ------------------------------------------------------------------------------------------------
# the loop, with pretend drivers


class FakeDriver:
    """A docker host that says yes to everything: started units are healthy on the next pass."""

    runtime = "docker"

    def __init__(self, host: str) -> None:
        self.host = host
        self.units: dict[str, UnitState] = {}
        self.checks: dict[Any, Any] = {}
        self.log: list[str] = []
        self.down = False

    def observe(self, now: float) -> dict[str, UnitState]:
        if self.down:
            raise DriverUnavailable(f"host {self.host}: its Docker daemon does not answer")
        return dict(self.units)

    def start(self, unit: Any, reason: str, failed: bool = False) -> None:
        self.units[unit.name] = UnitState(unit, True, Health.OK, started_at=time.time(), since=time.time())
        self.log.append(f"start {unit.name}")

    def stop(self, unit: Any, reason: str = "") -> None:
        self.units.pop(unit.name, None)
        self.log.append(f"stop {unit.name}")

    def verify(self, host: str, model: ModelRef) -> None:
        self.checks[(host, model)] = ModelCheck(ModelState.OK, size=1000)

    def models(self) -> dict[Any, Any]:
        return dict(self.checks)

    def stop_all(self) -> list[str]:
        names = list(self.units)
        self.units.clear()
        return names

    def close(self) -> None:
        pass


def test_a_host_dropped_from_the_manifest_has_its_units_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tightwad.operator.reconcile import Reconciler

    monkeypatch.setenv("TIGHTWAD_STATE_DIR", str(tmp_path / "state"))
    data = manifest_data()
    box = data["spec"]["hosts"][0]
    box |= {"runtime": "docker", "docker": {"endpoint": "unix:///nowhere.sock"}}
    extra = {
        "name": "extra",
        "address": "127.0.0.5",
        "runtime": "docker",
        "gpus": [{"backend": "cpu", "port": 18500}],
    }
    data["spec"]["hosts"].append(extra)
    path = tmp_path / "cluster.yaml"
    path.write_text(json.dumps(data))
    drivers: dict[str, FakeDriver] = {}

    def factory(host: Host, manifest: Any) -> FakeDriver:
        return drivers.setdefault(host.name, FakeDriver(host.name))

    reconciler = Reconciler(path, docker_factory=factory, components=frozenset({"proxy"}))
    try:
        for _ in range(3):
            reconciler.pass_once()
        assert "worker-extra-0" in drivers["extra"].units
        data["spec"]["hosts"].pop()
        path.write_text(json.dumps(data))
        result = reconciler.pass_once()
        assert "stop worker-extra-0 (no longer in the manifest)" in result.executed
        assert drivers["extra"].units == {}

        # A daemon that stops answering: nothing is started twice meanwhile, status says why.
        drivers["box"].down = True
        result = reconciler.pass_once()
        assert result.executed == []
        degraded = next(c for c in result.status["conditions"] if c["type"] == "Degraded")
        assert degraded["reason"] == "HostUnreachable" and "host box" in degraded["message"]
        drivers["box"].down = False
        again = reconciler.pass_once().executed  # back: everything is still there
        assert not [line for line in again if line.startswith(("start", "stop"))]
    finally:
        reconciler.close()


def test_an_unreachable_docker_daemon_degrades_instead_of_crashing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tightwad.operator.reconcile import Reconciler

    monkeypatch.setenv("TIGHTWAD_STATE_DIR", str(tmp_path / "state"))
    data = manifest_data()
    data["spec"]["hosts"][0] |= {"runtime": "docker", "docker": {"endpoint": f"unix://{tmp_path}/no.sock"}}
    path = tmp_path / "cluster.yaml"
    path.write_text(json.dumps(data))
    reconciler = Reconciler(path, components=frozenset({"proxy"}))
    try:
        result = reconciler.pass_once()
        degraded = next(c for c in result.status["conditions"] if c["type"] == "Degraded")
        assert degraded["status"] == "True" and degraded["reason"] == "HostUnreachable"
        assert "host box: cannot reach its Docker daemon" in degraded["message"]
        assert not [line for line in result.executed if line.startswith("start")]
    finally:
        reconciler.close()
