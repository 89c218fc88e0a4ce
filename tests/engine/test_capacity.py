"""Many users on a real engine process: conversations beyond its sequences queue first come first
served, a full queue or a wait past the bound is a 503 with Retry-After (before any SSE byte), the
openai SDK sees it as such, and `--parallel auto` follows from the KV cache."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import openai
import pytest
from support.engines import EngineProcess, start_engine
from support.procs import Processes

from tightwad import models
from tightwad.toolchain import Toolchain

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-q4_1"
LONG = {"prompt": "Once upon a time", "max_tokens": 96, "ignore_eos": True, "temperature": 0, "stream": True}


class Stream:
    """A streamed completion on a thread: its status, Retry-After, content type, text and end time;
    `abort` hangs up (the engine then cancels it)."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        self.url, self.body = url, body
        self.result: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        with (
            httpx.Client(timeout=120) as client,
            client.stream("POST", f"{self.url}/v1/completions", json=self.body) as r,
        ):
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if self._stop.is_set():
                    break
            self.result = {
                "status": r.status_code,
                "retry_after": r.headers.get("retry-after"),
                "type": r.headers.get("content-type", ""),
                "raw": "\n".join(lines),
                "done": time.monotonic(),
            }

    def abort(self) -> None:
        self._stop.set()

    def join(self) -> dict[str, Any]:
        self._thread.join(120)
        return self.result


def until(engine: EngineProcess, key: str, value: int) -> None:
    """Wait until the engine's stats say `key` (active: running, waiting: queued) reached `value`."""
    deadline = time.monotonic() + 30
    while engine.get("/tightwad/v1/stats").json()[key] < value:
        assert time.monotonic() < deadline, f"the engine never had {value} {key}"
        time.sleep(0.02)


def busy_and_queued(engine: EngineProcess, body: dict[str, Any] = LONG) -> tuple[Stream, Stream]:
    """One request running on the one sequence and one waiting behind it."""
    running = Stream(engine.url, body)
    until(engine, "active", 1)
    queued = Stream(engine.url, body)
    until(engine, "waiting", 1)
    return running, queued


@pytest.fixture(scope="module")
def one_seat(toolchain: Toolchain, module_processes: Processes) -> EngineProcess:
    """One conversation sequence and room for one waiting request."""
    extra = ["--queue", "1", "--queue-timeout", "20", "--alias", MODEL]
    return start_engine(
        module_processes, models.resolve(MODEL), parallel=1, ctx=1024, extra=extra, name="seat"
    )


def test_one_runs_one_waits_and_the_third_is_told_when_to_come_back(one_seat: EngineProcess) -> None:
    running, queued = busy_and_queued(one_seat)
    third = Stream(one_seat.url, LONG).join()
    first, second = running.join(), queued.join()
    assert first["status"] == 200 and second["status"] == 200, (first, second)
    assert first["raw"].rstrip().endswith("data: [DONE]") and second["raw"].rstrip().endswith("data: [DONE]")
    assert second["done"] > first["done"]  # it waited for the first, then ran to the end
    # The third never got an SSE byte: a real 503, the OpenAI shape, and when to retry.
    assert third["status"] == 503 and "event-stream" not in third["type"], third
    assert int(third["retry_after"]) >= 1
    error = httpx.Response(503, content=third["raw"]).json()["error"]
    assert error["code"] == "queue_full" and error["type"] == "server_error"
    assert "retry after" in error["message"] and "--parallel" in error["message"]
    stats = one_seat.get("/tightwad/v1/stats").json()
    assert stats["parallel"] == 1 and stats["queue_limit"] == 1 and stats["refused_queue_full"] >= 1


def test_the_openai_sdk_sees_a_503_it_can_retry(one_seat: EngineProcess) -> None:
    running, queued = busy_and_queued(one_seat, {**LONG, "max_tokens": 1000})
    client = openai.OpenAI(base_url=f"{one_seat.url}/v1", api_key="none", max_retries=0)
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
        assert caught.value.status_code == 503
        assert int(caught.value.response.headers["retry-after"]) >= 1
    finally:
        for stream in (running, queued):
            stream.abort()
            stream.join()
        client.close()


def test_a_request_that_waits_past_the_bound_gets_a_503(toolchain: Toolchain, processes: Processes) -> None:
    extra = ["--queue", "2", "--queue-timeout", "0.5"]
    engine = start_engine(
        processes, models.resolve(MODEL), parallel=1, ctx=1024, extra=extra, name="impatient"
    )
    running = Stream(engine.url, {**LONG, "max_tokens": 1000})
    until(engine, "active", 1)
    try:
        began = time.monotonic()
        waited = httpx.post(f"{engine.url}/v1/completions", json=LONG, timeout=60)  # streamed, queued
        plain = httpx.post(
            f"{engine.url}/v1/completions", json={**LONG, "stream": False, "max_tokens": 4}, timeout=60
        )
        assert time.monotonic() - began < 10  # refused near the bound, not once the first finished
    finally:
        running.abort()
        running.join()
    for response in (waited, plain):
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "queue_timeout"
        assert int(response.headers["retry-after"]) >= 1
    assert "event-stream" not in waited.headers.get("content-type", "")


def test_parallel_auto_follows_the_kv_cache(toolchain: Toolchain, processes: Processes) -> None:
    engine = start_engine(
        processes, models.resolve(MODEL), ctx=2048, extra=["--parallel", "auto", "--conversation-ctx", "256"]
    )
    stats = engine.get("/tightwad/v1/stats").json()
    # 2048 cells / 256 each = 8 conversations; the queue is 4 per sequence.
    assert stats["parallel"] == 8 and stats["queue_limit"] == 32, stats
    assert stats["parallel_rule"].startswith("auto: 2048 KV cells / 256 per conversation")
    assert "parallel=8" in engine.log.read_text()


@pytest.mark.parametrize(
    ("flag", "value"), [("--parallel", "many"), ("--queue", "-1"), ("--queue-timeout", "0")]
)
def test_bad_capacity_flags_are_one_clear_line(toolchain: Toolchain, flag: str, value: str) -> None:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "tightwad.engine.cli", "--model", "x.gguf", flag, value]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and flag in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_ctx_auto_reads_the_kv_size_from_the_gguf(toolchain: Toolchain) -> None:
    from tightwad.engine import cli, libllama

    model = libllama.Model(models.resolve(MODEL))
    try:
        # SmolLM2-135M: 30 layers, 3 KV heads of 576 / 9 = 64 values, a key and a value each.
        assert cli.kv_cell_bytes(model, "f16") == 30 * 3 * (64 + 64) * 2
        assert cli.kv_cell_bytes(model, "q8_0") == 30 * 3 * (64 + 64) * 34 / 32
    finally:
        model.close()
