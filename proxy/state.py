"""The running proxy that every route shares: its config and stack (stack.py), what it learnt about
the engine, its counters, and its lifecycle.

At start it learns the engine in the background (model, context, vocabulary, whether it renders
chat prompts to tokens, how many conversations it keeps) and warms the speculation loop up on it
(Speculator.warm_up; /ready waits for both), so the first request does not pay for it, and keeps
measuring the round trip to the engine for the cost model. An engine that becomes
unreachable is forgotten and learnt again when it answers: it may come back as another model.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from tightwad.openai import OpenAIError
from tightwad.proxy.config import ProxyConfig
from tightwad.proxy.detok import Vocabulary
from tightwad.proxy.drafters.guard import GuardedDrafter
from tightwad.proxy.drafters.race import RaceDrafter
from tightwad.proxy.gate import Gate
from tightwad.proxy.kpolicy.controller import KController
from tightwad.proxy.speculate import Speculator
from tightwad.proxy.stack import build_gate, build_speculation
from tightwad.proxy.telemetry import Telemetry
from tightwad.proxy.upstream import EngineClient, EngineInfo, EngineUnavailable

RECENT_REQUESTS = 20
APPROXIMATE_HEADER = "X-Tightwad-Approximate"
RTT_EVERY = 15.0  # seconds between round-trip probes of the engine


@dataclass
class EngineProfile:
    """What the proxy learnt about the engine (learnt again when the engine changes)."""

    info: EngineInfo
    vocabulary: Vocabulary
    chat_tokens: bool  # the engine renders chat prompts to token ids (its chat template)
    eog_tokens: set[int]  # end-of-generation ids, learnt from verdicts: never rendered as text


class Proxy:
    """One engine, the speculation stack (None in passthrough) and the gate (None unless configured)."""

    def __init__(self, config: ProxyConfig, engine: EngineClient | None = None) -> None:
        self.config = config
        self.engine = engine or EngineClient(config.target_url, config.target_token)
        self.telemetry = Telemetry()
        self.profile: EngineProfile | None = None
        self._learning = asyncio.Lock()
        self.speculator: Speculator | None = None
        self.controller: KController | None = None
        self.drafter: GuardedDrafter | RaceDrafter | None = None
        stack = build_speculation(config, self.engine, self.telemetry, n_vocab=self._n_vocab)
        if stack is not None:
            self.drafter, self.controller, self.speculator = stack.drafter, stack.controller, stack.speculator
        self._background: asyncio.Task[None] | None = None
        self.gate: Gate | None = build_gate(config.gate) if config.gate is not None else None
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_REQUESTS)

    @property
    def approximate(self) -> bool:
        """Mode consensus: replies may hold tokens the target never checked."""
        return self.config.mode == "consensus" and self.speculator is not None

    def mode_headers(self) -> dict[str, str]:
        return {APPROXIMATE_HEADER: "consensus"} if self.approximate else {}

    def _n_vocab(self) -> int:
        return self.profile.info.n_vocab if self.profile else 0

    # lifecycle ----------------------------------------------------------------------------------
    async def startup(self) -> None:
        self._background = asyncio.create_task(self._keep_in_touch())

    async def shutdown(self) -> None:
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(BaseException):
                await self._background
        if self.drafter is not None:
            await self.drafter.close()
        if self.gate is not None:
            await self.gate.close()
        await self.engine.close()

    async def _keep_in_touch(self) -> None:
        """Learn the engine early (so the first request does not pay for it) and keep measuring
        the round trip to it, which the cost model needs."""
        while True:
            try:
                await self.learn_engine()
                rtt = await self.engine.ping()
                if self.controller is not None:
                    self.controller.record_rtt(rtt)
                await asyncio.sleep(RTT_EVERY)
            except OpenAIError:
                await asyncio.sleep(1.0)

    # the engine ---------------------------------------------------------------------------------
    async def learn_engine(self) -> EngineProfile:
        """The engine's model, context and vocabulary; loaded once, again after the engine changed."""
        if self.profile is not None:
            return self.profile
        async with self._learning:
            if self.profile is None:
                info = await self.engine.info()
                vocabulary = await self.engine.vocabulary(info.n_vocab)
                chat = await self.engine.chat_tokens([{"role": "user", "content": "hi"}]) is not None
                if self.speculator is not None:
                    self._size_admission(await self.engine.stats())
                    # Before anyone is served: the first request is then speculated on measurements.
                    await self.speculator.warm_up(vocabulary, chat)
                self.profile = EngineProfile(info, vocabulary, chat, set())
        return self.profile

    def _size_admission(self, stats: dict[str, Any]) -> None:
        """As many conversations as the engine keeps; the wait for one bounded as the engine bounds
        its own queue (its queue_limit and queue_timeout), unless the proxy's flags say otherwise."""
        assert self.speculator is not None
        pool = self.speculator.conversations
        parallel, limit, timeout = stats.get("parallel"), stats.get("queue_limit"), stats.get("queue_timeout")
        self.speculator.resize(
            parallel if isinstance(parallel, int) and parallel > 0 else pool.size,
            self.config.queue_limit if self.config.queue_limit is not None else _count(limit),
            self.config.queue_timeout if self.config.queue_timeout is not None else _seconds(timeout),
        )

    async def engine_profile(self) -> EngineProfile:
        """`learn_engine` for a request: a failure also forgets the engine (see `engine_failed`)."""
        try:
            return await self.learn_engine()
        except OpenAIError as exc:
            self.engine_failed(exc)
            raise

    def engine_failed(self, exc: OpenAIError) -> None:
        if isinstance(exc, EngineUnavailable):
            self.profile = None  # it may come back as another model: learn it again

    def reply_failed(self, exc: OpenAIError) -> None:
        """A generated reply failed: the engine may be gone, and the error is counted."""
        self.engine_failed(exc)
        self.telemetry.error(exc.code)

    # the recent-requests list of /tightwad/v1/stats ---------------------------------------------
    def remember(self, route: str, served: str, prompt: int, max_tokens: int | None) -> None:
        self.recent.appendleft(
            {
                "at": round(time.time(), 3),
                "route": route,
                "served": served,
                "prompt": prompt,
                "max_tokens": max_tokens,
            }
        )


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _seconds(value: object) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    return float(value) if ok else None  # type: ignore[arg-type]
