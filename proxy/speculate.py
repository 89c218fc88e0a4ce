"""The speculation loop of one request, in token ids end to end.

Each round: the drafter proposes K ids (K from the controller), the engine verifies them in one
decode and returns the accepted ones plus its own next token; those are yielded and the next round
starts. The reply is the target's: the engine decides every token, the target's end-of-generation
ends the reply (the engine cuts a verdict at it), the drafter's never does.

Around that loop:
- a drafter that is slower than usual: the round goes ahead without it (a verify of no draft, one
  token) and its draft is still used by a later round if the tokens added meanwhile are its first;
- a drafter that fails (down, past its deadline, nonsense): it backs off, and meanwhile the target
  decodes alone in chunks;
- speculation the cost model says cannot win: the target decodes alone (the engine's own
  /v1/completions, token ids in and out, on the reply's own conversation) until the controller
  probes again;
- pipelining: while round n is verified, the drafter already drafts round n+1 assuming all of
  round n is accepted (it drafts one token more, its guess of the target's bonus token); when the
  verdict proves the guess right the next round starts with its draft ready, otherwise it is dropped.

Several drafters per round (drafters/race.py): the drafter answers `Candidates`, a round sends them all as
a list of proposals and the verdict says which one won (`draft_index`). Consensus (APPROXIMATE,
opt-in, consensus.py): when the candidates agree under `SpeculationSettings.consensus`, the agreed tokens are
emitted without the target (`Step.skipped`), and sent to the engine with the next verify. A request
that asks for logprobs is never skipped: every number it gets is the target's.

Penalties, logit_bias and seeds need nothing from the loop but two facts the engine cannot know:
where the reply starts in the conversation (`generation_start`, the prompt's length: penalties count
from there) and, when the target decodes alone, how much of its prompt is the reply so far. A seeded
reply is then the same token sequence however rounds are cut (engine/verify.py, "Seeds").
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tightwad.openai import OpenAIError, UpstreamError
from tightwad.proxy.consensus import agreed
from tightwad.proxy.conversations import ConversationPool, Lease, Ticket
from tightwad.proxy.detok import Vocabulary
from tightwad.proxy.drafters.base import DraftRequest, Proposal
from tightwad.proxy.drafters.guard import GuardedDrafter
from tightwad.proxy.drafters.race import Candidates, RaceDrafter
from tightwad.proxy.kpolicy.controller import KController
from tightwad.proxy.telemetry import Telemetry
from tightwad.proxy.upstream import EngineClient
from tightwad.verify_api import ConversationEvicted, Sampling, TokenLogprob, VerifyReply

# The warm-up (Speculator.warm_up): a code prompt, as typical a reply as any, and short.
WARMUP_PROMPT = "Write a Python function that returns the sum of the squares of a list of numbers."
WARMUP_DRAFT_K = (2, 8)  # draft calls timed
WARMUP_VERIFY_K = (0, 8, 2, 12)  # verify blocks timed: spread out, so the fit sees the slope
WARMUP_ALONE_TOKENS = 8  # the target decoding alone
WARMUP_LIMIT_S = 30.0  # a warm-up never holds the proxy's readiness longer than this
GONE_POLL_S = 0.25  # how often a waiting request checks that its client is still there


@dataclass(frozen=True)
class SpeculationSettings:
    """The loop's deadlines, patience and fallback sizes (the K policy has its own: KPolicy)."""

    pipeline: bool = True
    # A draft call slower than its deadline counts as a failure (the drafter backs off):
    draft_timeout: float = 2.0  # the least deadline of a call in a running reply
    first_draft_timeout: float = 15.0  # a reply's first call may have the whole prompt to read
    # How long a round waits for a draft before it goes ahead without one:
    min_patience: float = 0.02
    first_patience: float = 1.0
    fallback_chunk: int = 16  # tokens the target decodes alone while the drafter backs off
    # APPROXIMATE: "strict" | "majority" | "any_disagree" skips the target where drafters agree.
    consensus: str | None = None


@dataclass(frozen=True)
class Job:
    prompt: list[int]
    sampling: Sampling
    max_tokens: int
    n_ctx: int
    vocabulary: Vocabulary
    logprobs: int | None = None  # None: none; n: each token's logprob and its n best alternatives
    grammar: dict[str, Any] | None = None  # a decoding constraint the engine enforces (verify API)
    client_gone: Callable[[], Awaitable[bool]] | None = None  # asked while it waits for a conversation


class ClientLeft(OpenAIError):
    """The client disconnected while its request waited for a conversation (nobody reads this)."""

    status = 499
    code = "client_closed_request"


@dataclass(frozen=True)
class Step:
    tokens: list[int]  # new target tokens, in order
    eog: bool = False  # the last token (or, with no tokens, the previous one) ends the reply
    skipped: bool = False  # consensus (approximate): drafters' agreed tokens, not verified
    logprobs: list[TokenLogprob] | None = None  # one per token, when the job asked


class Speculator:
    """Shared by all requests: one engine, one guarded drafter and its controller."""

    def __init__(
        self,
        engine: EngineClient,
        drafter: GuardedDrafter | RaceDrafter,
        controller: KController,
        conversations: ConversationPool,
        telemetry: Telemetry,
        settings: SpeculationSettings | None = None,
    ) -> None:
        self.engine = engine
        self.drafter = drafter
        self.controller = controller
        self.conversations = conversations
        self.telemetry = telemetry
        self.settings = settings or SpeculationSettings()
        self.skipped_rounds = 0  # consensus (approximate): rounds and tokens the target never saw
        self.skipped_tokens = 0
        self._wakeups: dict[Ticket, asyncio.Event] = {}

    # admission: one conversation per running reply, first come first served ---------------------
    async def admit(
        self, prompt: list[int], client_gone: Callable[[], Awaitable[bool]] | None = None
    ) -> Lease:
        """A conversation for `prompt`, waiting for one when all are busy (conversations.py says
        the rules). Unavailable (503 queue_full / queue_timeout with Retry-After) when the wait is
        refused or too long; ClientLeft when `client_gone` says the client went away meanwhile."""
        pool, telemetry = self.conversations, self.telemetry
        try:
            got = pool.join(prompt, time.monotonic())
        except OpenAIError as exc:
            telemetry.refused(exc.code)
            raise
        if isinstance(got, Lease):
            self._report()
            return got
        ticket, woken = got, asyncio.Event()
        self._wakeups[ticket] = woken
        self._report()
        try:
            while ticket.lease is None:
                now = time.monotonic()
                late = pool.expired(ticket, now)
                if late is not None:
                    telemetry.refused(late.code)
                    raise late
                left = ticket.since + pool.queue_timeout - now
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.001, min(left, GONE_POLL_S))):
                        await woken.wait()
                if ticket.lease is None and client_gone is not None and await client_gone():
                    telemetry.left_queue()
                    raise ClientLeft("the client left while its request waited for a conversation")
        except BaseException:
            pool.leave(ticket)
            if ticket.lease is not None:  # handed an id just as it gave up: the next waiter's
                self._wake(pool.release(ticket.lease, None, time.monotonic()))
            raise
        finally:
            self._wakeups.pop(ticket, None)
            self._report()
        telemetry.waited(time.monotonic() - ticket.since)
        return ticket.lease

    def release(self, lease: Lease, history: Sequence[int] | None) -> None:
        """The reply is over: its conversation holds `history` ([]: unknown) and goes to the next waiter."""
        self._wake(self.conversations.release(lease, history, time.monotonic()))
        self._report()

    def resize(self, size: int, queue_limit: int | None, queue_timeout: float | None) -> None:
        """The engine's figures changed (learnt at start, again after it came back)."""
        self.conversations.resize(size, queue_limit, queue_timeout)
        self._wake(self.conversations.grant(time.monotonic()))
        self._report()

    def _wake(self, granted: list[Ticket]) -> None:
        for ticket in granted:
            woken = self._wakeups.get(ticket)
            if woken is not None:
                woken.set()

    def _report(self) -> None:
        pool = self.conversations
        waiting = len(pool.waiting)
        self.telemetry.admission(pool.size, pool.busy(), waiting, pool.queue_limit, pool.queue_timeout)

    async def warm_up(self, vocabulary: Vocabulary, chat: bool) -> None:
        """Measure before the first request, so that it is speculated on measurements, not priors.

        On one short code prompt: the round trip to the engine; the drafter reading it, then draft
        calls of two lengths; the engine reading it with the drafter's guess verified (a first
        acceptance), then verify blocks of several sizes (the cost curve's slope); and a stretch of
        the target decoding alone (the baseline speculation must beat). About a dozen target steps.
        Nothing here counts as a round or shows in the proxy's stats. A failure keeps the priors.
        """
        started = time.perf_counter()
        with contextlib.suppress(OpenAIError, TimeoutError):
            async with asyncio.timeout(WARMUP_LIMIT_S):
                await self._measure(vocabulary, chat)
            self.controller.warmup_s = time.perf_counter() - started

    async def _measure(self, vocabulary: Vocabulary, chat: bool) -> None:
        engine, controller, greedy = self.engine, self.controller, Sampling()
        for _ in range(3):
            controller.record_rtt(await engine.ping())
        messages = [{"role": "user", "content": WARMUP_PROMPT}]
        prompt = (await engine.chat_tokens(messages) if chat else None) or await engine.tokenize(
            WARMUP_PROMPT, add_special=True
        )
        guess = Proposal(())
        for i, k in enumerate((1, *WARMUP_DRAFT_K)):  # the first call reads the prompt: not timed
            t = time.perf_counter()
            request = DraftRequest(tuple(prompt), k, greedy, vocabulary)
            proposal = await self.drafter.propose(request, self.settings.first_draft_timeout)
            if proposal is not None and i:
                controller.record_draft(k, time.perf_counter() - t)
                guess = proposal.candidates()[0] if isinstance(proposal, Candidates) else proposal
        history = list(prompt)
        lease = await self.admit(history)
        try:
            # Reading the prompt is not a block's cost; the verdict on the guess is a first acceptance.
            verdict = await engine.verify(lease.conversation, history, [guess], greedy, True)
            controller.acceptance.add(len(guess.tokens), verdict.n_accepted)
            history += verdict.tokens
            for k in WARMUP_VERIFY_K:
                block = Proposal(tuple(history[-k:]) if k else ())  # any tokens: a block costs the same
                t = time.perf_counter()
                verdict = await engine.verify(lease.conversation, [], [block], greedy, False)
                controller.record_verify(k, time.perf_counter() - t)
                history += verdict.tokens
        finally:
            self.release(lease, history)
        stamps: list[float] = []
        async for tokens, _, _ in engine.generate(history, greedy, WARMUP_ALONE_TOKENS):
            stamps += [time.perf_counter()] * len(tokens)
        if len(stamps) > 2:
            controller.record_engine(len(stamps), len(stamps) - 1, stamps[-1] - stamps[0])

    async def run(self, job: Job) -> AsyncIterator[Step]:
        """Target tokens for `job` until end of generation, max_tokens or the context is full.
        Closing the iterator early (a stop sequence, a client gone) is clean."""
        # Waits here, before the reply's first byte, so a refusal is a real 503.
        reply = _Reply(self, job, await self.admit(job.prompt, job.client_gone))
        try:
            async with contextlib.aclosing(reply.steps()) as steps:
                async for step in steps:
                    yield step
            reply.ok = True
        finally:
            await reply.close()


@dataclass
class _Pending:
    """A draft in flight: proposed for `assumed` (the history it continues), started at `started`."""

    task: asyncio.Task[Proposal | None]
    assumed: tuple[int, ...]
    k: int
    started: float
    first: bool  # the reply's first draft: the drafter may have the whole prompt to read

    def usable_for(self, history: Sequence[int], proposal: Proposal) -> Proposal | None:
        """What is left of the proposal once `history` has moved past where it was drafted: the
        tokens the target added since must be the proposal's first tokens."""
        a = len(self.assumed)
        if len(history) < a or tuple(history[:a]) != self.assumed:
            return None
        done = len(history) - a
        if isinstance(proposal, Candidates):
            proposal = proposal.agreeing(history[a:])
        if tuple(proposal.tokens[:done]) != tuple(history[a:]):
            return None
        rest = proposal.tail(done)
        return rest if rest.tokens else None


class _Reply:
    """The state of one request's loop."""

    def __init__(self, speculator: Speculator, job: Job, lease: Lease) -> None:
        self.speculator = speculator
        self.job = job
        self.lease = lease
        self.history = list(job.prompt)
        self.produced = 0
        self.synced = False  # the engine's conversation holds `history` (its last token pending)
        self.unsent: list[int] = []  # consensus tokens the engine's conversation has not seen yet
        self.rounds = 0
        self.drafts = 0
        self.pending: _Pending | None = None
        self.pipelined = speculator.settings.pipeline and speculator.drafter.kind != "ngram"
        self.ok = False

    async def close(self) -> None:
        self._drop_pending()
        # Unless the engine holds this history (or a prefix of it), nothing there is worth reusing.
        self.speculator.release(self.lease, self.history if self.ok or self.synced else [])

    # the loop -----------------------------------------------------------------------------------
    async def steps(self) -> AsyncIterator[Step]:
        spec, job = self.speculator, self.job
        while self.produced < job.max_tokens:
            room = job.n_ctx - len(self.history) - 1
            if room <= 0:
                return  # the context is full: the reply ends with finish_reason "length"
            remaining = job.max_tokens - self.produced
            if not spec.drafter.available():
                spec.telemetry.fallback("drafter_backoff")
                async for step in self._alone(min(spec.settings.fallback_chunk, remaining, room)):
                    yield step
                    if step.eog:
                        return
                continue
            k = spec.controller.next_k()
            spec.telemetry.policy(k, spec.controller.acceptance.alpha)
            if k == 0:
                spec.telemetry.fallback("speculation_off")
                async for step in self._alone(min(spec.controller.off_chunk(), remaining, room)):
                    yield step
                    if step.eog:
                        return
                continue
            k = max(0, min(k, remaining - 1, room - 1))
            step = await self._round(k)
            yield step
            if step.eog:
                return

    async def _round(self, k: int) -> Step:
        spec = self.speculator
        if self.pipelined and self.rounds == 0 and self.pending is None and k > 0:
            # The first round verifies the prompt alone, so the first token comes as fast as from
            # the target alone, while the drafter reads the prompt and drafts the second round
            # (one token more: its guess of that first token).
            self._launch(self.history, k + 1)
            draft = None
        else:
            draft = await self._take_draft(k)
        proposal = draft or Proposal(())
        # Consensus skips the target: never for logprobs (the target's numbers) or a grammar.
        unchecked_ok = self.job.logprobs is None and self.job.grammar is None
        if spec.settings.consensus and isinstance(proposal, Candidates) and unchecked_ok:
            skipped = self._consensus(proposal, k)
            if skipped is not None:
                return skipped
        if self.pipelined and proposal.tokens:
            # Draft round n+1 while round n is verified, assuming all of round n is accepted.
            self._launch([*self.history, *proposal.tokens], k + 1)
        started = time.perf_counter()
        continued = self.synced  # a resent conversation also evaluates its new tokens: not timed
        proposals = proposal.candidates() if isinstance(proposal, Candidates) else [proposal]
        verdict = await self._verify(proposals)
        verify_seconds = time.perf_counter() - started if continued and self.synced else None
        winner = proposals[verdict.draft_index] if 0 <= verdict.draft_index < len(proposals) else proposal
        drafted = len(winner.tokens)
        if isinstance(proposal, Candidates):
            proposal.settle(verdict.draft_index, verdict.n_accepted, verdict.tokens)
        spec.controller.record_round(drafted, verdict.n_accepted, verify_seconds)
        spec.telemetry.round(drafted, verdict.n_accepted, len(verdict.tokens))
        self.rounds += 1
        if verdict.eog or verdict.n_accepted < drafted:
            self._drop_pending()  # it continued tokens the target did not accept
        return self._advance(verdict.tokens, verdict.eog, verdict.logprobs)

    def _consensus(self, candidates: Candidates, k: int) -> Step | None:
        """APPROXIMATE: the tokens the drafters agree on, emitted without the target; None when
        they do not agree (the round is verified as usual). Special tokens (an end of turn) are
        never skipped: the target decides where the reply ends."""
        assert self.speculator.settings.consensus is not None
        n = len(self.speculator.drafter.drafters) if isinstance(self.speculator.drafter, RaceDrafter) else 1
        drafts = [c.tokens for c in candidates.candidates()]
        tokens = agreed(drafts, self.speculator.settings.consensus, n)[:k]
        special = self.job.vocabulary.special
        cut = next((i for i, t in enumerate(tokens) if t in special), len(tokens))
        tokens = tokens[:cut]
        if not tokens:
            return None
        step = self._advance(tokens, False)
        self.unsent += step.tokens
        self.speculator.skipped_rounds += 1
        self.speculator.skipped_tokens += len(step.tokens)
        return Step(step.tokens, False, skipped=True)

    def _advance(self, tokens: list[int], eog: bool, logprobs: list[TokenLogprob] | None = None) -> Step:
        room = self.job.max_tokens - self.produced
        tokens = tokens[:room]
        self.history += tokens
        self.produced += len(tokens)
        if self.job.logprobs is not None and (logprobs is None or len(logprobs) < len(tokens)):
            raise UpstreamError("the engine's answer lacks the logprobs this reply asked for")
        return Step(tokens, eog, logprobs=logprobs[:room] if self.job.logprobs is not None else None)

    # drafting -----------------------------------------------------------------------------------
    def _expected_draft(self, k: int) -> float:
        costs = self.speculator.controller.costs()
        return costs.draft_fixed + costs.draft_per_token * k

    def _launch(self, assumed: Sequence[int], k: int) -> None:
        """Start a draft call; the drafter's own deadline (a failure, then backoff) is generous,
        the reply's patience with it is not (see _take_draft)."""
        self._drop_pending()
        s = self.speculator.settings
        first = self.drafts == 0
        self.drafts += 1
        hard = s.first_draft_timeout if first else max(s.draft_timeout, 5.0 * self._expected_draft(k))
        job = self.job
        request = DraftRequest(tuple(assumed), k, job.sampling, job.vocabulary, job.grammar, len(job.prompt))
        started = time.perf_counter()

        async def draft() -> Proposal | None:
            proposal = await self.speculator.drafter.propose(request, hard)
            if proposal is not None and not first:
                self.speculator.controller.record_draft(k, time.perf_counter() - started)
            return proposal

        self.pending = _Pending(asyncio.create_task(draft()), tuple(assumed), k, started, first)

    async def _take_draft(self, k: int) -> Proposal | None:
        """The draft for this round: the one in flight if it fits the history, else a fresh one.
        A reply never waits for a drafter much longer than the drafter usually takes: past that,
        the round goes ahead without a draft and the call may still be used by a later round."""
        spec = self.speculator
        fresh = self.pending is None
        if fresh:
            self._launch(self.history, k)
        pending = self.pending
        assert pending is not None
        if pending.first or not spec.controller.draft.measured:
            # The first call may read the whole prompt; and until one draft call is timed, twice
            # "what it usually takes" is twice a prior of zero: that would skip every early round.
            patience = spec.settings.first_patience
        else:
            patience = max(spec.settings.min_patience, 2.0 * self._expected_draft(pending.k))
        wait = pending.started + patience - time.perf_counter()
        done, _ = await asyncio.wait({pending.task}, timeout=max(wait, 0.0))
        if not done:
            spec.telemetry.fallback("drafter_slow")
            return None
        self.pending = None
        proposal = pending.task.result()
        if proposal is None:
            spec.telemetry.fallback("drafter_failed")
            return None
        usable = pending.usable_for(self.history, proposal)
        if usable is None and not fresh:
            return await self._take_draft(k)  # it guessed wrong: draft afresh
        return usable.head(k) if usable is not None else None

    def _drop_pending(self) -> None:
        if self.pending is not None:
            self.pending.task.cancel()
            self.pending = None

    # the engine ---------------------------------------------------------------------------------
    async def _verify(self, proposals: list[Proposal]) -> VerifyReply:
        engine, job, lease = self.speculator.engine, self.job, self.lease
        start, logprobs, grammar = len(job.prompt), job.logprobs, job.grammar
        if self.synced:
            try:
                verdict = await engine.verify(
                    lease.conversation, self.unsent, proposals, job.sampling, False, start, logprobs, grammar
                )
                self.unsent = []
                return verdict
            except ConversationEvicted:
                self.synced = False  # evicted by other traffic: send it whole again
                self.speculator.telemetry.conversation_evicted()
        verdict = await engine.verify(
            lease.conversation, self.history, proposals, job.sampling, True, start, logprobs, grammar
        )
        self.synced = True
        self.unsent = []
        return verdict

    async def _alone(self, n: int) -> AsyncIterator[Step]:
        """The target decodes n tokens alone: the engine's plain decoding streams them (no draft, no
        round trip per token) on this reply's own conversation, so no other reply's sequence is
        taken (an anonymous one would be the least recently used: another reply's, evicted)."""
        self._drop_pending()
        # The engine's sequence keeps what it decoded, but a stream cut short may have gone past
        # what this reply took: the next verify resends the history whole (reset) and the engine
        # keeps the common prefix, so it evaluates only what is new.
        self.synced = False
        self.unsent = []
        first: float | None = None
        last = 0.0
        count = 0
        job = self.job
        generated = len(self.history) - len(job.prompt)
        chunks = self.speculator.engine.generate(
            self.history, job.sampling, n, generated, job.logprobs, job.grammar, self.lease.conversation
        )
        # A token that renders as nothing may be the end of generation, which the stream only says
        # with its next event: it is held until then, so it reaches the reply marked (no text, no
        # logprobs entry), as in a verify verdict.
        held: tuple[list[int], list[TokenLogprob] | None] | None = None
        try:
            async with contextlib.aclosing(chunks):
                async for tokens, finish, logprobs in chunks:
                    if held is not None:
                        ends = finish == "stop" and not tokens
                        yield self._advance(held[0], ends, held[1])
                        held = None
                        if ends:
                            break
                    if tokens:
                        now = time.perf_counter()
                        first = now if first is None else first
                        last = now
                        count += len(tokens)
                        self.speculator.telemetry.engine_tokens(len(tokens))
                        if finish is None and not job.vocabulary.piece(tokens[-1]):
                            held = (tokens, logprobs)
                            continue
                        yield self._advance(tokens, False, logprobs)
                    if finish == "stop":  # the target's end of generation (no stop strings are sent)
                        yield Step([], True)
                        break
                if held is not None:
                    yield self._advance(held[0], False, held[1])
        finally:
            # Also for a stretch the reply cut short (its end, a stop string): its tokens count
            # toward the controller's next probe and its steady rate is still a sample.
            steady = last - first if first is not None else 0.0
            self.speculator.controller.record_engine(count, max(count - 1, 0), steady)
