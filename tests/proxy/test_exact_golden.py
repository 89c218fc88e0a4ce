"""Strict exact mode through the real proxy: speculative greedy replies are the target's, token for
token, on a real K-quant target (Gemma 3 270M Q4_K_M, `tightwad engine --exact on`, otherwise
default settings) - in race mode with two drafters, with a `response_format` json_schema, and with
presence/frequency penalties and a logit_bias. The prompts are those of
tests/engine/test_invariance.py whose greedy path flips under stock kernels (verify blocks of 5 or 9
positions decide a near-tie differently from one-token decoding), so the equality is the exact
kernels' doing, not luck. The drafter is a llama-server on the same GGUF with stock kernels: only
its proposals matter, never its arithmetic."""

from __future__ import annotations

from typing import Any

import pytest
from support.engines import EngineProcess, start_engine, tokenize
from support.procs import Processes
from support.proxies import ProxyProcess, start_proxy

from tightwad import models
from tightwad.launch import free_port, llama_server_command, wait_for_http
from tightwad.toolchain import Toolchain

pytestmark = pytest.mark.integration

TARGET = "gemma3-270m-q4_k_m"
MAX_TOKENS = 48
# From tests/engine/test_invariance.py GOLDEN_PROMPTS: these flip 1-2 greedy tokens in their first
# 32-40 positions on this model when verify blocks run on stock kernels. Measured with this file's
# engine started `--exact off`: the race, json_schema and penalised tests each fail there (the
# proxy's reply leaves the engine's on one of these prompts), so each can tell.
FLIPPING = [
    "Write a short story about a robot who learns to paint.",
    "List three ways to solve problems in a team.",
]
# Free text inside the JSON, so the constrained reply still passes the near-ties.
STORY = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "text": {"type": "string"}},
    "required": ["title", "text"],
    "additionalProperties": False,
}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "story", "schema": STORY, "strict": True}}
PENALTIES = {"presence_penalty": 0.3, "frequency_penalty": 0.5}


@pytest.fixture(scope="module")
def engine(toolchain: Toolchain, module_processes: Processes) -> EngineProcess:
    if not toolchain.exact:
        pytest.fail(f"the build at {toolchain.prefix} lacks the exact-mode patch; run `make toolchain`")
    return start_engine(
        module_processes, models.resolve(TARGET), parallel=2, ctx=2048, extra=["--exact", "on"], name="exact"
    )


@pytest.fixture(scope="module")
def drafter(toolchain: Toolchain, module_processes: Processes) -> str:
    """llama-server on the target's own GGUF (same vocabulary), on stock kernels (said explicitly:
    ggml's unset default is exact) - a drafter's arithmetic must not matter."""
    port = free_port()
    cmd = llama_server_command(toolchain, models.resolve(TARGET), port, threads=1, ctx_size=2048)
    process, log = module_processes.start(f"gemma-drafter-{port}", cmd, env={"GGML_CPU_EXACT": "0"})
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", timeout=60, process=process, log=log)
    return url


@pytest.fixture(scope="module")
def speculating(engine: EngineProcess, drafter: str, module_processes: Processes) -> ProxyProcess:
    return start_proxy(module_processes, engine.url, draft=drafter)


@pytest.fixture(scope="module")
def racing(engine: EngineProcess, drafter: str, module_processes: Processes) -> ProxyProcess:
    race = ["--mode", "race", "--drafter", f"gemma:llama-server:{drafter}", "--drafter", "lookup:ngram"]
    return start_proxy(module_processes, engine.url, *race)


def chat(target: EngineProcess | ProxyProcess, user: str, **kw: Any) -> tuple[list[int], str]:
    """A greedy chat reply's token ids (the `return_tokens` extension) and text."""
    body = {
        "messages": [{"role": "user", "content": user}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "return_tokens": True,
        **kw,
    }
    response = target.post("/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return list(choice["tokens"]), str(choice["message"]["content"])


def speculated(proxy: ProxyProcess, before: dict[str, Any]) -> int:
    """Tokens the drafters got accepted since `before` (the proxy's stats)."""
    return int(proxy.stats()["accepted_tokens"]) - int(before["accepted_tokens"])


def test_race_with_two_drafters_equals_the_engine_alone(engine: EngineProcess, racing: ProxyProcess) -> None:
    before = racing.stats()
    for user in FLIPPING:
        expected = chat(engine, user)
        assert len(expected[0]) >= 8, "the model should say something"
        assert chat(racing, user) == expected, user
    assert speculated(racing, before) > 0
    board = racing.stats()["race"]["drafters"]
    assert board["gemma"]["wins"] > 0 and "lookup" in board  # both drafters raced
    meta = racing.get("/v1/models").json()["data"][0]["meta"]["proxy"]
    assert meta["mode"] == "race" and meta["exact"] is True


def test_json_schema_reply_equals_the_engine_alone(engine: EngineProcess, speculating: ProxyProcess) -> None:
    before = speculating.stats()
    for user in FLIPPING:
        expected = chat(engine, user, response_format=SCHEMA)
        assert expected[1].lstrip().startswith('{ "') and '"text"' in expected[1]  # the schema held
        assert chat(speculating, user, response_format=SCHEMA) == expected, user
    assert speculated(speculating, before) > 0


def test_penalised_and_biased_reply_equals_the_engine_alone(
    engine: EngineProcess, speculating: ProxyProcess
) -> None:
    full_stop = tokenize(engine, ".")[-1]
    bias = {"logit_bias": {str(full_stop): -100}}  # no full stops
    before = speculating.stats()
    for user in FLIPPING:
        plain = chat(engine, user)[0]
        expected = chat(engine, user, **PENALTIES, **bias)
        assert expected[0] != plain and full_stop not in expected[0]  # they changed the reply
        assert chat(speculating, user, **PENALTIES, **bias) == expected, user
    assert speculated(speculating, before) > 0
