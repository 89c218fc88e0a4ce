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
