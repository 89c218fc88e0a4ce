"""Does a position's logits row depend on the block it is evaluated in?

Speculative greedy output equals the target's own output only if the target scores a position the
same whether it decodes it alone (plain generation) or inside a verify block of K+1 tokens. This
module measures exactly that, through the engine's own libllama bindings: after one shared prefill,
the same token sequence is evaluated one token per decode, then in blocks of B tokens with logits
at every position (as verify does), and the rows are compared bit for bit.

`bench/invariance.py` sweeps models and settings with it; `tests/engine/test_invariance.py` asserts
on it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tightwad.engine import libllama


@dataclass(frozen=True)
class BlockReport:
    """One block size against the one-token reference."""

    block: int
    positions: int
    differing: int  # positions whose logits row differs in any bit
    max_abs_diff: float
    argmax_flips: int  # positions whose greedy token differs
    seconds_per_block: float  # one decode of `block` tokens, including the wait for the backends


@dataclass(frozen=True)
class Measurement:
    positions: int
    seconds_per_token: float  # one-token decode, the plain-generation step
    prefill_seconds: float  # the prompt (all but its last token) in n_batch chunks
    blocks: list[BlockReport]

    @property
    def invariant(self) -> bool:
        return all(b.differing == 0 for b in self.blocks)


def _evaluate(
    ctx: libllama.Context, batch: libllama.Batch, prefix: Sequence[int], tail: Sequence[int], block: int
) -> tuple[np.ndarray, float, int, float]:
    """Logits rows for every tail position, decoding the tail `block` tokens at a time after a
    prefill of `prefix` (always in the same chunks). Returns the rows, and the seconds and count of
    the full-size decodes, and the prefill's seconds."""
    ctx.clear()
    start = time.perf_counter()
    if prefix:
        ctx.prefill(batch, prefix, 0)
        ctx.synchronize()
    prefill_seconds = time.perf_counter() - start
    rows = np.empty((len(tail), ctx.model.n_vocab), dtype=np.float32)
    seconds, decodes = 0.0, 0
    for offset in range(0, len(tail), block):
        chunk = tail[offset : offset + block]
        batch.clear()
        for j, token in enumerate(chunk):
            batch.add(token, len(prefix) + offset + j, (0,), True)
        start = time.perf_counter()
        ctx.decode(batch)
        ctx.synchronize()
        if len(chunk) == block:  # a short last block would skew the per-block time
            seconds += time.perf_counter() - start
            decodes += 1
        for j in range(len(chunk)):
            rows[offset + j] = ctx.logits_view(j)
    return rows, seconds, decodes, prefill_seconds


def greedy_tail(ctx: libllama.Context, prompt: Sequence[int], n_positions: int) -> list[int]:
    """The last prompt token followed by the greedy continuation, one token per decode: the
    sequence every block size is then fed."""
    out = libllama.greedy_generate(ctx, prompt, n_positions - 1, stop_at_eog=False)
    return [prompt[-1], *out]


def measure(
    ctx: libllama.Context, prompt: Sequence[int], n_positions: int, blocks: Sequence[int]
) -> Measurement:
    """Compare every block size in `blocks` against one-token evaluation over `n_positions`
    positions that follow `prompt` (its greedy continuation)."""
    if len(prompt) < 1 or n_positions < 1:
        raise libllama.LlamaError("measure needs a prompt of at least one token and one position")
    if len(prompt) + n_positions > ctx.n_ctx:
        raise libllama.LlamaError(f"prompt + positions exceed the context ({ctx.n_ctx} tokens)")
    tail = greedy_tail(ctx, prompt, n_positions)
    prefix = list(prompt[:-1])
    batch = libllama.Batch(ctx.n_batch)
    try:
        reference, seconds, decodes, prefill_seconds = _evaluate(ctx, batch, prefix, tail, 1)
        ref_argmax = reference.argmax(axis=1)
        reports: list[BlockReport] = []
        for block in blocks:
            rows, block_seconds, block_decodes, _ = _evaluate(ctx, batch, prefix, tail, block)
            # Bitwise: NaN == NaN and -0.0 != +0.0 here, unlike float comparison.
            differ = (rows.view(np.uint32) != reference.view(np.uint32)).any(axis=1)
            reports.append(
                BlockReport(
                    block=block,
                    positions=len(tail),
                    differing=int(differ.sum()),
                    max_abs_diff=float(np.abs(rows - reference).max()),
                    argmax_flips=int((rows.argmax(axis=1) != ref_argmax).sum()),
                    seconds_per_block=block_seconds / max(1, block_decodes),
                )
            )
        return Measurement(
            positions=len(tail),
            seconds_per_token=seconds / decodes,
            prefill_seconds=prefill_seconds,
            blocks=reports,
        )
    finally:
        batch.close()
