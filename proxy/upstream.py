"""The engine, seen from the proxy: its HTTP API and nothing else (no engine imports).

Uses: /v1/models (name, context, vocabulary size), /detokenize (the vocabulary as bytes, fetched
once), /tokenize (text, or a chat rendered with the model's template), the verify API (its contract,
encoded and decoded here, is tightwad.verify_api), /v1/completions with token ids (the target
decoding alone, when speculation is off), /tightwad/v1/stats (how many conversations it keeps), and
plain forwarding of whatever speculation cannot serve. Every failure becomes an OpenAIError: an
engine that cannot be reached is a 503 that names its URL; one that evicted our conversation is
verify_api.ConversationEvicted; a busy engine's 503 or 429 keeps its status, body and Retry-After,
so the client hears when to come back exactly as the engine said it.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from tightwad.openai import OpenAIError, Unavailable, UpstreamError, from_upstream, parse_retry_after
from tightwad.proxy.detok import Vocabulary
from tightwad.proxy.drafters.base import Proposal
from tightwad.verify_api import (
    STATS_PATH,
    VERIFY_PATH,
    Draft,
    Sampling,
    TokenLogprob,
    VerifyReply,
    VerifyRequest,
    decode_error,
    decode_logprobs,
    decode_pieces,
    decode_reply,
    encode_request,
)

HEALTH_DETAILS_PATH = "/tightwad/v1/health"  # the engine's /health, with details, behind its token
VOCAB_CHUNK = 8192  # token ids per /detokenize call while fetching the vocabulary
BUSY = (429, 503)  # statuses a client retries after the engine's Retry-After


@dataclass(frozen=True)
class EngineInfo:
    model: str
    n_ctx: int
    n_vocab: int
    models_body: dict[str, Any]  # /v1/models as the engine answered it


class EngineUnavailable(Unavailable):
    code = "engine_unavailable"


class EngineClient:
    def __init__(self, url: str, token: str | None = None, client: httpx.AsyncClient | None = None) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = client or httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(600.0, connect=3.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
        )
        self.token = token

    async def close(self) -> None:
        await self.client.aclose()

    # plumbing ---------------------------------------------------------------------------------
    def _unreachable(self, exc: Exception) -> EngineUnavailable:
        return EngineUnavailable(
            f"the engine at {self.url} is unreachable ({type(exc).__name__}: {exc}); "
            "start it, or point the proxy at it with --target"
        )

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            response = await self.client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        return self._json(response, path)

    async def _get(self, path: str) -> Any:
        try:
            response = await self.client.get(path)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        return self._json(response, path)

    def _json(self, response: httpx.Response, path: str) -> Any:
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200:
            raise self._error(response, body, path)
        if body is None:
            raise UpstreamError(f"the engine's {path} answered something that is not JSON")
        return body

    def _error(self, response: httpx.Response, body: Any, path: str) -> OpenAIError:
        error = decode_error(response.status_code, body, f"the engine's {path} failed")
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if retry_after is not None:
            error.retry_after = retry_after
        return error

    # the API ----------------------------------------------------------------------------------
    async def info(self) -> EngineInfo:
        body = await self._get("/v1/models")
        try:
            entry = body["data"][0]
            meta = entry.get("meta") or {}
            return EngineInfo(str(entry["id"]), int(meta["n_ctx"]), int(meta["n_vocab"]), body)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise UpstreamError(
                f"{self.url}/v1/models does not describe a Tightwad engine (no meta.n_ctx/n_vocab): "
                "--target must point at `tightwad engine`, not at another server"
            ) from exc

    async def vocabulary(self, n_vocab: int) -> Vocabulary:
        """Every token's bytes (plain, and spelled out for special tokens), in a few calls."""
        plain: list[bytes] = []
        special: dict[int, bytes] = {}
        for start in range(0, n_vocab, VOCAB_CHUNK):
            ids = list(range(start, min(start + VOCAB_CHUNK, n_vocab)))
            plain += decode_pieces((await self._post("/detokenize", {"tokens": ids}))["pieces"])
            spelled = decode_pieces(
                (await self._post("/detokenize", {"tokens": ids, "special": True}))["pieces"]
            )
            special.update({t: b for t, b in zip(ids, spelled, strict=True) if b != plain[t]})
        return Vocabulary(plain, special)

    async def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        body = {"content": text, "add_special": add_special, "parse_special": parse_special}
        return list((await self._post("/tokenize", body))["tokens"])

    async def chat_tokens(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int] | None:
        """The chat prompt's tokens with the model's own template (`/tokenize` with `messages`, and
        `tools` shown as the chat would show them), or None when the server behind --target is not an
        engine that renders chats (or, given tools, does not say it rendered them)."""
        try:
            body = await self._post(
                "/tokenize", {"messages": messages, **({"tools": tools} if tools else {})}
            )
        except OpenAIError as exc:
            if exc.status in (400, 404, 422):
                return None
            raise
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if tools and body.get("tools") != len(tools):
            return None
        return list(tokens) if isinstance(tokens, list) else None

    async def stats(self) -> dict[str, Any]:
        return dict(await self._get(STATS_PATH))

    async def health(self) -> dict[str, Any]:
        """The engine's health with its details (its rpc workers); an OpenAIError when it is down or
        unhealthy. The details are behind the token at /tightwad/v1/health; an engine without that
        route still tells them at /health."""
        try:
            return dict(await self._get(HEALTH_DETAILS_PATH))
        except OpenAIError as exc:
            if exc.status != 404:
                raise
        return dict(await self._get("/health"))

    async def ping(self) -> float:
        """Seconds for one round trip to the engine (its cheapest route)."""
        start = time.perf_counter()
        try:
            await self.client.get("/ready")
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        return time.perf_counter() - start

    async def verify(
        self,
        conversation: str,
        tokens: Sequence[int],
        drafts: Sequence[Proposal],
        sampling: Sampling,
        reset: bool,
        generation_start: int = 0,
        logprobs: int | None = None,
        grammar: dict[str, Any] | None = None,
    ) -> VerifyReply:
        """One verify call; ConversationEvicted when the engine no longer holds `conversation`.
        `grammar`: the reply's decoding constraint (tightwad.openai.constraint_of)."""
        request = VerifyRequest(
            conversation,
            list(tokens),
            [Draft(d.tokens, d.probs) for d in drafts if d.tokens],  # an empty draft says nothing
            sampling,
            reset,
            generation_start,
            logprobs,
            grammar,
        )
        return decode_reply(await self._post(VERIFY_PATH, encode_request(request)))

    async def generate(
        self,
        prompt: Sequence[int],
        sampling: Sampling,
        max_tokens: int,
        generated: int = 0,
        logprobs: int | None = None,
        grammar: dict[str, Any] | None = None,
        conversation: str | None = None,
    ) -> AsyncIterator[tuple[list[int], str | None, list[TokenLogprob] | None]]:
        """The target decoding alone: yields (token ids, finish_reason or None, their logprobs when
        asked) as they stream. `generated`: the prompt's last tokens that are the reply so far (the
        engine's penalties count them); logprobs come in the engine's `token_logprobs` extension.
        `conversation`: the engine decodes on that conversation's sequence (the engine's
        `conversation` extension), not an anonymous one that would evict another reply's."""
        body: dict[str, Any] = {
            "prompt": list(prompt),
            "max_tokens": max_tokens,
            "stream": True,
            "return_tokens": True,
            **sampling.to_json(),
        }
        if generated:
            body["generated_tokens"] = generated
        if conversation is not None:
            body["conversation"] = conversation
        if logprobs is not None:
            body["logprobs"] = logprobs
        if grammar is not None and "response_format" in grammar:
            # The OpenAI fields the constraint came from: the engine compiles them as verify does.
            body.update(grammar)
        elif grammar is not None:  # a required tool call's: the engine's `grammar` extension
            body["grammar"] = grammar
        try:
            async with self.client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    self._json(response, "/v1/completions")
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise from_upstream(503, chunk, "the engine's stream failed")
                    choice = chunk["choices"][0]
                    tokens = [int(t) for t in choice.get("tokens") or []]
                    entries = decode_logprobs(choice.get("token_logprobs")) if logprobs is not None else None
                    if entries is not None and len(entries) != len(tokens):
                        raise UpstreamError("the engine's stream sent logprobs that do not match its tokens")
                    yield tokens, choice.get("finish_reason"), entries
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc

    async def forward(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[httpx.Response, AsyncIterator[bytes]]:
        """Send a request on unchanged; the response's head, and its body as it arrives."""
        headers = {k: v for k, v in headers.items() if k.lower() in ("content-type", "accept")}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = self.client.build_request(method, path, content=body, headers=headers)
        try:
            response = await self.client.send(request, stream=True)
            if response.status_code in BUSY and "retry-after" in response.headers:
                # Raised, not relayed: the proxy's error handler answers it with its Retry-After.
                await response.aread()
                await response.aclose()
                self._json(response, path)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            finally:
                await response.aclose()

        return response, chunks()
