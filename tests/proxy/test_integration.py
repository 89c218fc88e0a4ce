"""The proxy on real processes: the engine (F32 SmolLM2 target), a llama-server drafter (the Q4_1
build of the same model: a same-model pair), and `python -m tightwad.proxy.cli start`.

Golden: through the proxy, greedy output equals the engine alone token for token, streamed or not.
Faults: a drafter killed mid-reply or answering garbage changes nothing; an engine that is down is
a 503 in OpenAI shape; an engine that dies mid-stream ends the stream with an error event."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from support.engines import EngineProcess, chat_prompt, start_engine
from support.procs import Processes
from support.proxies import AUTH, TOKEN, ProxyProcess, kill, sse, start_drafter, start_proxy, stream_reply
from support.servers import ThreadServer

from tightwad import models
from tightwad.launch import free_port
from tightwad.toolchain import Toolchain

pytestmark = pytest.mark.integration

# (prompt, stop sequences): non-ASCII text, and stops that cut inside multibyte text and across rounds.
GOLDEN = [
    (chat_prompt("Write a short poem about the sea, in French."), None),
    (chat_prompt("How do you say 'thank you' in Japanese, Chinese and Greek?"), ["くない"]),
    (chat_prompt("List three fruits, one per line."), ["3."]),
    (chat_prompt("Décris ton café préféré avec des emojis ☕"), None),
    (chat_prompt("List three fruits, one per line."), None),  # ends with the target's end of generation
]
MAX_TOKENS = 40


def golden_body(case: int) -> dict:  # type: ignore[type-arg]
    """The greedy completion request for GOLDEN[case], asking for token ids back."""
    prompt, stop = GOLDEN[case]
    return {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_tokens": True, "stop": stop}


# fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def drafter_url(toolchain: Toolchain, module_processes: Processes) -> str:
    return start_drafter(module_processes, toolchain)[0]


@pytest.fixture(scope="module")
def proxy(local_engine: EngineProcess, drafter_url: str, module_processes: Processes) -> ProxyProcess:
    return start_proxy(module_processes, local_engine.url, "--max-body-bytes", "65536", draft=drafter_url)


@pytest.fixture(scope="module")
def references(local_engine: EngineProcess) -> list[dict]:  # type: ignore[type-arg]
    """The engine alone, greedy, for each golden prompt."""
    out = []
    for case in range(len(GOLDEN)):
        body = golden_body(case)
        choice = local_engine.post("/v1/completions", body).json()["choices"][0]
        out.append(choice)
    return out


# golden -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", range(len(GOLDEN)))
def test_greedy_through_the_proxy_equals_the_target_alone(
    proxy: ProxyProcess,
    references: list[dict],
    case: int,  # type: ignore[type-arg]
) -> None:
    expected, stop = references[case], GOLDEN[case][1]
    body = golden_body(case)
    response = proxy.post("/v1/completions", body)
    assert response.status_code == 200, response.text
    reply = response.json()
    choice = reply["choices"][0]
    assert choice["tokens"] == expected["tokens"]
    assert choice["text"] == expected["text"]
    assert choice["finish_reason"] == expected["finish_reason"]
    assert reply["usage"]["completion_tokens"] == len(expected["tokens"])
    assert reply["id"].startswith("cmpl-") and reply["object"] == "text_completion" and reply["model"]
    if stop:
        assert stop[0] not in choice["text"] and expected["finish_reason"] == "stop"
    if case == len(GOLDEN) - 1:
        assert expected["finish_reason"] == "stop" and len(expected["tokens"]) < MAX_TOKENS

    text, tokens, events = stream_reply(
        proxy, "/v1/completions", {**body, "stream_options": {"include_usage": True}}
    )
    assert tokens == expected["tokens"] and text == expected["text"]
    assert events[-1] == {"done": True}
    assert events[-3]["choices"][0]["finish_reason"] == expected["finish_reason"]
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == len(expected["tokens"])
    assert len({e["id"] for e in events[:-1]}) == 1


def test_speculation_really_happened(proxy: ProxyProcess, references: list[dict]) -> None:  # type: ignore[type-arg]
    stats = proxy.stats()
    assert stats["rounds"] > 0 and stats["accepted_tokens"] > 0.5 * stats["draft_tokens"]
    assert stats["generated_tokens"]["verify"] > stats["rounds"]  # more than one token per round
    assert stats["errors"] == {}


def test_chat_through_the_proxy_equals_the_engine(local_engine: EngineProcess, proxy: ProxyProcess) -> None:
    body = {
        "messages": [{"role": "user", "content": "Name a color in Spanish."}],
        "max_tokens": 12,
        "temperature": 0,
    }
    expected = local_engine.post("/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    reply = proxy.post("/v1/chat/completions", body).json()
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": expected}
    text, _, events = stream_reply(proxy, "/v1/chat/completions", body)
    assert text == expected and events[0]["choices"][0]["delta"].get("role") == "assistant"
    assert events[-1] == {"done": True}


# the OpenAI surface -----------------------------------------------------------------------------
def test_what_speculation_cannot_serve_reaches_the_engine_unchanged(
    local_engine: EngineProcess, proxy: ProxyProcess
) -> None:
    before = proxy.stats()["requests"].get("passthrough", 0)
    for extra in ({"n": 2}, {"prompt": ["Hello", "Good night"]}):
        body = {"prompt": "Hello", "max_tokens": 2, "temperature": 0, **extra}
        direct = local_engine.post("/v1/completions", body).json()
        through = proxy.post("/v1/completions", body).json()
        assert (through["choices"], through["usage"]) == (direct["choices"], direct["usage"])
        assert len(through["choices"]) == 2
    # Refused by the proxy itself, with the engine's own words (the one parameter table).
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": tools}
    assert (
        proxy.post("/v1/chat/completions", body).json()
        == local_engine.post("/v1/chat/completions", body).json()
    )
    assert proxy.stats()["requests"]["passthrough"] == before + 2


def test_auth_limits_and_error_shapes(proxy: ProxyProcess) -> None:
    missing = proxy.post("/v1/completions", {"prompt": "x"}, headers={})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert proxy.get("/health", headers={}).status_code == 200  # open, like /ready
    big = proxy.post("/v1/completions", {"prompt": "x" * 70000})
    assert big.status_code == 413 and big.json()["error"]["type"] == "invalid_request_error"
    bad = proxy.post("/v1/completions", {"prompt": "x", "max_tokens": 0})
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
    huge = proxy.post("/v1/completions", {"prompt": [10**7]})
    assert huge.status_code == 400 and "not a token id" in huge.json()["error"]["message"]
    assert proxy.get("/nope").status_code == 404
    models_body = proxy.get("/v1/models").json()
    assert models_body["data"][0]["meta"]["proxy"]["mode"] == "speculate"


def test_metrics_and_status(proxy: ProxyProcess, references: list[dict]) -> None:  # type: ignore[type-arg]
    proxy.post("/v1/completions", {"prompt": GOLDEN[0][0], "max_tokens": 8, "temperature": 0})
    metrics = proxy.get("/metrics").text
    for name in (
        "tightwad_proxy_rounds_total",
        "tightwad_proxy_accepted_tokens_total",
        "tightwad_proxy_tokens_per_round_bucket",
        "tightwad_proxy_time_to_first_token_seconds_bucket",
        "tightwad_proxy_inter_token_seconds_bucket",
        "tightwad_proxy_acceptance_ratio",
    ):
        assert name in metrics
    out = subprocess.run(
        [sys.executable, "-m", "tightwad.proxy.cli", "status", "--url", proxy.url, "--token", TOKEN],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "rounds" in out.stdout and "acceptance" in out.stdout and "speedup" in out.stdout


# faults -----------------------------------------------------------------------------------------
def test_drafter_killed_mid_reply(
    local_engine: EngineProcess,
    toolchain: Toolchain,
    processes: Processes,
    references: list[dict],  # type: ignore[type-arg]
) -> None:
    url, drafter = start_drafter(processes, toolchain)
    proxy = start_proxy(processes, local_engine.url, draft=url)
    prompt, _ = GOLDEN[0]
    body = {
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "return_tokens": True,
        "stream": True,
    }
    tokens: list[int] = []
    with httpx.stream("POST", f"{proxy.url}/v1/completions", json=body, headers=AUTH, timeout=120) as r:
        for data in sse(r):
            if data == "[DONE]":
                break
            event = json.loads(data)
            assert "error" not in event
            tokens += event["choices"][0].get("tokens") or []
            if len(tokens) >= 6 and drafter.poll() is None:
                kill(drafter)
    assert drafter.poll() is not None
    assert tokens == references[0]["tokens"]
    stats = proxy.stats()
    assert stats["drafter"]["failures"] >= 1 and stats["generated_tokens"].get("engine", 0) > 0


def garbage_drafter() -> Starlette:
    """A "llama-server" that answers nonsense: random ids (some out of the vocabulary), broken
    JSON, wrong shapes and errors."""
    rng = random.Random(7)

    async def completion(request: Request) -> Response:
        body = await request.json()
        kind = rng.randrange(5)
        if kind == 0:
            return PlainTextResponse("{not json", media_type="application/json")
        if kind == 1:
            return JSONResponse({"error": "no"}, status_code=500)
        if kind == 2:
            return JSONResponse({"content": "hello", "tokens": "nope"})
        ids = [rng.randrange(-5, 60000) for _ in range(body.get("n_predict", 4) + 3)]
        return JSONResponse({"tokens": ids, "completion_probabilities": [{"bad": 1}]})

    return Starlette(routes=[Route("/completion", completion, methods=["POST"])])


def test_garbage_drafter_still_exact(
    local_engine: EngineProcess,
    processes: Processes,
    references: list[dict],  # type: ignore[type-arg]
) -> None:
    with ThreadServer(garbage_drafter()) as drafter:
        proxy = start_proxy(processes, local_engine.url, "--draft-timeout", "2", draft=drafter.url)
        for case in (0, 2):
            body = golden_body(case)
            choice = proxy.post("/v1/completions", body).json()["choices"][0]
            assert choice["tokens"] == references[case]["tokens"]
            assert choice["text"] == references[case]["text"]
        stats = proxy.stats()
        assert stats["drafter"]["calls"] > 0 and stats["errors"] == {}


def test_chat_is_speculative_and_exact(
    local_engine: EngineProcess, drafter_url: str, processes: Processes
) -> None:
    # The engine renders chat prompts with the model's template (/tokenize with `messages`).
    proxy = start_proxy(processes, local_engine.url, draft=drafter_url)
    assert proxy.get("/v1/models").json()["data"][0]["meta"]["proxy"]["chat_speculation"]
    body = {
        "messages": [{"role": "user", "content": "Écris une phrase sur la mer."}],
        "max_tokens": 32,
        "temperature": 0,
    }
    expected = local_engine.post("/v1/chat/completions", body).json()
    reply = proxy.post("/v1/chat/completions", body).json()
    assert reply["choices"][0]["message"] == expected["choices"][0]["message"]
    assert reply["usage"] == expected["usage"] and reply["id"].startswith("chatcmpl-")
    text, _, events = stream_reply(proxy, "/v1/chat/completions", body)
    assert text == expected["choices"][0]["message"]["content"]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    stats = proxy.stats()
    assert stats["requests"] == {"speculate": 2} and stats["accepted_tokens"] > 0


def test_a_text_drafter_is_retokenized_and_still_exact(
    local_engine: EngineProcess,
    drafter_url: str,
    processes: Processes,
    references: list[dict],  # type: ignore[type-arg]
) -> None:
    # llama-server's /v1/completions as "any OpenAI-compatible server": text in, text out.
    proxy = start_proxy(processes, local_engine.url, "--draft-kind", "openai", draft=f"{drafter_url}/v1")
    body = golden_body(0)
    choice = proxy.post("/v1/completions", body).json()["choices"][0]
    assert choice["tokens"] == references[0]["tokens"] and choice["text"] == references[0]["text"]
    stats = proxy.stats()
    assert stats["drafter"]["kind"] == "openai" and stats["drafter"]["failures"] == 0
    assert stats["accepted_tokens"] > 0.5 * stats["draft_tokens"]


def test_engine_down_is_a_503_in_openai_shape(processes: Processes) -> None:
    proxy = start_proxy(processes, f"http://127.0.0.1:{free_port()}", "--draft-kind", "ngram", ready=False)
    for stream in (False, True):
        r = proxy.post("/v1/completions", {"prompt": "hi", "max_tokens": 4, "stream": stream})
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["code"] == "engine_unavailable" and error["type"] == "server_error"
        assert "unreachable" in error["message"] and "--target" in error["message"]
    assert proxy.get("/ready", headers={}).status_code == 503
    assert proxy.get("/health", headers={}).json()["error"]["code"] == "engine_unavailable"
    chat = proxy.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 503 and chat.json()["error"]["code"] == "engine_unavailable"


def test_engine_dying_mid_stream_ends_with_an_error_event(toolchain: Toolchain, processes: Processes) -> None:
    engine = start_engine(processes, models.resolve("smollm2-135m-q4_1"), parallel=2, ctx=1024, name="doomed")
    proxy = start_proxy(processes, engine.url, "--draft-kind", "ngram")
    body = {"prompt": GOLDEN[0][0], "max_tokens": 400, "temperature": 0, "stream": True}
    events = []
    with httpx.stream("POST", f"{proxy.url}/v1/completions", json=body, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200
        for data in sse(r):
            events.append(data)
            if len(events) == 3:
                kill(engine.process)
    last = json.loads(events[-1])
    assert "[DONE]" not in events
    assert last["error"]["type"] == "server_error" and "unreachable" in last["error"]["message"]
    health = proxy.get("/health", headers={})
    assert health.status_code == 503 and health.json()["error"]["code"] == "engine_unavailable"


def test_sampled_replies_use_the_drafters_probabilities(
    local_engine: EngineProcess, drafter_url: str, processes: Processes
) -> None:
    # A fixed K and a patient drafter timeout: on a loaded machine the cost model may stop drafting
    # and a slow draft counts as a failure, and this test is about the rejection rule, not timing.
    # No seed: a seeded request uses the position-keyed rule instead, which needs no drafter
    # probabilities (tests/proxy/test_openai_exact.py covers it).
    proxy = start_proxy(
        processes, local_engine.url, "--max-draft-tokens", "6", "--draft-timeout", "60", draft=drafter_url
    )
    body = {"prompt": GOLDEN[0][0], "max_tokens": 24, "temperature": 0.7, "top_p": 0.95}
    before = proxy.stats()
    reply = proxy.post("/v1/completions", body).json()
    after = proxy.stats()
    assert reply["usage"]["completion_tokens"] == 24 or reply["choices"][0]["finish_reason"] == "stop"
    assert after["rounds"] > before["rounds"] and after["accepted_tokens"] > before["accepted_tokens"], after
    assert after["errors"] == {}


def test_concurrent_replies_are_each_exact(proxy: ProxyProcess, references: list[dict]) -> None:  # type: ignore[type-arg]
    cases = (0, 2)
    results: dict[int, list[int]] = {}

    def ask(case: int) -> None:
        body = golden_body(case)
        results[case] = proxy.post("/v1/completions", body).json()["choices"][0]["tokens"]

    threads = [threading.Thread(target=ask, args=(case,)) for case in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert {case: results.get(case) for case in cases} == {case: references[case]["tokens"] for case in cases}
