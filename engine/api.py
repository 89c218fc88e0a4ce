"""The engine's HTTP API (Starlette): OpenAI-compatible endpoints plus the versioned verify API.

  GET  /health                 open: {"status": "ok"}, or 503 with the error's code; with the token
                               (or when the engine has none) also the model and per-worker status,
                               and a 503 names the dead rpc worker
  GET  /ready                  200 once the model serves, 503 otherwise
  GET  /tightwad/v1/health     /health with its details, behind the token like every other route
  GET  /v1/models
  POST /v1/completions         prompt (text or token ids), streaming SSE, stop, sampling, max_tokens
  POST /v1/chat/completions    the model's own chat template; same options
  POST /tightwad/v1/verify     the verify API: its contract (request, reply, errors) is
                               tightwad.verify_api, shared with the proxy's client
  GET  /tightwad/v1/stats      counters (decodes, requests per decode, acceptance)
  POST /tokenize               {content, add_special?, parse_special?, with_pieces?} -> {tokens, pieces?};
                               or {messages} -> the chat rendered with the model's template, as tokens
  POST /detokenize             {tokens, special?} -> {content, pieces}; `pieces` are base64 bytes per
                               token, so a client can join them without splitting a UTF-8 character

Extensions to the OpenAI request bodies: `top_k`, `ignore_eos`, `return_tokens` (the generated token
ids in each choice). Options that would silently change the output (penalties, logit_bias, logprobs,
tools, n > 1) are refused with 400. Errors have the one shape of tightwad.openai, with a real status;
a stream that fails after it started ends with one `data: {"error": ...}` event. With a token
configured every route but /health and /ready needs it (tightwad.http.BearerAuth).

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
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tightwad import http
from tightwad.engine.chat import ChatFormatter, normalise_messages
from tightwad.engine.core import Engine, ErrorEvent, FinishEvent, Generation, GenerationEvent
from tightwad.engine.errors import BadRequest, ContextLengthExceeded, EngineError, PoolFailure
from tightwad.engine.textstream import TextAssembler
from tightwad.engine.workers import PoolMonitor, describe_loss
from tightwad.openai import OpenAIError, ReplyShape, get_field, token_list, usage
from tightwad.stops import parse_stops
from tightwad.verify_api import (
    PREFIX,
    STATS_PATH,
    VERIFY_PATH,
    VERSION,
    Sampling,
    decode_request,
    encode_pieces,
    encode_reply,
)

OPEN_PATHS = ("/health", "/ready")
HEALTH_PATH = f"{PREFIX}/health"
DEFAULT_MAX_BODY = 8 * 1024 * 1024  # bytes; a dense drafter row is ~0.5 MB of JSON
_THREADED_JSON = 64 * 1024  # bodies above this are parsed off the event loop


# request parsing -------------------------------------------------------------------------------
def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


async def read_json(request: Request, limit: int = DEFAULT_MAX_BODY) -> dict[str, Any]:
    raw = await http.read_limited(request, limit, "this engine (--max-body-bytes)")
    if len(raw) > _THREADED_JSON:
        return await asyncio.to_thread(_parse_json, raw)
    return _parse_json(raw)


async def _cancel_on_disconnect(request: Request, handle: Generation) -> None:
    """Cancel the generation once the client is gone (the body was read: the next message a
    connection gives is its disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return


@dataclass
class GenerationOptions:
    prompt: list[int]
    sampling: Sampling
    max_tokens: int
    stops: list[str]
    stream: bool
    return_tokens: bool
    ignore_eos: bool


@dataclass
class Delta:
    text: str
    tokens: list[int]


@dataclass
class Outcome:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

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
    ) -> None:
        self.engine = engine
        self.model = engine.model
        self.model_name = model_name
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
        }
        entry = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "tightwad"}
        return JSONResponse({"object": "list", "data": [{**entry, "meta": meta}]})

    async def stats(self, request: Request) -> Response:
        return JSONResponse(self.engine.snapshot())

    # tokens -----------------------------------------------------------------------------------
    # Tokenizing is CPU work that grows with the input: it runs on a thread, never on the event
    # loop (libllama's tokenizer reads the vocabulary only, so it may run beside the worker thread).
    async def tokenize(self, request: Request) -> Response:
        body = await read_json(request, self.max_body)
        return JSONResponse(await asyncio.to_thread(self._tokenize, body))

    def _tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("messages") is not None:
            # A chat rendered with the model's own template, exactly as /v1/chat/completions would:
            # what the proxy needs to speculate on chat requests.
            tokens = self.formatter.tokens(normalise_messages(body["messages"]))
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
                "tokens can hold: shorten it"
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
        if get_field(body, "n", int, 1) != 1:
            raise BadRequest("only n = 1 is supported")
        # Options that would change the output if silently ignored are refused instead.
        for key in ("presence_penalty", "frequency_penalty"):
            if get_field(body, key, float, 0.0) != 0.0:
                raise BadRequest(f"`{key}` is not supported by this engine; leave it at 0")
        for key in ("logit_bias", "tools", "functions", "logprobs", "top_logprobs", "echo", "suffix"):
            if body.get(key) not in (None, False, 0, {}, [], ""):
                raise BadRequest(f"`{key}` is not supported by this engine")
        max_tokens = get_field(body, "max_tokens", int, None)
        if max_tokens is None:
            max_tokens = get_field(body, "max_completion_tokens", int, default_max)
        if max_tokens < 1:
            raise BadRequest("`max_tokens` must be >= 1")
        return GenerationOptions(
            prompt=prompt,
            sampling=Sampling.from_json(body, default_temperature=1.0),
            max_tokens=max_tokens,
            stops=parse_stops(body.get("stop")),
            stream=get_field(body, "stream", bool, False),
            return_tokens=get_field(body, "return_tokens", bool, False),
            ignore_eos=get_field(body, "ignore_eos", bool, False),
        )

    def _start(self, options: GenerationOptions) -> tuple[Generation, asyncio.Queue[GenerationEvent]]:
        """Submit a generation (errors raise here, before any response is sent)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        self.refuse_if_unhealthy()
        handle = self.engine.generate(
            options.prompt,
            options.sampling,
            options.max_tokens,
            lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
            ignore_eos=options.ignore_eos,
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
        try:
            while True:
                event = await events.get()
                if isinstance(event, ErrorEvent):
                    raise event.error
                if isinstance(event, FinishEvent):
                    rest = assembler.finish()
                    if rest:
                        yield Delta(rest, [])
                    reason = "stop" if event.reason == "stop" else "length"
                    outcome.append(Outcome(reason, len(options.prompt), n_generated))
                    return
                n_generated += 1
                token = event.token
                if not options.ignore_eos and self.model.is_end_of_generation(token):
                    yield Delta("", [token])
                    continue
                text = assembler.feed(self.model.token_bytes(token))
                if text or options.return_tokens:
                    yield Delta(text, [token])
                if assembler.stopped:
                    handle.cancel()
                    outcome.append(Outcome("stop", len(options.prompt), n_generated))
                    return
        finally:
            handle.cancel()  # the client went away, or we are done: a no-op once finished

    async def completions(self, request: Request) -> Response:
        body = await read_json(request, self.max_body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            tokens = await asyncio.to_thread(self._prompt_tokens, prompt, "prompt")
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            tokens = prompt
        else:
            raise BadRequest("`prompt` must be a string, or a non-empty list of token ids")
        options = self._options(body, tokens, default_max=16)
        return await self._respond(request, options, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        body = await read_json(request, self.max_body)
        messages = normalise_messages(body.get("messages"))
        tokens = await asyncio.to_thread(self._chat_tokens, messages)
        options = self._options(body, tokens, default_max=self.engine.n_ctx)
        return await self._respond(request, options, chat=True)

    def _chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        size = sum(len(m.get("content") or "") for m in messages)
        if size > self.max_prompt_chars:
            raise ContextLengthExceeded(
                f"the messages have {size} characters, more than a context of {self.engine.n_ctx} "
                "tokens can hold: shorten them"
            )
        return self.formatter.tokens(messages)

    async def _respond(self, request: Request, options: GenerationOptions, chat: bool) -> Response:
        shape = ReplyShape(chat, self.model_name)
        handle, events = self._start(options)
        if options.stream:
            return EventSourceResponse(self._stream(options, handle, events, shape), ping=15)
        # Not streamed: nothing is written until the end, so only the connection says the client
        # left; without this a chat (max_tokens defaults to the whole context) would run on.
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, handle))
        outcome: list[Outcome] = []
        text, tokens = [], []
        try:
            async for delta in self._drain(options, handle, events, outcome):
                text.append(delta.text)
                tokens.extend(delta.tokens)
        finally:
            watcher.cancel()
        if not outcome:
            raise EngineError("the generation ended without an outcome")
        done = outcome[0]
        returned = tokens if options.return_tokens else None
        return JSONResponse(shape.body("".join(text), done.finish_reason, done.usage(), returned))

    async def _stream(
        self,
        options: GenerationOptions,
        handle: Generation,
        events: asyncio.Queue[GenerationEvent],
        shape: ReplyShape,
    ) -> AsyncIterator[str]:
        outcome: list[Outcome] = []

        def returned(tokens: list[int]) -> list[int] | None:
            return tokens if options.return_tokens else None

        try:
            if shape.chat:
                yield json.dumps(shape.chunk("", role=True, tokens=returned([])))
            async for delta in self._drain(options, handle, events, outcome):
                yield json.dumps(shape.chunk(delta.text, tokens=returned(delta.tokens)))
            done = outcome[0]
            # The engine's last chunk always carries usage (the proxy reads it; OpenAI clients ignore it).
            final = shape.chunk(
                None, done.finish_reason, tokens=returned([]), with_usage=True, usage=done.usage()
            )
            yield json.dumps(final)
            yield "[DONE]"
        except OpenAIError as exc:
            yield json.dumps(exc.to_json())


def create_app(
    engine: Engine,
    model_name: str,
    monitor: PoolMonitor | None = None,
    token: str | None = None,
    formatter: ChatFormatter | None = None,
    max_body: int = DEFAULT_MAX_BODY,
) -> Starlette:
    api = Api(engine, model_name, monitor, formatter, token=token, max_body=max_body)
    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route(HEALTH_PATH, api.health_detail, methods=["GET"]),
        Route("/ready", api.ready, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route(VERIFY_PATH, api.verify, methods=["POST"]),
        Route(STATS_PATH, api.stats, methods=["GET"]),
        Route("/tokenize", api.tokenize, methods=["POST"]),
        Route("/detokenize", api.detokenize, methods=["POST"]),
    ]
    return http.app(routes, token=token, open_paths=OPEN_PATHS)
