"""Race and consensus on real processes: the engine (F32 SmolLM2 target), a llama-server drafter
(its Q4_1 build: a same-model pair) and the n-gram drafter, behind `tightwad.proxy.cli start --mode
race|consensus --drafter ...`. Race: greedy output equals the engine alone, token for token, and both
drafters' proposals reach the engine. Consensus: serves, and says it is approximate."""

from __future__ import annotations

import pytest
from support.engines import EngineProcess, chat_prompt
from support.procs import Processes
from support.proxies import ProxyProcess, start_drafter, start_proxy

from tightwad.toolchain import Toolchain

pytestmark = pytest.mark.integration

PROMPTS = [
    chat_prompt("List the days of the week, one per line."),
    chat_prompt("Write a short poem about the sea."),
]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def q4_url(toolchain: Toolchain, module_processes: Processes) -> str:
    return start_drafter(module_processes, toolchain)[0]


def drafter_args(q4_url: str) -> list[str]:
    return ["--drafter", f"q4:llama-server:{q4_url}", "--drafter", "lookup:ngram"]


def completion(target: EngineProcess | ProxyProcess, prompt: str) -> dict:  # type: ignore[type-arg]
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_tokens": True}
    response = target.post("/v1/completions", body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_race_greedy_equals_the_target_alone(
    local_engine: EngineProcess, q4_url: str, module_processes: Processes
) -> None:
    proxy = start_proxy(module_processes, local_engine.url, "--mode", "race", *drafter_args(q4_url))
    for prompt in PROMPTS:
        expected = completion(local_engine, prompt)["choices"][0]
        reply = completion(proxy, prompt)
        assert reply["choices"][0]["tokens"] == expected["tokens"]
        assert reply["choices"][0]["text"] == expected["text"]
    stats = proxy.stats()
    race = stats["race"]["drafters"]
    assert stats["race"]["rounds"] > 0 and race["q4"]["offered"] > 0 and "lookup" in race
    assert race["q4"]["wins"] > 0 and stats["accepted_tokens"] > 0
    meta = proxy.get("/v1/models").json()["data"][0]["meta"]["proxy"]
    assert meta["mode"] == "race" and meta["exact"] is True


def test_consensus_serves_and_is_labelled_approximate(
    local_engine: EngineProcess, q4_url: str, module_processes: Processes
) -> None:
    proxy = start_proxy(
        module_processes,
        local_engine.url,
        "--mode",
        "consensus",
        "--consensus-policy",
        "any_disagree",
        *drafter_args(q4_url),
    )
    body = {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "return_tokens": True}
    response = proxy.post("/v1/completions", body)
    assert response.status_code == 200, response.text
    assert response.headers["x-tightwad-approximate"] == "consensus"
    assert len(response.json()["choices"][0]["tokens"]) == MAX_TOKENS
    stats = proxy.stats()
    assert stats["consensus"]["approximate"] is True and stats["consensus"]["policy"] == "any_disagree"
    assert stats["rounds"] + stats["consensus"]["skipped_rounds"] > 0
    assert "APPROXIMATE" in proxy.log.read_text()
