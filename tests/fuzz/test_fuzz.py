"""The fuzz stage: Schemathesis against the real engine, proxy and swarm peer, from their OpenAPI
documents (tightwad.openapi), bounded in time.

Every operation of each document gets bodies, path parameters and headers that fit its schema
(positive) and ones that break it (negative: wrong types, missing fields, garbage); every POST also
gets raw bodies that are not JSON objects (MALFORMED: deep nesting, bad UTF-8). The checks are
what a user would notice: no 5xx, every request answered within REQUEST_TIMEOUT (no hang), the
engine's worker thread alive after each operation (its /health says so), and, after the fuzzing,
the same greedy tokens for the golden request as before it, through the engine and through the
proxy, and the swarm peer's file byte for byte. The figures are printed (`-s` shows them) and
written to fuzz-figures.json in the test's folder.

Examples are derandomized (the same ones every run, so a failure reproduces) and few per operation,
so the stage stays under 3 minutes on a 2-core machine. The engine runs the Q4_1 SmolLM2 with
llama.cpp's smallest context (256), so even a request that asks for all of it ends in seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import HypothesisException
from support.engines import EngineProcess, start_engine
from support.procs import Processes
from support.proxies import AUTH, TOKEN, ProxyProcess, start_proxy

from tightwad import models, openapi
from tightwad.launch import free_port, wait_for_http
from tightwad.toolchain import Toolchain

pytestmark = pytest.mark.integration

REQUEST_TIMEOUT = 60.0  # seconds; a request not answered by then is a hang (a whole context: ~10 s)
POSITIVE_EXAMPLES = 10  # per operation
NEGATIVE_EXAMPLES = 5
# Operations that never end by design: the proxy's once-a-second stats stream.
ENDLESS = {("/tightwad/v1/events", "GET")}
GOLDEN = {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0, "return_tokens": True}


@dataclass
class Figures:
    requests: int = 0
    server_errors: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    worker_thread_deaths: list[str] = field(default_factory=list)
    per_server: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "5xx": len(self.server_errors),
            "hangs": len(self.hangs),
            "worker_thread_deaths": len(self.worker_thread_deaths),
            "per_server": self.per_server,
            "seconds": round(self.seconds, 1),
        }


def _run(strategy: Any, examples: int, send: Callable[[Any], None]) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        send(case)

    # No negative example exists for an operation with nothing to break (a bare GET): that is fine.
    with contextlib.suppress(HypothesisException):
        run()


def fuzz(
    name: str,
    url: str,
    document: dict[str, Any],
    figures: Figures,
    after_each: Callable[[str], None],
    path_parameters: dict[str, Any] | None = None,
) -> None:
    """Every operation of `document` against `url`, positive then negative; `after_each(label)`
    checks the server's health once an operation is done."""
    schema = schemathesis.openapi.from_dict(document)
    session = requests.Session()
    before = figures.requests

    def send(case: Any) -> None:
        figures.requests += 1
        label = f"{name}: {case.method} {case.formatted_path}"
        try:
            response = case.call(base_url=url, session=session, headers=AUTH, timeout=REQUEST_TIMEOUT)
        except requests.RequestException as exc:  # no answer in time, or the connection dropped
            figures.hangs.append(f"{label}: {type(exc).__name__}: {exc}\n  {case.as_curl_command()}")
            return
        if response.status_code >= 500:
            text = response.text[:300]
            figures.server_errors.append(
                f"{label}: {response.status_code} {text}\n  {case.as_curl_command()}"
            )

    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.path, operation.method.upper()) in ENDLESS:
            continue
        label = f"{name}: {operation.method.upper()} {operation.path}"
        params = path_parameters if operation.path_parameters and path_parameters else None
        if params:  # half the positive examples on a real resource, so the handlers go past the lookup
            _run(operation.as_strategy(path_parameters=params), POSITIVE_EXAMPLES // 2, send)
        _run(operation.as_strategy(), POSITIVE_EXAMPLES, send)
        _run(
            operation.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE),
            NEGATIVE_EXAMPLES,
            send,
        )
        after_each(label)
    figures.per_server[name] = figures.requests - before


# Bodies no schema generates, since they are not JSON objects at all: each POST operation gets them
# raw, and must refuse them with a 4xx (a RecursionError once made deep nesting a 500).
MALFORMED = [
    b"[" * 100_000,
    b'{"a":' * 50_000,
    b"\xff\xfe not utf-8",
    b'{"prompt": "unterminated',
    b"null",
    b"",
]


def fuzz_malformed(name: str, url: str, document: dict[str, Any], figures: Figures) -> None:
    with httpx.Client(headers=AUTH, timeout=REQUEST_TIMEOUT) as client:
        for path, method in sorted(openapi.operations(document)):
            if method != "POST":
                continue
            for body in MALFORMED:
                figures.requests += 1
                figures.per_server[name] = figures.per_server.get(name, 0) + 1
                label = f"{name}: POST {path} with {body[:12]!r}... ({len(body)} bytes)"
                try:
                    response = client.post(url + path, content=body)
                except httpx.HTTPError as exc:
                    figures.hangs.append(f"{label}: {type(exc).__name__}: {exc}")
                    continue
                if response.status_code >= 500:
                    figures.server_errors.append(f"{label}: {response.status_code} {response.text[:300]}")


def golden(client: httpx.Client, url: str, headers: dict[str, str] | None = None) -> list[int]:
    response = client.post(f"{url}/v1/completions", json=GOLDEN, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return list(response.json()["choices"][0]["tokens"])


def test_fuzzing_the_engine_proxy_and_swarm_peer_breaks_nothing(
    toolchain: Toolchain, processes: Processes, tmp_path: Path
) -> None:
    started = time.monotonic()
    model = models.resolve("smollm2-135m-q4_1")
    engine: EngineProcess = start_engine(processes, model, parallel=4, ctx=256, extra=["--batch", "64"])
    proxy: ProxyProcess = start_proxy(processes, engine.url, "--draft-kind", "ngram")
    served = tmp_path / "model.bin"
    served.write_bytes(hashlib.sha256(b"fuzz").digest() * 4096)  # 128 KiB: 8 pieces
    sha = hashlib.sha256(served.read_bytes()).hexdigest()
    port = free_port()
    cmd = [
        *(sys.executable, "-m", "tightwad.swarm.cli", "seed", str(served)),
        *("--port", str(port), "--piece-size", "16KiB", "--token", TOKEN),
    ]
    peer_process, log = processes.start(f"swarm-{port}", cmd)
    peer = f"http://127.0.0.1:{port}"
    wait_for_http(f"{peer}/swarm/v1/health", timeout=60, process=peer_process, log=log)

    client = httpx.Client()
    engine_before, proxy_before = golden(client, engine.url), golden(client, proxy.url, AUTH)
    assert engine_before == proxy_before  # exact speculation: the proxy answers as the engine does

    figures = Figures()

    def engine_alive(label: str) -> None:
        assert engine.process.poll() is None, f"the engine exited after {label}"
        health = client.get(f"{engine.url}/health", timeout=REQUEST_TIMEOUT)
        if health.status_code != 200:
            figures.worker_thread_deaths.append(f"after {label}: {health.status_code} {health.text[:200]}")

    def proxy_alive(label: str) -> None:
        assert proxy.process.poll() is None, f"the proxy exited after {label}"
        engine_alive(label)

    def peer_alive(label: str) -> None:
        assert peer_process.poll() is None, f"the swarm peer exited after {label}"

    fuzz("engine", engine.url, openapi.engine_document(), figures, engine_alive)
    fuzz("proxy", proxy.url, openapi.proxy_document(), figures, proxy_alive)
    fuzz("swarm", peer, openapi.swarm_document(), figures, peer_alive, {"sha256": sha})
    fuzz_malformed("engine", engine.url, openapi.engine_document(), figures)
    fuzz_malformed("proxy", proxy.url, openapi.proxy_document(), figures)
    fuzz_malformed("swarm", peer, openapi.swarm_document(), figures)
    engine_alive("the malformed bodies")
    figures.seconds = time.monotonic() - started

    (tmp_path / "fuzz-figures.json").write_text(json.dumps(asdict(figures), indent=2))
    print(f"\nfuzz stage: {json.dumps(figures.summary())}")
    assert not figures.server_errors, "\n".join(figures.server_errors)
    assert not figures.hangs, "\n".join(figures.hangs)
    assert not figures.worker_thread_deaths, "\n".join(figures.worker_thread_deaths)
    assert golden(client, engine.url) == engine_before
    assert golden(client, proxy.url, AUTH) == proxy_before
    data = client.get(f"{peer}/swarm/v1/files/{sha}/data", headers=AUTH, timeout=30)
    assert data.status_code == 200 and data.content == served.read_bytes()
