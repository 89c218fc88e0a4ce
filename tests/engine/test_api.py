"""The engine's HTTP surface on a real engine process: OpenAI shapes, streaming, stop sequences,
chat templates, byte-safe detokenization, errors, auth, and the CLI's refusals."""

from __future__ import annotations

import base64
import json
import socket
import struct
import subprocess
import sys
import threading
import time

import httpx
import pytest
from support.engines import EngineProcess, chat_prompt, engine_greedy, start_engine, tokenize
from support.procs import Processes

from tightwad import models
from tightwad.engine import cli, libllama
from tightwad.engine.chat import ChatFormatter
from tightwad.launch import free_port
from tightwad.toolchain import Toolchain

pytestmark = pytest.mark.integration

STORY = chat_prompt("Tell me a short story about a cat.")


def sse_data(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data:").strip() for line in response.iter_lines() if line.startswith("data:")]


def test_models_health_and_ready(local_engine: EngineProcess) -> None:
    models_body = local_engine.get("/v1/models").json()
    entry = models_body["data"][0]
    assert models_body["object"] == "list" and entry["object"] == "model"
    assert (
        entry["meta"]["n_vocab"] == 49152 and entry["meta"]["chat_template"] == "GGUF tokenizer.chat_template"
    )
    health = local_engine.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert local_engine.get("/ready").json() == {"ready": True}


def test_tokenize_renders_a_chat_exactly_as_chat_completions_does(local_engine: EngineProcess) -> None:
    messages = [{"role": "user", "content": "Nenne drei Farben."}]
    tokens = local_engine.post("/tokenize", {"messages": messages}).json()["tokens"]
    reply = local_engine.post("/v1/chat/completions", {"messages": messages, "max_tokens": 1}).json()
    assert len(tokens) == reply["usage"]["prompt_tokens"]
    text = local_engine.post("/detokenize", {"tokens": tokens, "special": True}).json()["content"]
    assert "Nenne drei Farben." in text and text.rstrip().endswith("assistant")


def test_detokenize_pieces_are_byte_safe(local_engine: EngineProcess) -> None:
    text = "café ☕ 日本"
    tokens = local_engine.post("/tokenize", {"content": text, "with_pieces": True}).json()
    body = local_engine.post("/detokenize", {"tokens": tokens["tokens"]}).json()
    pieces = [base64.b64decode(p) for p in body["pieces"]]
    assert body["content"] == text and b"".join(pieces) == text.encode()
    assert [base64.b64decode(p) for p in tokens["pieces"]] == pieces

    def decodes(piece: bytes) -> bool:
        try:
            piece.decode()
            return True
        except UnicodeDecodeError:
            return False

    assert not all(decodes(p) for p in pieces), "some token should hold part of a character"


def test_completion_usage_and_finish_reason(local_engine: EngineProcess) -> None:
    prompt = tokenize(local_engine, STORY)
    body = local_engine.post(
        "/v1/completions", {"prompt": STORY, "max_tokens": 5, "temperature": 0, "return_tokens": True}
    ).json()
    choice = body["choices"][0]
    assert body["object"] == "text_completion" and choice["finish_reason"] == "length"
    assert body["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": 5,
        "total_tokens": len(prompt) + 5,
    }
    assert len(choice["tokens"]) == 5 and choice["text"]


def test_stop_sequences_never_leak_even_across_tokens(local_engine: EngineProcess) -> None:
    prompt = tokenize(local_engine, STORY)
    tokens = engine_greedy(local_engine, prompt, 40)
    pieces = [
        base64.b64decode(p).decode()
        for p in local_engine.post("/detokenize", {"tokens": tokens}).json()["pieces"]
    ]
    text = "".join(pieces)
    # a stop string that starts in one token and ends in the next, somewhere in the middle
    boundary = len("".join(pieces[:20]))
    stop = text[boundary - 2 : boundary + 2]
    start = text.find(stop)
    assert len(stop) == 4 and 0 < start <= boundary - 2
    request = {"prompt": prompt, "max_tokens": 40, "temperature": 0, "stop": ["NEVER-SEEN", stop]}
    body = local_engine.post("/v1/completions", request).json()
    assert body["choices"][0]["text"] == text[:start]
    assert body["choices"][0]["finish_reason"] == "stop"
    with httpx.stream("POST", f"{local_engine.url}/v1/completions", json={**request, "stream": True}) as r:
        data = sse_data(r)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == text[:start]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_uses_the_gguf_template_and_streams(local_engine: EngineProcess) -> None:
    messages = [{"role": "user", "content": "Tell me a short story about a cat."}]
    expected_prompt = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        + STORY
    )
    prompt = tokenize(local_engine, expected_prompt)
    request = {"messages": messages, "max_tokens": 12, "temperature": 0, "return_tokens": True}
    body = local_engine.post("/v1/chat/completions", request).json()
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert choice["tokens"] == engine_greedy(local_engine, prompt, 12)

    with httpx.stream(
        "POST", f"{local_engine.url}/v1/chat/completions", json={**request, "stream": True}
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        data = sse_data(r)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 12


def test_a_gguf_without_a_template_falls_back_to_the_builtin_one(toolchain: Toolchain) -> None:
    model = libllama.Model(models.resolve("gemma3-270m-q4_k_m"))
    try:
        formatter = ChatFormatter(model)
        text = formatter.render([{"role": "user", "content": "Hi"}])
        assert formatter.describe() == "llama.cpp built-in 'gemma'"
        assert text == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
        tokens = formatter.tokens([{"role": "user", "content": "Hi"}])
        assert tokens[0] == model.bos and tokens.count(model.bos) == 1
    finally:
        model.close()


def test_a_client_that_goes_away_stops_its_generation(local_engine: EngineProcess) -> None:
    request = {"prompt": "Count:", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{local_engine.url}/v1/completions", json=request) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break
    time.sleep(1.0)
    first = local_engine.get("/tightwad/v1/stats").json()
    time.sleep(0.5)
    second = local_engine.get("/tightwad/v1/stats").json()
    assert second["generated_tokens"] == first["generated_tokens"] and second["active"] == 0


def test_errors_are_openai_shaped(local_engine: EngineProcess) -> None:
    def error(response: httpx.Response, status: int, code: str) -> str:
        assert response.status_code == status, response.text
        body = response.json()["error"]
        assert set(body) == {"message", "type", "param", "code"} and body["code"] == code, body
        return str(body["message"])

    error(local_engine.get("/v1/nothing"), 404, "not_found")
    bad_json = httpx.post(f"{local_engine.url}/v1/completions", content=b"{nope", timeout=30)
    error(bad_json, 400, "invalid_request")
    error(local_engine.post("/v1/completions", {"prompt": "x", "temperature": -1}), 400, "invalid_request")
    error(local_engine.post("/v1/completions", {"prompt": "x", "n": 0}), 400, "invalid_request")
    error(
        local_engine.post("/v1/completions", {"prompt": "x", "logit_bias": {"5": 1000}}),
        400,
        "invalid_request",
    )
    error(local_engine.post("/v1/completions", {"prompt": "x", "mirostat": 2}), 400, "unknown_parameter")
    message = error(
        local_engine.post("/tightwad/v1/verify", {"conversation": "e", "tokens": [1, 999999]}),
        400,
        "invalid_request",
    )
    assert "999999" in message
    too_long = {"conversation": "too-long", "tokens": [1] * 5000, "reset": True, "drafts": [{"tokens": [2]}]}
    error(local_engine.post("/tightwad/v1/verify", too_long), 400, "context_length_exceeded")
    bad_probs = {"conversation": "p", "tokens": [1, 2], "drafts": [{"tokens": [3], "probs": [[0.5, 0.5]]}]}
    error(local_engine.post("/tightwad/v1/verify", bad_probs), 400, "invalid_request")


def test_an_evicted_conversation_is_told_to_reset(local_engine: EngineProcess) -> None:
    parallel = 8  # the local engine's --parallel
    for i in range(parallel + 1):
        body = {"conversation": f"evict-{i}", "tokens": [1, 2, 3 + i], "reset": True}
        assert local_engine.post("/tightwad/v1/verify", body).status_code == 200
    response = local_engine.post("/tightwad/v1/verify", {"conversation": "evict-0", "tokens": [5]})
    assert response.status_code == 409 and response.json()["error"]["code"] == "conversation_evicted"
    again = local_engine.post(
        "/tightwad/v1/verify", {"conversation": "evict-0", "tokens": [1, 2, 3], "reset": True}
    )
    assert again.status_code == 200 and again.json()["n_past"] == 3


def test_a_conversation_the_engine_never_held_must_be_sent_whole(local_engine: EngineProcess) -> None:
    # E.g. a proxy whose engine was swapped behind a router: its continuation would be taken for a
    # whole prompt, so the engine refuses it rather than silently change the output.
    response = local_engine.post("/tightwad/v1/verify", {"conversation": "never-seen", "tokens": [5, 6]})
    assert response.status_code == 409 and response.json()["error"]["code"] == "conversation_evicted"
    assert "reset: true" in response.json()["error"]["message"]


def test_a_token_is_required_when_configured(toolchain: Toolchain, processes: Processes) -> None:
    engine = start_engine(
        processes, models.resolve("smollm2-135m-q4_1"), ctx=512, extra=["--token", "s3cret"], name="auth"
    )
    denied = engine.get("/v1/models")
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    assert engine.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert engine.get("/health").status_code == 200  # probes need no token


def test_cli_refuses_to_listen_beyond_loopback_without_a_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TIGHTWAD_TOKEN", raising=False)
    assert cli.main(["--model", "x.gguf", "--host", "0.0.0.0"]) == 1
    assert "without a token" in capsys.readouterr().err


def test_cli_refuses_an_unreachable_worker_with_one_clear_line(
    toolchain: Toolchain, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    model = str(models.resolve("smollm2-135m-q4_1"))
    assert cli.main(["--model", model, "--rpc", dead, "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert f"rpc worker {dead} is unreachable" in err and "Traceback" not in err


def test_cli_refuses_a_worker_of_another_llama_cpp_build(
    toolchain: Toolchain, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fake worker answering HELLO with protocol 99.0.0: refused before libggml connects."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(1 + 8 + 24)
            conn.sendall(struct.pack("<Q", 28) + bytes([99, 0, 0, 0]) + bytes(24))

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    model = str(models.resolve("smollm2-135m-q4_1"))
    try:
        assert cli.main(["--model", model, "--rpc", f"127.0.0.1:{port}", "--port", str(free_port())]) == 1
    finally:
        server.close()
    err = capsys.readouterr().err
    assert "speaks RPC protocol 99.0.0" in err and "same llama.cpp build" in err


# hostile or careless requests: each fails alone, with a 4xx naming its field ----------------------
def test_a_negative_seed_is_served_reproducibly_and_hurts_no_one(local_engine: EngineProcess) -> None:
    prompt = tokenize(local_engine, STORY)
    sampling = {"temperature": 0.8, "seed": -1}
    replies = []
    for i in range(9):  # one more than the engine's --parallel: no sequence may be lost
        body = {"conversation": f"seed-{i}", "tokens": prompt, "reset": True, "sampling": sampling}
        response = httpx.post(f"{local_engine.url}/tightwad/v1/verify", json={**body}, timeout=30)
        assert response.status_code == 200, response.text
        replies.append(response.json()["tokens"])
    assert replies[0] == replies[1]  # -1 is a seed like any other: the same stream every time
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, **sampling}
    assert local_engine.post("/v1/chat/completions", chat).status_code == 200
    too_big = local_engine.post("/v1/completions", {"prompt": "x", "temperature": 1, "seed": 2**64})
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "seed"


def test_a_tiny_temperature_is_greedy_and_hurts_no_one(local_engine: EngineProcess) -> None:
    prompt = tokenize(local_engine, STORY)
    outcome: list[list[str]] = []

    def neighbour() -> None:
        request = {"prompt": prompt, "max_tokens": 40, "ignore_eos": True, "stream": True, "temperature": 0}
        with httpx.stream("POST", f"{local_engine.url}/v1/completions", json=request, timeout=60) as r:
            outcome.append(sse_data(r))

    thread = threading.Thread(target=neighbour)
    thread.start()
    time.sleep(0.3)
    tiny = {"prompt": prompt, "max_tokens": 8, "temperature": 1e-308, "return_tokens": True}
    response = local_engine.post("/v1/completions", tiny)
    thread.join(timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["tokens"] == engine_greedy(local_engine, prompt, 8)
    assert outcome and outcome[0][-1] == "[DONE]", outcome


def test_stop_lists_are_bounded(local_engine: EngineProcess) -> None:
    for stop in (["x"] * 17, "y" * 5000):
        response = local_engine.post("/v1/completions", {"prompt": "x", "max_tokens": 1, "stop": stop})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "stop"


def test_a_body_over_the_limit_is_a_413(local_engine: EngineProcess) -> None:
    huge = json.dumps({"prompt": "a " * (5 * 2**20)}).encode()  # 10 MiB, over the default 8 MiB
    for content in (huge, iter([huge[i : i + 2**20] for i in range(0, len(huge), 2**20)])):
        response = httpx.post(f"{local_engine.url}/v1/completions", content=content, timeout=60)
        assert response.status_code == 413, response.text[:300]
        assert response.json()["error"]["code"] == "request_too_large"


def test_big_inputs_never_block_the_event_loop(local_engine: EngineProcess) -> None:
    text = "the quick brown fox jumps over the lazy dog. " * 150_000  # 6.8 MB: seconds to tokenize
    done = threading.Event()

    def tokenize_it() -> None:
        local_engine.post("/tokenize", {"content": text})
        done.set()

    thread = threading.Thread(target=tokenize_it)
    thread.start()
    time.sleep(0.5)
    slowest = 0.0
    while not done.is_set():
        start = time.perf_counter()
        assert local_engine.get("/health").status_code == 200
        slowest = max(slowest, time.perf_counter() - start)
        time.sleep(0.1)
    thread.join()
    assert slowest < 1.0, f"/health took {slowest:.2f} s while a big input was tokenized"
    # A prompt that cannot fit the context whatever its tokens is refused before it is tokenized.
    start = time.perf_counter()
    response = local_engine.post("/v1/completions", {"prompt": text})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert time.perf_counter() - start < 1.0


def test_a_client_that_leaves_a_non_streaming_request_stops_it(local_engine: EngineProcess) -> None:
    request = {"prompt": "Count:", "max_tokens": 3000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{local_engine.url}/v1/completions", json=request, timeout=1.5)
    time.sleep(1.0)
    first = local_engine.get("/tightwad/v1/stats").json()
    time.sleep(0.5)
    second = local_engine.get("/tightwad/v1/stats").json()
    assert second["generated_tokens"] == first["generated_tokens"] and second["active"] == 0


def test_health_details_need_the_token(toolchain: Toolchain, processes: Processes) -> None:
    engine = start_engine(
        processes, models.resolve("smollm2-135m-q4_1"), ctx=512, extra=["--token", "s3cret"], name="health"
    )
    auth = {"Authorization": "Bearer s3cret"}
    assert engine.get("/health").json() == {"status": "ok"}  # nothing about the pool for strangers
    detailed = engine.get("/health", headers=auth).json()
    assert detailed["status"] == "ok" and "workers" in detailed and "model" in detailed
    assert engine.get("/tightwad/v1/health").status_code == 401
    assert engine.get("/tightwad/v1/health", headers=auth).json() == detailed


def test_the_shutdown_watchdog_ends_a_teardown_that_hangs() -> None:
    code = "import time; from tightwad.engine import cli; cli.start_watchdog(0.5, bool); time.sleep(60)"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == cli.EXIT_TEARDOWN_HUNG and time.monotonic() - start < 10
    assert "exiting without freeing" in done.stderr
