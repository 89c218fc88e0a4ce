"""Exactness of the engine under greedy decoding, against real llama.cpp on real models.

For several prompts (some not ASCII), decoding driven through the verify API with drafts from the
small model (SmolLM2 Q4_1, in this process) gives token-for-token what the engine's own greedy
decoding gives and what llama-server gives on the same target (SmolLM2 F32): also with garbage
drafts (accepting next to nothing), with several drafts at once, and with four conversations
verified concurrently in shared decode batches.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from support.engines import (
    INVARIANT_SERVER,
    EngineProcess,
    LocalDrafter,
    chat_prompt,
    engine_greedy,
    llama_server_greedy,
    strip_eog,
    tokenize,
    verify_decode,
)
from support.procs import Processes

from tightwad import models
from tightwad.launch import free_port, llama_server_command, wait_for_http
from tightwad.toolchain import Toolchain

pytestmark = pytest.mark.integration

N_TOKENS = 32
K = 4
PROMPTS = [
    chat_prompt("Tell me about the sea."),
    chat_prompt("Écris une phrase sur le café ☕ et le thé 🍵, s'il te plaît."),
    chat_prompt("日本の首都はどこですか？短く答えてください。"),
    chat_prompt("Write a Python function that reverses a string."),
]


@pytest.fixture(scope="module")
def llama_server(toolchain: Toolchain, module_processes: Processes) -> str:
    port = free_port()
    target = models.resolve("smollm2-135m-f32")
    cmd = llama_server_command(toolchain, target, port, ctx_size=2048, threads=1, extra=INVARIANT_SERVER)
    server, log = module_processes.start("llama-server-f32", cmd)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", process=server, log=log)
    return url


@pytest.fixture(scope="module")
def references(local_engine: EngineProcess, llama_server: str, drafter: LocalDrafter) -> Iterator[dict]:  # type: ignore[type-arg]
    """Prompt tokens, the engine's greedy output and llama-server's, for each prompt."""
    eog = drafter.model.is_end_of_generation
    refs = {}
    for prompt in PROMPTS:
        tokens = tokenize(local_engine, prompt)
        ours = strip_eog(engine_greedy(local_engine, tokens, N_TOKENS), eog)
        theirs = strip_eog(llama_server_greedy(llama_server, tokens, N_TOKENS), eog)
        refs[prompt] = (tokens, ours, theirs)
    yield refs


@pytest.mark.parametrize("prompt", PROMPTS, ids=["sea", "cafe-fr", "tokyo-ja", "python"])
def test_engine_greedy_equals_llama_server(references: dict, prompt: str) -> None:  # type: ignore[type-arg]
    _, ours, theirs = references[prompt]
    assert len(ours) >= 8, "the model should say something"
    assert ours == theirs


@pytest.mark.parametrize("prompt", PROMPTS, ids=["sea", "cafe-fr", "tokyo-ja", "python"])
def test_verify_with_small_model_drafts_is_exact(
    local_engine: EngineProcess,
    drafter: LocalDrafter,
    references: dict,  # type: ignore[type-arg]
    prompt: str,
) -> None:
    tokens, ours, theirs = references[prompt]
    eog = drafter.model.is_end_of_generation
    out, stats = verify_decode(
        local_engine, f"golden-{abs(hash(prompt))}", tokens, N_TOKENS, lambda h: [drafter.propose(h, K)], eog
    )
    assert strip_eog(out, eog) == ours == theirs
    # Same weights at two precisions: most drafts survive (measured ~70-90% on these prompts).
    assert stats["accepted"] > 0.4 * stats["drafted"], stats
    assert stats["rounds"] < len(ours), "speculation should need fewer rounds than tokens"


@pytest.mark.parametrize("prompt", PROMPTS[:2], ids=["sea", "cafe-fr"])
def test_verify_with_garbage_drafts_is_still_exact(
    local_engine: EngineProcess,
    drafter: LocalDrafter,
    references: dict,  # type: ignore[type-arg]
    prompt: str,
) -> None:
    tokens, ours, _ = references[prompt]
    rng = np.random.default_rng(7)
    eog = drafter.model.is_end_of_generation
    garbage = lambda h: [[int(t) for t in rng.integers(1000, 40000, size=3)]]  # noqa: E731
    out, stats = verify_decode(local_engine, f"garbage-{abs(hash(prompt))}", tokens, N_TOKENS, garbage, eog)
    assert strip_eog(out, eog) == ours
    assert stats["accepted"] <= 2, stats


def test_several_drafts_in_one_pass_pick_the_best_and_stay_exact(
    local_engine: EngineProcess,
    drafter: LocalDrafter,
    references: dict,  # type: ignore[type-arg]
) -> None:
    tokens, ours, _ = references[PROMPTS[0]]
    eog = drafter.model.is_end_of_generation
    rng = np.random.default_rng(8)
    chosen: list[int] = []

    def propose(history: list[int]) -> list[list[int]]:
        good = drafter.propose(history, K)
        return [[int(t) for t in rng.integers(1000, 40000, size=K)], good, [*good[:2], 5]]

    before = local_engine.get("/tightwad/v1/stats").json()
    history = list(tokens)
    out: list[int] = []
    first = True
    while len(out) < N_TOKENS:
        drafts = propose(history)
        body = {"conversation": "multi", "tokens": tokens if first else [], "reset": first}
        body["drafts"] = [{"tokens": d} for d in drafts]
        result = local_engine.post("/tightwad/v1/verify", body).json()
        first = False
        assert result["accepted_per_draft"][result["draft_index"]] == result["n_accepted"]
        assert result["n_accepted"] == max(result["accepted_per_draft"])
        chosen.append(result["draft_index"])
        history += result["tokens"]
        out += result["tokens"]
    assert strip_eog(out[:N_TOKENS], eog) == ours
    assert 1 in chosen, "the real draft should win some rounds"
    after = local_engine.get("/tightwad/v1/stats").json()
    assert after["verify_calls"] > before["verify_calls"]


def test_four_conversations_verified_concurrently_in_shared_batches(
    local_engine: EngineProcess,
    drafter: LocalDrafter,
    references: dict,  # type: ignore[type-arg]
) -> None:
    """Each conversation gets drafts made from its own target-alone output with deliberate errors,
    so acceptance varies round to round; all four run at once and share decode batches."""
    eog = drafter.model.is_end_of_generation
    before = local_engine.get("/tightwad/v1/stats").json()
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(PROMPTS))

    def run(i: int, prompt: str) -> None:
        tokens, ours, _ = references[prompt]
        rng = np.random.default_rng(100 + i)

        def propose(history: list[int]) -> list[list[int]]:
            done = len(history) - len(tokens)
            truth = ours[done : done + K]  # what the target will say after the history
            cut = int(rng.integers(0, K + 1))
            return [truth[:cut] + [7] * (K - cut)] if truth else [[7]]

        try:
            with httpx.Client() as client:
                barrier.wait()
                out, _ = verify_decode(
                    local_engine, f"concurrent-{i}", tokens, len(ours), propose, eog, client
                )
            results[i] = strip_eog(out, eog)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for i, prompt in enumerate(PROMPTS):
        assert results[i] == references[prompt][1], f"conversation {i}"
    after = local_engine.get("/tightwad/v1/stats").json()
    assert after["shared_decodes"] > before["shared_decodes"]
    assert after["max_requests_per_decode"] >= 2


def test_a_prompt_longer_than_a_batch_is_prefilled_in_chunks(
    local_engine: EngineProcess, llama_server: str, drafter: LocalDrafter
) -> None:
    facts = "\n".join(f"Fact {i}: {i} squared is {i * i}." for i in range(1, 22))
    text = chat_prompt(f"Read these facts.\n{facts}\nWhich fact is about 7? Quote it.")
    tokens = tokenize(local_engine, text)
    assert 256 < len(tokens) < 384, len(tokens)  # three chunks of the local engine's n_batch (128)
    eog = drafter.model.is_end_of_generation
    n = 12
    ours = strip_eog(engine_greedy(local_engine, tokens, n), eog)
    theirs = strip_eog(llama_server_greedy(llama_server, tokens, n), eog)
    spec, _ = verify_decode(local_engine, "long", tokens, n, lambda h: [drafter.propose(h, K)], eog)
    assert len(ours) >= 4 and ours == theirs == strip_eog(spec, eog)
