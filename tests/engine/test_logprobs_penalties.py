"""The engine alone and its verify API under penalties, logit_bias, seeds and logprobs (the real F32
SmolLM2 target in the batch-invariant configuration).

The seeded rule (engine/verify.py, "Seeds") makes the token at each position a function of (seed,
position) and the target's row: so verify calls with ANY drafts give the engine's own sampled reply,
and a reply continued from its middle (`generated_tokens`, what the proxy's fallback sends) goes on
exactly as the whole reply did.
"""

from __future__ import annotations

import numpy as np
import pytest
from support.engines import EngineProcess, chat_prompt, tokenize, verify
from support.openai_bodies import complete

pytestmark = pytest.mark.integration

PROMPT = chat_prompt("Write a short story about a cat who likes boxes.")
SAMPLED = {"temperature": 0.9, "top_p": 0.95, "frequency_penalty": 0.4, "presence_penalty": 0.2}


def test_a_seeded_reply_is_reproducible_and_depends_on_the_seed(local_engine: EngineProcess) -> None:
    first = complete(local_engine, PROMPT, max_tokens=32, seed=11, **SAMPLED)["tokens"]
    assert complete(local_engine, PROMPT, max_tokens=32, seed=11, **SAMPLED)["tokens"] == first
    assert complete(local_engine, PROMPT, max_tokens=32, seed=12, **SAMPLED)["tokens"] != first


def test_seeded_verify_of_any_drafts_gives_the_engines_own_reply(local_engine: EngineProcess) -> None:
    """Random drafts, some right for a while: every verdict continues the engine-alone reply."""
    seed, n = 99, 32
    alone = complete(local_engine, PROMPT, max_tokens=n, seed=seed, **SAMPLED)["tokens"]
    prompt = tokenize(local_engine, PROMPT)
    rng = np.random.default_rng(5)
    sampling = {**SAMPLED, "seed": seed}
    out: list[int] = []
    first = True
    while len(out) < len(alone):
        k = int(rng.integers(0, 6))
        draft = [int(t) for t in rng.integers(0, 2000, size=k)]
        good = int(rng.integers(0, k + 1))
        draft[:good] = alone[len(out) : len(out) + good]
        body = {
            "conversation": "seeded-any-draft",
            "tokens": prompt if first else [],
            "reset": first,
            "drafts": [{"tokens": draft}] if draft else [],
            "sampling": sampling,
            "generation_start": len(prompt),
        }
        reply = verify(local_engine, body)
        out += reply["tokens"]
        first = False
        if reply["eog"]:
            break
    assert out[: len(alone)] == alone


def test_a_reply_continued_from_its_middle_goes_on_the_same(local_engine: EngineProcess) -> None:
    """`generated_tokens`: the prompt's tail is the reply so far (penalties count it; the seed keys
    the next position), as the proxy sends when the target decodes alone for a while."""
    prompt = tokenize(local_engine, PROMPT)
    whole = complete(local_engine, prompt, max_tokens=40, seed=3, logprobs=1, ignore_eos=True, **SAMPLED)
    head = whole["tokens"][:15]
    tail = complete(
        local_engine,
        prompt + head,
        max_tokens=25,
        seed=3,
        logprobs=1,
        ignore_eos=True,
        generated_tokens=15,
        **SAMPLED,
    )
    assert tail["tokens"] == whole["tokens"][15:]
    ours = whole["token_logprobs"][15:]
    assert [e["token"] for e in tail["token_logprobs"]] == [e["token"] for e in ours]
    assert np.allclose(
        [e["logprob"] for e in tail["token_logprobs"]], [e["logprob"] for e in ours], atol=1e-3
    )


def test_verify_logprobs_are_the_engines_own(local_engine: EngineProcess) -> None:
    prompt = tokenize(local_engine, PROMPT)
    alone = complete(local_engine, prompt, max_tokens=8, temperature=0, logprobs=2)
    tokens = alone["tokens"]
    body = {
        "conversation": "verify-logprobs",
        "tokens": prompt,
        "reset": True,
        "drafts": [{"tokens": tokens[:5]}],
        "logprobs": 2,
    }
    reply = verify(local_engine, body)
    assert reply["tokens"] == tokens[:6] and len(reply["logprobs"]) == 6
    for entry, token, expected in zip(reply["logprobs"], tokens, alone["token_logprobs"], strict=False):
        assert entry["token"] == token == expected["token"]
        assert abs(entry["logprob"] - expected["logprob"]) < 1e-3
        assert [t for t, _ in entry["top"]] == [t for t, _ in expected["top"]]


def test_bad_shaping_values_are_400s_naming_the_field(local_engine: EngineProcess) -> None:
    for body, param in [
        ({"logit_bias": {"999999": 5}}, "logit_bias"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"logprobs": 21}, "logprobs"),
    ]:
        response = local_engine.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2, **body})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert param in error["message"]
    response = local_engine.post(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "top_logprobs": 2},
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "top_logprobs"
