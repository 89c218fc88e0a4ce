"""The proxy's HTTP API (Starlette): the OpenAI endpoints apps talk to, on :8088.

  GET  /health, /ready          open (no token): the proxy, and whether the engine answers
  GET  /v1/models               the engine's model, with the proxy's mode in `meta.proxy`
                                (mode consensus is APPROXIMATE: `exact: false`, `approximate: consensus`)
  POST /v1/completions          speculative when it can be (see request_parsing.py), else passed through
  POST /v1/chat/completions     the same; chat prompts need the engine's template (see upstream.py)
  POST /tightwad/v1/gate/chat/completions   the quality gate (gate.py), when configured
  GET  /tightwad/v1/stats       live numbers for `tightwad proxy status`
  GET  /metrics                 Prometheus

Errors are OpenAI-shaped with a real status before the first byte of a reply; a streamed reply that
breaks later ends with one `data: {"error": ...}` event. Replies generated in mode consensus carry
the header `X-Tightwad-Approximate: consensus` (some tokens were never checked by the target). With
a token configured every route but /health and /ready needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tightwad.auth import BearerAuth
from tightwad.openai import (
    InvalidRequest,
    OpenAIError,
    PayloadTooLarge,
    Unauthorized,
    error_body,
    new_id,
    now,
    usage,
)
from tightwad.proxy.config import DrafterConfig, ProxyConfig
from tightwad.proxy.conversations import ConversationPool
from tightwad.proxy.dashboard import DASHBOARD_HTML, live_stats
from tightwad.proxy.detok import Vocabulary
from tightwad.proxy.drafters.base import Drafter
from tightwad.proxy.drafters.guard import GuardedDrafter
from tightwad.proxy.drafters.llama_server import LlamaServerDrafter
from tightwad.proxy.drafters.ngram import NgramDrafter
from tightwad.proxy.drafters.race import RaceDrafter
from tightwad.proxy.drafters.text import OllamaDrafter, OpenAIDrafter
from tightwad.proxy.gate import Endpoint, Gate
from tightwad.proxy.kpolicy.controller import KController, KPolicy
from tightwad.proxy.kpolicy.costmodel import Costs
from tightwad.proxy.replies import ReplyDelta, TextReply
from tightwad.proxy.request_parsing import (
    Params,
    parse_messages,
    parse_params,
    parse_prompt,
    passthrough_reason,
)
from tightwad.proxy.speculate import Job, SpeculationSettings, Speculator
from tightwad.proxy.telemetry import Telemetry
from tightwad.proxy.upstream import EngineClient, EngineInfo, EngineUnavailable

OPEN_PATHS = ("/health", "/ready", "/dashboard")  # /dashboard: a page with no data in it
RECENT_REQUESTS = 20
APPROXIMATE_HEADER = "X-Tightwad-Approximate"
SPECULATING_MODES = ("speculate", "race", "consensus")
GATE_PARAMS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed")
RTT_EVERY = 15.0  # seconds between round-trip probes of the engine


@dataclass
class Backend:
    """What the proxy learnt about the engine (reloaded when the engine changes)."""

    info: EngineInfo
    vocabulary: Vocabulary
    chat_tokens: bool  # the engine can render chat prompts to token ids for us
    eog_tokens: set[int]


def make_drafter(config: DrafterConfig, engine: EngineClient) -> Drafter:
    if config.kind == "llama-server":
        assert config.url
        return LlamaServerDrafter(config.url, name=config.name)
    if config.kind in ("openai", "ollama"):
        assert config.url
        cls = OpenAIDrafter if config.kind == "openai" else OllamaDrafter
        return cls(
            config.url, engine.tokenize, model=config.remote_model, api_key=config.api_key, name=config.name
        )
    return NgramDrafter(config.ngram_n, name=config.name)


class Proxy:
    """The routes, bound to one engine and one drafter."""

    def __init__(self, config: ProxyConfig, engine: EngineClient | None = None) -> None:
        self.config = config
        self.engine = engine or EngineClient(config.target_url, config.target_token)
        self.telemetry = Telemetry()
        self.backend: Backend | None = None
        self._loading = asyncio.Lock()
        self.speculator: Speculator | None = None
        self.controller: KController | None = None
        self.drafter: GuardedDrafter | RaceDrafter | None = None
        if config.mode in SPECULATING_MODES and config.drafters:
            if config.mode == "speculate":
                drafter = make_drafter(config.drafters[0], self.engine)
                self.drafter = GuardedDrafter(drafter, n_vocab=self._n_vocab)
                pipelined = config.pipeline and drafter.kind != "ngram"
            else:  # race / consensus: every drafter each round, verified in one pass (race.py)
                guards = [
                    GuardedDrafter(make_drafter(d, self.engine), n_vocab=self._n_vocab)
                    for d in config.drafters
                ]
                self.drafter = RaceDrafter(guards, costs=self._costs)
                pipelined = config.pipeline  # drafts the next round on the best-guess candidate
            self.controller = KController(KPolicy(fixed_k=config.max_draft_tokens, pipelined=pipelined))
            self.speculator = Speculator(
                self.engine,
                self.drafter,
                self.controller,
                ConversationPool(4),
                self.telemetry,
                SpeculationSettings(
                    pipeline=pipelined,
                    draft_timeout=config.draft_timeout,
                    consensus=config.consensus_policy if config.mode == "consensus" else None,
                ),
            )
        self._background: asyncio.Task[None] | None = None
        self.gate: Gate | None = None
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_REQUESTS)
        if config.gate is not None:
            g = config.gate
            self.gate = Gate(
                [Endpoint(a.name, a.url, a.model, a.api_key) for a in g.agents],
                Endpoint(g.reviewer.name, g.reviewer.url, g.reviewer.model, g.reviewer.api_key),
                fail_closed=g.fail_closed,
                cache_size=g.cache_size,
            )

    @property
    def approximate(self) -> bool:
        """Mode consensus: replies may hold tokens the target never checked."""
        return self.config.mode == "consensus" and self.speculator is not None

    def _costs(self) -> Costs | None:
        return self.controller.costs() if self.controller is not None else None

    def _n_vocab(self) -> int:
        return self.backend.info.n_vocab if self.backend else 0

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
                await self.ready_backend()
                rtt = await self.engine.ping()
                if self.controller is not None:
                    self.controller.record_rtt(rtt)
                await asyncio.sleep(RTT_EVERY)
            except OpenAIError:
                await asyncio.sleep(1.0)

    async def ready_backend(self) -> Backend:
        """The engine's model, context and vocabulary; loaded once, again after the engine changed."""
        if self.backend is not None:
            return self.backend
        async with self._loading:
            if self.backend is None:
                info = await self.engine.info()
                vocabulary = await self.engine.vocabulary(info.n_vocab)
                chat = await self.engine.chat_tokens([{"role": "user", "content": "hi"}]) is not None
                if self.speculator is not None:
                    parallel = (await self.engine.stats()).get("parallel")
                    if isinstance(parallel, int) and parallel > 0:
                        self.speculator.conversations = ConversationPool(parallel)
                self.backend = Backend(info, vocabulary, chat, set())
        return self.backend

    def _engine_failed(self, exc: OpenAIError) -> None:
        if isinstance(exc, EngineUnavailable):
            self.backend = None  # it may come back as another model: learn it again

    # open routes --------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        """Healthy when the engine is: reachable, serving, every rpc worker alive."""
        body: dict[str, Any] = {"status": "ok", "engine": self.engine.url}
        if self.drafter is not None:
            body["drafter"] = self.drafter.snapshot()
        try:
            backend = await self.ready_backend()
            body["model"] = backend.info.model
            body["workers"] = (await self.engine.health()).get("workers", [])
        except OpenAIError as exc:
            self._engine_failed(exc)
            return JSONResponse({**body, "status": "error", **exc.to_json()}, status_code=503)
        return JSONResponse(body)

    async def ready(self, request: Request) -> Response:
        try:
            await self.ready_backend()
            await self.engine.health()
        except OpenAIError as exc:
            self._engine_failed(exc)
            return JSONResponse({"ready": False, **exc.to_json()}, status_code=503)
        return JSONResponse({"ready": True})

    # information --------------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        backend = await self._backend()
        body = json.loads(json.dumps(backend.info.models_body))
        for entry in body.get("data", []):
            meta = entry.setdefault("meta", {})
            meta["proxy"] = {
                "mode": self.config.mode,
                "exact": not self.approximate,
                "drafter": self.drafter.kind if self.drafter else None,
                "chat_speculation": backend.chat_tokens,
            }
            if isinstance(self.drafter, RaceDrafter):
                meta["proxy"]["drafters"] = [d.name for d in self.drafter.drafters]
            if self.approximate:
                meta["proxy"]["approximate"] = "consensus"
                meta["proxy"]["consensus_policy"] = self.config.consensus_policy
        return JSONResponse(body)

    async def stats(self, request: Request) -> Response:
        return JSONResponse(self.stats_body())

    def stats_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "object": "tightwad.proxy.stats",
            "mode": self.config.mode,
            "engine": self.engine.url,
            "model": self.backend.info.model if self.backend else None,
            **self.telemetry.snapshot(),
        }
        if self.controller is not None and self.drafter is not None:
            body["policy"] = self.controller.snapshot()
            body["drafter"] = self.drafter.snapshot()
            measured, alone = body.get("tok_s"), body["policy"]["target_alone_tok_s"]
            body["speedup_measured"] = round(measured / alone, 3) if measured and alone else None
        if isinstance(self.drafter, RaceDrafter):
            body["race"] = self.drafter.board.snapshot()
        if self.gate is not None:
            body["gate"] = self.gate.snapshot()
        if self.approximate and self.speculator is not None:
            body["consensus"] = {
                "approximate": True,
                "policy": self.config.consensus_policy,
                "skipped_rounds": self.speculator.skipped_rounds,
                "skipped_tokens": self.speculator.skipped_tokens,
            }
        body["recent_requests"] = list(self.recent)
        return body

    async def dashboard(self, request: Request) -> Response:
        """The page only (no numbers in it): it asks for the token and reads /tightwad/v1/events."""
        return HTMLResponse(DASHBOARD_HTML)

    async def events(self, request: Request) -> Response:
        """Live stats for the dashboard (SSE, one event a second); needs the token like any route."""
        return EventSourceResponse(live_stats(self.stats_body, self._pool_health), ping=15)

    async def _pool_health(self) -> dict[str, Any]:
        try:
            return {"ok": True, "workers": (await self.engine.health()).get("workers", [])}
        except OpenAIError as exc:
            return {"ok": False, "error": str(exc)}

    async def metrics(self, request: Request) -> Response:
        if self.controller is not None:
            self.telemetry.policy(self.controller.last_choice.k, self.controller.acceptance.alpha)
        return Response(generate_latest(self.telemetry.registry), media_type=CONTENT_TYPE_LATEST)

    # generation ---------------------------------------------------------------------------------
    async def _backend(self) -> Backend:
        try:
            return await self.ready_backend()
        except OpenAIError as exc:
            self._engine_failed(exc)
            raise

    async def _body(self, request: Request) -> tuple[bytes, dict[str, Any]]:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"the request body is {declared} bytes; this proxy takes at most {limit}")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise PayloadTooLarge(
                    f"the request body is over {limit} bytes; this proxy takes at most {limit}"
                )
        try:
            body = json.loads(bytes(raw) or b"{}")
        except ValueError as exc:
            raise InvalidRequest(f"the request body is not valid JSON ({exc})") from exc
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        return bytes(raw), body

    async def completions(self, request: Request) -> Response:
        raw, body = await self._body(request)
        if self.speculator is None or passthrough_reason(body):
            return await self._pass(request, raw, "completions")
        backend = await self._backend()
        params = parse_params(body, self.config.max_tokens, default_max_tokens=16)
        prompt = parse_prompt(body)
        if isinstance(prompt, str):
            tokens = await self.engine.tokenize(prompt, add_special=True, parse_special=True)
        else:
            tokens = prompt
        return await self._generate(tokens, params, backend, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        raw, body = await self._body(request)
        if self.speculator is None or passthrough_reason(body):
            return await self._pass(request, raw, "chat")
        backend = await self._backend()
        if not backend.chat_tokens:
            # The engine cannot hand us the chat prompt's tokens: it serves the chat itself (exact,
            # just not sped up) until its API grows that (see upstream.EngineClient.chat_tokens).
            return await self._pass(request, raw, "chat")
        params = parse_params(body, self.config.max_tokens, default_max_tokens=None)
        tokens = await self.engine.chat_tokens(parse_messages(body))
        if tokens is None:
            return await self._pass(request, raw, "chat")  # the engine will say what is wrong
        return await self._generate(tokens, params, backend, chat=True)

    async def gate_chat(self, request: Request) -> Response:
        """The quality gate: an agent answers, the reviewer approves, corrects or rejects (gate.py).
        Same token and limits as every route; the final answer is streamed when asked for."""
        if self.gate is None:
            raise OpenAIError(
                "the quality gate is not configured: enable spec.gate in the manifest", status=404
            )
        _, body = await self._body(request)
        messages = parse_messages(body)
        params = {k: body[k] for k in GATE_PARAMS if body.get(k) is not None}
        limit = self.config.max_tokens
        if limit is not None and int(params.get("max_tokens", 0) or 0) > limit:
            raise InvalidRequest(f"`max_tokens` is over this proxy's limit of {limit}")
        self.telemetry.request("gate", "gate")
        self._remember("gate", "gate", len(messages), params.get("max_tokens"))
        try:
            answer = await self.gate.answer(messages, params)
        except OpenAIError as exc:
            self.telemetry.error(exc.code)
            raise
        meta = {"verdict": answer.verdict, "agent": answer.agent, "cached": answer.cached}
        headers = {"X-Tightwad-Gate-Verdict": answer.verdict}
        base = {"id": new_id("chatcmpl"), "created": now(), "model": "tightwad-gate", "tightwad_gate": meta}
        if body.get("stream"):

            async def events() -> AsyncIterator[str]:
                chunk = {**base, "object": "chat.completion.chunk"}
                yield json.dumps(
                    {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
                )
                for piece in _pieces(answer.text):
                    yield json.dumps({**chunk, "choices": [{"index": 0, "delta": {"content": piece}}]})
                yield json.dumps({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                yield "[DONE]"

            return EventSourceResponse(events(), ping=15, headers=headers)
        message = {"role": "assistant", "content": answer.text}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return JSONResponse({**base, "object": "chat.completion", "choices": [choice]}, headers=headers)

    async def _pass(self, request: Request, raw: bytes, route: str) -> Response:
        self.telemetry.request(route, "passthrough")
        self._remember(route, "passthrough", 0, None)
        try:
            head, chunks = await self.engine.forward(
                request.method, request.url.path, raw, dict(request.headers)
            )
        except OpenAIError as exc:
            self._engine_failed(exc)
            raise
        media = head.headers.get("content-type", "application/json")

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in chunks:
                    yield chunk
            except Exception as exc:  # the engine broke mid-reply: say so, never go silent
                if "event-stream" in media:
                    message = f"the engine stopped mid-reply: {type(exc).__name__}: {exc}"
                    event = json.dumps(error_body(message, "server_error", "engine_failed"))
                    yield f"data: {event}\n\n".encode()

        return StreamingResponse(relay(), status_code=head.status_code, media_type=media)

    async def _generate(self, prompt: list[int], params: Params, backend: Backend, chat: bool) -> Response:
        assert self.speculator is not None
        info = backend.info
        bad = next((t for t in prompt if not 0 <= t < info.n_vocab), None)
        if bad is not None:
            raise InvalidRequest(f"`prompt` holds {bad}, which is not a token id in [0, {info.n_vocab})")
        if len(prompt) + 1 > info.n_ctx:
            raise OpenAIError(
                f"the prompt has {len(prompt)} tokens but the context holds {info.n_ctx}",
                status=400,
                code="context_length_exceeded",
            )
        room = info.n_ctx - len(prompt)
        max_tokens = min(params.max_tokens or room, room)
        job = Job(prompt, params.sampling, max_tokens, info.n_ctx, backend.vocabulary)
        self.telemetry.request("chat" if chat else "completions", "speculate")
        self._remember("chat" if chat else "completions", self.config.mode, len(prompt), max_tokens)
        started = time.perf_counter()
        reply = TextReply(self.speculator.run(job), backend.vocabulary, params.stops, backend.eog_tokens)
        deltas = _Timed(reply.deltas(), self.telemetry, started)
        first = await self._first(deltas)  # errors before the first byte get a real status
        base = {"id": new_id("chatcmpl" if chat else "cmpl"), "created": now(), "model": info.model}
        if params.stream:
            events = self._events(first, deltas, reply, params, base, chat, len(prompt))
            return EventSourceResponse(events, ping=15, headers=self._mode_headers())
        texts, tokens = [], []
        delta: ReplyDelta | None = first
        try:
            while delta is not None:
                texts.append(delta.text)
                tokens.extend(delta.tokens)
                delta = await deltas.next()
        except OpenAIError as exc:
            self._fail(exc)
            raise
        choice: dict[str, Any] = {"index": 0, "finish_reason": reply.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": "".join(texts)}
        else:
            choice.update({"text": "".join(texts), "logprobs": None})
        if params.return_tokens:
            choice["tokens"] = tokens
        obj = "chat.completion" if chat else "text_completion"
        body = {
            **base,
            "object": obj,
            "choices": [choice],
            "usage": usage(len(prompt), reply.completion_tokens),
        }
        return JSONResponse(body, headers=self._mode_headers())

    def _remember(self, route: str, served: str, prompt: int, max_tokens: int | None) -> None:
        self.recent.appendleft(
            {
                "at": round(time.time(), 3),
                "route": route,
                "served": served,
                "prompt": prompt,
                "max_tokens": max_tokens,
            }
        )

    def _mode_headers(self) -> dict[str, str]:
        return {APPROXIMATE_HEADER: "consensus"} if self.approximate else {}

    async def _first(self, deltas: _Timed) -> ReplyDelta | None:
        try:
            return await deltas.next()
        except OpenAIError as exc:
            self._fail(exc)
            await deltas.close()
            raise

    def _fail(self, exc: OpenAIError) -> None:
        self._engine_failed(exc)
        self.telemetry.error(exc.code)

    async def _events(
        self,
        first: ReplyDelta | None,
        deltas: _Timed,
        reply: TextReply,
        params: Params,
        base: dict[str, Any],
        chat: bool,
        n_prompt: int,
    ) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: ReplyDelta | None, finish: str | None, role: bool = False) -> str:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if chat:
                body: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if delta is not None:
                    body["content"] = delta.text
                choice["delta"] = body
            else:
                choice.update({"text": delta.text if delta else "", "logprobs": None})
            if params.return_tokens:
                choice["tokens"] = delta.tokens if delta else []
            out = {**base, "object": obj, "choices": [choice]}
            if params.include_usage:
                out["usage"] = None
            return json.dumps(out)

        try:
            if chat:
                yield chunk(None, None, role=True)
            delta = first
            while delta is not None:
                yield chunk(delta, None)
                delta = await deltas.next()
            yield chunk(None, reply.finish_reason)
            if params.include_usage:
                yield json.dumps(
                    {**base, "object": obj, "choices": [], "usage": usage(n_prompt, reply.completion_tokens)}
                )
            yield "[DONE]"
        except OpenAIError as exc:
            self._fail(exc)
            yield json.dumps(exc.to_json())
        except Exception as exc:  # a bug must still end the stream with an error, not silence
            self.telemetry.error("internal_error")
            yield json.dumps(error_body(f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            await deltas.close()


def _pieces(text: str, size: int = 16) -> list[str]:
    """The reviewed answer in small pieces for streaming (it is whole before the first byte)."""
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


class _Timed:
    """Pulls deltas one at a time and records time to first token and gaps between tokens."""

    def __init__(self, deltas: AsyncIterator[ReplyDelta], telemetry: Telemetry, started: float) -> None:
        self.deltas = deltas
        self.telemetry = telemetry
        self.started = started
        self.first: float | None = None
        self.last = started
        self.tokens_after_first = 0

    async def next(self) -> ReplyDelta | None:
        try:
            delta = await anext(self.deltas)
        except StopAsyncIteration:
            if self.first is not None:
                self.telemetry.reply(self.tokens_after_first, self.last - self.first)
            return None
        now_ = time.perf_counter()
        n = len(delta.tokens)
        if n:
            if self.first is None:
                self.first = now_
                self.telemetry.first_token(now_ - self.started)
                self.tokens_after_first += n - 1
            else:
                self.telemetry.gap(now_ - self.last, n)
                self.tokens_after_first += n
            self.last = now_
        return delta

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.deltas.aclose()  # type: ignore[attr-defined]


async def _on_openai_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, OpenAIError)
    return JSONResponse(exc.to_json(), status_code=exc.status)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    body = error_body(f"{request.method} {request.url.path}: {exc.detail}", type_, code)
    return JSONResponse(body, status_code=exc.status_code)


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    body = error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error", "internal_error")
    return JSONResponse(body, status_code=500)


def _unauthorized() -> JSONResponse:
    error = Unauthorized("missing or wrong bearer token: send `Authorization: Bearer <token>`")
    return JSONResponse(error.to_json(), status_code=error.status)


def create_app(config: ProxyConfig, engine: EngineClient | None = None) -> Starlette:
    proxy = Proxy(config, engine)
    routes = [
        Route("/health", proxy.health, methods=["GET"]),
        Route("/ready", proxy.ready, methods=["GET"]),
        Route("/v1/models", proxy.models, methods=["GET"]),
        Route("/v1/completions", proxy.completions, methods=["POST"]),
        Route("/v1/chat/completions", proxy.chat_completions, methods=["POST"]),
        Route("/tightwad/v1/gate/chat/completions", proxy.gate_chat, methods=["POST"]),
        Route("/tightwad/v1/stats", proxy.stats, methods=["GET"]),
        Route("/tightwad/v1/events", proxy.events, methods=["GET"]),
        Route("/dashboard", proxy.dashboard, methods=["GET"]),
        Route("/metrics", proxy.metrics, methods=["GET"]),
    ]
    middleware = (
        [Middleware(BearerAuth, token=config.token, open_paths=OPEN_PATHS, rejection=_unauthorized)]
        if config.token
        else []
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await proxy.startup()
        yield
        await proxy.shutdown()

    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            OpenAIError: _on_openai_error,
            HTTPException: _on_http_error,
            Exception: _on_unexpected,
        },
    )
    app.state.proxy = proxy
    return app
