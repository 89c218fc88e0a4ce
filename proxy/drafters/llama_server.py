"""A llama-server drafter: token ids in, token ids out, its KV cache reused between rounds.

`/completion` takes the history as token ids with `cache_prompt`, so each round evaluates only the
tokens that are new to it. Greedy requests draft greedily (temperature 0, top-k 1). Sampled requests
draft by sampling with the request's temperature and top-p (top-k capped at SAMPLED_TOP_K) and ask
for `post_sampling_probs`: the exact distribution each token was drawn from, which the engine's
rejection rule uses. The drafter must share the target's vocabulary (same tokenizer).
"""

from __future__ import annotations

from typing import Any

import httpx

from tightwad.proxy.drafters.base import DrafterError, DraftRequest, Proposal

SAMPLED_TOP_K = 32  # the drafter's top-k when sampling: every surviving token's probability comes back


class LlamaServerDrafter:
    kind = "llama-server"

    def __init__(
        self,
        url: str,
        name: str = "llama-server",
        client: httpx.AsyncClient | None = None,
        api_key: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.name = name
        self.client = client or httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=2.0))
        # llama-server started with --api-key (LLAMA_API_KEY) answers 401 to anything else.
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def body(self, request: DraftRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": list(request.history),
            "n_predict": request.k,
            "cache_prompt": True,
            "return_tokens": True,
            "stream": False,
        }
        s = request.sampling
        if s.greedy:
            return {**body, "temperature": 0.0, "top_k": 1}
        top_k = min(s.top_k, SAMPLED_TOP_K) if s.top_k > 0 else SAMPLED_TOP_K
        return {
            **body,
            "temperature": s.temperature,
            "top_k": top_k,
            "top_p": s.top_p,
            "min_p": 0.0,
            "typical_p": 1.0,
            "n_probs": top_k,
            "post_sampling_probs": True,
        }

    async def propose(self, request: DraftRequest) -> Proposal:
        try:
            response = await self.client.post(
                f"{self.url}/completion", json=self.body(request), headers=self.headers
            )
        except httpx.HTTPError as exc:
            raise DrafterError(f"llama-server drafter at {self.url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 401:
            raise DrafterError(
                f"llama-server drafter at {self.url} answered HTTP 401: it wants the cluster's token "
                "(spec.auth.token / TIGHTWAD_TOKEN), or give the drafter's key with --draft-api-key"
            )
        if response.status_code != 200:
            raise DrafterError(f"llama-server drafter at {self.url} answered HTTP {response.status_code}")
        return parse_completion(response.json(), sampled=not request.sampling.greedy)

    async def close(self) -> None:
        await self.client.aclose()


def parse_completion(body: Any, sampled: bool) -> Proposal:
    """llama-server's /completion answer -> a proposal (probabilities only for sampled drafts)."""
    if not isinstance(body, dict) or not isinstance(body.get("tokens"), list):
        raise DrafterError(
            "llama-server's answer has no `tokens` (is it started with return_tokens support?)"
        )
    tokens = tuple(body["tokens"])
    if not sampled:
        return Proposal(tokens)
    rows = body.get("completion_probabilities")
    if not isinstance(rows, list) or len(rows) != len(tokens):
        return Proposal(tokens)  # no usable probabilities: the engine's point-mass rule is still exact
    probs = []
    for token, row in zip(tokens, rows, strict=True):
        top = row.get("top_probs") if isinstance(row, dict) else None
        if not isinstance(top, list):
            return Proposal(tokens)
        ids = [int(p["id"]) for p in top]
        p = [float(p["prob"]) for p in top]
        if token not in ids:  # sampled outside the listed top: add it with its own probability
            ids.append(int(token))
            p.append(float(row.get("prob") or 0.0))
        probs.append({"ids": ids, "p": p})
    return Proposal(tokens, tuple(probs))
