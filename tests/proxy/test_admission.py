"""Many users through the proxy: a speculated request beyond the engine's conversations waits first
come first served for one (conversations.py), bounded by --queue and --queue-timeout, and is refused
with 503 queue_full / queue_timeout and a Retry-After; it never takes a throwaway id that would evict
another conversation at the engine.

First the pure rules and the asyncio wait (no I/O), then real processes: an engine with a small
--parallel, the proxy in front, concurrent streamed clients."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from support.engines import INVARIANT_ENGINE, EngineProcess, engine_greedy, start_engine, tokenize
from support.procs import Processes
from support.proxies import AUTH, ProxyProcess, cli_config, sse, start_proxy
from support.proxy_fakes import FakeDrafter, FakeEngine, job, make_speculator, target_alone

from tightwad import models
from tightwad.errors import TightwadError
from tightwad.openai import OpenAIError
from tightwad.proxy.conversations import MAX_RETRY_AFTER, ConversationPool, Lease, Ticket
from tightwad.proxy.speculate import ClientLeft
from tightwad.toolchain import Toolchain


# the pure rules ---------------------------------------------------------------------------------
def test_waiters_get_conversations_first_come_first_served() -> None:
    pool = ConversationPool(1, prefix="p", queue_limit=2)
    running = pool.join([1, 2], now=0.0)
    assert isinstance(running, Lease)
    first, second = pool.join([5], now=1.0), pool.join([1, 2, 3], now=2.0)
    assert isinstance(first, Ticket) and isinstance(second, Ticket)
    assert pool.acquire([9], now=2.0) is None  # nobody jumps the queue
    granted = pool.release(running, [1, 2, 3, 4], now=10.0)
    # The oldest waiter gets it, though the second shares more of the conversation's history.
    assert granted == [first] and first.lease is not None and second.lease is None
    assert first.lease.conversation == running.conversation and list(pool.waiting) == [second]
    assert pool.release(first.lease, [5, 6], now=11.0) == [second]
    assert second.lease is not None and pool.busy() == 1 and not pool.waiting


def test_a_full_queue_refuses_with_retry_after_from_recent_hold_times() -> None:
    pool = ConversationPool(2, prefix="p", queue_limit=1)
    a, b = pool.join([1], 0.0), pool.join([2], 0.0)
    assert isinstance(a, Lease) and isinstance(b, Lease)
    # Nothing finished yet: the oldest running request's age (7 s) stands for a hold time.
    assert pool.retry_after(0, now=7.0) == 7
    pool.release(a, [1, 1], now=4.0)  # held 4 s
    a = pool.join([1], 4.0)
    assert isinstance(a, Lease) and isinstance(pool.join([3], 5.0), Ticket)
    with pytest.raises(OpenAIError) as refused:
        pool.join([4], 5.0)
    error = refused.value
    assert error.status == 503 and error.code == "queue_full" and error.type == "server_error"
    # One ahead and itself, two at a time, 4 s each: one round of 4 s.
    assert error.retry_after == 4 and error.headers() == {"Retry-After": "4"}
    assert "--queue 1" in str(error) and "retry after 4 s" in str(error)
    assert pool.retry_after(5, now=5.0) == 12  # six to serve, two at a time
    pool.service.extend([10_000.0] * 32)
    assert pool.retry_after(0, now=5.0) == MAX_RETRY_AFTER


def test_a_waiter_past_the_timeout_is_refused_and_leaves_the_queue() -> None:
    pool = ConversationPool(1, prefix="p", queue_timeout=3.0)
    running = pool.join([1], 0.0)
    ticket = pool.join([2], 1.0)
    assert isinstance(running, Lease) and isinstance(ticket, Ticket)
    assert pool.expired(ticket, now=3.9) is None
    late = pool.expired(ticket, now=4.0)
    assert late is not None and late.code == "queue_timeout" and late.status == 503
    assert late.retry_after is not None and late.retry_after >= 1
    assert "--queue-timeout 3" in str(late) and not pool.waiting
    assert pool.release(running, [1], now=5.0) == []  # it left: nobody is handed the id


def test_a_failed_reply_forgets_its_history_and_an_unused_lease_keeps_it() -> None:
    pool = ConversationPool(1, prefix="p")
    lease = pool.join([1, 2, 3], 0.0)
    assert isinstance(lease, Lease)
    pool.release(lease, [1, 2, 3, 4], 1.0)
    unused = pool.join([1, 2, 3, 4, 5], 2.0)
    assert isinstance(unused, Lease) and unused.shared == 4
    pool.release(unused, None, 3.0)  # handed over but never used: the engine still holds it all
    failed = pool.join([1, 2, 3, 4, 5], 4.0)
    assert isinstance(failed, Lease) and failed.shared == 4
    assert list(pool.service) == [1.0]  # an unused lease served nobody
    pool.release(failed, [], 5.0)
    again = pool.join([1, 2, 3], 6.0)
    assert isinstance(again, Lease) and again.shared == 0


def test_the_pool_follows_the_engine_and_hands_new_ids_to_waiters() -> None:
    pool = ConversationPool(1, prefix="p")
    running = pool.join([1], 0.0)
    waiter = pool.join([2], 0.0)
    assert isinstance(running, Lease) and isinstance(waiter, Ticket)
    pool.resize(2, queue_limit=5, queue_timeout=9.0)
    assert pool.queue_limit == 5 and pool.queue_timeout == 9.0
    assert pool.grant(1.0) == [waiter] and waiter.lease is not None
    assert waiter.lease.conversation != running.conversation
    pool.resize(1)  # shrinks: both ids are busy, one goes when it is released
    pool.release(running, [1], 2.0)
    assert len(pool.entries) == 1 and pool.entries[0].conversation == waiter.lease.conversation


# the asyncio wait -------------------------------------------------------------------------------
def test_a_waiting_request_gets_the_released_conversation() -> None:
    spec = make_speculator(FakeEngine(), FakeDrafter())
    spec.resize(1, 4, 5.0)

    async def go() -> None:
        held = await spec.admit([1, 2])
        waiter = asyncio.create_task(spec.admit([3]))
        await asyncio.sleep(0.05)
        assert not waiter.done() and spec.telemetry.queue["waiting"] == 1
        spec.release(held, [1, 2, 7])
        lease = await asyncio.wait_for(waiter, 1.0)
        assert lease.conversation == held.conversation
        admission = spec.telemetry.snapshot()["admission"]
        assert admission["waiting"] == 0 and admission["busy"] == 1 and admission["waited"] == 1

    asyncio.run(go())


def test_a_waiting_request_times_out_or_leaves_with_its_client() -> None:
    spec = make_speculator(FakeEngine(), FakeDrafter())
    spec.resize(1, 4, 0.3)
    gone = False

    async def client_gone() -> bool:
        return gone

    async def go() -> None:
        nonlocal gone
        held = await spec.admit([1])
        started = time.monotonic()
        with pytest.raises(OpenAIError) as late:
            await spec.admit([2])
        assert late.value.code == "queue_timeout" and 0.3 <= time.monotonic() - started < 1.0
        spec.resize(1, 4, 30.0)
        waiter = asyncio.create_task(spec.admit([3], client_gone))
        await asyncio.sleep(0.05)
        gone = True
        with pytest.raises(ClientLeft):
            await asyncio.wait_for(waiter, 2.0)
        assert not spec.conversations.waiting
        spec.release(held, [1])
        assert spec.conversations.busy() == 0  # nobody was handed the id

    asyncio.run(go())
    admission = spec.telemetry.snapshot()["admission"]
    assert admission["refused"] == {"queue_timeout": 1} and admission["left_while_waiting"] == 1


def test_a_waiter_cancelled_as_it_is_handed_an_id_passes_it_on() -> None:
    spec = make_speculator(FakeEngine(), FakeDrafter())
    spec.resize(1, 4, 5.0)

    async def go() -> None:
        held = await spec.admit([1])
        first = asyncio.create_task(spec.admit([2]))
        second = asyncio.create_task(spec.admit([3]))
        await asyncio.sleep(0.02)
        spec.release(held, [1])  # hands the id to `first` ...
        first.cancel()  # ... whose client is cancelled before it runs again
        lease = await asyncio.wait_for(second, 1.0)
        assert lease.conversation == held.conversation and first.cancelled()

    asyncio.run(go())


def test_replies_beyond_the_conversations_queue_and_decode_alone_on_their_own() -> None:
    """Three replies on two conversations with the drafter down (the target decodes alone): each is
    the target's, the third waited, and every stretch of plain decoding ran on the reply's own
    conversation (never an anonymous sequence, which would be another reply's), streamed rather than
    one verify call per token, so no conversation was ever evicted."""
    engine = FakeEngine()
    spec = make_speculator(engine, FakeDrafter(behaviour="down"))
    prompts = [[5, 9, 13], [7, 7], [11, 3, 2, 1]]

    async def reply(prompt: list[int]) -> list[int]:
        out: list[int] = []
        async for step in spec.run(job(24, prompt)):
            out += step.tokens
        return out

    async def go() -> list[list[int]]:
        return list(await asyncio.gather(*(reply(p) for p in prompts)))

    assert asyncio.run(go()) == [target_alone(p, 24) for p in prompts]
    admission = spec.telemetry.snapshot()["admission"]
    assert admission["waited"] == 1 and admission["conversation_evicted"] == 0
    assert admission["busy"] == 0 and admission["conversations"] == 2
    # Each reply's plain decoding stayed on one named conversation; the two that ran together
    # had different ones.
    on = {p[0]: {c for c, history in engine.generate_calls if history[: len(p)] == p} for p in prompts}
    assert all(len(conversations) == 1 and None not in conversations for conversations in on.values())
    assert on[prompts[0][0]] != on[prompts[1][0]]
    # Streamed, not a verify per token: at most each reply's first round (before the drafter
    # failed) was a verify call.
    assert engine.verify_calls <= len(prompts) and engine.generated == 3 * 24 - engine.verify_calls


def test_queue_flags() -> None:
    config = cli_config(
        "--target", "http://e", "--draft-kind", "ngram", "--queue", "3", "--queue-timeout", "2"
    )
    assert config.queue_limit == 3 and config.queue_timeout == 2.0
    auto = cli_config("--target", "http://e", "--draft-kind", "ngram", "--queue", "auto")
    assert auto.queue_limit is None and auto.queue_timeout is None
    for bad, field in ((("--queue", "many"), "--queue"), (("--queue-timeout", "0"), "--queue-timeout")):
        with pytest.raises(TightwadError, match=field):
            cli_config("--target", "http://e", "--draft-kind", "ngram", *bad)


# real processes ---------------------------------------------------------------------------------
# Exact kernels: a verify block scores each position bit for bit as one-token decoding does, so a
# reply equals the target alone's even where greedy meets a float near-tie (stock kernels: measured
# to leave it at token 104 of PROMPTS[0]).
EXACT = ("--exact", "on", *INVARIANT_ENGINE)
# Under concurrent load a conversation's later tokens can sit in KV cells below its earlier ones,
# which moves logits by up to 0.5 (README, Exactness): a near-tie could flip. These replies have no
# greedy choice closer than a whole logit (checked below), so any difference would be ours.
WIDE_MARGIN = ["1, 2, 3, 4, 5,", "a, b, c, d, e,", "100, 200, 300,", "10, 20, 30, 40,"]
MIN_MARGIN = 1.0


def greedy_and_margin(engine: EngineProcess, prompt: str, n: int) -> tuple[list[int], float]:
    """The target alone's greedy tokens, and the least logit gap between its first and second choice."""
    reply = engine.post(
        "/v1/completions",
        {"prompt": prompt, "max_tokens": n, "temperature": 0, "return_tokens": True, "logprobs": 2},
    ).json()["choices"][0]
    tops = [sorted(top.values(), reverse=True) for top in reply["logprobs"]["top_logprobs"]]
    return reply["tokens"], min(t[0] - t[1] for t in tops if len(t) > 1)


PROMPTS = [
    "The history of the city begins",
    "Here is a recipe for bread:",
    "def fibonacci(n):",
    "My favourite season is autumn because",
]


class Client:
    """One streamed completion through the proxy on its own thread: status, token ids, headers."""

    def __init__(self, proxy: ProxyProcess, body: dict[str, Any]) -> None:
        self.status = 0
        self.tokens: list[int] = []
        self.headers: dict[str, str] = {}
        self.error: dict[str, Any] = {}
        self.started = threading.Event()  # the first SSE event came
        self._thread = threading.Thread(target=self._run, args=(proxy, body))
        self._thread.start()

    def _run(self, proxy: ProxyProcess, body: dict[str, Any]) -> None:
        with httpx.stream("POST", f"{proxy.url}/v1/completions", json=body, headers=AUTH, timeout=120) as r:
            self.status, self.headers = r.status_code, dict(r.headers)
            if r.status_code != 200:
                self.error = json.loads(r.read())["error"]
                return
            for data in sse(r):
                self.started.set()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                assert "error" not in event, event
                self.tokens += event["choices"][0].get("tokens") or []

    def join(self) -> Client:
        self._thread.join(120)
        assert not self._thread.is_alive()
        return self


def body(prompt: str, n: int) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True, "return_tokens": True}


def until(check: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def admission(proxy: ProxyProcess) -> dict[str, Any]:
    return dict(proxy.stats()["admission"])


def serving(processes: Processes, parallel: int, *proxy_args: str) -> tuple[EngineProcess, ProxyProcess]:
    """An exact-mode SmolLM2 engine keeping `parallel` conversations, and an n-gram proxy on it."""
    engine = start_engine(
        processes, models.resolve("smollm2-135m-q4_1"), parallel=parallel, ctx=4096, extra=EXACT
    )
    return engine, start_proxy(processes, engine.url, "--draft-kind", "ngram", *proxy_args)


@pytest.fixture(scope="module")
def single(toolchain: Toolchain, module_processes: Processes) -> tuple[EngineProcess, ProxyProcess]:
    """An engine with one conversation sequence; a proxy that lets one request wait for it."""
    return serving(module_processes, 1, "--queue", "1")


def test_one_runs_one_waits_one_is_refused(single: tuple[EngineProcess, ProxyProcess]) -> None:
    engine, proxy = single
    long_n, short_n = 256, 24
    expected_long = engine_greedy(engine, tokenize(engine, PROMPTS[0]), long_n)
    expected = engine_greedy(engine, tokenize(engine, PROMPTS[1]), short_n)
    assert len(expected_long) == long_n  # it runs long enough for the others to arrive
    assert admission(proxy)["conversations"] == 1 and admission(proxy)["queue_limit"] == 1

    running = Client(proxy, body(PROMPTS[0], long_n))
    assert running.started.wait(60)
    waiting = Client(proxy, body(PROMPTS[1], short_n))
    until(lambda: admission(proxy)["waiting"] == 1, "the second request waits")
    refused = Client(proxy, body(PROMPTS[2], short_n)).join()
    assert refused.status == 503 and "event-stream" not in refused.headers.get("content-type", "")
    assert refused.error["code"] == "queue_full" and refused.error["type"] == "server_error"
    assert int(refused.headers["retry-after"]) >= 1
    assert not waiting.started.is_set() and running._thread.is_alive()

    assert running.join().status == 200 and running.tokens == expected_long
    assert waiting.join().status == 200 and waiting.tokens == expected  # the target's greedy tokens
    stats = admission(proxy)
    assert stats["refused"] == {"queue_full": 1} and stats["waited"] >= 1 and stats["waiting"] == 0
    metrics = proxy.get("/metrics").text
    assert 'tightwad_proxy_refused_total{code="queue_full"} 1.0' in metrics
    assert "tightwad_proxy_waiting_requests 0.0" in metrics


def test_a_client_that_leaves_while_waiting_leaves_the_queue(
    single: tuple[EngineProcess, ProxyProcess],
) -> None:
    _, proxy = single
    left = admission(proxy)["left_while_waiting"]
    running = Client(proxy, body(PROMPTS[0], 256))
    assert running.started.wait(60)
    # A raw socket: the request is sent, and closed while it still waits (no byte answered yet).
    payload = json.dumps(body(PROMPTS[3], 8)).encode()
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: {AUTH['Authorization']}\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        conn.sendall(head.encode() + payload)
        until(lambda: admission(proxy)["waiting"] == 1, "the request waits")
        assert running._thread.is_alive()
    until(lambda: admission(proxy)["waiting"] == 0, "the request left the queue", seconds=5)
    assert admission(proxy)["left_while_waiting"] == left + 1
    assert running.join().status == 200


@pytest.fixture(scope="module")
def pair(toolchain: Toolchain, module_processes: Processes) -> tuple[EngineProcess, ProxyProcess]:
    """Two conversation sequences; an n-gram drafter with K at most 4."""
    return serving(module_processes, 2, "--max-draft-tokens", "4")


def test_four_clients_on_two_conversations_never_evict_each_other(
    pair: tuple[EngineProcess, ProxyProcess],
) -> None:
    engine, proxy = pair
    n = 24
    references = [greedy_and_margin(engine, p, n) for p in WIDE_MARGIN]
    assert min(margin for _, margin in references) > MIN_MARGIN, references
    expected = [tokens for tokens, _ in references]
    evictions = engine.get("/tightwad/v1/stats").json()["evictions"]
    clients = [Client(proxy, body(p, n)) for p in WIDE_MARGIN]
    outputs = [c.join() for c in clients]
    assert [c.status for c in outputs] == [200] * 4
    for client, want in zip(outputs, expected, strict=True):
        assert client.tokens == want  # each the target's own greedy reply
    stats = admission(proxy)
    assert stats["conversation_evicted"] == 0  # no reply lost its KV to another
    assert stats["conversations"] == 2 and stats["waited"] >= 1 and stats["refused"] == {}
    # Nor at the engine: a reply's plain decoding (the target alone) stays on its own conversation.
    assert engine.get("/tightwad/v1/stats").json()["evictions"] == evictions


def test_with_the_drafter_down_plain_decoding_stays_on_each_replys_conversation(
    toolchain: Toolchain, processes: Processes
) -> None:
    """Four clients on two conversations, the drafter unreachable: the target decodes alone for
    every reply, streamed by the engine on the reply's own conversation, so no conversation is
    evicted at the engine and each reply is the target's own."""
    engine = start_engine(processes, models.resolve("smollm2-135m-q4_1"), parallel=2, ctx=4096, extra=EXACT)
    with socket.socket() as unused:  # a port nothing listens on: every draft call fails
        unused.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{unused.getsockname()[1]}"
    proxy = start_proxy(processes, engine.url, draft=dead)
    n = 24
    expected = [greedy_and_margin(engine, p, n)[0] for p in WIDE_MARGIN]
    evictions = engine.get("/tightwad/v1/stats").json()["evictions"]
    outputs = [c.join() for c in [Client(proxy, body(p, n)) for p in WIDE_MARGIN]]
    assert [c.status for c in outputs] == [200] * 4
    assert [c.tokens for c in outputs] == expected
    stats = proxy.stats()
    assert stats["admission"]["conversation_evicted"] == 0 and stats["admission"]["waited"] >= 1
    assert stats["generated_tokens"].get("engine", 0) > 0  # the target did decode alone
    assert engine.get("/tightwad/v1/stats").json()["evictions"] == evictions
