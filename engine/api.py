"""The engine's HTTP API (Starlette): OpenAI-compatible endpoints plus the versioned verify API.

  GET  /health                 200 with per-worker status; 503 naming a dead rpc worker
  GET  /ready                  200 once the model serves, 503 otherwise
  GET  /v1/models
  POST /v1/completions         prompt (text or token ids), streaming SSE, stop, sampling, max_tokens
  POST /v1/chat/completions    the model's own chat template; same options
  POST /tightwad/v1/verify     {conversation, tokens, reset?, drafts: [{tokens, probs?}], sampling?}
                               -> {accepted, tokens, draft_index, accepted_per_draft, n_past, eog, pieces}
  GET  /tightwad/v1/stats      counters (decodes, requests per decode, acceptance)
  POST /tokenize               {content, add_special?, parse_special?, with_pieces?} -> {tokens, pieces?}
  POST /detokenize             {tokens, special?} -> {content, pieces}; `pieces` are base64 bytes per
                               token, so a client can join them without splitting a UTF-8 character

The verify API (version 1). `tokens` are the conversation's tokens since the last call (usually none:
the engine already holds what it returned), or its whole token list on the first call or with
`reset: true` (the engine keeps the longest common prefix it holds). Each draft continues the
conversation; `probs` (optional) is one row per draft token, either a dense list of n_vocab floats or
{"ids": [...], "p": [...]} (zero elsewhere). `sampling` is {temperature, top_k, top_p, seed}, greedy
when absent; `seed` seeds the conversation's random stream when it starts or resets, and later calls
continue that stream. The reply's `tokens` are the accepted draft tokens then the next token;
`n_past` is how many of the conversation's tokens are now in the KV (all but that last one); `pieces`
are the reply tokens' bytes, base64. A conversation this engine does not hold (evicted to make
room, or the engine is new) answers 409 `conversation_evicted` unless the call has `reset: true`:
the first call of every conversation sends its whole token list with `reset: true`.

Extensions to the OpenAI request bodies: `top_k`, `ignore_eos`, `return_tokens` (the generated token
ids in each choice). Options that would silently change the output (penalties, logit_bias, logprobs,
tools, n > 1) are refused with 400. Errors are always {"error": {"message", "type", "code"}} with a
real status; a stream that fails after it started ends with one `data: {"error": ...}` event.
With a token configured every route but /health and /ready needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tightwad.auth import BearerAuth
from tightwad.engine.chat import ChatFormatter, normalise_messages
from tightwad.engine.core import Draft, Engine, ErrorEvent, FinishEvent, Generation, GenerationEvent
from tightwad.engine.errors import BadRequest, EngineError, PoolFailure
from tightwad.engine.textstream import TextAssembler
from tightwad.engine.verify import SamplingParams
from tightwad.engine.workers import PoolMonitor, describe_loss

VERIFY_API_VERSION = 1
OPEN_PATHS = ("/health", "/ready")


def error_response(status: int, message: str, type_: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": code}}, status_code=status)


def engine_error_response(exc: EngineError) -> JSONResponse:
    return JSONResponse(exc.to_json(), status_code=exc.status)


# request parsing -------------------------------------------------------------------------------
def _get(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and kind is not bool:
        raise BadRequest(f"`{key}` must be {getattr(kind, '__name__', kind)}, not a boolean")
    if not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BadRequest(f"`{key}` must be {name}, got {type(value).__name__}")
    return value


def parse_sampling(body: dict[str, Any], default_temperature: float) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=_get(body, "temperature", float, default_temperature),
            top_k=_get(body, "top_k", int, 0),
            top_p=_get(body, "top_p", float, 1.0),
            seed=_get(body, "seed", int, None),
        )
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc


def parse_stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return [s for s in stop if s]
    raise BadRequest("`stop` must be a string or a list of strings")


def parse_token_list(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise BadRequest(f"`{where}` must be a list of token ids (integers)")
    return value


async def read_json(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass
class GenerationOptions:
    prompt: list[int]
    sampling: SamplingParams
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
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class Api:
    """The routes, bound to one engine."""

    def __init__(
        self,
        engine: Engine,
        model_name: str,
        monitor: PoolMonitor | None = None,
        formatter: ChatFormatter | None = None,
    ) -> None:
        self.engine = engine
        self.model = engine.model
        self.model_name = model_name
        self.monitor = monitor
        self.formatter = formatter if formatter is not None else ChatFormatter(engine.model)
        self.created = int(time.time())

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

    async def health(self, request: Request) -> Response:
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
            "verify_api": VERIFY_API_VERSION,
        }
        entry = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "tightwad"}
        return JSONResponse({"object": "list", "data": [{**entry, "meta": meta}]})

    async def stats(self, request: Request) -> Response:
        return JSONResponse(self.engine.snapshot())

    # tokens -----------------------------------------------------------------------------------
    async def tokenize(self, request: Request) -> Response:
        body = await read_json(request)
        if body.get("messages") is not None:
            # A chat rendered with the model's own template, exactly as /v1/chat/completions would:
            # what the proxy needs to speculate on chat requests.
            tokens = self.formatter.tokens(normalise_messages(body["messages"]))
        else:
            content = _get(body, "content", str, None)
            if content is None:
                raise BadRequest("`content` (a string) or `messages` (a chat) is required")
            tokens = self.model.tokenize(
                content,
                add_special=_get(body, "add_special", bool, False),
                parse_special=_get(body, "parse_special", bool, True),
            )
        out: dict[str, Any] = {"tokens": tokens}
        if _get(body, "with_pieces", bool, False):
            out["pieces"] = [b64(self.model.token_bytes(t)) for t in tokens]
        return JSONResponse(out)

    async def detokenize(self, request: Request) -> Response:
        body = await read_json(request)
        tokens = parse_token_list(body.get("tokens"), "tokens")
        self.engine.check_tokens(tokens, "tokens")
        special = _get(body, "special", bool, False)
        pieces = [self.model.token_bytes(t, special) for t in tokens]
        return JSONResponse(
            {"content": b"".join(pieces).decode("utf-8", "replace"), "pieces": [b64(p) for p in pieces]}
        )

    # verify -----------------------------------------------------------------------------------
    def _parse_probs(self, value: Any, n_tokens: int, where: str) -> np.ndarray | None:
        if value is None:
            return None
        if not isinstance(value, list) or len(value) != n_tokens:
            raise BadRequest(f"`{where}` must be a list of {n_tokens} rows, one per draft token")
        n_vocab = self.model.n_vocab
        probs = np.zeros((n_tokens, n_vocab), dtype=np.float64)
        for i, row in enumerate(value):
            if isinstance(row, list):
                if len(row) != n_vocab:
                    raise BadRequest(f"`{where}[{i}]` has {len(row)} entries; a dense row needs {n_vocab}")
                probs[i] = np.asarray(row, dtype=np.float64)
            elif (
                isinstance(row, dict) and isinstance(row.get("ids"), list) and isinstance(row.get("p"), list)
            ):
                ids, p = row["ids"], row["p"]
                if len(ids) != len(p) or not all(isinstance(t, int) and 0 <= t < n_vocab for t in ids):
                    raise BadRequest(f"`{where}[{i}]` needs `ids` (token ids) and `p` of the same length")
                probs[i, ids] = np.asarray(p, dtype=np.float64)
            else:
                raise BadRequest(f"`{where}[{i}]` must be a list of {n_vocab} floats or {{ids, p}}")
            total = probs[i].sum()
            if not (np.isfinite(total) and total > 0 and (probs[i] >= 0).all()):
                raise BadRequest(f"`{where}[{i}]` must be non-negative with a positive sum")
            probs[i] /= total
        return probs

    async def verify(self, request: Request) -> Response:
        body = await read_json(request)
        conversation = _get(body, "conversation", str, "")
        tokens = parse_token_list(body.get("tokens", []), "tokens")
        reset = _get(body, "reset", bool, False)
        sampling_body = _get(body, "sampling", dict, {})
        sampling = parse_sampling(sampling_body, default_temperature=0.0)
        raw_drafts = _get(body, "drafts", list, [])
        drafts = []
        for i, raw in enumerate(raw_drafts):
            if not isinstance(raw, dict):
                raise BadRequest(f"drafts[{i}] must be an object with `tokens`")
            draft_tokens = parse_token_list(raw.get("tokens", []), f"drafts[{i}].tokens")
            probs = self._parse_probs(raw.get("probs"), len(draft_tokens), f"drafts[{i}].probs")
            drafts.append(Draft(tuple(draft_tokens), probs))
        self.refuse_if_unhealthy()
        future = self.engine.verify(conversation, tokens, drafts, sampling, reset=reset)
        result = await asyncio.wrap_future(future)
        return JSONResponse(
            {
                "object": "tightwad.verify",
                "version": VERIFY_API_VERSION,
                "accepted": result.n_accepted,
                "tokens": result.tokens,
                "draft_index": result.draft_index,
                "accepted_per_draft": result.accepted_per_draft,
                "n_past": result.n_past,
                "eog": result.eog,
                "pieces": [b64(self.model.token_bytes(t)) for t in result.tokens],
            }
        )

    # generation -------------------------------------------------------------------------------
    def _options(self, body: dict[str, Any], prompt: list[int], default_max: int) -> GenerationOptions:
        if _get(body, "n", int, 1) != 1:
            raise BadRequest("only n = 1 is supported")
        # Options that would change the output if silently ignored are refused instead.
        for key in ("presence_penalty", "frequency_penalty"):
            if _get(body, key, float, 0.0) != 0.0:
                raise BadRequest(f"`{key}` is not supported by this engine; leave it at 0")
        for key in ("logit_bias", "tools", "functions", "logprobs", "top_logprobs", "echo", "suffix"):
            if body.get(key) not in (None, False, 0, {}, [], ""):
                raise BadRequest(f"`{key}` is not supported by this engine")
        max_tokens = _get(body, "max_tokens", int, None)
        if max_tokens is None:
            max_tokens = _get(body, "max_completion_tokens", int, default_max)
        if max_tokens < 1:
            raise BadRequest("`max_tokens` must be >= 1")
        return GenerationOptions(
            prompt=prompt,
            sampling=parse_sampling(body, default_temperature=1.0),
            max_tokens=max_tokens,
            stops=parse_stops(body),
            stream=_get(body, "stream", bool, False),
            return_tokens=_get(body, "return_tokens", bool, False),
            ignore_eos=_get(body, "ignore_eos", bool, False),
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
        body = await read_json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            tokens = self.model.tokenize(prompt, add_special=True, parse_special=True)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            tokens = prompt
        else:
            raise BadRequest("`prompt` must be a string, or a non-empty list of token ids")
        options = self._options(body, tokens, default_max=16)
        return await self._respond(options, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        body = await read_json(request)
        messages = normalise_messages(body.get("messages"))
        tokens = self.formatter.tokens(messages)
        options = self._options(body, tokens, default_max=self.engine.n_ctx)
        return await self._respond(options, chat=True)

    async def _respond(self, options: GenerationOptions, chat: bool) -> Response:
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        base = {"id": ident, "created": created, "model": self.model_name}
        handle, events = self._start(options)
        if options.stream:
            return EventSourceResponse(self._stream(options, handle, events, chat, base), ping=15)
        outcome: list[Outcome] = []
        text, tokens = [], []
        async for delta in self._drain(options, handle, events, outcome):
            text.append(delta.text)
            tokens.extend(delta.tokens)
        done = outcome[0]
        choice: dict[str, Any] = {"index": 0, "finish_reason": done.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": "".join(text)}
        else:
            choice.update({"text": "".join(text), "logprobs": None})
        if options.return_tokens:
            choice["tokens"] = tokens
        return JSONResponse({**base, "object": obj, "choices": [choice], "usage": done.usage()})

    async def _stream(
        self,
        options: GenerationOptions,
        handle: Generation,
        events: asyncio.Queue[GenerationEvent],
        chat: bool,
        base: dict[str, Any],
    ) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        outcome: list[Outcome] = []

        def chunk(text: str | None, tokens: list[int], finish: str | None, role: bool = False) -> str:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice["delta"] = delta
            else:
                choice.update({"text": text or "", "logprobs": None})
            if options.return_tokens:
                choice["tokens"] = tokens
            return json.dumps({**base, "object": obj, "choices": [choice]})

        try:
            if chat:
                yield chunk("", [], None, role=True)
            async for delta in self._drain(options, handle, events, outcome):
                yield chunk(delta.text, delta.tokens, None)
            done = outcome[0]
            final = json.loads(chunk(None, [], done.finish_reason))
            final["usage"] = done.usage()
            yield json.dumps(final)
            yield "[DONE]"
        except EngineError as exc:
            yield json.dumps(exc.to_json())


async def _on_engine_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EngineError)
    return engine_error_response(exc)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(exc.status_code, message, type_, code)


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    return error_response(
        500, f"internal error: {type(exc).__name__}: {exc}", "server_error", "internal_error"
    )


def _unauthorized() -> Response:
    message = "missing or wrong bearer token: send `Authorization: Bearer <token>`"
    return error_response(401, message, "invalid_request_error", "invalid_api_key")


def create_app(
    engine: Engine,
    model_name: str,
    monitor: PoolMonitor | None = None,
    token: str | None = None,
    formatter: ChatFormatter | None = None,
) -> Starlette:
    api = Api(engine, model_name, monitor, formatter)
    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/ready", api.ready, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route(f"/tightwad/v{VERIFY_API_VERSION}/verify", api.verify, methods=["POST"]),
        Route(f"/tightwad/v{VERIFY_API_VERSION}/stats", api.stats, methods=["GET"]),
        Route("/tokenize", api.tokenize, methods=["POST"]),
        Route("/detokenize", api.detokenize, methods=["POST"]),
    ]
    middleware = (
        [Middleware(BearerAuth, token=token, open_paths=OPEN_PATHS, rejection=_unauthorized)] if token else []
    )
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            EngineError: _on_engine_error,
            HTTPException: _on_http_error,
            Exception: _on_unexpected,
        },
    )
