"""`tightwad agent`: a host the operator cannot reach runs its own units and reports them.

Host `mac` (runtime: native) lends an rpc worker through an agent; host `local` runs the engine and
the proxy under `tightwad up`. The engine waits for the agent's worker, the agent learns the
manifest and everything else from the operator's token-protected API, and the cluster serves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.procs import default_signals
from support.reconcile import Operator, answers_again, local_manifest, pids_alive, write_manifest

from tightwad.launch import free_port
from tightwad.manifest import load_manifest
from tightwad.toolchain import Toolchain

pytestmark = pytest.mark.integration
TOKEN = "agent-test-token-0123456789"


@pytest.fixture(scope="module")
def operator_with_agent_host(
    toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Operator, str]]:
    folder = tmp_path_factory.mktemp("operator-agent")
    data: dict[str, Any] = local_manifest("agenttest", drafter=False)
    spec = data["spec"]
    spec["auth"] = {"token": TOKEN}
    spec["hosts"][0]["gpus"] = spec["hosts"][0]["gpus"][:1]
    spec["hosts"].append(
        {
            "name": "mac",
            "address": "127.0.0.1",
            "runtime": "native",
            "gpus": [{"backend": "cpu", "port": free_port(), "threads": 1}],
        }
    )
    manifest = folder / "cluster.yaml"
    write_manifest(manifest, data)
    op = Operator(manifest, folder / "state", folder / "up.log")
    api = f"http://127.0.0.1:{free_port()}"
    op.start("--agents", api.removeprefix("http://"))
    try:
        yield op, api
    finally:
        if op.process is not None and op.process.poll() is None:
            assert op.interrupt() == 0, op.log()


def start_agent(op: Operator, api: str, log: Path, token: str = TOKEN) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tightwad.operator.cli", "agent", "--host", "mac", "--manifest", api],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**op.env(), "TIGHTWAD_TOKEN": token},
            start_new_session=True,
            preexec_fn=default_signals,
        )


def test_the_engine_waits_for_the_agents_worker(operator_with_agent_host: tuple[Operator, str]) -> None:
    op, _ = operator_with_agent_host
    doc = op.wait(
        "the engine waiting for the agent's worker",
        lambda d: any("worker-mac-0" in (u.get("waiting") or "") for u in op.units(d).values()),
    )
    assert op.condition("Ready", doc)["status"] == "False"
    assert "tightwad agent --host NAME --manifest http://127.0.0.1:" in op.log()


def test_the_agent_api_wants_the_token(operator_with_agent_host: tuple[Operator, str]) -> None:
    _, api = operator_with_agent_host
    assert httpx.get(f"{api}/v1/manifest", timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.get(f"{api}/v1/observed", headers=wrong, timeout=10).status_code == 401
    assert httpx.post(f"{api}/v1/hosts/mac/report", json={}, headers=wrong, timeout=10).status_code == 401
    right = {"Authorization": f"Bearer {TOKEN}"}
    body = httpx.get(f"{api}/v1/manifest", headers=right, timeout=10).json()
    assert body["cluster"] == "agenttest"
    refused = httpx.post(f"{api}/v1/hosts/local/report", json={"units": []}, headers=right, timeout=10)
    assert refused.status_code == 404  # `local` is the operator's own


def test_a_wrong_token_stops_the_agent_with_a_clear_error(
    operator_with_agent_host: tuple[Operator, str], tmp_path: Path
) -> None:
    op, api = operator_with_agent_host
    agent = start_agent(op, api, tmp_path / "agent.log", token="wrong")
    assert agent.wait(timeout=60) == 1
    assert "refused the token" in (tmp_path / "agent.log").read_text()


def test_with_its_agent_the_cluster_serves_and_stops_cleanly(
    operator_with_agent_host: tuple[Operator, str], tmp_path: Path
) -> None:
    op, api = operator_with_agent_host
    agent = start_agent(op, api, tmp_path / "agent.log")
    try:
        doc = op.wait_ready(timeout=180)
        answers_again(str(doc["endpoint"]), token=TOKEN)
        worker = op.units(doc)["worker-mac-0"]
        assert worker["observed"] == "running" and worker["runtime"] == "native"
        pid = worker["pid"]
        assert pids_alive([pid]) == [pid]
    finally:
        os.killpg(agent.pid, signal.SIGTERM)
        assert agent.wait(timeout=60) == 0, (tmp_path / "agent.log").read_text()
    assert pids_alive([pid]) == []  # the agent stops what it ran
    op.wait(
        "the agent's worker gone",
        lambda d: "worker-mac-0" not in op.units(d) or op.units(d)["worker-mac-0"]["observed"] != "running",
    )


# -- the agent's own guards, without processes: a mock operator (httpx.MockTransport) -----------


class MockOperator:
    """The operator's agent API, answering a manifest until told to answer something else."""

    def __init__(self, manifest: dict[str, Any]) -> None:
        self.manifest = manifest
        self.answer: httpx.Response | None = None

    def handler(self, request: httpx.Request) -> httpx.Response:
        if self.answer is not None and request.url.path == "/v1/manifest":
            return self.answer
        if request.url.path == "/v1/manifest":
            return httpx.Response(200, json={"cluster": "agentunit", "manifest": self.manifest})
        if request.url.path == "/v1/observed":
            return self.answer or httpx.Response(200, json={"units": [], "models": []})
        return httpx.Response(200, json={"ok": True})


MockAgent = tuple[Any, MockOperator, list[Any]]


@pytest.fixture
def mock_agent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[tuple[Any, MockOperator, list[Any]]]:
    from tightwad.operator import agent as agent_module

    monkeypatch.setenv("TIGHTWAD_STATE_DIR", str(tmp_path / "state"))
    data: dict[str, Any] = local_manifest("agentunit", drafter=False)
    data["spec"]["auth"] = {"token": TOKEN}
    data["spec"]["hosts"].append(
        {"name": "mac", "address": "127.0.0.1", "runtime": "native", "gpus": [{"backend": "cpu", "port": 1}]}
    )
    write_manifest(tmp_path / "cluster.yaml", data)
    operator = MockOperator(load_manifest(tmp_path / "cluster.yaml").data)  # as the API serves it
    real_client = httpx.Client

    def client(**kwargs: Any) -> httpx.Client:
        return real_client(transport=httpx.MockTransport(operator.handler), **kwargs)

    monkeypatch.setattr(agent_module.httpx, "Client", client)
    agent = agent_module.Agent("mac", "http://127.0.0.1:18090", None, TOKEN)
    acted: list[Any] = []
    monkeypatch.setattr(agent, "execute", acted.append)  # plan, but start nothing
    try:
        yield agent, operator, acted
    finally:
        agent.driver.close()
        agent.http.close()


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, text="<html>a captive portal</html>"),
        httpx.Response(200, json={"not": "a manifest"}),
        httpx.Response(200, json=["a", "list"]),
        httpx.Response(200, json={"manifest": "text"}),
    ],
    ids=["html", "no-manifest-key", "a-list", "manifest-not-an-object"],
)
def test_an_operator_answer_that_is_not_the_manifest_keeps_the_units_running(
    mock_agent: MockAgent, answer: httpx.Response, capsys: pytest.CaptureFixture[str]
) -> None:
    agent, operator, acted = mock_agent
    agent.pass_once()
    planned = len(acted)
    assert planned > 0  # the worker's start, planned (not carried out here)
    operator.answer = answer
    stopped: list[str] = []
    agent.driver.stop_all = lambda: stopped.append("all") or []  # type: ignore[method-assign]
    agent.pass_once()  # no exception: the last good manifest stays in force
    err = capsys.readouterr().err
    assert "keeping the last good manifest" in err and "/v1/manifest" in err
    assert agent.manifest.name == "agentunit" and len(acted) > planned and stopped == []


def test_a_pass_that_fails_unexpectedly_is_logged_and_retried_not_a_shutdown(
    mock_agent: tuple[Any, MockOperator, list[Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    import threading

    agent, _, _ = mock_agent
    calls: list[int] = []
    stop = threading.Event()

    def flaky() -> list[Any]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        stop.set()
        return []

    agent.pass_once = flaky
    agent.run(stop, retry_after=0.01)
    assert len(calls) == 2 and "boom" in capsys.readouterr().err


def test_the_manifest_copy_is_private_and_written_whole(mock_agent: MockAgent) -> None:
    agent, _, _ = mock_agent
    mode = agent.copy.stat().st_mode & 0o777
    assert mode == 0o600, oct(mode)
    assert TOKEN in agent.copy.read_text()  # the token is in it: hence 0600
    copies = [p.name for p in agent.copy.parent.iterdir() if "manifest" in p.name]
    assert copies == ["manifest.yaml"]  # no temporary file left beside it


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("http://192.168.1.10:8090", True),
        ("http://operator.lan:8090", True),
        ("https://operator.lan:8090", False),
        ("http://127.0.0.1:8090", False),
        ("http://localhost:8090", False),
        ("http://[::1]:8090", False),
    ],
)
def test_the_token_never_travels_over_plain_http_beyond_loopback(url: str, refused: bool) -> None:
    from tightwad.operator.agent import AgentError, check_operator_url

    if refused:
        with pytest.raises(AgentError, match=r"https://.*ssh"):
            check_operator_url(url, TOKEN)
    else:
        check_operator_url(url, TOKEN)
    check_operator_url(url, None)  # no token, nothing to leak (the API then refuses, clearly)
