"""Sampling exactness on the real models: tokens that come out of verification are distributed as the
target's own samples, even when the drafter's distribution is far from the target's.

Target: SmolLM2 F32 at temperature 1, top-k 8 (8 possible first tokens). Draft: SmolLM2 Q4_1 at
temperature 1, top-k 3, so the draft piles its mass on three of the target's tokens: about half of
the proposals must be rejected and replaced from the residual distribution norm(max(0, p - q)).

Tolerance (see tests/engine/test_verify_rules.py): with k categories and n samples, TV(empirical, p) stays
below 0.5*sqrt(k/n) + sqrt(ln(1e6)/(2n)) except with probability 1e-6: 0.029 for n = 20000, 0.16 for
n = 640, 0.23 for n = 320. The fixture checks that the two classic mistakes land well outside the
end-to-end tolerance on these very distributions (measured: accepting every draft token gives
TV 0.51; resampling a rejection from p instead of the residual gives TV 0.25).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from support.engines import EngineProcess, LocalDrafter, chat_prompt, tokenize
from support.stats import tv, tv_tolerance

from tightwad import models
from tightwad.engine import libllama
from tightwad.engine.verify import accept_sampled, target_distribution
from tightwad.verify_api import Sampling

pytestmark = pytest.mark.integration

PROMPT = chat_prompt("Say a number between 1 and 10.")
TARGET = Sampling(temperature=1.0, top_k=8)
DRAFT = Sampling(temperature=1.0, top_k=3)


@pytest.fixture(scope="module")
def distributions(local_engine: EngineProcess, drafter: LocalDrafter) -> Iterator[tuple]:  # type: ignore[type-arg]
    """(prompt tokens, target p0, draft q0): the target's logits fetched ONCE from the same model
    and build in this process, so the heavy statistics below cost no decoding."""
    tokens = tokenize(local_engine, PROMPT)
    target = libllama.Model(models.resolve("smollm2-135m-f32"))
    ctx = libllama.Context(target, n_ctx=512, flash_attn="off", kv_type="f32")  # as the engine
    batch = libllama.Batch(ctx.n_batch)
    try:
        p0 = target_distribution(ctx.logits(ctx.prefill(batch, tokens, 0)), TARGET)
    finally:
        batch.close()
        ctx.close()
        target.close()
    q0 = target_distribution(drafter.logits(tokens), DRAFT)
    assert np.count_nonzero(p0) == 8
    # The mistakes these tests must catch are far outside the end-to-end tolerance.
    overlap = np.minimum(p0, q0)
    always_accept = 0.5 * np.abs(q0 - p0).sum()
    residual_from_p = 0.5 * np.abs(overlap + (1 - overlap.sum()) * p0 - p0).sum()
    assert min(always_accept, residual_from_p) > 1.4 * tv_tolerance(8, 640)
    yield tokens, p0, q0


def test_the_rejection_rule_on_real_distributions(distributions: tuple) -> None:  # type: ignore[type-arg]
    """20000 verifications of one draft token drawn from q0, on the real rows, in numpy."""
    _, p0, q0 = distributions
    rng = np.random.default_rng(1234)
    n = 20000
    firsts: Counter[int] = Counter()
    accepted = 0
    for x in rng.choice(p0.size, size=n, p=q0):
        verdict = accept_sampled([int(x)], [q0], [p0, p0], rng)
        accepted += verdict.n_accepted
        firsts[int(x) if verdict.n_accepted else verdict.next_token] += 1
    assert tv(firsts, p0) < tv_tolerance(8, n)
    # sum_x min(p, q): the acceptance rate the theory predicts
    assert abs(accepted / n - np.minimum(p0, q0).sum()) < 0.02


async def _collect(url: str, bodies: list[dict], path: str, concurrency: int) -> list[dict]:  # type: ignore[type-arg]
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one(body: dict) -> dict:  # type: ignore[type-arg]
            async with limit:
                response = await client.post(path, json=body)
                assert response.status_code == 200, response.text
                return dict(response.json())

        return await asyncio.gather(*(one(b) for b in bodies))


def test_verify_api_samples_are_distributed_as_the_target(
    local_engine: EngineProcess,
    distributions: tuple,  # type: ignore[type-arg]
) -> None:
    """End to end: 640 verify calls (8 conversations at a time, decoded together), each with one
    draft token drawn from q0 and q0 itself sent (sparsely: its 3 tokens); first returned token ~ p0."""
    tokens, p0, q0 = distributions
    rng = np.random.default_rng(99)
    support = np.flatnonzero(q0)
    n, lanes = 640, 8
    bodies = []
    for i in range(n):
        x = int(rng.choice(p0.size, p=q0))
        bodies.append(
            {
                "conversation": f"sampling-{i % lanes}",
                "tokens": tokens,
                "reset": True,
                "drafts": [{"tokens": [x], "probs": [{"ids": support.tolist(), "p": q0[support].tolist()}]}],
                "sampling": {"temperature": TARGET.temperature, "top_k": TARGET.top_k, "seed": 1000 + i},
            }
        )
    results = asyncio.run(_collect(local_engine.url, bodies, "/tightwad/v1/verify", lanes))
    firsts = Counter(r["tokens"][0] for r in results)
    accepted = sum(r["n_accepted"] for r in results)
    assert tv(firsts, p0) < tv_tolerance(8, n), (firsts, accepted)
    assert set(firsts) <= set(np.flatnonzero(p0).tolist())
    assert 0 < accepted < n  # both paths taken


def test_target_alone_samples_are_distributed_as_the_target(
    local_engine: EngineProcess,
    distributions: tuple,  # type: ignore[type-arg]
) -> None:
    """The engine's own sampling (/v1/completions, one token, fixed seeds) against the same p0."""
    tokens, p0, _ = distributions
    n = 320
    bodies = [
        {
            "prompt": tokens,
            "max_tokens": 1,
            "temperature": TARGET.temperature,
            "top_k": TARGET.top_k,
            "seed": 5000 + i,
            "return_tokens": True,
        }
        for i in range(n)
    ]
    results = asyncio.run(_collect(local_engine.url, bodies, "/v1/completions", 8))
    firsts = Counter(r["choices"][0]["tokens"][0] for r in results)
    assert tv(firsts, p0) < tv_tolerance(8, n), firsts
