"""The proxy's fakes, one set for every proxy test: a deterministic "target", an in-process engine
that verifies drafts against it, a drafter that drafts it with chosen mistakes, speed or failures,
and builders for the speculation loop (one drafter, or a race).

The engine is the real `EngineClient` with its network calls replaced, so the loop, the race and
the app run unchanged on top of it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from tightwad.proxy.conversations import ConversationPool
from tightwad.proxy.detok import Vocabulary
from tightwad.proxy.drafters.base import DrafterError, DraftRequest, Proposal
from tightwad.proxy.drafters.guard import GuardedDrafter
from tightwad.proxy.drafters.race import RaceDrafter
from tightwad.proxy.kpolicy.controller import KController, KPolicy
from tightwad.proxy.speculate import Job, SpeculationSettings, Speculator
from tightwad.proxy.telemetry import Telemetry
from tightwad.proxy.upstream import EngineClient, EngineInfo
from tightwad.verify_api import ConversationEvicted, Sampling, VerifyReply

N_VOCAB = 64
EOG = 0  # the fake target's end of generation; `target_next` never yields it unless asked to
PROMPT = [5, 9, 13]


# the target -------------------------------------------------------------------------------------
def target_next(history: Sequence[int], eog_at: int | None = None) -> int:
    """The target's next token: a fixed function of the history; EOG once it is `eog_at` long."""
    if eog_at is not None and len(history) >= eog_at:
        return EOG
    return (history[-1] * 31 + history[-2] * 17 + len(history)) % (N_VOCAB - 1) + 1


def target_alone(prompt: Sequence[int], n: int, eog_at: int | None = None) -> list[int]:
    """What the target alone replies: n tokens, or fewer when it reaches its end of generation."""
    history = list(prompt)
    out: list[int] = []
    while len(out) < n:
        token = target_next(history, eog_at)
        history.append(token)
        out.append(token)
        if token == EOG:
            break
    return out


# the engine -------------------------------------------------------------------------------------
class FakeEngine(EngineClient):
    """The verify API and plain decoding of `target_next`, with a little time per call.

    verify() takes several drafts like the real one under greedy: each is checked against the
    target, the longest accepted wins (ties: the first), and its accepted tokens plus the target's
    next one come back. A verify costs `decode_s`, plus `draft_cost` of that per draft token of the
    winner (so the cost model sees a slope). `evict_every` evicts the conversation every n-th call.
    The app's calls (info, vocabulary, chat_tokens, stats) answer as a small engine would."""

    def __init__(
        self,
        eog_at: int | None = None,
        decode_s: float = 0.004,
        evict_every: int = 0,
        draft_cost: float = 0.1,
        n_ctx: int = 512,
    ) -> None:
        super().__init__("http://fake-engine")
        self.eog_at = eog_at
        self.decode_s = decode_s
        self.evict_every = evict_every
        self.draft_cost = draft_cost
        self.n_ctx = n_ctx
        self.conversations: dict[str, list[int]] = {}
        self.verify_calls = self.generated = self.resets = 0
        # Each plain decoding's conversation and prompt (None: an anonymous sequence, which at the
        # real engine is the least recently used one: another reply's, evicted).
        self.generate_calls: list[tuple[str | None, list[int]]] = []
        self.seen_tokens: list[list[int]] = []  # `tokens` of every verify (consensus sends skipped ones)
        self.max_drafts = 0

    def _accepted(self, history: list[int], draft: Sequence[int]) -> int:
        n = 0
        for token in draft:
            expected = target_next(history + list(draft[:n]), self.eog_at)
            if token != expected or expected == EOG:
                break
            n += 1
        return n

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
        self.verify_calls += 1
        self.seen_tokens.append(list(tokens))
        if self.evict_every and self.verify_calls % self.evict_every == 0:
            self.conversations.pop(conversation, None)
        drafts = [d for d in drafts if d.tokens]  # what EngineClient.verify sends
        self.max_drafts = max(self.max_drafts, len(drafts))
        if reset:
            self.resets += 1
            history = list(tokens)
        elif conversation in self.conversations:
            history = self.conversations[conversation] + list(tokens)
        else:
            raise ConversationEvicted("evicted")
        best, best_n = 0, 0
        for i, draft in enumerate(drafts):
            n = self._accepted(history, draft.tokens)
            if n > best_n:
                best, best_n = i, n
        drafted = len(drafts[best].tokens) if drafts else 0
        await asyncio.sleep(self.decode_s * (1 + self.draft_cost * drafted))
        out = list(drafts[best].tokens[:best_n]) if drafts else []
        out.append(target_next(history + out, self.eog_at))
        self.conversations[conversation] = history + out
        return VerifyReply(out, best_n, best, out[-1] == EOG)

    async def generate(
        self,
        prompt: Sequence[int],
        sampling: Sampling,
        max_tokens: int,
        generated: int = 0,
        logprobs: int | None = None,
        grammar: dict[str, Any] | None = None,
        conversation: str | None = None,
    ) -> AsyncIterator[tuple[list[int], str | None, None]]:
        history = list(prompt)
        self.generate_calls.append((conversation, list(prompt)))
        for _ in range(max_tokens):
            await asyncio.sleep(self.decode_s)
            token = target_next(history, self.eog_at)
            history.append(token)
            self.generated += 1
            if conversation is not None:  # the named conversation keeps what was decoded
                self.conversations[conversation] = list(history)
            yield [token], None, None
            if token == EOG:
                yield [], "stop", None
                return
        yield [], "length", None

    async def info(self) -> EngineInfo:
        body = {"object": "list", "data": [{"id": "fake", "meta": {"n_ctx": self.n_ctx, "n_vocab": N_VOCAB}}]}
        return EngineInfo("fake", self.n_ctx, N_VOCAB, body)

    async def vocabulary(self, n_vocab: int) -> Vocabulary:
        return Vocabulary([b"x"] * n_vocab)

    async def chat_tokens(self, messages: list[dict[str, Any]]) -> list[int] | None:
        return list(PROMPT)

    async def stats(self) -> dict[str, Any]:
        return {"parallel": 2}


# the drafter ------------------------------------------------------------------------------------
class FakeDrafter:
    """Drafts the target's tokens, spoiled as a test asks.

    `behaviour`: "good" (the target's tokens), "half" (wrong every other token), "garbage" (ids,
    some out of the vocabulary), "down" (raises), "slow" (10 s). It may change mid-reply.
    `right`: only the first `right` tokens of each draft are the target's; drafters with the same
    `wrong_with` then make the same mistakes. `wrong_every`: wrong from the first token whenever the
    history's length is a multiple of it. `length`: the most tokens it drafts. `delay_s` before it
    answers, `per_token_s` per token drafted after."""

    def __init__(
        self,
        behaviour: str = "good",
        *,
        name: str = "fake",
        kind: str = "llama-server",
        right: int | None = None,
        wrong_with: int = 1,
        wrong_every: int = 0,
        length: int | None = None,
        delay_s: float = 0.0,
        per_token_s: float = 0.0,
    ) -> None:
        self.behaviour = behaviour
        self.name = name
        self.kind = kind
        self.right = right
        self.wrong_with = wrong_with
        self.wrong_every = wrong_every
        self.length = length
        self.delay_s = delay_s
        self.per_token_s = per_token_s
        self.calls = 0

    async def propose(self, request: DraftRequest) -> Proposal:
        self.calls += 1
        if self.behaviour == "down":
            raise DrafterError("connection refused")
        if self.behaviour == "slow":
            await asyncio.sleep(10)
        if self.behaviour == "garbage":
            return Proposal(tuple((7 * self.calls + i) % 200 for i in range(request.k)))
        await asyncio.sleep(self.delay_s)
        history = list(request.history)
        right = self.right
        if self.wrong_every and len(history) % self.wrong_every == 0:
            right = 0
        draft = []
        for i in range(min(request.k, self.length or request.k)):
            token = target_next(history)
            if self.behaviour == "half" and i % 2 == 1:
                token = token % (N_VOCAB - 1) + 1
            elif right is not None and i >= right:
                token = (token + self.wrong_with) % (N_VOCAB - 1) + 1
            draft.append(token)
            history.append(token)
        if self.per_token_s:
            await asyncio.sleep(self.per_token_s * request.k)
        return Proposal(tuple(draft))

    async def close(self) -> None:
        return None


def lane(name: str, right: int, **kwargs: Any) -> FakeDrafter:
    """A race drafter: right for its first `right` tokens, then wrong (see FakeDrafter)."""
    return FakeDrafter(name=name, right=right, **kwargs)


# the loop ---------------------------------------------------------------------------------------
def make_speculator(
    engine: EngineClient, drafter: FakeDrafter, pipeline: bool = True, policy: KPolicy | None = None
) -> Speculator:
    """One guarded drafter, deadlines short enough for tests, auto K unless `policy` says."""
    guard = GuardedDrafter(drafter, n_vocab=lambda: N_VOCAB)
    settings = SpeculationSettings(
        pipeline=pipeline, draft_timeout=0.05, first_draft_timeout=0.2, fallback_chunk=4
    )
    controller = KController(policy or KPolicy())
    return Speculator(engine, guard, controller, ConversationPool(2), Telemetry(), settings)


def make_race(
    drafters: Sequence[FakeDrafter],
    engine: EngineClient,
    consensus: str | None = None,
    k: int = 6,
    pipeline: bool = False,
) -> Speculator:
    """Several guarded drafters raced each round at a fixed K (consensus: the approximate rule)."""
    guards = [GuardedDrafter(d, n_vocab=lambda: N_VOCAB) for d in drafters]
    controller = KController(KPolicy(fixed_k=k))
    race = RaceDrafter(guards, costs=controller.costs)
    settings = SpeculationSettings(
        pipeline=pipeline, draft_timeout=0.5, first_draft_timeout=0.5, first_patience=0.5, consensus=consensus
    )
    return Speculator(engine, race, controller, ConversationPool(2), Telemetry(), settings)


def job(n: int, prompt: Sequence[int] = PROMPT, n_ctx: int = 4096) -> Job:
    return Job(list(prompt), Sampling(), n, n_ctx=n_ctx, vocabulary=Vocabulary([b"x"] * N_VOCAB))


def run(spec: Speculator, n: int, prompt: Sequence[int] = PROMPT) -> list[int]:
    """The reply's tokens for `prompt`, at most n."""

    async def go() -> list[int]:
        out: list[int] = []
        async for step in spec.run(job(n, prompt)):
            out += step.tokens
        return out

    return asyncio.run(go())
