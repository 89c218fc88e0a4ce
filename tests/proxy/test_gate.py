"""The quality gate against in-process fake agents and a fake reviewer (httpx.MockTransport): agents
that are sometimes wrong on purpose, on questions with known answers; the reviewer approves right
answers, corrects fixable ones and rejects the rest (then writes the answer itself). Counts, end
accuracy vs the agents alone, the cache, fail-closed, and the route's auth and streaming."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from support import ROOT

from tightwad.proxy.app import create_app
from tightwad.proxy.config import GateConfig, GateEndpointConfig, ProxyConfig
from tightwad.proxy.gate import Endpoint, Gate, GateUnavailable, parse_verdict

QUESTIONS = {f"What is {a} + {b}?": str(a + b) for a, b in [(2, 3), (7, 5), (10, 4), (6, 6), (9, 8), (1, 1)]}
TOKEN = "gate-token"


def agent_reply(name: str, question: str) -> str:
    right = QUESTIONS[question]
    if name == "sloppy":  # wrong on every other question: off by one (fixable) or nonsense
        index = list(QUESTIONS).index(question)
        if index % 2 == 1:
            return str(int(right) + 1) if index % 4 == 1 else "bananas"
    return right


def reviewer_reply(messages: list[dict], mode: str) -> str:  # type: ignore[type-arg]
    last = messages[-1]["content"]
    if messages[0]["role"] != "system":  # asked to write the answer itself
        return QUESTIONS[last]
    if mode == "garbage":
        return "I think it is fine."
    question = next(q for q in QUESTIONS if q in last)
    answer = last.rsplit("Answer to review:\n", 1)[1]
    right = QUESTIONS[question]
    if answer == right:
        return '```json\n{"verdict": "approve", "reason": "right"}\n```'
    if answer.isdigit():
        return json.dumps({"verdict": "correct", "answer": right, "reason": "off by one"})
    return json.dumps({"verdict": "reject", "reason": "not a number"})


class Fleet:
    def __init__(self, reviewer: str = "ok") -> None:
        self.reviewer = reviewer
        self.calls: list[str] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.calls.append(host)
        body = json.loads(request.content)
        if host == "reviewer":
            if self.reviewer == "down":
                raise httpx.ConnectError("connection refused")
            text = reviewer_reply(body["messages"], self.reviewer)
        else:
            text = agent_reply(host, body["messages"][-1]["content"])
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": text}}]})

    def gate(self, fail_closed: bool = True, cache_size: int = 16) -> Gate:
        agents = [Endpoint("careful", "http://careful"), Endpoint("sloppy", "http://sloppy")]
        return Gate(
            agents,
            Endpoint("reviewer", "http://reviewer"),
            fail_closed=fail_closed,
            cache_size=cache_size,
            transport=httpx.MockTransport(self.handler),
        )


def ask(gate: Gate, question: str) -> str:
    return asyncio.run(gate.answer([{"role": "user", "content": question}], {"temperature": 0})).text


def test_verdicts_are_parsed_strictly() -> None:
    assert parse_verdict('{"verdict": "approve"}').verdict == "approve"  # type: ignore[union-attr]
    assert parse_verdict('Sure! {"verdict": "Correct", "answer": "5"} done').answer == "5"  # type: ignore[union-attr]
    assert parse_verdict('{"verdict": "correct"}').verdict == "reject"  # type: ignore[union-attr]
    assert parse_verdict('{"verdict": "maybe"}') is None
    assert parse_verdict("looks good to me") is None


def test_the_gate_approves_corrects_and_rejects_and_ends_more_accurate_than_the_agents() -> None:
    fleet = Fleet()
    gate = fleet.gate()
    agents_alone = sum(
        agent_reply(name, q) == QUESTIONS[q] for q in QUESTIONS for name in ("careful", "sloppy")
    )
    served = []
    for _ in range(2):  # each question once per agent: agents take turns, shifted by one per pass
        for question in QUESTIONS:
            gate.cache.entries.clear()
            served.append(ask(gate, question) == QUESTIONS[question])
        gate._next += 1
    stats = gate.snapshot()
    assert stats["agents"]["careful"]["approve"] == 6 and stats["agents"]["careful"]["pass_rate"] == 1.0
    sloppy = stats["agents"]["sloppy"]
    assert (sloppy["approve"], sloppy["correct"], sloppy["reject"]) == (3, 2, 1) and sloppy[
        "pass_rate"
    ] == 0.5
    assert all(served) and agents_alone == 9  # 12/12 through the gate vs 9/12 from the agents alone
    assert stats["served"] == {"approve": 9, "correct": 2, "reject": 1}


def test_identical_requests_come_from_the_cache() -> None:
    fleet = Fleet()
    gate = fleet.gate()
    question = next(iter(QUESTIONS))
    assert ask(gate, question) == ask(gate, question) == QUESTIONS[question]
    assert len(fleet.calls) == 2 and gate.snapshot()["cache"]["hits"] == 1  # one agent + one review


@pytest.mark.parametrize("reviewer", ["down", "garbage"])
def test_the_gate_fails_closed_when_the_reviewer_cannot_judge(reviewer: str) -> None:
    gate = Fleet(reviewer).gate()
    with pytest.raises(GateUnavailable, match="fails closed"):
        ask(gate, next(iter(QUESTIONS)))
    open_gate = Fleet(reviewer).gate(fail_closed=False)
    result = asyncio.run(open_gate.answer([{"role": "user", "content": "What is 2 + 3?"}], {}))
    assert result.verdict == "unreviewed" and result.text == "5"
    assert open_gate.cache.entries == {}  # unreviewed answers are never cached


def test_the_route_needs_the_token_streams_and_reports_pass_rates() -> None:
    gate_config = GateConfig(
        [GateEndpointConfig("careful", "http://careful")], GateEndpointConfig("r", "http://r")
    )
    config = ProxyConfig("http://engine", mode="passthrough", token=TOKEN, gate=gate_config).check()
    app = create_app(config)
    app.state.proxy.gate = Fleet().gate()
    body = {"messages": [{"role": "user", "content": "What is 7 + 5?"}], "stream": True}
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async def go() -> tuple[httpx.Response, str, dict, httpx.Response]:  # type: ignore[type-arg]
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            refused = await client.post("/tightwad/v1/gate/chat/completions", json=body)
            text = ""
            async with client.stream(
                "POST", "/tightwad/v1/gate/chat/completions", json=body, headers=auth
            ) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data:") and "[DONE]" not in line:
                        event = json.loads(line.removeprefix("data:"))
                        text += event["choices"][0]["delta"].get("content", "")
            stats = (await client.get("/tightwad/v1/stats", headers=auth)).json()
            plain = await client.post(
                "/tightwad/v1/gate/chat/completions", json={**body, "stream": False}, headers=auth
            )
        return refused, text, stats, plain

    refused, text, stats, plain = asyncio.run(go())
    assert refused.status_code == 401
    assert text == "12"
    assert stats["gate"]["agents"]["careful"]["approve"] == 1
    assert (
        plain.json()["tightwad_gate"]["cached"] is True
        and plain.headers["x-tightwad-gate-verdict"] == "approve"
    )


def test_the_manifest_gate_section_and_race_mode_reach_the_proxy_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tightwad.manifest import load_manifest
    from tightwad.proxy.config import from_manifest

    monkeypatch.setenv("TIGHTWAD_TOKEN", "t0ken")
    config = from_manifest(load_manifest(ROOT / "examples" / "homelab.yaml"))
    assert config.mode == "race" and len(config.drafters) >= 2
    assert config.gate is not None and [a.name for a in config.gate.agents] == ["xeon-qwen", "laptop-llama"]
    assert config.gate.reviewer.url == config.target_url and config.gate.fail_closed is True


def test_agent_urls_work_with_or_without_v1() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        content = '{"verdict": "approve"}' if request.url.host == "r" else "5"
        return httpx.Response(200, json={"choices": [{"message": {"content": content}}]})

    gate = Gate(
        [Endpoint("a", "http://a:11434/v1/")],
        Endpoint("r", "http://r"),
        transport=httpx.MockTransport(handler),
    )
    assert ask(gate, "What is 2 + 3?") == "5"
    assert seen == ["http://a:11434/v1/chat/completions", "http://r/v1/chat/completions"]
