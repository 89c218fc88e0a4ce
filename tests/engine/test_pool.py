"""The engine on a pool: the target split across two real rpc workers on loopback.

- Greedy output (and verify-driven speculative output) equals `llama-server --rpc` on the same two
  workers. A worker serves one client at a time, so the engine is stopped before llama-server
  connects.
- Losing a worker: /health answers 503 naming it, requests get an OpenAI-shaped 503 that says what
  failed, and the process stays up (exit code 3 when it is finally stopped), whether the worker dies
  while the engine is idle or in the middle of a streaming generation (where libggml would abort the
  process if the engine's abort trap did not catch it).
"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest
from support.engines import (
    INVARIANT_ENGINE,
    INVARIANT_SERVER,
    EngineProcess,
    LocalDrafter,
    chat_prompt,
    engine_greedy,
    llama_server_greedy,
    start_engine,
    strip_eog,
    tokenize,
    verify_decode,
)
from support.procs import Processes

from tightwad import models
from tightwad.launch import free_port, llama_server_command, rpc_worker_command, wait_for_http, wait_for_port
from tightwad.toolchain import Toolchain

pytestmark = pytest.mark.integration

N_TOKENS = 24
PROMPTS = [chat_prompt("List three uses of a paperclip."), chat_prompt("Quelle est la couleur du ciel ?")]


def start_workers(procs: Processes, toolchain: Toolchain, count: int = 2) -> list[tuple[str, int]]:
    """Real ggml-rpc-server workers; returns (endpoint, pid) pairs."""
    workers = []
    for _ in range(count):
        port = free_port()
        process, log = procs.start(f"rpc-{port}", rpc_worker_command(toolchain, port, threads=1))
        wait_for_port("127.0.0.1", port, process=process, log=log)
        workers.append((f"127.0.0.1:{port}", process.pid))
    return workers


def stop(engine: EngineProcess) -> int:
    os.killpg(engine.process.pid, signal.SIGTERM)
    return engine.process.wait(timeout=30)


def wait_for_unhealthy(engine: EngineProcess, timeout: float = 5.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        response = engine.get("/health")
        if response.status_code != 200 or time.monotonic() > deadline:
            return response
        time.sleep(0.1)


def test_pool_output_equals_llama_server_on_the_same_workers(
    toolchain: Toolchain, processes: Processes, drafter: LocalDrafter
) -> None:
    target = models.resolve("smollm2-135m-f32")
    endpoints = [e for e, _ in start_workers(processes, toolchain)]
    engine = start_engine(
        processes, target, rpc=endpoints, parallel=2, ctx=1024, extra=INVARIANT_ENGINE, name="pool-engine"
    )
    health = engine.get("/health").json()
    assert [w["endpoint"] for w in health["workers"]] == endpoints
    assert all(w["status"] == "ok" for w in health["workers"])

    eog = drafter.model.is_end_of_generation
    prompts = [tokenize(engine, p) for p in PROMPTS]
    ours = [strip_eog(engine_greedy(engine, p, N_TOKENS), eog) for p in prompts]
    spec, stats = verify_decode(
        engine, "pool-spec", prompts[0], N_TOKENS, lambda h: [drafter.propose(h, 4)], eog
    )
    assert stop(engine) == 0

    port = free_port()
    cmd = llama_server_command(
        toolchain, target, port, ctx_size=1024, rpc=endpoints, threads=1, extra=INVARIANT_SERVER
    )
    server, log = processes.start("llama-server-rpc", cmd)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", timeout=180, process=server, log=log)
    theirs = [strip_eog(llama_server_greedy(url, p, N_TOKENS), eog) for p in prompts]

    assert all(len(o) >= 8 for o in ours)
    assert ours == theirs
    assert strip_eog(spec, eog) == ours[0]
    assert stats["accepted"] > 0.4 * stats["drafted"], stats


def test_a_dead_worker_is_named_by_health_and_requests_get_503(
    toolchain: Toolchain, processes: Processes
) -> None:
    workers = start_workers(processes, toolchain)
    endpoints = [e for e, _ in workers]
    engine = start_engine(processes, models.resolve("smollm2-135m-q4_1"), rpc=endpoints, name="loss-idle")
    assert engine.post("/v1/completions", {"prompt": "Hello", "max_tokens": 2}).status_code == 200

    dead, pid = workers[1]
    os.killpg(pid, signal.SIGKILL)
    health = wait_for_unhealthy(engine)
    assert health.status_code == 503
    body = health.json()
    assert dead in body["error"]["message"]
    assert {w["endpoint"]: w["status"] for w in body["workers"]} == {endpoints[0]: "ok", dead: "dead"}

    for path, request in (
        ("/v1/completions", {"prompt": "Hello", "max_tokens": 4}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
        ("/tightwad/v1/verify", {"conversation": "c", "tokens": [1, 2, 3], "drafts": [{"tokens": [4]}]}),
    ):
        response = engine.post(path, request)
        assert response.status_code == 503, (path, response.text)
        error = response.json()["error"]
        assert error["code"] == "worker_lost" and dead in error["message"], error
    assert engine.get("/ready").status_code == 503
    assert engine.process.poll() is None, "the engine must stay up to say what failed"
    assert stop(engine) == 3


def test_a_worker_lost_mid_stream_ends_the_stream_with_an_error_not_a_crash(
    toolchain: Toolchain, processes: Processes
) -> None:
    workers = start_workers(processes, toolchain)
    endpoints = [e for e, _ in workers]
    engine = start_engine(processes, models.resolve("smollm2-135m-f32"), rpc=endpoints, name="loss-stream")
    dead, pid = workers[0]
    request = {"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    chunks: list[dict] = []  # type: ignore[type-arg]
    with httpx.stream("POST", f"{engine.url}/v1/completions", json=request, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line.removeprefix("data:").strip()
            assert data != "[DONE]", "the stream cannot finish normally without the worker"
            chunks.append(json.loads(data))
            if len(chunks) == 5:
                os.killpg(pid, signal.SIGKILL)  # while the engine is decoding
    assert len(chunks) > 5
    error = chunks[-1]["error"]
    assert error["code"] == "worker_lost", error
    print(f"\nmid-stream loss reported as: {error['message']}")

    health = wait_for_unhealthy(engine)
    assert health.status_code == 503 and dead in health.json()["error"]["message"]
    response = engine.post("/v1/completions", {"prompt": "Hello", "max_tokens": 4})
    assert response.status_code == 503 and response.json()["error"]["code"] == "worker_lost"
    assert engine.process.poll() is None, "libggml's abort must not take the engine down"
    assert stop(engine) == 3


def test_sigterm_ends_an_engine_whose_workers_died_before_anyone_noticed(
    toolchain: Toolchain, processes: Processes
) -> None:
    workers = start_workers(processes, toolchain)
    engine = start_engine(
        processes, models.resolve("smollm2-135m-q4_1"), rpc=[e for e, _ in workers], name="loss-stop"
    )
    assert engine.post("/v1/completions", {"prompt": "Hello", "max_tokens": 2}).status_code == 200
    for _, pid in workers:
        os.killpg(pid, signal.SIGKILL)
    os.killpg(engine.process.pid, signal.SIGTERM)  # at once: no request or probe has seen the loss
    start = time.monotonic()
    code = engine.process.wait(timeout=40)
    assert code == 3 and time.monotonic() - start < 20, (code, engine.log.read_text()[-2000:])
