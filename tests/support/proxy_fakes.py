"""Fakes shared by the race and consensus tests: an in-process engine whose verify API takes several
drafts (the longest accepted wins, like the real one under greedy) and drafters of chosen speed and
quality over a deterministic "target"."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from tightwad.proxy.conversations import ConversationPool
from tightwad.proxy.detok import Vocabulary
from tightwad.proxy.drafters.base import DraftRequest, Proposal
from tightwad.proxy.drafters.guard import GuardedDrafter
from tightwad.proxy.drafters.race import RaceDrafter
from tightwad.proxy.kpolicy.controller import KController, KPolicy
from tightwad.proxy.sampling import Sampling
from tightwad.proxy.speculate import Job, SpeculationSettings, Speculator
from tightwad.proxy.telemetry import Telemetry
from tightwad.proxy.upstream import ConversationLost, EngineClient, Verdict

N_VOCAB = 64
PROMPT = [5, 9, 13]


def target_next(history: Sequence[int]) -> int:
    return (history[-1] * 31 + history[-2] * 17 + len(history)) % (N_VOCAB - 1) + 1


def target_alone(prompt: Sequence[int], n: int) -> list[int]:
    history = list(prompt)
    for _ in range(n):
        history.append(target_next(history))
    return history[len(prompt) :]


class MultiDraftEngine(EngineClient):
    """verify() with several drafts: each is checked against the target, the longest accepted wins
    (ties: the first), and the winner's accepted tokens plus the target's next one come back."""

    def __init__(self, decode_s: float = 0.004) -> None:
        super().__init__("http://fake-engine")
        self.decode_s = decode_s
        self.conversations: dict[str, list[int]] = {}
        self.verify_calls = 0
        self.seen_tokens: list[list[int]] = []  # `tokens` of every verify (consensus sends skipped ones)
        self.max_drafts = 0

    async def verify(
        self,
        conversation: str,
        tokens: Sequence[int],
        drafts: Sequence[Proposal],
        sampling: Sampling,
        reset: bool,
    ) -> Verdict:
        self.verify_calls += 1
        self.seen_tokens.append(list(tokens))
        drafts = [d for d in drafts if d.tokens]  # what EngineClient.verify sends
        self.max_drafts = max(self.max_drafts, len(drafts))
        if reset:
            history = list(tokens)
        elif conversation in self.conversations:
            history = self.conversations[conversation] + list(tokens)
        else:
            raise ConversationLost("evicted")
        await asyncio.sleep(self.decode_s)
        best, best_n = 0, 0
        for i, draft in enumerate(drafts):
            h = list(history)
            n = 0
            for t in draft.tokens:
                if t != target_next(h):
                    break
                h.append(t)
                n += 1
            if n > best_n:
                best, best_n = i, n
        out = list(drafts[best].tokens[:best_n]) if drafts else []
        out.append(target_next(history + out))
        self.conversations[conversation] = history + out
        return Verdict(out, best_n, best, False)

    async def generate(
        self, prompt: Sequence[int], sampling: Sampling, max_tokens: int
    ) -> AsyncIterator[tuple[list[int], str | None]]:
        history = list(prompt)
        for _ in range(max_tokens):
            await asyncio.sleep(self.decode_s)
            token = target_next(history)
            history.append(token)
            yield [token], None
        yield [], "length"


class ScriptedDrafter:
    """Right for the first `right` tokens of each draft, then wrong; answers after `delay_s`."""

    kind = "llama-server"

    def __init__(
        self,
        name: str,
        right: int,
        delay_s: float = 0.0,
        wrong_with: int = 1,
        length: int | None = None,
        wrong_every: int = 0,
    ) -> None:
        self.name = name
        self.right = right
        self.delay_s = delay_s
        self.wrong_with = wrong_with  # drafters with the same value make the same mistakes
        self.length = length  # the most tokens it drafts (None: as many as asked)
        self.wrong_every = wrong_every  # wrong from the first token when len(history) % this == 0
        self.calls = 0

    async def propose(self, request: DraftRequest) -> Proposal:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        history = list(request.history)
        right = 0 if self.wrong_every and len(history) % self.wrong_every == 0 else self.right
        draft = []
        for i in range(min(request.k, self.length or request.k)):
            token = target_next(history)
            if i >= right:
                token = (token + self.wrong_with) % (N_VOCAB - 1) + 1
            draft.append(token)
            history.append(token)
        return Proposal(tuple(draft))

    async def close(self) -> None:
        return None


def make_race(
    drafters: Sequence[ScriptedDrafter],
    engine: EngineClient,
    consensus: str | None = None,
    k: int = 6,
    pipeline: bool = False,
) -> Speculator:
    guards = [GuardedDrafter(d, n_vocab=lambda: N_VOCAB) for d in drafters]
    controller = KController(KPolicy(fixed_k=k))
    race = RaceDrafter(guards, costs=controller.costs)
    settings = SpeculationSettings(
        pipeline=pipeline, draft_timeout=0.5, first_draft_timeout=0.5, first_patience=0.5, consensus=consensus
    )
    return Speculator(engine, race, controller, ConversationPool(2), Telemetry(), settings)


def run(spec: Speculator, n: int, prompt: Sequence[int] = PROMPT) -> list[int]:
    job = Job(list(prompt), Sampling(), n, n_ctx=4096, vocabulary=Vocabulary([b"x"] * N_VOCAB))

    async def go() -> list[int]:
        out: list[int] = []
        async for step in spec.run(job):
            out += step.tokens
        return out

    return asyncio.run(go())
