"""Each HTTP server serves its OpenAPI document, and the document is exactly what it serves.

For the engine, the proxy, the engine router, the agent API and the swarm peer: the server runs for
real (its own process, or for the agent API the operator's thread server), `GET /openapi.json`
answers without a token, the document's paths and methods equal the server's route table (so a new
route without docs fails here), and every documented operation reaches a handler over HTTP (no
routing 404 or 405), and one whose body is nested 60,000 deep is refused with a 4xx.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from support import ROOT
from support.engines import start_engine
from support.procs import Processes
from support.proxies import AUTH, TOKEN, cli_config, start_proxy

from tightwad import models, openapi
from tightwad.engine import libllama
from tightwad.engine.api import create_app as engine_app
from tightwad.engine.core import Engine
from tightwad.launch import free_port, wait_for_http
from tightwad.operator.agent_api import AgentServer
from tightwad.operator.agent_api import create_app as agent_app
from tightwad.operator.reconcile import Reconciler
from tightwad.operator.router import Router
from tightwad.operator.router import create_app as router_app
from tightwad.proxy.app import create_app as proxy_app
from tightwad.swarm.library import Library
from tightwad.swarm.server import create_app as swarm_app
from tightwad.toolchain import Toolchain

SHA = "0" * 64


PARAMS = {"sha256": SHA, "path": "anything", "model": "no-such-model", "host": "no-such-host"}
DEEP = b"[" * 60_000  # nested 60,000 deep, under every server's body limit


def _concrete(path: str, params: dict[str, str]) -> str:
    for name, value in params.items():
        path = path.replace(f"{{{name}}}", value)
    return path


def _probe(url: str, path: str, method: str, headers: dict[str, str]) -> tuple[int, str]:
    """One request to a documented operation (path parameters filled in): its status, and the body
    when it is a 404/405 (a stream, like /tightwad/v1/events, is not read)."""
    concrete = _concrete(path, PARAMS)
    body = b"{}" if method in ("POST", "PUT", "PATCH") else None
    with httpx.stream(method, url + concrete, content=body, headers=headers, timeout=60) as response:
        text = response.read().decode() if response.status_code in (404, 405) else ""
        return response.status_code, text


def check_server(
    url: str,
    document_path: str,
    routes: set[tuple[str, str]],
    headers: dict[str, str],
    real: dict[str, str] | None = None,
) -> None:
    """The served document (fetched with no token) against the route table, then every operation;
    `real` names path parameters that reach a handler's body parsing (an agent host, say)."""
    served = httpx.get(url + document_path, timeout=30)
    assert served.status_code == 200, served.text
    document = served.json()
    assert openapi.operations(document) == routes
    for path, method in sorted(routes):
        if "requestBody" in document["paths"][path][method.lower()]:
            # A body nested 60,000 deep is the client's error (a RecursionError once made it a 500).
            where = url + _concrete(path, {**PARAMS, **(real or {})})
            deep = httpx.request(method, where, content=DEEP, headers=headers, timeout=60)
            assert deep.status_code < 500, (method, path, deep.text)
        status, text = _probe(url, path, method, headers)
        assert status != 405, (method, path, text)
        if status == 404:  # the handler's own 404 (an unknown model), never the router's "Not Found"
            assert not json.loads(text)["error"]["message"].endswith(": Not Found"), (method, path, text)


@pytest.fixture(scope="module")
def small_model(toolchain: Toolchain) -> Path:
    return models.resolve("smollm2-135m-q4_1")


def test_the_engine_documents_exactly_its_routes(small_model: Path, processes: Processes) -> None:
    model = libllama.Model(small_model)
    engine = Engine(model, n_ctx=256, parallel=1, n_batch=64)
    try:
        routes = openapi.app_operations(engine_app(engine, "m").routes)
    finally:
        engine.ctx.close()
        model.close()
    served = start_engine(processes, small_model, parallel=1, ctx=256, extra=["--token", TOKEN])
    assert served.get("/v1/models").status_code == 401  # the token is on, the document stays open
    check_server(served.url, openapi.OPENAPI_PATH, routes, AUTH)


def test_the_proxy_documents_exactly_its_routes(small_model: Path, processes: Processes) -> None:
    engine = start_engine(processes, small_model, parallel=1, ctx=256)
    routes = openapi.app_operations(
        proxy_app(cli_config("--target", engine.url, "--draft-kind", "ngram")).routes
    )
    proxy = start_proxy(processes, engine.url, "--draft-kind", "ngram")
    assert proxy.get("/v1/models", headers={}).status_code == 401
    check_server(proxy.url, openapi.OPENAPI_PATH, routes, AUTH)


def test_the_engine_router_documents_exactly_its_routes(processes: Processes) -> None:
    routes = openapi.app_operations(router_app(Router(None, TOKEN)).routes)
    port = free_port()
    cmd = [sys.executable, "-m", "tightwad.operator.router", "--port", str(port)]
    process, log = processes.start(f"router-{port}", cmd, env={"TIGHTWAD_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/_tightwad/health", timeout=30, process=process, log=log)
    assert httpx.get(f"{url}/_tightwad/route", timeout=10).status_code == 401
    check_server(url, openapi.ROUTER_OPENAPI_PATH, routes, AUTH)


@pytest.fixture
def reconciler(tmp_path: Path) -> Iterator[Reconciler]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "local.yaml").read_text())
    agent_host = {"name": "mac", "address": "127.0.0.1", "runtime": "native"}  # run by `tightwad agent`
    data["spec"]["hosts"].append({**agent_host, "gpus": [{"backend": "cpu", "port": free_port()}]})
    manifest = tmp_path / "cluster.yaml"
    manifest.write_text(yaml.safe_dump(data))
    yield Reconciler(manifest, components=frozenset({"proxy"}), lock=False, dry_run=True)


def test_the_agent_api_documents_exactly_its_routes(reconciler: Reconciler) -> None:
    routes = openapi.app_operations(agent_app(reconciler, TOKEN).routes)
    server = AgentServer(reconciler, TOKEN, "127.0.0.1", 0)
    server.start()
    try:
        assert httpx.get(f"{server.url}/v1/observed", timeout=10).status_code == 401
        check_server(server.url, openapi.OPENAPI_PATH, routes, AUTH, real={"host": "mac"})
    finally:
        server.stop()


def test_the_swarm_peer_documents_exactly_its_routes(tmp_path: Path, processes: Processes) -> None:
    routes = openapi.app_operations(swarm_app(Library(), token=TOKEN).routes)  # type: ignore[attr-defined]
    served = tmp_path / "model.bin"
    served.write_bytes(bytes(range(256)) * 256)
    port = free_port()
    cmd = [sys.executable, "-m", "tightwad.swarm.cli", "seed", str(served), "--port", str(port)]
    cmd += ["--piece-size", "16KiB", "--token", TOKEN]
    process, log = processes.start(f"swarm-{port}", cmd)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/swarm/v1/health", timeout=60, process=process, log=log)
    assert httpx.get(f"{url}/swarm/v1/files", timeout=10).status_code == 401
    check_server(url, openapi.OPENAPI_PATH, routes, AUTH)
