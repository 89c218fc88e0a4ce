"""Helpers for engine tests: start a real engine process, talk to it over HTTP, draft with a real
small model in-process, and ask llama-server for its greedy continuation."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

import httpx
import numpy as np

from support.procs import Processes
from tightwad.engine import libllama
from tightwad.launch import free_port, wait_for_http

Propose = Callable[[list[int]], list[list[int]]]  # history -> drafts

# Exactness tests run the engine and llama-server in the same, most batch-invariant configuration:
# no flash attention (its CPU kernel rounds Q to F16) and an F32 KV cache. Scoring a position inside
# a block then agrees with scoring it alone to ~1e-5 in the logits (1e-2 with the defaults), so a
# near-tie cannot break differently in a verify block than in one-token decoding. See
# engine/libllama.py Context for the measurements.
INVARIANT_ENGINE = ("--flash-attn", "off", "--cache-type", "f32")
INVARIANT_SERVER = ("-fa", "off", "--cache-type-k", "f32", "--cache-type-v", "f32")


@dataclass
class EngineProcess:
    url: str
    process: Popen[bytes]
    log: Path

    def get(self, path: str, **kwargs) -> httpx.Response:  # type: ignore[no-untyped-def]
        return httpx.get(f"{self.url}{path}", timeout=120, **kwargs)

    def post(self, path: str, body: dict, **kwargs) -> httpx.Response:  # type: ignore[no-untyped-def, type-arg]
        return httpx.post(f"{self.url}{path}", json=body, timeout=120, **kwargs)


def start_engine(
    procs: Processes,
    model: Path,
    rpc: Sequence[str] = (),
    parallel: int = 4,
    ctx: int = 2048,
    extra: Sequence[str] = (),
    name: str = "engine",
) -> EngineProcess:
    """`python -m tightwad.engine.cli` as a real process on loopback, waited for until /ready."""
    port = free_port()
    cmd = [sys.executable, "-m", "tightwad.engine.cli", "--model", str(model), "--port", str(port)]
    cmd += ["--threads", "1", "--parallel", str(parallel), "--ctx", str(ctx), *extra]
    if rpc:
        cmd += ["--rpc", ",".join(rpc)]
    process, log = procs.start(f"{name}-{port}", cmd)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/ready", timeout=180, process=process, log=log)
    return EngineProcess(url, process, log)


def chat_prompt(user: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def tokenize(engine: EngineProcess, text: str) -> list[int]:
    response = engine.post("/tokenize", {"content": text, "add_special": True, "parse_special": True})
    response.raise_for_status()
    return list(response.json()["tokens"])


def engine_greedy(engine: EngineProcess, prompt: list[int], n: int) -> list[int]:
    response = engine.post(
        "/v1/completions",
        {"prompt": prompt, "max_tokens": n, "temperature": 0, "return_tokens": True},
    )
    response.raise_for_status()
    return list(response.json()["choices"][0]["tokens"])


def llama_server_greedy(url: str, prompt: list[int], n: int) -> list[int]:
    """llama-server's greedy tokens (its default temperature is 0.8, so ask for 0 and top-k 1)."""
    response = httpx.post(
        f"{url}/completion",
        json={
            "prompt": prompt,
            "n_predict": n,
            "temperature": 0.0,
            "top_k": 1,
            "cache_prompt": False,
            "return_tokens": True,
        },
        timeout=120,
    )
    response.raise_for_status()
    return list(response.json()["tokens"])


def verify(engine: EngineProcess, body: dict, client: httpx.Client | None = None) -> dict:  # type: ignore[type-arg]
    post = client.post if client is not None else httpx.post
    response = post(f"{engine.url}/tightwad/v1/verify", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return dict(response.json())


def verify_decode(
    engine: EngineProcess,
    conversation: str,
    prompt: list[int],
    n: int,
    propose: Propose,
    eog: Callable[[int], bool],
    client: httpx.Client | None = None,
) -> tuple[list[int], dict[str, int]]:
    """Speculative greedy decoding driven through /tightwad/v1/verify: `propose(history)` gives the
    drafts for each round. Returns the first n tokens and acceptance counts."""
    history = list(prompt)
    out: list[int] = []
    stats = {"rounds": 0, "drafted": 0, "accepted": 0}
    first = True
    while len(out) < n:
        drafts = propose(history)
        body = {
            "conversation": conversation,
            "tokens": prompt if first else [],
            "reset": first,
            "drafts": [{"tokens": d} for d in drafts],
        }
        result = verify(engine, body, client)
        first = False
        assert result["n_past"] == len(history) + result["n_accepted"]
        history += result["tokens"]
        out += result["tokens"]
        stats["rounds"] += 1
        stats["drafted"] += len(drafts[result["draft_index"]]) if drafts else 0
        stats["accepted"] += result["n_accepted"]
        if result["eog"]:
            break
    return out[:n], stats


class LocalDrafter:
    """A real small model in this process proposing greedy drafts, reusing its KV prefix."""

    def __init__(self, path: Path, n_ctx: int = 2048) -> None:
        self.model = libllama.Model(path)
        self.ctx = libllama.Context(self.model, n_ctx=n_ctx)
        self.batch = libllama.Batch(self.ctx.n_batch)
        self.held: list[int] = []  # tokens in the draft KV

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()
        self.model.close()

    def _logits_after(self, history: list[int]) -> np.ndarray:
        """Logits for the token after `history` (evaluates only what the KV lacks)."""
        keep = 0
        while keep < min(len(self.held), len(history) - 1) and self.held[keep] == history[keep]:
            keep += 1
        self.ctx.remove(0, keep, -1)
        index = self.ctx.prefill(self.batch, history[keep:], keep)
        self.held = list(history)
        return self.ctx.logits(index)

    def propose(self, history: list[int], k: int) -> list[int]:
        draft: list[int] = []
        context = list(history)
        while len(draft) < k:
            token = int(np.argmax(self._logits_after(context)))
            draft.append(token)
            context.append(token)
        return draft

    def logits(self, history: list[int]) -> np.ndarray:
        return self._logits_after(list(history))


def strip_eog(tokens: list[int], eog: Callable[[int], bool]) -> list[int]:
    """Cut at the first end-of-generation token (dropping it): servers differ in returning it."""
    for i, t in enumerate(tokens):
        if eog(t):
            return tokens[:i]
    return tokens
