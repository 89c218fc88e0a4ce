"""The quality gate: a fleet of cheap agents writes whole answers; one strong reviewer judges each.

For a chat request the gate asks one agent (round robin over those not backing off) for a whole
answer, then asks the reviewer (the cluster's engine, or any OpenAI-compatible server) for a
structured verdict on it, a JSON object:

    {"verdict": "approve" | "correct" | "reject", "answer": "<the corrected answer>", "reason": "..."}

- approve: the agent's answer is served;
- correct: the reviewer's corrected `answer` is served;
- reject (or an agent that failed): the reviewer writes the answer itself (the original request).

Fail-closed by default: when the reviewer cannot be reached or gives no readable verdict, the
request fails (503) and no unreviewed answer is served; with `fail_closed=False` the agent's answer
is served, marked `"verdict": "unreviewed"`. Identical requests are answered from a cache of
reviewed answers. Per-agent approve/correct/reject counts and pass rates are in `snapshot()`.
The routes (same auth, body limit and max_tokens limit as the proxy) live in app.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from tightwad.openai import OpenAIError, Unavailable

VERDICTS = ("approve", "correct", "reject")
VERDICT_SCHEMA = {
    "type": "object",
    "properties": {
        "verdict": {"type": "string", "enum": list(VERDICTS)},
        "answer": {"type": "string"},
        "reason": {"type": "string"},
    },
    "required": ["verdict", "reason"],
}
REVIEW_INSTRUCTIONS = (
    "You review an answer written by another assistant. Reply with ONE JSON object and nothing else: "
    '{"verdict": "approve" | "correct" | "reject", "answer": "<your corrected answer, only for correct>", '
    '"reason": "<one short sentence>"}. approve: the answer is right and complete. correct: it is '
    "fixable; give the full corrected answer. reject: it is wrong or off-topic."
)


class GateUnavailable(Unavailable):
    code = "gate_reviewer_unavailable"


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server: an agent, or the reviewer."""

    name: str
    url: str
    model: str | None = None
    api_key: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict, hash=False)  # fields every call gets


@dataclass(frozen=True)
class ReviewVerdict:
    """The reviewer's judgement of one agent's answer (not the engine's verify verdict)."""

    verdict: str  # approve | correct | reject
    answer: str | None = None  # the corrected answer (correct)
    reason: str = ""


@dataclass(frozen=True)
class GateAnswer:
    text: str
    verdict: str  # approve | correct | reject | unreviewed
    agent: str | None  # the agent whose answer was judged (None: none answered)
    cached: bool = False
    reason: str = ""


@dataclass
class AgentRecord:
    verdicts: Counter[str] = field(default_factory=Counter)  # approve / correct / reject / failed

    def to_json(self) -> dict[str, Any]:
        judged = sum(self.verdicts[v] for v in VERDICTS)
        return {
            **{v: self.verdicts[v] for v in (*VERDICTS, "failed", "unreviewed")},
            "pass_rate": round(self.verdicts["approve"] / judged, 4) if judged else None,
        }


def parse_verdict(text: str) -> ReviewVerdict | None:
    """The reviewer's verdict from its reply: the first JSON object in it (a code fence is fine);
    None when there is no readable verdict (the gate then fails closed)."""
    for match in re.finditer(r"\{", text):
        try:
            body, _ = json.JSONDecoder().raw_decode(text[match.start() :])
        except ValueError:
            continue
        if not isinstance(body, dict):
            continue
        verdict = str(body.get("verdict", "")).strip().lower()
        if verdict not in VERDICTS:
            return None
        answer = body.get("answer")
        answer = answer if isinstance(answer, str) and answer.strip() else None
        if verdict == "correct" and answer is None:
            return ReviewVerdict("reject", None, "a correction without an answer")  # the reviewer rewrites
        return ReviewVerdict(verdict, answer, str(body.get("reason", "")))
    return None


def _content(name: str, response: httpx.Response) -> str:
    """The text of a chat completion, or ValueError naming what is missing: an answer of another
    shape (`"choices": []`, no message) is a failed call, never a crash of the request."""
    body = response.json()
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices:
        raise ValueError(f"{name} answered no choices")
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise ValueError(f"{name} answered no text in choices[0].message.content")
    return content


def review_messages(messages: Sequence[dict[str, Any]], answer: str) -> list[dict[str, Any]]:
    conversation = "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)
    return [
        {"role": "system", "content": REVIEW_INSTRUCTIONS},
        {"role": "user", "content": f"Conversation:\n{conversation}\n\nAnswer to review:\n{answer}"},
    ]


def cache_key(messages: Sequence[dict[str, Any]], params: dict[str, Any]) -> str:
    raw = json.dumps({"messages": list(messages), "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()


class AnswerCache:
    """Reviewed answers of identical requests, least recently used out first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[str, GateAnswer] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: str) -> GateAnswer | None:
        answer = self.entries.get(key)
        if answer is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return answer

    def put(self, key: str, answer: GateAnswer) -> None:
        if self.size <= 0:
            return
        self.entries[key] = answer
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


class Gate:
    def __init__(
        self,
        agents: Sequence[Endpoint],
        reviewer: Endpoint,
        fail_closed: bool = True,
        cache_size: int = 256,
        timeout: float = 120.0,
        transport: httpx.AsyncBaseTransport | None = None,
        review_params: dict[str, Any] | None = None,
    ) -> None:
        if not agents:
            raise ValueError("the gate needs at least one agent")
        self.agents = list(agents)
        self.reviewer = reviewer
        self.fail_closed = fail_closed
        # Extra fields of every review call, e.g. a `response_format` JSON schema for servers that
        # constrain output to it (llama-server): the verdict is then always readable.
        self.review_params = {"temperature": 0, **(review_params or {})}
        self.cache = AnswerCache(cache_size)
        self.records = {a.name: AgentRecord() for a in self.agents}
        self.requests = 0
        self.served: Counter[str] = Counter()  # final answers by verdict
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=3.0), transport=transport)
        self._next = 0
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        await self.client.aclose()

    # the flow ---------------------------------------------------------------------------------
    async def answer(self, messages: Sequence[dict[str, Any]], params: dict[str, Any]) -> GateAnswer:
        self.requests += 1
        key = cache_key(messages, params)
        cached = self.cache.get(key)
        if cached is not None:
            self.served["cached"] += 1
            return GateAnswer(cached.text, cached.verdict, cached.agent, True, cached.reason)
        agent = await self._pick()
        draft: str | None
        try:
            draft = await self._chat(agent, messages, params)
        except (httpx.HTTPError, OpenAIError, ValueError, KeyError, TypeError):
            draft = None
        if draft is None:
            self.records[agent.name].verdicts["failed"] += 1
            result = GateAnswer(
                await self._reviewer_writes(messages, params), "reject", agent.name, reason="agent failed"
            )
        else:
            result = await self._judge(agent, messages, params, draft)
        self.served[result.verdict] += 1
        if result.verdict != "unreviewed":
            self.cache.put(key, result)
        return result

    async def _pick(self) -> Endpoint:
        async with self._lock:
            agent = self.agents[self._next % len(self.agents)]
            self._next += 1
            return agent

    async def _judge(
        self, agent: Endpoint, messages: Sequence[dict[str, Any]], params: dict[str, Any], draft: str
    ) -> GateAnswer:
        record = self.records[agent.name]
        try:
            reply = await self._chat(self.reviewer, review_messages(messages, draft), self.review_params)
            verdict = parse_verdict(reply)
        except (httpx.HTTPError, OpenAIError, ValueError, KeyError, TypeError) as exc:
            return self._unreviewed(record, agent, draft, f"the reviewer failed: {type(exc).__name__}: {exc}")
        if verdict is None:
            return self._unreviewed(record, agent, draft, "the reviewer gave no readable verdict")
        record.verdicts[verdict.verdict] += 1
        if verdict.verdict == "approve":
            return GateAnswer(draft, "approve", agent.name, reason=verdict.reason)
        if verdict.verdict == "correct" and verdict.answer is not None:
            return GateAnswer(verdict.answer, "correct", agent.name, reason=verdict.reason)
        return GateAnswer(
            await self._reviewer_writes(messages, params), "reject", agent.name, reason=verdict.reason
        )

    def _unreviewed(self, record: AgentRecord, agent: Endpoint, draft: str, why: str) -> GateAnswer:
        if self.fail_closed:
            raise GateUnavailable(
                f"{why}; the gate fails closed (no unreviewed answers): check the reviewer at "
                f"{self.reviewer.url}, or set gate.failClosed: false"
            )
        record.verdicts["unreviewed"] += 1
        return GateAnswer(draft, "unreviewed", agent.name, reason=why)

    async def _reviewer_writes(self, messages: Sequence[dict[str, Any]], params: dict[str, Any]) -> str:
        try:
            return await self._chat(self.reviewer, messages, params)
        except (httpx.HTTPError, OpenAIError, ValueError, KeyError, TypeError) as exc:
            raise GateUnavailable(
                f"the reviewer at {self.reviewer.url} could not write the answer "
                f"({type(exc).__name__}: {exc})"
            ) from exc

    async def _chat(
        self, endpoint: Endpoint, messages: Sequence[dict[str, Any]], params: dict[str, Any]
    ) -> str:
        body: dict[str, Any] = {**params, **endpoint.overrides, "messages": list(messages), "stream": False}
        if endpoint.model:
            body["model"] = endpoint.model
        headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        base = endpoint.url.rstrip("/").removesuffix("/v1")  # "http://host:11434/v1" or without
        response = await self.client.post(f"{base}/v1/chat/completions", json=body, headers=headers)
        if response.status_code != 200:
            raise OpenAIError(f"{endpoint.name} answered HTTP {response.status_code}", status=502)
        return _content(endpoint.name, response)

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "served": dict(self.served),
            "cache": {"size": len(self.cache.entries), "hits": self.cache.hits, "misses": self.cache.misses},
            "fail_closed": self.fail_closed,
            "reviewer": self.reviewer.name,
            "agents": {name: record.to_json() for name, record in self.records.items()},
        }
