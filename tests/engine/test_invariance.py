"""Exact mode: a position's logits do not depend on the block it is evaluated in.

The pinned build patches ggml's CPU backend (scripts/llama-exact.patch) so that every
output element is computed in the same order whatever the number of tokens in the batch, when
GGML_CPU_EXACT=1 (`tightwad engine --exact on`, `spec.target.exact: strict`; Tightwad's default is
stock kernels, GGML_CPU_EXACT=0). Here, in exact mode, said explicitly to every process, on real
quantized models with otherwise default settings (flash attention auto, F16 KV cache):

- the logits of 17 positions after a 300-token prompt, evaluated one token per decode and inside
  blocks of 2..17 tokens (as verify does), agree bit for bit: in this process and over a real rpc
  worker; with stock kernels (GGML_CPU_EXACT=0, the default) the same measurement differs, so it
  can fail;
- speculative greedy decoding through the engine's verify API gives token for token the engine's
  own target-alone greedy output and llama-server's, on Gemma 3 270M Q4_K_M and (when fetched, they
  are opt-in) the Qwen2.5-Coder 1.5B/0.5B Q4_K_M pair, on prompts whose greedy path passes near-ties
  (two top logits closer than the stock kernels' block-vs-single difference).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.engines import (
    EngineProcess,
    LocalDrafter,
    engine_greedy,
    llama_server_greedy,
    start_engine,
    strip_eog,
    verify_decode,
)
from support.procs import Processes, start_rpc_workers

from tightwad import models
from tightwad.engine import invariance, libllama
from tightwad.errors import TightwadError
from tightwad.launch import free_port, llama_server_command, wait_for_http
from tightwad.toolchain import Toolchain

pytestmark = pytest.mark.integration

BLOCKS = [2, 5, 9, 17]  # the stock kernels change at 2 (sgemm, FA), 4 (repacked GEMM), 8 (tiled K-quants)
POSITIONS = 17
TEXT = "The lighthouse keeper climbed the spiral stairs at dusk to light the lamp for the ships. "


def prompt_tokens(model: libllama.Model, n: int = 300) -> list[int]:
    # Over 256 tokens: the KV cache view reaches 512 cells, where stock flash attention splits a
    # one-token decode across threads and chunks.
    return model.tokenize(TEXT * 30)[:n]


def measure(model: libllama.Model) -> invariance.Measurement:
    ctx = libllama.Context(model, n_ctx=1024)
    try:
        return invariance.measure(ctx, prompt_tokens(model), POSITIONS, BLOCKS)
    finally:
        ctx.close()


def explain(m: invariance.Measurement) -> str:
    return "; ".join(
        f"block {b.block}: {b.differing}/{b.positions} rows differ (max |diff| {b.max_abs_diff:.3g})"
        for b in m.blocks
    )


@pytest.fixture(scope="module")
def gemma(toolchain: Toolchain) -> Iterator[libllama.Model]:
    if not toolchain.exact:
        pytest.fail(f"the build at {toolchain.prefix} lacks the exact-mode patch; run `make toolchain`")
    model = libllama.Model(models.resolve("gemma3-270m-q4_k_m"))
    yield model
    model.close()


@pytest.fixture
def exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact mode for this process's contexts and the processes it starts (they inherit it)."""
    monkeypatch.setenv("GGML_CPU_EXACT", "1")


@pytest.mark.usefixtures("exact")
def test_block_and_single_token_logits_are_bit_identical(gemma: libllama.Model) -> None:
    m = measure(gemma)
    assert m.invariant, explain(m)


def test_stock_kernels_differ_so_the_check_can_fail(
    gemma: libllama.Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ggml reads GGML_CPU_EXACT when a context creates its CPU backend.
    monkeypatch.setenv("GGML_CPU_EXACT", "0")
    m = measure(gemma)
    assert not m.invariant, "stock kernels should make some block differ from one-token decoding"


@pytest.mark.usefixtures("exact")
def test_bit_identical_over_an_rpc_worker(toolchain: Toolchain, processes: Processes) -> None:
    assert os.environ["GGML_CPU_EXACT"] == "1"  # this process's and the worker's own kernels
    endpoints = start_rpc_workers(processes, toolchain, 1)
    model = libllama.Model(models.resolve("gemma3-270m-q4_k_m"), libllama.rpc_devices(endpoints))
    try:
        m = measure(model)
    finally:
        model.close()
    assert m.invariant, explain(m)


# Golden: speculation through the verify API against target-alone decoding -----------------------

N_TOKENS = 40
K = 4
# Prompts whose greedy continuation passes near-ties: with stock kernels (GGML_CPU_EXACT=0), scoring
# their first 32-40 positions inside blocks of 5 or 9 flips the greedy token at 1-2 positions on
# Gemma 3 270M Q4_K_M and on Qwen2.5-Coder 1.5B Q4_K_M (measured with engine/invariance.py).
GOLDEN_PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "List three ways to solve problems in a team.",
    "Write a Python function that checks whether a number is prime.",
]


def chat(model: libllama.Model, user: str) -> list[int]:
    text = libllama.builtin_chat_template(
        "gemma" if "gemma" in model.path.name else "chatml", [("user", user)], True
    )
    assert text is not None
    return model.tokenize(text)


def golden_check(
    target: Path, draft: Path, prompts: list[str], toolchain: Toolchain, processes: Processes
) -> None:
    """Exact mode, otherwise default engine and llama-server settings; drafts from the small model
    in this process (only proposals: their kernels do not matter)."""
    engine: EngineProcess = start_engine(
        processes, target, parallel=2, ctx=2048, extra=["--exact", "on"], name="exact-engine"
    )
    port = free_port()
    server, log = processes.start(
        "llama-server-exact",
        llama_server_command(toolchain, target, port, ctx_size=2048, threads=1),
        env={"GGML_CPU_EXACT": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", process=server, log=log)
    drafter = LocalDrafter(draft)
    try:
        eog = drafter.model.is_end_of_generation
        for i, user in enumerate(prompts):
            tokens = chat(drafter.model, user)
            alone = strip_eog(engine_greedy(engine, tokens, N_TOKENS), eog)
            theirs = strip_eog(llama_server_greedy(url, tokens, N_TOKENS), eog)
            spec, stats = verify_decode(
                engine, f"exact-{i}", tokens, N_TOKENS, lambda h: [drafter.propose(h, K)], eog
            )
            assert len(alone) >= 8, "the model should say something"
            assert strip_eog(spec, eog) == alone == theirs, user
            assert stats["rounds"] < len(alone), f"drafts should be accepted: {stats}"
    finally:
        drafter.close()


def test_speculative_greedy_equals_target_alone_on_gemma_q4_k_m(
    toolchain: Toolchain, processes: Processes
) -> None:
    path = models.resolve("gemma3-270m-q4_k_m")
    golden_check(path, path, GOLDEN_PROMPTS, toolchain, processes)


def _qwen_or_skip(name: str) -> Path:
    try:
        return models.resolve(name)
    except TightwadError:
        pytest.skip(f"{name} is not fetched (opt-in): `tightwad models fetch {name}`")


def test_speculative_greedy_equals_target_alone_on_the_qwen_pair(
    toolchain: Toolchain, processes: Processes
) -> None:
    target = _qwen_or_skip("qwen2.5-coder-1.5b-q4_k_m")
    draft = _qwen_or_skip("qwen2.5-coder-0.5b-q4_k_m")
    golden_check(target, draft, GOLDEN_PROMPTS[:2], toolchain, processes)
