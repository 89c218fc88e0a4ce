"""The Engine: one model, one llama context, and one thread that makes every libllama call.

libllama is not thread-safe, so requests arrive through a queue and a single worker thread runs a
loop of steps. Each step packs the work of every active request into ONE decode batch (up to
n_batch tokens): prompt chunks (no logits), verify blocks (logits at every draft position) and
one-token generation steps, from several conversations at once. After the decode each request reads
its own rows by batch index, decides what it accepts, and rolls its KV back past the first rejection.

Layout of the KV cache (one unified pool of n_ctx cells, `kv_unified`):
  sequences 0 .. parallel-1            one per conversation (see sessions.py)
  sequences parallel .. n_seq_max-1    scratch, for verifying several drafts in one pass: the
                                        conversation's prefix is shared into a scratch sequence
                                        (seq_cp shares cells, it copies nothing), each draft is
                                        evaluated in its own sequence, the winner's accepted cells
                                        are shared back and the scratch sequences emptied.

Admission: jobs wait in `_waiting` first come, first served for a conversation sequence. The queue is
bounded (`queue_limit`, checked when a job is submitted: 503 queue_full) and so is the wait in it
(`queue_timeout`: 503 queue_timeout); both carry a Retry-After estimated from recent service times
(capacity.py). `Generation.admitted` lets a streamed reply wait for its start before its first byte.

A verify block for a conversation whose KV holds positions [0, P) is the conversation's next
unevaluated token at P (the "head": the token returned last time, or the last new prompt token)
followed by the K draft tokens at P+1..P+K. Row i of the block is the target's distribution of draft
token i; row K gives the bonus.

Failure: an rpc worker that dies makes libggml abort the process on the next operation that touches
it. The engine checks the pool before every step (workers.PoolMonitor, which reads the state of our
own connections) and, once one is gone, refuses everything with PoolFailure (HTTP 503) without
calling libllama again. If a worker dies DURING a decode, libggml's abort callback (installed by
`install_abort_trap`) reports it here and parks the failing thread, so the process stays up and
answers 503 instead of vanishing. Either way the state is final: the weights on that worker are
gone, so the engine must be restarted (with the worker back) by its supervisor; /health says so.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
import traceback
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import asdict, dataclass

import numpy as np

from tightwad.engine import capacity, libllama
from tightwad.engine.errors import (
    BadRequest,
    ContextLengthExceeded,
    EngineError,
    EngineStopped,
    Overloaded,
    PoolFailure,
    QueueFull,
    QueueTimeout,
)
from tightwad.engine.grammar import Grammar, GrammarState, compile_constraint
from tightwad.engine.sessions import ANONYMOUS_PREFIX, SessionTable, Slot
from tightwad.engine.verify import (
    Acceptance,
    accept_greedy,
    accept_sampled,
    accept_seeded,
    accept_tree,
    accept_tree_seeded,
    penalty_counts,
    sample,
    seeded_choice,
    shape_logits,
    target_distribution,
    token_logprob,
)
from tightwad.engine.workers import PoolMonitor, describe_loss
from tightwad.openai import OpenAIError
from tightwad.tokens import common_prefix
from tightwad.verify_api import (
    ConversationEvicted,
    Draft,
    ProbRows,
    Sampling,
    TokenLogprob,
    VerifyReply,
    VerifyRequest,
)


@dataclass(frozen=True)
class TokenEvent:
    token: int
    logprob: TokenLogprob | None = None  # when the generation asked for logprobs


@dataclass(frozen=True)
class PromptLogprobsEvent:
    """Prompt scoring (`echo` with logprobs): the logprob of each prompt token after the first,
    under the target's row at the token before it; in prompt order, one event per decode."""

    entries: list[TokenLogprob]


@dataclass(frozen=True)
class FinishEvent:
    reason: str  # "stop" (end of generation), "length" (max_tokens or context), "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ErrorEvent:
    error: OpenAIError


GenerationEvent = TokenEvent | PromptLogprobsEvent | FinishEvent | ErrorEvent


@dataclass
class EngineStats:
    decodes: int = 0
    tokens_evaluated: int = 0
    max_requests_per_decode: int = 0
    shared_decodes: int = 0  # decodes that served two or more requests at once
    verify_calls: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    generated_tokens: int = 0
    evictions: int = 0
    refused_queue_full: int = 0  # 503 queue_full: the waiting queue was full on arrival
    refused_queue_timeout: int = 0  # 503 queue_timeout: waited past --queue-timeout, never started


class _Rows(Sequence[np.ndarray]):
    """Target rows computed on first use (a row costs a softmax over the vocabulary)."""

    def __init__(self, n: int, make: Callable[[int], np.ndarray]) -> None:
        self._n, self._make, self._cache = n, make, {}

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        if i not in self._cache:
            self._cache[i] = self._make(i)
        return self._cache[i]


class _Job:
    """A request inside the worker thread. `pending` is the part of its conversation not in the KV
    yet; its last token is the head of the next block."""

    def __init__(self, conversation: str, sampling: Sampling, logprobs: int | None) -> None:
        self.conversation = conversation
        self.sampling = sampling
        self.logprobs = logprobs  # None: none; n: each token's logprob and its n best alternatives
        self.grammar: Grammar | None = None  # constrained decoding (engine/grammar.py)
        self.slot: Slot | None = None
        self.pending: list[int] = []
        self.seqs: list[int] = []  # this step's block: one sequence per draft
        self.indices: list[list[int]] = []  # this step's block: batch indices of each draft's rows
        self.n_fed = 0  # this step: pending tokens evaluated before the block
        self.submitted = time.monotonic()
        self.admitted_at: float | None = None  # when it got its sequence (None: still queued)
        self.admission: Future[None] = Future()  # done once it runs, or with the refusal
        self._over = False
        self._lock = threading.Lock()

    def settle_admission(self, error: OpenAIError | None = None) -> None:
        """It started (None) or will never start (the error): whoever waits on `admission` learns."""
        try:
            if error is None:
                self.admission.set_result(None)
            else:
                self.admission.set_exception(error)
        except InvalidStateError:
            pass  # already settled

    def claim_end(self) -> bool:
        """True exactly once: whoever gets it delivers the job's outcome."""
        with self._lock:
            if self._over:
                return False
            self._over = True
            return True

    @property
    def over(self) -> bool:
        return self._over

    def full_tokens(self, slot: Slot | None, sessions: SessionTable) -> list[int]:
        raise NotImplementedError

    def block_drafts(self) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def fail(self, error: OpenAIError) -> None:
        raise NotImplementedError


class _VerifyJob(_Job):
    def __init__(self, request: VerifyRequest, probs: list[ProbRows | None]) -> None:
        super().__init__(request.conversation, request.sampling, request.logprobs)
        self.generation_start = request.generation_start
        self.counts: Counter[int] = Counter()  # this block: penalty counts of the text at its head
        self.tokens = list(request.tokens)
        self.drafts = request.drafts or [Draft(())]
        self.probs = probs or [None]  # per draft: the drafter's checked rows, made dense when read
        self.reset = request.reset
        self.future: Future[VerifyReply] = Future()
        # Grammar states of this block, by (draft, position): position 0 is the state at the head.
        self.states: dict[tuple[int, int], GrammarState | None] = {}

    def full_tokens(self, slot: Slot | None, sessions: SessionTable) -> list[int]:
        if slot is None and not self.reset:
            # Never guess that `tokens` is the whole conversation: after an eviction, or behind a
            # router that switched to a new engine, that guess would silently change the output.
            why = (
                "was evicted to make room for others"
                if sessions.was_evicted(self.conversation)
                else ("is not held by this engine (a new or restarted engine)")
            )
            raise ConversationEvicted(
                f"conversation {self.conversation!r} {why}; send it again with reset: true and its whole "
                "token list"
            )
        full = list(self.tokens) if self.reset or slot is None else slot.history + list(self.tokens)
        if not full:
            raise BadRequest("the conversation has no tokens yet: send its prompt in `tokens`")
        return full

    def block_drafts(self) -> list[tuple[int, ...]]:
        return [d.tokens for d in self.drafts]

    def fail(self, error: OpenAIError) -> None:
        self.settle_admission(error)
        if self.claim_end():
            self.future.set_exception(error)


class _GenerateJob(_Job):
    def __init__(
        self,
        prompt: list[int],
        sampling: Sampling,
        max_tokens: int,
        on_event: Callable[[GenerationEvent], None],
        ignore_eos: bool,
        logprobs: int | None = None,
        generated: int = 0,
        score_prompt: bool = False,
        conversation: str | None = None,
    ) -> None:
        # A named conversation decodes on its own sequence and keeps what it evaluated there (a
        # later verify with `reset` evaluates only what is new); otherwise it is anonymous.
        super().__init__(conversation or f"{ANONYMOUS_PREFIX}{uuid.uuid4().hex}", sampling, logprobs)
        self.prompt = prompt
        # Prompt scoring: every prompt position is evaluated (no KV prefix reuse) with its logits on,
        # a decode's worth at a time, so the rows held at once are bounded by n_batch.
        self.score_prompt = score_prompt
        self.fed_rows: list[int] = []  # this step: batch indices of the fed prompt tokens' rows
        # Penalties count the generated text: the last `generated` prompt tokens (a reply continued
        # by the proxy) and every token this job adds.
        self.counts = penalty_counts(prompt[len(prompt) - generated :] if generated else ())
        self.max_tokens = max_tokens
        self.on_event = on_event
        self.ignore_eos = ignore_eos
        self.generated = 0
        self.cancelled = threading.Event()
        self.rng = np.random.default_rng(sampling.rng_seed)
        self.state: GrammarState | None = None  # the grammar after the generated text so far

    def full_tokens(self, slot: Slot | None, sessions: SessionTable) -> list[int]:
        if not self.prompt:
            raise BadRequest("the prompt is empty")
        return list(self.prompt)

    def block_drafts(self) -> list[tuple[int, ...]]:
        return [()]

    def emit(self, event: GenerationEvent) -> None:
        try:
            self.on_event(event)
        except Exception as exc:  # a broken listener must not take the engine down
            print(f"tightwad engine: dropping a generation event: {exc!r}", file=sys.stderr)

    def finish(self, reason: str) -> None:
        self.settle_admission()
        if self.claim_end():
            self.emit(FinishEvent(reason, len(self.prompt), self.generated))

    def fail(self, error: OpenAIError) -> None:
        self.settle_admission(error)
        if self.claim_end():
            self.emit(ErrorEvent(error))


@dataclass
class _Cursor:
    """A conversation's grammar state after `tokens` (its constrained text so far), kept between
    verify calls so a call advances it over its new tokens only."""

    conversation: str
    grammar: Grammar
    start: int
    tokens: list[int]
    state: GrammarState


class Generation:
    """Handle on a running generation: cancel it (client went away, stop sequence found)."""

    def __init__(self, job: _GenerateJob) -> None:
        self._job = job

    def cancel(self) -> None:
        self._job.cancelled.set()

    async def admitted(self) -> None:
        """Wait until it holds a conversation sequence; raises the refusal when it never will
        (QueueTimeout after --queue-timeout, or the engine failing), so a streamed reply can answer
        a real 503 with Retry-After before its first byte."""
        await asyncio.wrap_future(self._job.admission)


_STOP = object()


class Engine:
    """Serves one model from one context; see the module docstring."""

    def __init__(
        self,
        model: libllama.Model,
        n_ctx: int = 4096,
        parallel: int | None = None,
        n_batch: int = 512,
        threads: int = 1,
        max_drafts: int = 4,
        pool: PoolMonitor | None = None,
        flash_attn: str = "auto",
        kv_type: str = "f16",
        conversation_cells: int = capacity.DEFAULT_CONVERSATION_CELLS,
        queue_limit: int | None = None,
        queue_timeout: float = 30.0,
    ) -> None:
        """`parallel` None: as many conversation sequences as n_ctx holds at `conversation_cells`
        each (capacity.conversations_for); `queue_limit` None: capacity.queue_bound(parallel)."""
        if max_drafts < 1:
            raise ValueError("max_drafts must be >= 1")
        self.parallel_auto = parallel is None
        if parallel is None:
            parallel = capacity.conversations_for(n_ctx, conversation_cells, max_drafts)
        if parallel < 1:
            raise ValueError("parallel must be >= 1")
        if queue_limit is not None and queue_limit < 0:
            raise ValueError("the queue bound must be >= 0")
        if queue_timeout <= 0:
            raise ValueError("the queue timeout must be > 0 seconds")
        self.model = model
        self.parallel = parallel
        self.max_drafts = max_drafts
        self.conversation_cells = conversation_cells
        self.queue_limit = capacity.queue_bound(parallel) if queue_limit is None else queue_limit
        self.queue_timeout = queue_timeout
        self._service: deque[float] = deque(maxlen=32)  # seconds each recent request held a sequence
        n_scratch = parallel * (max_drafts - 1)
        if parallel + n_scratch > 256:
            raise ValueError("parallel * max_drafts must be at most 256 (llama.cpp's sequence limit)")
        self.ctx = libllama.Context(
            model,
            n_ctx=n_ctx,
            n_seq_max=parallel + n_scratch,
            n_batch=n_batch,
            n_threads=threads,
            flash_attn=flash_attn,
            kv_type=kv_type,
        )
        self.n_ctx = self.ctx.n_ctx
        self.n_batch = self.ctx.n_batch
        self.sessions = SessionTable(parallel)
        self._scratch = list(range(parallel, parallel + n_scratch))
        self.pool = pool
        self.eog_tokens = np.array(
            [t for t in range(model.n_vocab) if model.is_end_of_generation(t)], dtype=np.int64
        )
        self.stats = EngineStats()
        self._parsed: set[Grammar] = set()  # grammars llama.cpp has parsed
        # Per conversation sequence: the grammar state after its generated text (see _grammar_base).
        self._cursors: dict[int, _Cursor] = {}
        self._batch = libllama.Batch(self.n_batch, max(1, parallel + n_scratch))
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._waiting: list[_Job] = []
        self._active: list[_Job] = []
        self._jobs: set[_Job] = set()
        self._jobs_lock = threading.Lock()
        self.failure: EngineError | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tightwad-engine", daemon=True)

    # public API (any thread) ------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker thread and free the context and model (not after a failure: freeing
        memory on a dead rpc worker would abort the process)."""
        self._stopping = True
        self._inbox.put(_STOP)
        if self._thread.is_alive() and self.failure is None:
            self._thread.join(timeout)
        self._fail_everything(EngineStopped("the engine is shutting down"))
        if self.failure is None and not self._thread.is_alive():
            self._batch.close()
            self.ctx.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def fail(self, error: EngineError) -> None:
        """Enter the failed state (final) and fail every request; safe from any thread."""
        if self.failure is None:
            self.failure = error
        self._fail_everything(self.failure)
        self._inbox.put(None)  # wake the worker thread so it stops touching libllama

    def on_fatal_ggml_error(self, message: str) -> bool:
        """The abort trap: libggml hit a fatal error. Report it and park the failing thread."""
        lost = [s.detail for s in self.pool.check(max_age=0) if not s.alive] if self.pool else []
        detail = "; ".join(lost) if lost else "no rpc worker reports a closed connection"
        self.fail(
            PoolFailure(
                f"the model can no longer be computed: libggml reported a fatal error ({message}); "
                f"{detail}. Restart the engine once every rpc worker is back"
            )
        )
        return True

    def verify(self, request: VerifyRequest) -> Future[VerifyReply]:
        """Evaluate the conversation's new tokens and score every draft in ONE decode. Refusals
        (InvalidRequest) raise here, in the caller's thread."""
        tokens, drafts = request.tokens, request.drafts
        self.check_conversation(request.conversation)
        self.check_tokens(tokens, "tokens")
        if len(drafts) > self.max_drafts:
            raise BadRequest(f"at most {self.max_drafts} drafts per call (engine --max-drafts)")
        block = sum(1 + len(d.tokens) for d in drafts) if drafts else 1
        if block > self.n_batch:
            raise BadRequest(
                f"the drafts need {block} batch slots but n_batch is {self.n_batch}: send shorter drafts"
            )
        self.check_sampling(request.sampling)
        probs: list[ProbRows | None] = []
        for i, draft in enumerate(drafts):
            self.check_tokens(draft.tokens, f"drafts[{i}].tokens")
            # Checked here (sizes first), made dense one row at a time in the worker when read.
            probs.append(draft.prob_rows(self.model.n_vocab, f"drafts[{i}].probs"))
        job = _VerifyJob(request, probs)
        if request.grammar is not None:
            job.grammar = self._grammar(request.grammar)
        self._submit(job)
        return job.future

    def generate(
        self,
        prompt: Sequence[int],
        sampling: Sampling,
        max_tokens: int,
        on_event: Callable[[GenerationEvent], None],
        ignore_eos: bool = False,
        logprobs: int | None = None,
        generated: int = 0,
        grammar: dict[str, object] | None = None,
        score_prompt: bool = False,
        conversation: str | None = None,
    ) -> Generation:
        """The engine's own decoding, one token per step; events arrive on the worker thread.
        `generated`: how many of the prompt's last tokens are text generated earlier (a reply the
        caller continues): penalties count them, and `grammar` (a constraint, engine/grammar.py)
        constrains them with what follows. `score_prompt` (needs `logprobs`): PromptLogprobsEvents
        for the prompt's tokens first; then `max_tokens` may be 0 (the prompt scored, nothing more).
        `conversation`: run on that conversation's sequence as a verify with `reset` would (its
        common prefix kept, waiting while it is busy) and leave it holding what was evaluated;
        None: an anonymous sequence (a free one, else the least recently used idle one)."""
        if conversation is not None:
            self.check_conversation(conversation)
        self.check_tokens(prompt, "prompt")
        self.check_sampling(sampling)
        if not 0 <= generated <= len(prompt):
            raise BadRequest(f"`generated_tokens` must be between 0 and the prompt's {len(prompt)} tokens")
        if not prompt:
            raise BadRequest("the prompt is empty")
        if len(prompt) + 1 > self.n_ctx:
            raise ContextLengthExceeded(
                f"the prompt has {len(prompt)} tokens but the context holds {self.n_ctx}"
            )
        if score_prompt and logprobs is None:
            raise BadRequest("scoring the prompt needs `logprobs`", param="logprobs")
        if max_tokens < (0 if score_prompt else 1):
            raise BadRequest("max_tokens must be >= 1 (0 only when the prompt is scored)")
        job = _GenerateJob(
            list(prompt),
            sampling,
            max_tokens,
            on_event,
            ignore_eos,
            logprobs,
            generated,
            score_prompt,
            conversation,
        )
        if grammar is not None:
            if ignore_eos:
                raise BadRequest("`ignore_eos` cannot be used with a grammar", param="ignore_eos")
            job.grammar = self._grammar(grammar)
            job.state = GrammarState.start(self.model, job.grammar)
            job.state.advance_over(prompt[len(prompt) - generated :] if generated else (), "generated_tokens")
        self._submit(job)
        return Generation(job)

    def snapshot(self) -> dict[str, object]:
        return {
            **asdict(self.stats),
            "active": len(self._active),
            "waiting": len(self._waiting),
            "held_tokens": self.sessions.held_tokens(),
            "n_ctx": self.n_ctx,
            "n_batch": self.n_batch,
            "parallel": self.parallel,
            "parallel_rule": self.capacity_rule(),
            "queue_limit": self.queue_limit,
            "queue_timeout": self.queue_timeout,
        }

    def capacity_rule(self) -> str:
        """How `parallel` was chosen, for the start line and the stats."""
        if not self.parallel_auto:
            return "fixed (--parallel)"
        return (
            f"auto: {self.n_ctx} KV cells / {self.conversation_cells} per conversation, at most "
            f"{capacity.sequence_limit(self.max_drafts)} (256 sequences / {self.max_drafts} drafts)"
        )

    # internals: submission and failure ----------------------------------------------------------
    def check_conversation(self, conversation: object) -> None:
        """A conversation id a client may name: the anonymous prefix is the engine's own."""
        if not isinstance(conversation, str) or not conversation:
            raise BadRequest("`conversation` must be a non-empty string", param="conversation")
        if conversation.startswith(ANONYMOUS_PREFIX):
            raise BadRequest(
                f"`conversation` ids may not start with {ANONYMOUS_PREFIX!r} (the engine's own): "
                "choose another id",
                param="conversation",
            )

    def check_tokens(self, tokens: Sequence[int], what: str) -> None:
        n_vocab = self.model.n_vocab
        for t in tokens:
            if not isinstance(t, int | np.integer) or isinstance(t, bool) or not 0 <= int(t) < n_vocab:
                raise BadRequest(f"{what} holds {t!r}, which is not a token id in [0, {n_vocab})")

    def _grammar(self, constraint: dict[str, object]) -> Grammar:
        """A constraint compiled, and parsed once by llama.cpp (BadRequest names the field)."""
        grammar = compile_constraint(constraint)
        if grammar not in self._parsed:
            GrammarState.start(self.model, grammar)
            self._parsed.add(grammar)
        return grammar

    def check_sampling(self, sampling: Sampling) -> None:
        n_vocab = self.model.n_vocab
        bad = next((t for t, _ in sampling.logit_bias if t >= n_vocab), None)
        if bad is not None:
            raise BadRequest(f"`logit_bias` names {bad}, which is not a token id in [0, {n_vocab})")

    def _submit(self, job: _Job) -> None:
        """Queue a job, or refuse it (503 queue_full, with Retry-After) when more are already waiting
        for a sequence than the queue's bound: a client must hear "later", never wait unbounded."""
        if self.failure is not None:
            raise self.failure
        if self._stopping or not self._thread.is_alive():
            raise EngineStopped("the engine is not running")
        with self._jobs_lock:
            running = sum(1 for j in self._jobs if j.admitted_at is not None)
            # Jobs not started yet, less those a free sequence will take at once.
            waiting = len(self._jobs) - running - max(0, self.parallel - running)
            if waiting >= self.queue_limit:
                self.stats.refused_queue_full += 1
                wait = self._retry_after_locked(waiting)
                raise QueueFull(
                    f"the engine is busy: its {self.parallel} conversation sequences are in use and "
                    f"{max(0, waiting)} request(s) already wait (engine --queue {self.queue_limit}); "
                    f"retry after {wait} s, or give the engine more KV memory (--ctx) or conversations "
                    "(--parallel)",
                    retry_after=wait,
                )
            self._jobs.add(job)
        self._inbox.put(job)

    def _retry_after_locked(self, ahead: int) -> int:
        """capacity.retry_after from the recent service times; before any, the time the oldest
        running request has taken so far. Call with _jobs_lock held."""
        now = time.monotonic()
        started = [now - j.admitted_at for j in self._jobs if j.admitted_at is not None]
        return capacity.retry_after(ahead, self.parallel, list(self._service), max(started, default=1.0))

    def retry_after(self, ahead: int = 0) -> int:
        with self._jobs_lock:
            return self._retry_after_locked(ahead)

    def _fail_everything(self, error: EngineError) -> None:
        with self._jobs_lock:
            jobs = list(self._jobs)
            self._jobs.clear()
        for job in jobs:
            job.fail(error)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Job):
                item.fail(error)

    def _done(self, job: _Job) -> None:
        with self._jobs_lock:
            if job in self._jobs and job.admitted_at is not None:
                self._service.append(time.monotonic() - job.admitted_at)
            self._jobs.discard(job)
        if job in self._active:
            self._active.remove(job)

    # the worker thread --------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            self._collect(block=not self._active and not self._waiting)
            if self._stopping:
                break
            if self.failure is not None:
                self._active.clear()
                self._waiting.clear()
                self._fail_everything(self.failure)
                continue
            if self.pool is not None:
                dead = self.pool.dead(max_age=0)
                if dead:
                    self.fail(PoolFailure(describe_loss(dead)))
                    continue
            try:
                self._admit()
                if self._active:
                    self._step()
            except Exception as exc:  # a refusal or bug we did not foresee: fail them, keep serving
                traceback.print_exc()
                self._abandon_all(EngineError(f"the engine could not run a step: {exc}"))

    def _collect(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is _STOP:
                self._stopping = True
            elif isinstance(item, _Job) and not item.over:
                self._waiting.append(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _admit(self) -> None:
        """First come, first served: a sequence that frees goes to the oldest waiting request (one
        whose conversation is still running waits for it without holding the others back). A
        request that waited past --queue-timeout is refused with Retry-After, never left to hang."""
        now = time.monotonic()
        for job in list(self._waiting):
            if job.over or (isinstance(job, _GenerateJob) and job.cancelled.is_set()):
                self._waiting.remove(job)
                if not job.over:
                    job.finish("cancelled")  # its client left while it waited
                self._done(job)
                continue
            try:
                self._admit_one(job)
            except Exception as exc:  # this job's own failure: it fails alone and frees its sequence
                traceback.print_exc()
                if job in self._waiting:
                    self._waiting.remove(job)
                self._abandon(job, EngineError(f"the engine could not start this request: {exc}"))
                continue
            waited = now - job.submitted
            if job in self._waiting and waited > self.queue_timeout:
                self._waiting.remove(job)
                self.stats.refused_queue_timeout += 1
                wait = self.retry_after(len(self._waiting))  # it would join the back of the queue
                job.fail(
                    QueueTimeout(
                        f"this request waited {waited:.0f} s for one of the engine's {self.parallel} "
                        f"conversation sequences (engine --queue-timeout {self.queue_timeout:g}) and "
                        f"never started; retry after {wait} s, or give the engine more KV memory "
                        "(--ctx) or conversations (--parallel)",
                        retry_after=wait,
                    )
                )
                self._done(job)

    def _admit_one(self, job: _Job) -> None:
        slot = self.sessions.find(job.conversation)
        if slot is not None and slot.busy:
            return  # the conversation's previous request is still running
        try:
            full = job.full_tokens(slot, self.sessions)
            longest = max(len(d) for d in job.block_drafts())
            if len(full) + longest > self.n_ctx:
                raise ContextLengthExceeded(
                    f"the conversation would reach {len(full) + longest} tokens but the context "
                    f"holds {self.n_ctx}: start a new conversation or raise --ctx"
                )
        except OpenAIError as exc:
            self._waiting.remove(job)
            job.fail(exc)
            self._done(job)
            return
        # A scored prompt is evaluated whole: a reused KV prefix would have no logits.
        scored = isinstance(job, _GenerateJob) and job.score_prompt
        plan = self.sessions.acquire(job.conversation, full, min_pending=len(full) if scored else 1)
        if plan is None:
            return  # every sequence is busy: wait for one
        # From here on the sequence is this job's: _abandon frees it if anything below fails.
        job.slot = plan.slot
        if plan.evicted:
            self.stats.evictions += 1
        self.ctx.remove(plan.slot.seq, plan.keep, -1)
        if isinstance(job, _VerifyJob) and (job.reset or plan.slot.state is None):
            plan.slot.state = np.random.default_rng(job.sampling.rng_seed)
        job.pending = full[plan.keep :]
        self._waiting.remove(job)
        self._active.append(job)
        with self._jobs_lock:
            job.admitted_at = time.monotonic()
        job.settle_admission()

    def _free_cells(self) -> int:
        return self.n_ctx - self.sessions.held_tokens()

    def _evict_idle(self, need: int, used_now: int) -> bool:
        """Evict idle conversations, least recently used first, until `need` more cells are free."""
        while self._free_cells() - used_now < need:
            idle = self.sessions.idle_by_age()
            if not idle:
                return False
            self.ctx.remove(idle[0].seq, 0, -1)
            self.sessions.forget(idle[0], evicted=True)
            self.stats.evictions += 1
        return True

    def _step(self) -> None:
        for job in list(self._active):
            if isinstance(job, _GenerateJob) and job.cancelled.is_set():
                self._release(job, tail=job.pending)
                job.finish("cancelled")
                self._done(job)
        if not self._active:
            return
        batch = self._batch
        batch.clear()
        budget = self.n_batch
        used = 0  # KV cells this batch adds
        scratch = list(self._scratch)
        fed: list[_Job] = []
        blocks: list[_Job] = []
        # Requests ready to score a block go first (they are waiting on one decode), then prompts.
        for job in sorted(self._active, key=lambda j: len(j.pending) > 1):
            slot = job.slot
            assert slot is not None
            drafts = job.block_drafts()
            block = sum(1 + len(d) for d in drafts)
            before = len(job.pending) - 1  # tokens to evaluate ahead of the block's head
            # Several drafts share the prefix through seq_cp, so the prefix must be in the KV first.
            block_now = len(drafts) == 1 or before == 0
            self._evict_idle(min(before + block if block_now else before, budget), used)
            room = min(budget, self._free_cells() - used)
            with_block = block_now and before + block <= room and len(drafts) - 1 <= len(scratch)
            n_feed = before if with_block else max(0, min(before, room))
            job.n_fed, job.seqs, job.indices = n_feed, [], []
            pos = len(slot.tokens)
            scored = isinstance(job, _GenerateJob) and job.score_prompt
            rows = [batch.add(job.pending[j], pos + j, (slot.seq,), scored) for j in range(n_feed)]
            if isinstance(job, _GenerateJob):
                job.fed_rows = rows if scored else []
            budget -= n_feed
            used += n_feed
            if with_block:
                head, at = job.pending[-1], pos + before
                for d, draft in enumerate(drafts):
                    seq = slot.seq if d == 0 else scratch.pop()
                    if d > 0:
                        self.ctx.copy(slot.seq, seq, -1, -1)
                    rows = [batch.add(head, at, (seq,), True)]
                    rows += [batch.add(t, at + 1 + k, (seq,), True) for k, t in enumerate(draft)]
                    job.seqs.append(seq)
                    job.indices.append(rows)
                budget -= block
                used += block
                blocks.append(job)
            if n_feed or with_block:
                fed.append(job)
        if not len(batch):
            self._relieve_deadlock()
            return
        try:
            self.ctx.decode(batch)
        except libllama.KvCacheFull as exc:
            for job in fed:
                self._roll_back(job)
            evicted = self.stats.evictions
            self._evict_idle(self.n_ctx, 0)  # as many idle conversations as there are
            if self.stats.evictions == evicted and fed:  # nothing left to evict: give up one request
                self._abandon(
                    fed[-1],
                    Overloaded(f"{exc}; too many long conversations at once", retry_after=self.retry_after()),
                )
            return
        self.stats.decodes += 1
        self.stats.tokens_evaluated += len(batch)
        self.stats.max_requests_per_decode = max(self.stats.max_requests_per_decode, len(fed))
        if len(fed) > 1:
            self.stats.shared_decodes += 1
        for job in fed:
            assert job.slot is not None
            if isinstance(job, _GenerateJob) and job.fed_rows:
                self._score_prompt(job)
            job.slot.tokens.extend(job.pending[: job.n_fed])
            job.pending = job.pending[job.n_fed :]
            job.n_fed = 0
        for job in blocks:
            try:
                if isinstance(job, _VerifyJob):
                    self._finish_verify(job)
                elif isinstance(job, _GenerateJob):
                    self._finish_generate_step(job)
            except Exception as exc:  # this job's rows or sampling failed: it fails alone
                traceback.print_exc()
                self._abandon(job, EngineError(f"the engine could not finish this request: {exc}"))

    def _relieve_deadlock(self) -> None:
        """Nothing fit in the KV cache even after evicting every idle conversation."""
        victim = max(self._active, key=lambda j: len(j.slot.tokens) if j.slot else 0)
        self._abandon(
            victim,
            Overloaded(
                f"the KV cache ({self.n_ctx} cells) is full with {len(self._active)} requests "
                "running: retry later, or raise --ctx",
                retry_after=self.retry_after(),
            ),
        )

    def _roll_back(self, job: _Job) -> None:
        """Undo this step's KV writes for a job whose decode did not happen."""
        assert job.slot is not None
        self.ctx.remove(job.slot.seq, len(job.slot.tokens), -1)
        for seq in job.seqs[1:]:
            self.ctx.remove(seq, 0, -1)
        job.seqs, job.indices, job.n_fed = [], [], 0

    def _abandon(self, job: _Job, error: OpenAIError) -> None:
        if job.slot is not None:
            self._roll_back(job)
            self.ctx.remove(job.slot.seq, 0, -1)
            self.sessions.forget(job.slot)
        job.fail(error)
        self._done(job)

    def _abandon_all(self, error: OpenAIError) -> None:
        for job in list(self._active):
            try:
                self._abandon(job, error)
            except Exception:
                job.fail(error)
                self._done(job)

    def _release(self, job: _Job, tail: Sequence[int]) -> None:
        assert job.slot is not None
        self.sessions.release(job.slot, job.slot.tokens, tail)

    # outcomes -----------------------------------------------------------------------------------
    def _shaped(self, job: _VerifyJob, d: int, i: int, masked: bool = True) -> np.ndarray:
        """Row i of draft d with logit_bias and the penalties (the history there is the generated
        text up to the block's head plus the draft's first i tokens, as for the target alone), and
        the grammar's mask at that position unless `masked` is False."""
        logits = self.ctx.logits_view(job.indices[d][i])
        s = job.sampling
        if s.penalized:
            counts = job.counts
            if i and (s.presence_penalty or s.frequency_penalty):
                counts = counts + penalty_counts(job.block_drafts()[d][:i])
            logits = shape_logits(logits, s, counts)
        state = self._state(job, d, i) if masked and job.grammar is not None else None
        return logits if state is None else state.mask(logits)

    def _state(self, job: _VerifyJob, d: int, i: int) -> GrammarState | None:
        """The grammar at row i of draft d: the head's state advanced over the draft's first i
        tokens; None past a draft token the grammar refuses (that row can never be reached)."""
        if (d, i) not in job.states:
            before = self._state(job, d, i - 1)
            token = job.block_drafts()[d][i - 1]
            job.states[(d, i)] = before.advanced(token) if before is not None else None
        return job.states[(d, i)]

    def _greedy(self, job: _VerifyJob, d: int, i: int) -> int:
        """The target's greedy token at row i of draft d. Under a grammar the unmasked argmax is
        checked first: when the grammar allows it, it is the masked argmax too (the same first
        maximum), and the whole-vocabulary mask is not needed."""
        logits = self._shaped(job, d, i, masked=False)
        token = int(np.argmax(logits))
        state = self._state(job, d, i) if job.grammar is not None else None
        if state is None or state.allows(token):
            return token
        return int(np.argmax(state.mask(logits)))

    def _grammar_base(self, job: _VerifyJob) -> GrammarState:
        """The grammar after the conversation's generated text up to the block's head: the
        sequence's cursor, advanced over the tokens added since the last call (checked: a token the
        grammar refuses is a 400), or built afresh for a new conversation, grammar or history."""
        slot, grammar = job.slot, job.grammar
        assert slot is not None and grammar is not None
        text = [*slot.tokens, job.pending[0]][job.generation_start :]
        cursor = self._cursors.get(slot.seq)
        if (
            cursor is None
            or (cursor.conversation, cursor.grammar, cursor.start)
            != (job.conversation, grammar, job.generation_start)
            or text[: len(cursor.tokens)] != cursor.tokens
        ):
            state = GrammarState.start(self.model, grammar)
            cursor = _Cursor(job.conversation, grammar, job.generation_start, [], state)
        self._cursors.pop(slot.seq, None)  # put back only once it is consistent
        new = text[len(cursor.tokens) :]
        cursor.state.advance_over(new, "tokens")
        cursor.tokens += new
        self._cursors[slot.seq] = cursor
        return cursor.state

    def _row(self, job: _VerifyJob, d: int, i: int) -> np.ndarray:
        return target_distribution(self._shaped(job, d, i), job.sampling)

    def _finish_verify(self, job: _VerifyJob) -> None:
        slot = job.slot
        assert slot is not None
        drafts = job.block_drafts()
        head = job.pending[0]
        start = len(slot.tokens)  # the head's position
        sampling = job.sampling
        if sampling.presence_penalty or sampling.frequency_penalty:
            job.counts = penalty_counts([*slot.tokens, head][job.generation_start :])
        if job.grammar is not None:
            try:
                base = self._grammar_base(job)
            except OpenAIError as exc:  # generated text the grammar refuses: this request's 400
                self._abandon(job, exc)
                return
            job.states = {(d, 0): base for d in range(len(drafts))}
        if sampling.greedy:
            outcomes = [
                # Rows read lazily, up to the first mismatch: a masked row costs a grammar pass.
                accept_greedy(draft, _Rows(len(rows), lambda i, d=d: self._greedy(job, d, i)))  # type: ignore[misc]
                if sampling.penalized or job.grammar is not None
                else accept_greedy(draft, [self.ctx.argmax(i) for i in rows])
                for d, (draft, rows) in enumerate(zip(drafts, job.indices, strict=True))
            ]
            winner = max(range(len(drafts)), key=lambda d: (outcomes[d].n_accepted, -d))
            acceptance: Acceptance = outcomes[winner]
        elif sampling.seed is not None:
            # Keyed by (seed, position): the same tokens as the engine alone, whatever the draft.
            seed = sampling.rng_seed
            assert seed is not None
            if len(drafts) == 1:
                rows = _Rows(len(drafts[0]) + 1, lambda i: self._row(job, 0, i))
                acceptance, winner = accept_seeded(drafts[0], rows, seed, start + 1), 0
            else:
                row = lambda d, i: self._row(job, d, i)  # noqa: E731
                acceptance, winner = accept_tree_seeded(drafts, row, seed, start + 1)
        else:
            rng = slot.state
            assert isinstance(rng, np.random.Generator)
            if len(drafts) == 1:
                rows = _Rows(len(drafts[0]) + 1, lambda i: self._row(job, 0, i))
                acceptance, winner = accept_sampled(drafts[0], job.probs[0], rows, rng), 0
            else:
                acceptance, winner = accept_tree(drafts, lambda d, i: self._row(job, d, i), rng)
        n = acceptance.n_accepted
        out = [*drafts[winner][:n], acceptance.next_token]
        for j, token in enumerate(out):
            if self.model.is_end_of_generation(token):
                out, n = out[: j + 1], j
                break
        logprobs = None
        if job.logprobs is not None:  # read before anything else touches the logits
            logprobs = [
                token_logprob(self._shaped(job, winner, j), t, job.logprobs) for j, t in enumerate(out)
            ]
        keep_to = start + 1 + n
        conv = slot.seq
        if job.seqs[winner] == conv:
            self.ctx.remove(conv, keep_to, -1)
        else:
            self.ctx.remove(conv, start, -1)
            self.ctx.copy(job.seqs[winner], conv, start, keep_to)
        for seq in job.seqs[1:]:
            self.ctx.remove(seq, 0, -1)
        slot.tokens.extend([head, *out[:n]])
        self.sessions.release(slot, slot.tokens, out[-1:])
        self.stats.verify_calls += 1
        self.stats.draft_tokens += sum(len(d) for d in drafts)
        self.stats.accepted_tokens += n
        result = VerifyReply(
            tokens=out,
            n_accepted=n,
            draft_index=winner,
            eog=self.model.is_end_of_generation(out[-1]),
            accepted_per_draft=[min(common_prefix(d, out[:n]), len(d)) for d in drafts],
            n_past=len(slot.tokens),
            pieces=[self.model.token_bytes(t) for t in out],
            logprobs=logprobs,
        )
        self._done(job)
        if job.claim_end():
            job.future.set_result(result)

    def _score_prompt(self, job: _GenerateJob) -> None:
        """The logprobs of the prompt tokens after those fed this step, from their rows (logit_bias
        applied; nothing generated yet, so no penalty), sent before the rows are overwritten."""
        assert job.logprobs is not None
        empty: Counter[int] = Counter()
        entries = [
            token_logprob(shape_logits(self.ctx.logits_view(row), job.sampling, empty), nxt, job.logprobs)
            for row, nxt in zip(job.fed_rows, job.pending[1 : job.n_fed + 1], strict=True)
        ]
        job.fed_rows = []
        job.emit(PromptLogprobsEvent(entries))

    def _finish_generate_step(self, job: _GenerateJob) -> None:
        slot = job.slot
        assert slot is not None
        slot.tokens.append(job.pending[0])
        if job.max_tokens == 0:  # a scored prompt was all that was asked for (`echo`, max_tokens 0)
            self._release(job, tail=[])
            self._done(job)
            job.finish("length")
            return
        logits = shape_logits(self.ctx.logits_view(job.indices[0][0]), job.sampling, job.counts)
        if job.ignore_eos and self.eog_tokens.size:
            logits = logits.copy()
            logits[self.eog_tokens] = -np.inf
        state = job.state
        # Greedy without logprobs needs the whole mask only when the grammar refuses the argmax.
        if state is not None and (
            not job.sampling.greedy or job.logprobs is not None or not state.allows(int(np.argmax(logits)))
        ):
            logits = state.mask(logits)
            if not np.isfinite(logits).any():  # the grammar allows nothing more (not even the end)
                self._release(job, tail=[])
                self._done(job)
                job.finish("stop")
                return
        if job.sampling.greedy:
            token = int(np.argmax(logits))
        elif job.sampling.seed is not None:
            # The token's absolute position keys its random number (verify.py, "Seeds").
            seed = job.sampling.rng_seed
            assert seed is not None
            token = seeded_choice(target_distribution(logits, job.sampling), seed, len(slot.tokens))
        else:
            token = sample(target_distribution(logits, job.sampling), job.rng)
        logprob = token_logprob(logits, token, job.logprobs) if job.logprobs is not None else None
        if state is not None:
            state.accept(token)
        job.pending = [token]
        job.generated += 1
        job.counts[token] += 1
        self.stats.generated_tokens += 1
        job.emit(TokenEvent(token, logprob))
        reason = None
        if not job.ignore_eos and self.model.is_end_of_generation(token):
            reason = "stop"
        elif job.generated >= job.max_tokens or len(slot.tokens) + 1 >= self.n_ctx:
            reason = "length"
        if reason is not None:
            self._release(job, tail=[token])
            self._done(job)
            job.finish(reason)
