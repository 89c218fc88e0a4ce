"""Drafters that speak text: any OpenAI-compatible server, or Ollama.

They continue the conversation's text (special tokens spelled out) as a raw completion, and the
continuation is re-tokenized with the target's own tokenizer (the engine's /tokenize), so their
model may have any vocabulary. A continuation that tokenizes differently than the target would
have produced it only costs acceptance, never exactness.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from tightwad.proxy.drafters.base import DrafterError, DraftRequest, Proposal

Tokenize = Callable[[str], Awaitable[list[int]]]  # text -> the target's token ids (no BOS)

# Drafter tokens per target token asked for: vocabularies differ, so ask for a little more text.
TEXT_SLACK = 1.25


class _TextDrafter:
    kind = "text"

    def __init__(
        self,
        url: str,
        tokenize: Tokenize,
        model: str | None = None,
        api_key: str | None = None,
        name: str = "text",
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.tokenize = tokenize
        self.model = model
        self.name = name
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = client or httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=2.0), headers=headers)

    async def continuation(self, request: DraftRequest) -> str:
        raise NotImplementedError

    async def propose(self, request: DraftRequest) -> Proposal:
        text = await self.continuation(request)
        if not text:
            return Proposal(())
        tokens = await self.tokenize(text)
        return Proposal(tuple(tokens[: request.k]))

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            response = await self.client.post(f"{self.url}{path}", json=body)
        except httpx.HTTPError as exc:
            raise DrafterError(f"{self.kind} drafter at {self.url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise DrafterError(
                f"{self.kind} drafter at {self.url}{path} answered HTTP {response.status_code}"
            )
        try:
            return response.json()
        except ValueError as exc:
            raise DrafterError(
                f"{self.kind} drafter at {self.url}{path} answered something not JSON"
            ) from exc

    async def close(self) -> None:
        await self.client.aclose()


class OpenAIDrafter(_TextDrafter):
    """POST {url}/v1/completions (the URL may end in /v1 or not)."""

    kind = "openai"

    def __init__(self, url: str, tokenize: Tokenize, **kwargs: Any) -> None:
        url = url.rstrip("/")
        super().__init__(url.removesuffix("/v1"), tokenize, **kwargs)

    async def continuation(self, request: DraftRequest) -> str:
        body: dict[str, Any] = {
            "prompt": request.text,
            "max_tokens": max(1, round(request.k * TEXT_SLACK)),
            "temperature": 0.0,  # text drafts carry no probabilities, so draft greedily
            "stream": False,
        }
        if self.model:
            body["model"] = self.model
        answer = await self._post("/v1/completions", body)
        try:
            text = answer["choices"][0]["text"]
        except (KeyError, IndexError, TypeError) as exc:
            raise DrafterError(f"openai drafter at {self.url}: no choices[0].text in its answer") from exc
        if not isinstance(text, str):
            raise DrafterError(f"openai drafter at {self.url}: choices[0].text is not a string")
        return text


class OllamaDrafter(_TextDrafter):
    """POST {url}/api/generate with `raw: true` (no template: the text is continued as it is)."""

    kind = "ollama"

    async def continuation(self, request: DraftRequest) -> str:
        body: dict[str, Any] = {
            "model": self.model or "",
            "prompt": request.text,
            "raw": True,
            "stream": False,
            "options": {"num_predict": max(1, round(request.k * TEXT_SLACK)), "temperature": 0.0},
        }
        answer = await self._post("/api/generate", body)
        text = answer.get("response") if isinstance(answer, dict) else None
        if not isinstance(text, str):
            raise DrafterError(f"ollama drafter at {self.url}: no `response` text in its answer")
        return text
