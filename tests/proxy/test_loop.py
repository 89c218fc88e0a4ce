"""The speculation loop against an in-process fake engine with a deterministic "target": whatever
the drafter does (right, wrong, garbage, down, slow, pipelined or not), the reply is the target's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from tightwad.proxy.conversations import ConversationPool
from tightwad.proxy.detok import Vocabulary
from tightwad.proxy.drafters.base import DrafterError, DraftRequest, Proposal
from tightwad.proxy.drafters.guard import GuardedDrafter
from tightwad.proxy.kpolicy.controller import KController, KPolicy
from tightwad.proxy.replies import TextReply
from tightwad.proxy.sampling import Sampling
from tightwad.proxy.speculate import Job, SpeculationSettings, Speculator
from tightwad.proxy.telemetry import Telemetry
from tightwad.proxy.upstream import ConversationLost, EngineClient, Verdict

EOG = 0
N_VOCAB = 64


def target_next(history: Sequence[int], eog_at: int | None) -> int:
    if eog_at is not None and len(history) >= eog_at:
        return EOG
    return (history[-1] * 31 + history[-2] * 17 + len(history)) % (N_VOCAB - 1) + 1


def target_alone(prompt: list[int], n: int, eog_at: int | None = None) -> list[int]:
    history = list(prompt)
    out: list[int] = []
    while len(out) < n:
        token = target_next(history, eog_at)
        history.append(token)
        out.append(token)
        if token == EOG:
            break
    return out


class FakeEngine(EngineClient):
    """The verify API and plain decoding of `target_next`, with a little time per call."""

    def __init__(self, eog_at: int | None = None, decode_s: float = 0.004, evict_every: int = 0) -> None:
        super().__init__("http://fake-engine")
        self.eog_at = eog_at
        self.decode_s = decode_s
        self.evict_every = evict_every
        self.conversations: dict[str, list[int]] = {}
        self.verify_calls = self.generated = self.resets = 0

    async def verify(
        self,
        conversation: str,
        tokens: Sequence[int],
        drafts: Sequence[Proposal],
        sampling: Sampling,
        reset: bool,
    ) -> Verdict:
        self.verify_calls += 1
        if self.evict_every and self.verify_calls % self.evict_every == 0:
            self.conversations.pop(conversation, None)
        if reset:
            self.resets += 1
            history = list(tokens)
        elif conversation in self.conversations:
            history = self.conversations[conversation] + list(tokens)
        else:
            raise ConversationLost("evicted")
        draft = list(drafts[0].tokens) if drafts and drafts[0].tokens else []
        await asyncio.sleep(self.decode_s * (1 + 0.1 * len(draft)))
        out: list[int] = []
        accepted = 0
        for token in [*draft, None]:
            expected = target_next(history + out, self.eog_at)
            out.append(expected)
            if token != expected or expected == EOG:
                break
            accepted += 1
        accepted = min(accepted, len(draft))
        self.conversations[conversation] = history + out
        return Verdict(out, accepted, 0, out[-1] == EOG)

    async def generate(
        self, prompt: Sequence[int], sampling: Sampling, max_tokens: int
    ) -> AsyncIterator[tuple[list[int], str | None]]:
        history = list(prompt)
        for _ in range(max_tokens):
            await asyncio.sleep(self.decode_s)
            token = target_next(history, self.eog_at)
            history.append(token)
            self.generated += 1
            yield [token], None
            if token == EOG:
                yield [], "stop"
                return
        yield [], "length"


class FakeDrafter:
    name = "fake"

    def __init__(
        self, kind: str = "good", eog_at: int | None = None, kind_name: str = "llama-server"
    ) -> None:
        self.behaviour = kind
        self.kind = kind_name
        self.eog_at = eog_at
        self.calls = 0

    async def propose(self, request: DraftRequest) -> Proposal:
        self.calls += 1
        if self.behaviour == "down":
            raise DrafterError("connection refused")
        if self.behaviour == "slow":
            await asyncio.sleep(10)
        if self.behaviour == "garbage":
            return Proposal(tuple((7 * self.calls + i) % 200 for i in range(request.k)))  # some out of vocab
        history = list(request.history)
        draft = []
        for i in range(request.k):
            token = target_next(history, None)
            if self.behaviour == "half" and i % 2 == 1:
                token = token % (N_VOCAB - 1) + 1  # wrong every other token
            draft.append(token)
            history.append(token)
        await asyncio.sleep(0.0005 * request.k)
        return Proposal(tuple(draft))

    async def close(self) -> None:
        return None


def make(
    engine: FakeEngine, drafter: FakeDrafter, pipeline: bool = True, policy: KPolicy | None = None
) -> Speculator:
    guard = GuardedDrafter(drafter, n_vocab=lambda: N_VOCAB)
    settings = SpeculationSettings(
        pipeline=pipeline, draft_timeout=0.05, first_draft_timeout=0.2, fallback_chunk=4
    )
    return Speculator(
        engine, guard, KController(policy or KPolicy()), ConversationPool(2), Telemetry(), settings
    )


def run(spec: Speculator, prompt: list[int], n: int) -> list[int]:
    job = Job(prompt, Sampling(), n, n_ctx=4096, vocabulary=Vocabulary([b""] * N_VOCAB))

    async def go() -> list[int]:
        out: list[int] = []
        async for step in spec.run(job):
            out += step.tokens
        return out

    return asyncio.run(go())


PROMPT = [5, 9, 13]


@pytest.mark.parametrize("pipeline", [True, False])
@pytest.mark.parametrize("behaviour", ["good", "half", "garbage"])
def test_reply_is_the_targets_whatever_the_drafter_does(behaviour: str, pipeline: bool) -> None:
    engine = FakeEngine()
    spec = make(engine, FakeDrafter(behaviour), pipeline)
    assert run(spec, PROMPT, 40) == target_alone(PROMPT, 40)


def test_a_good_drafter_needs_few_rounds_and_pipelining_saves_draft_calls() -> None:
    engine = FakeEngine()
    spec = make(engine, FakeDrafter("good"), pipeline=True)
    assert run(spec, PROMPT, 60) == target_alone(PROMPT, 60)
    assert engine.verify_calls < 60 / 3
    assert spec.telemetry.accepted > 0.9 * spec.telemetry.drafted


def test_target_end_of_generation_ends_the_reply() -> None:
    engine = FakeEngine(eog_at=len(PROMPT) + 11)
    spec = make(engine, FakeDrafter("good"))
    out = run(spec, PROMPT, 50)
    assert out == target_alone(PROMPT, 50, eog_at=len(PROMPT) + 11) and out[-1] == EOG and len(out) == 12


def test_a_drafter_that_is_down_falls_back_to_the_target_alone() -> None:
    engine = FakeEngine()
    drafter = FakeDrafter("down")
    spec = make(engine, drafter)
    assert run(spec, PROMPT, 30) == target_alone(PROMPT, 30)
    assert engine.generated > 0  # while it backs off, the engine decodes on its own
    assert spec.drafter.health.failures >= 1 and drafter.calls < 5
    assert spec.telemetry.fallbacks["drafter_backoff"] > 0


def test_a_slow_drafter_misses_its_deadline_and_the_reply_goes_on() -> None:
    engine = FakeEngine()
    spec = make(engine, FakeDrafter("slow"), pipeline=False)
    assert run(spec, PROMPT, 12) == target_alone(PROMPT, 12)
    assert spec.drafter.health.timeouts >= 1


def test_a_drafter_that_dies_mid_reply() -> None:
    engine = FakeEngine()
    drafter = FakeDrafter("good")
    spec = make(engine, drafter)

    async def go() -> list[int]:
        job = Job(PROMPT, Sampling(), 40, 4096, Vocabulary([b""] * N_VOCAB))
        out: list[int] = []
        async for step in spec.run(job):
            out += step.tokens
            if len(out) > 10:
                drafter.behaviour = "down"
        return out

    assert asyncio.run(go()) == target_alone(PROMPT, 40)


def test_speculation_turns_itself_off_for_a_useless_drafter() -> None:
    engine = FakeEngine(decode_s=0.002)
    policy = KPolicy(probe_after=16, warmup_rounds=3)
    spec = make(engine, FakeDrafter("garbage"), pipeline=False, policy=policy)
    spec.controller.record_engine(20, 19, 19 * 0.002)  # the target alone is fast
    assert run(spec, PROMPT, 60) == target_alone(PROMPT, 60)
    assert engine.generated >= 16 and spec.telemetry.fallbacks["speculation_off"] >= 1


def test_an_evicted_conversation_is_resent_whole() -> None:
    engine = FakeEngine(evict_every=3)
    spec = make(engine, FakeDrafter("half"))
    assert run(spec, PROMPT, 30) == target_alone(PROMPT, 30)
    assert engine.resets > 1


def test_max_tokens_and_a_full_context_end_the_reply() -> None:
    spec = make(FakeEngine(), FakeDrafter("good"))
    assert run(spec, PROMPT, 7) == target_alone(PROMPT, 7)
    job = Job(PROMPT, Sampling(), 100, n_ctx=len(PROMPT) + 9, vocabulary=Vocabulary([b""] * N_VOCAB))

    async def go() -> list[int]:
        return [t async for step in spec.run(job) for t in step.tokens]

    assert asyncio.run(go()) == target_alone(PROMPT, 8)


def test_the_reply_text_stops_at_a_stop_sequence_across_rounds_and_counts_tokens_to_it() -> None:
    pieces = [f"<{i}>".encode() for i in range(N_VOCAB)]
    vocab = Vocabulary(pieces)
    expected = target_alone(PROMPT, 30)
    text = "".join(f"<{t}>" for t in expected)
    cut_token = 17
    stop = f"{expected[cut_token - 1]}><{expected[cut_token]}"  # spans two tokens
    # The stop's first occurrence decides where the text ends.
    end = text.find(stop)
    spec = make(FakeEngine(), FakeDrafter("good"))
    job = Job(PROMPT, Sampling(), 30, 4096, vocab)
    reply = TextReply(spec.run(job), vocab, [stop], set())

    async def go() -> str:
        return "".join([d.text async for d in reply.deltas()])

    assert asyncio.run(go()) == text[:end]
    assert reply.finish_reason == "stop"
    assert reply.completion_tokens == text[: end + len(stop)].count("<")  # up to the completing token
