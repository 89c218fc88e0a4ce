"""The engine's HTTP API (Starlette): OpenAI-compatible endpoints plus the versioned verify API.

  GET  /health                 open: {"status": "ok"}, or 503 with the error's code; with the token
                               (or when the engine has none) also the model and per-worker status,
                               and a 503 names the dead rpc worker
  GET  /ready                  200 once the model serves, 503 otherwise
  GET  /tightwad/v1/health     /health with its details, behind the token like every other route
  GET  /v1/models              the served model, then its aliases
  GET  /v1/models/{id}         one of them, or 404 model_not_found
  POST /v1/completions         prompt (text or token ids), streaming SSE, stop, sampling, max_tokens
  POST /v1/chat/completions    the model's own chat template; same options
  POST /tightwad/v1/verify     the verify API: its contract (request, reply, errors) is
                               tightwad.verify_api, shared with the proxy's client
  GET  /tightwad/v1/stats      counters (decodes, requests per decode, acceptance)
  POST /tokenize               {content, add_special?, parse_special?, with_pieces?} -> {tokens, pieces?};
                               or {messages} -> the chat rendered with the model's template, as tokens
  POST /detokenize             {tokens, special?} -> {content, pieces}; `pieces` are base64 bytes per
                               token, so a client can join them without splitting a UTF-8 character
  GET  /openapi.json           open: this API's OpenAPI document (tightwad.openapi)

Extensions to the OpenAI request bodies: `top_k`, `ignore_eos`, `return_tokens` (the generated token
ids in each choice). Legacy `echo` with `logprobs` scores the prompt as well (Engine.generate's
`score_prompt`): its tokens' entries come first, the first one null, as OpenAI's; `max_tokens: 0`
(only with `echo`) gives the prompt alone. Every parameter is honoured, refused with a 400 naming
it, or ignored because it cannot change a reply: the one table is tightwad.openai.PARAMS, and a
parameter it does not know is refused too. `model` must be the served name or an alias (`--alias`,
repeated), else 404 model_not_found; `GET /v1/models/{id}` answers for each. A list of prompts and
`n` give several choices, each a generation of its own (their stream chunks carry `index`). Errors
have the one shape of tightwad.openai, with a real status; a stream that fails after it started ends
with one `data: {"error": ...}` event. With a token configured every route but /health and /ready
needs it (tightwad.http.BearerAuth).

Nothing a request carries may hurt another request: bodies are limited (413 over --max-body-bytes),
stop lists are bounded (tightwad.stops), a prompt that cannot fit the context is refused before it
is tokenized, tokenizing and checking big inputs run off the event loop, and a client that leaves
cancels its generation, streamed or not.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tightwad import http, openapi, tools
from tightwad.engine.chat import ChatFormatter, normalise_messages
from tightwad.engine.core import (
    Engine,
    ErrorEvent,
    FinishEvent,
    Generation,
    GenerationEvent,
    PromptLogprobsEvent,
)
from tightwad.engine.errors import BadRequest, ContextLengthExceeded, EngineError, PoolFailure
from tightwad.engine.textstream import TextAssembler
from tightwad.engine.workers import PoolMonitor, describe_loss
from tightwad.logprobs import LogprobShape, attach, requested
from tightwad.openai import (
    CHAT,
    COMPLETIONS,
    OpenAIError,
    ReplyShape,
    check_model,
    check_params,
    constraint_of,
    get_field,
    token_list,
    usage,
)
from tightwad.stops import parse_stops
from tightwad.verify_api import (
    PREFIX,
    STATS_PATH,
    VERIFY_PATH,
    VERSION,
    Sampling,
    TokenLogprob,
    decode_request,
    encode_pieces,
    encode_reply,
)

OPEN_PATHS = ("/health", "/ready", openapi.OPENAPI_PATH)
HEALTH_PATH = f"{PREFIX}/health"
DEFAULT_MAX_BODY = 8 * 1024 * 1024  # bytes; a dense drafter row is ~0.5 MB of JSON
_THREADED_JSON = 64 * 1024  # bodies above this are parsed off the event loop


# request parsing -------------------------------------------------------------------------------
def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON ({exc})") from exc
    except RecursionError:  # `[[[[...` thousands deep: the parser's stack, not a server fault
        raise BadRequest("the request body nests arrays or objects too deeply; flatten it") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


async def read_json(request: Request, limit: int = DEFAULT_MAX_BODY) -> dict[str, Any]:
    raw = await http.read_limited(request, limit, "this engine (--max-body-bytes)")
    if len(raw) > _THREADED_JSON:
        return await asyncio.to_thread(_parse_json, raw)
    return _parse_json(raw)


async def _cancel_on_disconnect(request: Request, *handles: Generation) -> None:
    """Cancel the generations once the client is gone (the body was read: the next message a
    connection gives is its disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for handle in handles:
                handle.cancel()
            return


MAX_CHOICES = 16  # n times the prompts: each choice is a generation of its own
_SEED_STEP = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: one request's choice seeds lie far apart


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of a request seeded with `seed`: choice 0 keeps it (so it answers
    as n = 1 does), the others get distinct ones derived from it; None stays fresh entropy."""
    if seed is None or index == 0:
        return seed
    return (seed + index * _SEED_STEP) % 2**64


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_prompts(prompt: Any) -> list[str | list[int]]:
    """A completions `prompt`: a string, a list of strings, a list of token ids, or a list of lists
    of token ids; one entry per prompt, in order."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(_is_token(t) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and p and all(_is_token(t) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise BadRequest(
        "`prompt` must be a string, a list of strings, a non-empty list of token ids, or a list of "
        "such lists",
        param="prompt",
    )


def _usage(choices: list[GenerationOptions], outcomes: list[Outcome], n: int) -> dict[str, int]:
    """A request's usage: each prompt counted once (not once per choice), every choice's tokens."""
    prompt_tokens = sum(len(choices[i].prompt) for i in range(0, len(choices), n))
    return usage(prompt_tokens, sum(o.completion_tokens for o in outcomes))


@dataclass
class GenerationOptions:
    prompt: list[int]
    sampling: Sampling
    max_tokens: int
    stops: list[str]
    stream: bool
    return_tokens: bool
    ignore_eos: bool
    logprobs: int | None = None  # None: none; n: each token's logprob and n alternatives
    generated: int = 0  # extension `generated_tokens`: the prompt's tail that is generated text
    echo: bool = False  # completions: the prompt's text before the reply's
    grammar: dict[str, Any] | None = None  # a decoding constraint (tightwad.openai.constraint_of)
    conversation: str | None = None  # extension: decode on this conversation's sequence (the proxy)

    @property
    def scores_prompt(self) -> bool:
        """`echo` with `logprobs`: the prompt's tokens get logprobs too (the engine scores them)."""
        return self.echo and self.logprobs is not None


@dataclass
class Delta:
    text: str
    tokens: list[int]
    entries: list[TokenLogprob] = field(default_factory=list)  # per token of `tokens`, when asked
    shown: list[TokenLogprob] = field(default_factory=list)  # the rendered tokens' (no end of generation)
    prompt: list[TokenLogprob] | None = None  # echo + logprobs: the prompt's tokens after the first


@dataclass
class Outcome:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    shown: list[TokenLogprob] = field(default_factory=list)  # filled by _collect when asked
    entries: list[TokenLogprob] = field(default_factory=list)
    prompt: list[TokenLogprob] = field(default_factory=list)  # echo + logprobs (Delta.prompt)

    def usage(self) -> dict[str, int]:
        return usage(self.prompt_tokens, self.completion_tokens)


class Api:
    """The routes, bound to one engine."""

    def __init__(
        self,
        engine: Engine,
        model_name: str,
        monitor: PoolMonitor | None = None,
        formatter: ChatFormatter | None = None,
        token: str | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        aliases: Sequence[str] = (),
    ) -> None:
        self.engine = engine
        self.model = engine.model
        self.model_name = model_name
        # Other names apps may send in `model` (a hard-coded one, say): served like the real one.
        self.aliases = tuple(a for a in dict.fromkeys(aliases) if a != model_name)
        self.names = (model_name, *self.aliases)
        self.monitor = monitor
        self.formatter = formatter if formatter is not None else ChatFormatter(engine.model)
        self.created = int(time.time())
        self.token = token
        self.max_body = max_body
        # No token covers more characters than the longest piece, so a text longer than n_ctx of
        # them cannot fit the context, whatever it tokenizes to: refused without tokenizing it.
        longest = max(len(self.model.token_bytes(t, True)) for t in range(self.model.n_vocab))
        self.max_prompt_chars = self.engine.n_ctx * max(1, longest)

    # health -----------------------------------------------------------------------------------
    def problem(self) -> EngineError | None:
        """Why requests cannot be served right now, decided without touching libllama."""
        if self.engine.failure is not None:
            return self.engine.failure
        if self.monitor is not None:
            dead = self.monitor.dead()
            if dead:
                return PoolFailure(describe_loss(dead))
        if not self.engine.running:
            return EngineError("the engine's worker thread is not running")
        return None

    def refuse_if_unhealthy(self) -> None:
        problem = self.problem()
        if problem is not None:
            raise problem

    def _authorized(self, request: Request) -> bool:
        if self.token is None:
            return True  # no token: every route is open (and check_bind kept it on loopback)
        given = request.headers.get("authorization", "").encode()
        return hmac.compare_digest(given, f"Bearer {self.token}".encode())

    async def health(self, request: Request) -> Response:
        """Open, for probes; the pool's endpoints and what failed only for callers with the token."""
        if self._authorized(request):
            return await self.health_detail(request)
        problem = self.problem()
        if problem is not None:
            message = f"the engine cannot serve ({problem.code}); {HEALTH_PATH} with the token says why"
            error = EngineError(message, status=503, code=problem.code, type_=problem.type)
            return JSONResponse({"status": "error", **error.to_json()}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def health_detail(self, request: Request) -> Response:
        workers = [s.to_json() for s in self.monitor.check()] if self.monitor else []
        problem = self.problem()
        if problem is not None:
            body = {"status": "error", "workers": workers, **problem.to_json()}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ok", "model": self.model_name, "workers": workers})

    async def ready(self, request: Request) -> Response:
        problem = self.problem()
        if problem is not None:
            return JSONResponse({"ready": False, **problem.to_json()}, status_code=503)
        return JSONResponse({"ready": True})

    async def models(self, request: Request) -> Response:
        meta = {
            "n_ctx": self.engine.n_ctx,
            "n_ctx_train": self.model.n_ctx_train,
            "n_vocab": self.model.n_vocab,
            "n_params": self.model.n_params,
            "size": self.model.size_bytes,
            "chat_template": self.formatter.describe(),
            "verify_api": VERSION,
            "grammar": True,  # the verify API takes `grammar` (tightwad.openai.serves_grammar)
            "tools": self.formatter.tool_family,  # how the template calls tools; None: it takes none
            "aliases": list(self.aliases),
        }
        # The served model first (the proxy reads it there), then each alias as a model of its own.
        data = [{**self._model_object(self.model_name), "meta": meta}]
        data += [self._model_object(alias) for alias in self.aliases]
        return JSONResponse({"object": "list", "data": data})

    def _model_object(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "tightwad"}

    async def model_detail(self, request: Request) -> Response:
        """GET /v1/models/{id}: OpenAI's model object for the served model or an alias."""
        name = request.path_params["model"]
        check_model({"model": name}, self.names)  # 404 model_not_found for any other name
        return JSONResponse(self._model_object(name))

    async def stats(self, request: Request) -> Response:
        return JSONResponse(self.engine.snapshot())

    # tokens -----------------------------------------------------------------------------------
    # Tokenizing is CPU work that grows with the input: it runs on a thread, never on the event
    # loop (libllama's tokenizer reads the vocabulary only, so it may run beside the worker thread).
    async def tokenize(self, request: Request) -> Response:
        body = await read_json(request, self.max_body)
        return JSONResponse(await asyncio.to_thread(self._tokenize, body))

    def _tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        rendered = None
        if body.get("messages") is not None:
            # A chat rendered with the model's own template, exactly as /v1/chat/completions would:
            # what the proxy needs to speculate on chat requests; `tools` as the chat would show them.
            plan = tools.ToolPlan.of({"tools": body.get("tools")}, self.formatter.tool_family)
            rendered = plan.tools if plan is not None else None
            tokens = self.formatter.tokens(normalise_messages(body["messages"]), rendered)
        else:
            content = get_field(body, "content", str, None)
            if content is None:
                raise BadRequest("`content` (a string) or `messages` (a chat) is required")
            tokens = self.model.tokenize(
                content,
                add_special=get_field(body, "add_special", bool, False),
                parse_special=get_field(body, "parse_special", bool, True),
            )
        out: dict[str, Any] = {"tokens": tokens}
        if rendered is not None:
            out["tools"] = len(rendered)  # says they were rendered (an older engine drops `tools`)
        if get_field(body, "with_pieces", bool, False):
            out["pieces"] = encode_pieces([self.model.token_bytes(t) for t in tokens])
        return out

    async def detokenize(self, request: Request) -> Response:
        body = await read_json(request, self.max_body)
        return JSONResponse(await asyncio.to_thread(self._detokenize, body))

    def _detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        tokens = token_list(body.get("tokens"), "tokens")
        self.engine.check_tokens(tokens, "tokens")
        special = get_field(body, "special", bool, False)
        pieces = [self.model.token_bytes(t, special) for t in tokens]
        return {"content": b"".join(pieces).decode("utf-8", "replace"), "pieces": encode_pieces(pieces)}

    def _prompt_tokens(self, text: str, what: str) -> list[int]:
        """A prompt's tokens (on a thread); ContextLengthExceeded before tokenizing one too long."""
        if len(text) > self.max_prompt_chars:
            raise ContextLengthExceeded(
                f"the {what} has {len(text)} characters, more than a context of {self.engine.n_ctx} "
                "tokens can hold: shorten it",
                param=what,
            )
        return self.model.tokenize(text, add_special=True, parse_special=True)

    # verify -----------------------------------------------------------------------------------
    async def verify(self, request: Request) -> Response:
        body = await read_json(request, self.max_body)
        self.refuse_if_unhealthy()
        # Checking drafter rows costs time in proportion to the body: off the event loop.
        future = await asyncio.to_thread(lambda: self.engine.verify(decode_request(body)))
        reply = await asyncio.wrap_future(future)
        return JSONResponse(encode_reply(reply))

    # generation -------------------------------------------------------------------------------
    def _options(self, body: dict[str, Any], prompt: list[int], default_max: int) -> GenerationOptions:
        chat = body.get("messages") is not None
        generated = get_field(body, "generated_tokens", int, 0)  # extension: the proxy continuing a reply
        echo = not chat and get_field(body, "echo", bool, False)
        max_tokens = get_field(body, "max_tokens", int, None)
        if max_tokens is None:
            max_tokens = get_field(body, "max_completion_tokens", int, default_max)
        # 0 with echo: the prompt alone, scored with logprobs (how eval harnesses score a text).
        if max_tokens < (0 if echo else 1):
            hint = "" if chat else " (0 only with `echo: true`)"
            raise BadRequest(f"`max_tokens` must be >= 1{hint}, got {max_tokens}", param="max_tokens")
        return GenerationOptions(
            prompt=prompt,
            sampling=Sampling.from_json(body, default_temperature=1.0),
            max_tokens=max_tokens,
            stops=parse_stops(body.get("stop")),
            stream=get_field(body, "stream", bool, False),
            return_tokens=get_field(body, "return_tokens", bool, False),
            ignore_eos=get_field(body, "ignore_eos", bool, False),
            logprobs=requested(body, chat),
            generated=generated,
            echo=echo,
            grammar=constraint_of(body),
            conversation=get_field(body, "conversation", str, None),
        )

    def _start(self, options: GenerationOptions) -> tuple[Generation, asyncio.Queue[GenerationEvent]]:
        """Submit a generation (errors raise here, before any response is sent)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        self.refuse_if_unhealthy()
        # max_tokens 0 (echo alone): the engine decodes the prompt and stops; it does so only for a
        # scored prompt, so one without logprobs is scored with no alternatives and not shown.
        score = options.scores_prompt or options.max_tokens == 0
        handle = self.engine.generate(
            options.prompt,
            options.sampling,
            options.max_tokens,
            lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
            ignore_eos=options.ignore_eos,
            logprobs=0 if score and options.logprobs is None else options.logprobs,
            generated=options.generated,
            grammar=options.grammar,
            score_prompt=score,
            conversation=options.conversation,
        )
        return handle, events

    async def _drain(
        self,
        options: GenerationOptions,
        handle: Generation,
        events: asyncio.Queue[GenerationEvent],
        outcome: list[Outcome],
    ) -> AsyncIterator[Delta]:
        """Yield text deltas of a running generation, then append its outcome. Text never goes past
        a stop sequence; end-of-generation tokens produce no text."""
        assembler = TextAssembler(options.stops)
        n_generated = 0
        # echo + logprobs: the prompt's entries (one event per decode) go out together, first.
        prompt: list[TokenLogprob] = []
        if options.scores_prompt and len(options.prompt) == 1:
            yield Delta("", [], prompt=[])
        try:
            while True:
                event = await events.get()
                if isinstance(event, ErrorEvent):
                    raise event.error
                if isinstance(event, PromptLogprobsEvent):
                    prompt += event.entries
                    if options.scores_prompt and len(prompt) == len(options.prompt) - 1:
                        yield Delta("", [], prompt=prompt)
                    continue
                if isinstance(event, FinishEvent):
                    rest = assembler.finish()
                    if rest:
                        yield Delta(rest, [])
                    reason = "stop" if event.reason == "stop" else "length"
                    outcome.append(Outcome(reason, len(options.prompt), n_generated))
                    return
                n_generated += 1
                token = event.token
                entries = [event.logprob] if event.logprob is not None else []
                if not options.ignore_eos and self.model.is_end_of_generation(token):
                    yield Delta("", [token], entries)
                    continue
                text = assembler.feed(self.model.token_bytes(token))
                if text or options.return_tokens or entries:
                    yield Delta(text, [token], entries, entries)
                if assembler.stopped:
                    handle.cancel()
                    outcome.append(Outcome("stop", len(options.prompt), n_generated))
                    return
        finally:
            handle.cancel()  # the client went away, or we are done: a no-op once finished

    def _check(self, body: dict[str, Any], route: str) -> None:
        """Every parameter honoured or refused (tightwad.openai.PARAMS), and a model we serve."""
        check_params(body, route)
        check_model(body, self.names)

    async def completions(self, request: Request) -> Response:
        body = await read_json(request, self.max_body)
        self._check(body, COMPLETIONS)
        prompts = []
        for prompt in parse_prompts(body.get("prompt")):
            if isinstance(prompt, str):
                prompt = await asyncio.to_thread(self._prompt_tokens, prompt, "prompt")
            prompts.append(self._fits(prompt, "prompt"))
        choices = self._choices(body, prompts, default_max=16)
        return await self._respond(request, choices, chat=False, n=len(choices) // len(prompts))

    async def chat_completions(self, request: Request) -> Response:
        body = await read_json(request, self.max_body)
        self._check(body, CHAT)
        messages = normalise_messages(body.get("messages"))
        plan = tools.ToolPlan.of(body, self.formatter.tool_family)
        rendered = plan.tools if plan is not None else None
        tokens = self._fits(await asyncio.to_thread(self._chat_tokens, messages, rendered), "messages")
        choices = self._choices(body, [tokens], default_max=self.engine.n_ctx)
        if plan is not None and plan.grammar is not None:
            if choices[0].grammar is not None:
                raise BadRequest(
                    "`response_format` and a required tool call (`tool_choice`) cannot both shape the "
                    "reply: send one of them",
                    param="tool_choice",
                )
            choices = [replace(options, grammar=plan.grammar) for options in choices]
        return await self._respond(request, choices, chat=True, n=len(choices), plan=plan)

    def _fits(self, tokens: list[int], what: str) -> list[int]:
        if len(tokens) + 1 > self.engine.n_ctx:
            raise ContextLengthExceeded(
                f"the {what} has {len(tokens)} tokens but the context holds {self.engine.n_ctx}: shorten it",
                param=what,
            )
        return tokens

    def _choices(
        self, body: dict[str, Any], prompts: list[list[int]], default_max: int
    ) -> list[GenerationOptions]:
        """One generation per choice: each prompt `n` times, in OpenAI's order (index = prompt * n + j).
        Sampled choices of one prompt get distinct seeds derived from the request's (choice 0 keeps
        it, so it is the n = 1 answer); greedy ones are the same answer n times."""
        n = get_field(body, "n", int, 1)
        if not 1 <= n <= MAX_CHOICES or len(prompts) * n > MAX_CHOICES:
            raise BadRequest(
                f"`n` is {n} for {len(prompts)} prompt(s): at most {MAX_CHOICES} choices per request",
                param="n",
            )
        first = self._options(body, prompts[0], default_max)
        if first.conversation is not None and len(prompts) * n > 1:
            # One sequence holds one text: several choices would each undo the others' KV.
            raise BadRequest(
                f"`conversation` names one sequence but this request asks for {len(prompts) * n} "
                "choices: send one prompt with n 1, or leave `conversation` out",
                param="conversation",
            )
        seed = first.sampling.seed
        return [
            replace(first, prompt=prompt, sampling=replace(first.sampling, seed=choice_seed(seed, j)))
            for prompt in prompts
            for j in range(n)
        ]

    def _chat_tokens(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        size = sum(len(m.get("content") or "") for m in messages)
        if size > self.max_prompt_chars:
            raise ContextLengthExceeded(
                f"the messages have {size} characters, more than a context of {self.engine.n_ctx} "
                "tokens can hold: shorten them",
                param="messages",
            )
        return self.formatter.tokens(messages, tools)

    async def _respond(
        self,
        request: Request,
        choices: list[GenerationOptions],
        chat: bool,
        n: int,
        plan: tools.ToolPlan | None = None,
    ) -> Response:
        shape = ReplyShape(chat, self.model_name)
        started: list[tuple[Generation, asyncio.Queue[GenerationEvent]]] = []
        try:
            for options in choices:
                started.append(self._start(options))
            if choices[0].stream:  # still queued: its refusal (503, Retry-After) before any SSE byte
                for handle, _ in started:
                    await handle.admitted()
        except BaseException:
            for handle, _ in started:  # one choice refused: the others must not run on unread
                handle.cancel()
            raise
        if choices[0].stream:
            return EventSourceResponse(self._stream(choices, started, shape, n, plan), ping=15)
        # Not streamed: nothing is written until the end, so only the connection says the client
        # left; without this a chat (max_tokens defaults to the whole context) would run on.
        handles = [handle for handle, _ in started]
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, *handles))
        tasks = [
            asyncio.ensure_future(self._collect(options, handle, events))
            for options, (handle, events) in zip(choices, started, strict=True)
        ]
        try:
            results = await asyncio.gather(*tasks)
        finally:
            watcher.cancel()
            for task in tasks:  # one choice failed: the others stop with it
                task.cancel()
        bodies = [
            shape.body(text, done.finish_reason, done.usage(), tokens if options.return_tokens else None)
            for options, (text, tokens, done) in zip(choices, results, strict=True)
        ]
        for options, one, (_, _, done) in zip(choices, bodies, results, strict=True):
            self._add_logprobs(one, options, done.shown, done.entries)
            if options.scores_prompt:  # the prompt's entries, then the reply's
                reply_part = one["choices"][0]["logprobs"]
                prompt_part = self._prompt_logprobs(options, done.prompt)
                attach(one, {key: prompt_part[key] + reply_part[key] for key in prompt_part})
            if plan is not None:
                plan.shape_message(one["choices"][0])
        body = bodies[0]  # one choice: exactly the body it always was
        body["choices"] = [{**one["choices"][0], "index": i} for i, one in enumerate(bodies)]
        body["usage"] = _usage(choices, [done for _, _, done in results], n)
        return JSONResponse(body)

    async def _collect(
        self, options: GenerationOptions, handle: Generation, events: asyncio.Queue[GenerationEvent]
    ) -> tuple[str, list[int], Outcome]:
        """One choice's whole text, tokens and outcome."""
        outcome: list[Outcome] = []
        text, tokens = [self._echo(options)], []
        shown: list[TokenLogprob] = []
        entries: list[TokenLogprob] = []
        prompt: list[TokenLogprob] = []
        async for delta in self._drain(options, handle, events, outcome):
            text.append(delta.text)
            tokens.extend(delta.tokens)
            shown += delta.shown
            entries += delta.entries
            prompt += delta.prompt or []
        if not outcome:
            raise EngineError("the generation ended without an outcome")
        outcome[0].shown, outcome[0].entries, outcome[0].prompt = shown, entries, prompt
        return "".join(text), tokens, outcome[0]

    def _echo(self, options: GenerationOptions) -> str:
        """`echo`: the prompt's text, which the reply's text starts with."""
        if not options.echo:
            return ""
        return b"".join(self.model.token_bytes(t) for t in options.prompt).decode("utf-8", "replace")

    def _prompt_logprobs(self, options: GenerationOptions, entries: list[TokenLogprob]) -> dict[str, Any]:
        """OpenAI's legacy `logprobs` of an echoed prompt: its first token has none (null), each
        other token its entry from the engine; offsets into the echoed text."""
        first = self.model.token_bytes(options.prompt[0]).decode("utf-8", "replace")
        rest = LogprobShape(False, self.model.token_bytes, len(first)).shape(entries)
        return {
            "tokens": [first, *rest["tokens"]],
            "token_logprobs": [None, *rest["token_logprobs"]],
            "top_logprobs": [None, *rest["top_logprobs"]],
            "text_offset": [0, *rest["text_offset"]],
        }

    def _add_logprobs(
        self,
        reply: dict[str, Any],
        options: GenerationOptions,
        shown: list[TokenLogprob],
        entries: list[TokenLogprob],
        shaper: LogprobShape | None = None,
    ) -> None:
        """The OpenAI `logprobs` of a body or chunk; with `return_tokens` also every token's entry
        (end of generation included) as `token_logprobs`, which the proxy reads."""
        if options.logprobs is None:
            return
        chat = "message" in reply["choices"][0] or "delta" in reply["choices"][0]
        shaper = shaper or LogprobShape(chat, self.model.token_bytes, len(self._echo(options)))
        attach(reply, shaper.shape(shown))
        if options.return_tokens:
            reply["choices"][0]["token_logprobs"] = [e.to_json() for e in entries]

    async def _stream(
        self,
        choices: list[GenerationOptions],
        started: list[tuple[Generation, asyncio.Queue[GenerationEvent]]],
        shape: ReplyShape,
        n: int,
        plan: tools.ToolPlan | None = None,
    ) -> AsyncIterator[str]:
        """The choices' chunks as they come, each with its `index`. One choice: its last chunk carries
        usage (the proxy reads it; OpenAI clients ignore it); several: a usage chunk ends the stream."""
        merged: asyncio.Queue[tuple[int, Delta | Outcome | Exception]] = asyncio.Queue()

        async def pump(index: int) -> None:
            options, (handle, events) = choices[index], started[index]
            outcome: list[Outcome] = []
            try:
                async for delta in self._drain(options, handle, events, outcome):
                    await merged.put((index, delta))
                await merged.put((index, outcome[0]))
            except Exception as exc:  # the stream ends with it, not silently
                await merged.put((index, exc))

        shapers = [
            LogprobShape(shape.chat, self.model.token_bytes, len(self._echo(options))) for options in choices
        ]

        def chunk(
            index: int, text: str | None, tokens: list[int], delta: Delta | None = None, **kw: Any
        ) -> str:
            returned = tokens if choices[index].return_tokens else None
            out = shape.chunk(text, tokens=returned, **kw)
            if delta is not None:
                self._add_logprobs(out, choices[index], delta.shown, delta.entries, shapers[index])
            out["choices"][0]["index"] = index
            return json.dumps(out)

        single = len(choices) == 1
        # With tools: text that may start a call is held back, the calls go out at the end.
        streams = [plan.stream() if plan is not None else None for _ in choices]
        tasks = [asyncio.ensure_future(pump(i)) for i in range(len(choices))]
        outcomes: dict[int, Outcome] = {}
        try:
            if shape.chat:
                for index in range(len(choices)):
                    yield chunk(index, "", [], role=True)
            for index, options in enumerate(choices):
                if options.echo and not options.scores_prompt:  # else once the prompt is scored
                    yield chunk(index, self._echo(options), [])
            while len(outcomes) < len(choices):
                index, item = await merged.get()
                if isinstance(item, Exception):
                    raise item
                stream = streams[index]
                if isinstance(item, Delta) and item.prompt is not None:
                    out = shape.chunk(self._echo(choices[index]))
                    attach(out, self._prompt_logprobs(choices[index], item.prompt))
                    out["choices"][0]["index"] = index
                    yield json.dumps(out)
                    continue
                if isinstance(item, Delta):
                    text = stream.feed(item.text) if stream is not None else item.text
                    yield chunk(index, text, item.tokens, item)
                    continue
                outcomes[index] = item
                reason = item.finish_reason
                if stream is not None and plan is not None:
                    rest, calls = stream.finish()
                    if rest:
                        yield chunk(index, rest, [])
                    if calls:
                        out = shape.chunk(None)
                        out["choices"][0]["index"] = index
                        out["choices"][0]["delta"]["tool_calls"] = plan.calls_json(calls)
                        yield json.dumps(out)
                        reason = "tool_calls"
                final = {"with_usage": True, "usage": item.usage()} if single else {}
                yield chunk(index, None, [], finish_reason=reason, **final)
            if not single:
                done = [outcomes[i] for i in range(len(choices))]
                yield json.dumps(shape.usage_chunk(_usage(choices, done, n)))
            yield "[DONE]"
        except OpenAIError as exc:
            yield json.dumps(exc.to_json())
        finally:
            for task in tasks:
                task.cancel()


def create_app(
    engine: Engine,
    model_name: str,
    monitor: PoolMonitor | None = None,
    token: str | None = None,
    formatter: ChatFormatter | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    aliases: Sequence[str] = (),
) -> Starlette:
    api = Api(engine, model_name, monitor, formatter, token=token, max_body=max_body, aliases=aliases)
    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route(HEALTH_PATH, api.health_detail, methods=["GET"]),
        Route("/ready", api.ready, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.model_detail, methods=["GET"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route(VERIFY_PATH, api.verify, methods=["POST"]),
        Route(STATS_PATH, api.stats, methods=["GET"]),
        Route("/tokenize", api.tokenize, methods=["POST"]),
        Route("/detokenize", api.detokenize, methods=["POST"]),
        openapi.route(openapi.engine_document()),
    ]
    return http.app(routes, token=token, open_paths=OPEN_PATHS)
