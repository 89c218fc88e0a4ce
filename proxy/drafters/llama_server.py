"""A llama-server drafter: token ids in, token ids out, its KV cache reused between rounds.

`/completion` takes the history as token ids with `cache_prompt`, so each round evaluates only the
tokens that are new to it. Greedy requests draft greedily (temperature 0, top-k 1). Sampled requests
draft by sampling with the request's temperature and top-p (top-k capped at SAMPLED_TOP_K) and ask
for `post_sampling_probs`: the exact distribution each token was drawn from, which the engine's
rejection rule uses. The drafter must share the target's vocabulary (same tokenizer).

A request under a JSON constraint (`response_format`, a required call in the Llama 3 format, which
is a bare JSON object, or the JSON inside a Hermes `<tool_call>` block) drafts under it too:
llama-server takes a `json_schema`, and its `generation_prompt` feeds the text generated so far (of
that JSON value) to the grammar, so each round's draft starts from the grammar state the target is
in. Elsewhere (a Hermes reply's tags, Mistral calls) it drafts unconstrained. Either way the engine
masks the target's distribution itself: a draft that breaks the grammar is only rejected.
"""

from __future__ import annotations

from typing import Any

import httpx

from tightwad import tools
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
            **grammar_fields(request),
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
        body = self.body(request)
        response = await self._post(body)
        if response.status_code in (400, 500) and "json_schema" in body:
            # Its grammar refused the text so far (its schema converter is not the engine's, or
            # the build predates generation_prompt): draft unconstrained rather than not at all.
            body.pop("json_schema")
            body.pop("generation_prompt")
            response = await self._post(body)
        if response.status_code == 401:
            raise DrafterError(
                f"llama-server drafter at {self.url} answered HTTP 401: it wants the cluster's token "
                "(spec.auth.token / TIGHTWAD_TOKEN), or give the drafter's key with --draft-api-key"
            )
        if response.status_code != 200:
            raise DrafterError(f"llama-server drafter at {self.url} answered HTTP {response.status_code}")
        return parse_completion(response.json(), sampled=not request.sampling.greedy)

    async def _post(self, body: dict[str, Any]) -> httpx.Response:
        try:
            return await self.client.post(f"{self.url}/completion", json=body, headers=self.headers)
        except httpx.HTTPError as exc:
            raise DrafterError(f"llama-server drafter at {self.url}: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        await self.client.aclose()


HERMES_OPEN = "<tool_call>\n"


def json_schema_of(constraint: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON Schema a constraint makes the reply (a Hermes call: each call) follow, or None."""
    if constraint is None:
        return None
    response_format = constraint.get("response_format")
    if isinstance(response_format, dict):
        if response_format.get("type") == "json_object":
            return {}  # llama-server: an empty schema is any object
        spec = response_format.get("json_schema")
        schema = spec.get("schema", {}) if isinstance(spec, dict) else None
        return schema if isinstance(schema, dict) else None
    if constraint.get("family") in ("llama3", "hermes") and "tools" in constraint:
        try:  # the engine has checked them; anything odd here just drafts unconstrained
            calls = tools.required_calls(constraint["tools"], constraint.get("tool_choice"))
        except Exception:
            return None
        return tools.calls_schema(calls)
    return None


def grammar_fields(request: DraftRequest) -> dict[str, Any]:
    """llama-server's fields that put the draft under the request's constraint, in the state the
    text generated so far (`generation_prompt`, fed to the grammar before sampling) leaves it."""
    schema = json_schema_of(request.grammar)
    if schema is None or request.vocabulary is None:
        return {}
    generated = request.history[request.generation_start :]
    try:  # a history that ends inside a character: this round drafts unconstrained
        text = request.vocabulary.join(generated, True).decode("utf-8")
    except UnicodeDecodeError:
        return {}
    if (request.grammar or {}).get("family") == "hermes":
        # Only inside a call's JSON: from the last `<tool_call>\n` while its block is open.
        at = text.rfind(HERMES_OPEN)
        if at < 0 or "</tool_call>" in text[at:]:
            return {}
        text = text[at + len(HERMES_OPEN) :]
    return {"json_schema": schema, "generation_prompt": text}


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
