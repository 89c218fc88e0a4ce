"""POST /v1/completions and /v1/chat/completions: the speculative path.

A request the loop can serve (see ../request_parsing.py) becomes a prompt of token ids: the
completion prompt tokenized by the engine, or the chat messages rendered by the engine's chat
template. The speculation loop (../speculate.py) yields target tokens, `TextReply` (../replies.py)
turns them into text with stops and limits, and shaping.py writes the OpenAI body or stream.
Anything else, and chat with an engine that cannot render chat prompts, is passed through.

Errors before the first byte of a reply get a real status; a stream that breaks later ends with
one `data: {"error": ...}` event.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tightwad import tools
from tightwad.openai import (
    CHAT,
    COMPLETIONS,
    InvalidRequest,
    OpenAIError,
    check_model,
    check_params,
    constraint_of,
    error_body,
    served_names,
    serves_grammar,
)
from tightwad.proxy.replies import ReplyDelta, TextReply
from tightwad.proxy.request_parsing import (
    Params,
    parse_messages,
    parse_params,
    parse_prompt,
    passthrough_reason,
    read_body,
    tool_family,
)
from tightwad.proxy.routes.passthrough import pass_through
from tightwad.proxy.routes.shaping import ReplyShape
from tightwad.proxy.speculate import Job
from tightwad.proxy.state import EngineProfile, Proxy
from tightwad.proxy.telemetry import Telemetry


class GenerateRoutes:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def completions(self, request: Request) -> Response:
        proxy = self.proxy
        raw, body = await read_body(request, proxy.config.max_body_bytes)
        route = "completions"
        check_params(body, COMPLETIONS)  # refused here as the engine would: never ignored
        if proxy.speculator is None or passthrough_reason(body):
            return await pass_through(proxy, request, raw, body, "completions")
        profile = await proxy.engine_profile()
        check_model(body, served_names(profile.info.models_body))
        if constraint_of(body) is not None and not serves_grammar(profile.info.models_body):
            # An engine from before the verify API's `grammar` would ignore it: it serves alone.
            return await pass_through(proxy, request, raw, body, route)
        params = parse_params(body, proxy.config.max_tokens, default_max_tokens=16)
        prompt = parse_prompt(body)
        if isinstance(prompt, str):
            tokens = await proxy.engine.tokenize(prompt, add_special=True, parse_special=True)
        else:
            tokens = prompt
        return await self._generate(tokens, params, profile, chat=False, gone=request.is_disconnected)

    async def chat_completions(self, request: Request) -> Response:
        proxy = self.proxy
        raw, body = await read_body(request, proxy.config.max_body_bytes)
        route = "chat"
        check_params(body, CHAT)
        if proxy.speculator is None or passthrough_reason(body):
            return await pass_through(proxy, request, raw, body, "chat")
        profile = await proxy.engine_profile()
        models_body = profile.info.models_body
        check_model(body, served_names(models_body))
        plan = None
        if body.get("tools") or body.get("tool_choice") not in (None, "none", "auto"):
            if tools.engine_takes_tools(models_body) is None:
                # An engine from before tools says nothing about them: it answers for itself.
                return await pass_through(proxy, request, raw, body, route)
            # Checked here in the engine's own words; a template without tools is refused.
            plan = tools.ToolPlan.of(body, tool_family(models_body))
        grammar = constraint_of(body)
        if plan is not None and plan.grammar is not None:
            if grammar is not None:  # response_format and a required call: the engine's 400
                return await pass_through(proxy, request, raw, body, route)
            grammar = plan.grammar
        if grammar is not None and not serves_grammar(models_body):
            # An engine from before the verify API's `grammar` would ignore it: it serves alone.
            return await pass_through(proxy, request, raw, body, route)
        if not profile.chat_tokens:
            # An engine without the chat-template rendering (`/tokenize` with `messages`) serves
            # the chat itself: exact, just not sped up.
            return await pass_through(proxy, request, raw, body, "chat")
        params = replace(
            parse_params(body, proxy.config.max_tokens, default_max_tokens=None), grammar=grammar
        )
        # The prompt the engine's chat would read: its template, shown the tools (if any).
        tokens = await proxy.engine.chat_tokens(parse_messages(body), plan.tools if plan else None)
        if tokens is None:
            return await pass_through(proxy, request, raw, body, "chat")  # the engine will say what is wrong
        return await self._generate(
            tokens, params, profile, chat=True, plan=plan, gone=request.is_disconnected
        )

    async def _generate(
        self,
        prompt: list[int],
        params: Params,
        profile: EngineProfile,
        chat: bool,
        plan: tools.ToolPlan | None = None,
        gone: Callable[[], Awaitable[bool]] | None = None,  # a request waiting for a conversation asks
    ) -> Response:
        proxy = self.proxy
        assert proxy.speculator is not None
        info = profile.info
        bad = next((t for t in prompt if not 0 <= t < info.n_vocab), None)
        if bad is not None:
            raise InvalidRequest(f"`prompt` holds {bad}, which is not a token id in [0, {info.n_vocab})")
        if len(prompt) + 1 > info.n_ctx:
            raise InvalidRequest(
                f"the prompt has {len(prompt)} tokens but the context holds {info.n_ctx}: shorten it",
                code="context_length_exceeded",
                param="messages" if chat else "prompt",
            )
        room = info.n_ctx - len(prompt)
        max_tokens = min(params.max_tokens or room, room)
        sampling, vocabulary = params.sampling, profile.vocabulary
        job = Job(prompt, sampling, max_tokens, info.n_ctx, vocabulary, params.logprobs, params.grammar, gone)
        route = "chat" if chat else "completions"
        proxy.telemetry.request(route, "speculate")
        proxy.remember(route, proxy.config.mode, len(prompt), max_tokens)
        started = time.perf_counter()
        reply = TextReply(proxy.speculator.run(job), profile.vocabulary, params.stops, profile.eog_tokens)
        deltas = _Timed(reply.deltas(), proxy.telemetry, started)
        first = await self._first(deltas)  # errors before the first byte get a real status
        shape = ReplyShape.of(params, info.model, chat, profile.vocabulary.piece)
        if params.stream:
            events = self._events(first, deltas, reply, shape, len(prompt), plan)
            return EventSourceResponse(events, ping=15, headers=proxy.mode_headers())
        texts, tokens, entries = [], [], []
        delta: ReplyDelta | None = first
        try:
            while delta is not None:
                texts.append(delta.text)
                tokens.extend(delta.tokens)
                entries.extend(delta.logprobs or [])
                delta = await deltas.next()
        except OpenAIError as exc:
            proxy.reply_failed(exc)
            raise
        n_completion = reply.completion_tokens
        body = shape.body("".join(texts), tokens, reply.finish_reason, len(prompt), n_completion, entries)
        if plan is not None:
            plan.shape_message(body["choices"][0])  # the calls in the text, parsed as the engine does
        return JSONResponse(body, headers=proxy.mode_headers())

    async def _first(self, deltas: _Timed) -> ReplyDelta | None:
        try:
            return await deltas.next()
        except OpenAIError as exc:
            self.proxy.reply_failed(exc)
            await deltas.close()
            raise

    async def _events(
        self,
        first: ReplyDelta | None,
        deltas: _Timed,
        reply: TextReply,
        shape: ReplyShape,
        n_prompt: int,
        plan: tools.ToolPlan | None = None,
    ) -> AsyncIterator[str]:
        # With tools: text that may start a call is held back, the calls go out at the end.
        stream = plan.stream() if plan is not None else None
        try:
            if shape.chat:
                yield shape.chunk(None, None, role=True)
            delta = first
            while delta is not None:
                if stream is not None:
                    delta = replace(delta, text=stream.feed(delta.text))
                yield shape.chunk(delta, None)
                delta = await deltas.next()
            finish = reply.finish_reason
            if stream is not None and plan is not None:
                rest, calls = stream.finish()
                if rest:
                    yield shape.chunk(ReplyDelta(rest, []), None)
                if calls:
                    out = json.loads(shape.chunk(ReplyDelta("", []), None))
                    delta_out = out["choices"][0]["delta"]
                    delta_out.pop("content", None)
                    delta_out["tool_calls"] = plan.calls_json(calls)
                    yield json.dumps(out)
                    finish = "tool_calls"
            yield shape.chunk(None, finish)
            if shape.include_usage:
                yield shape.usage_chunk(n_prompt, reply.completion_tokens)
            yield "[DONE]"
        except OpenAIError as exc:
            self.proxy.reply_failed(exc)
            yield json.dumps(exc.to_json())
        except Exception as exc:  # a bug must still end the stream with an error, not silence
            self.proxy.telemetry.error("internal_error")
            yield json.dumps(error_body(f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            await deltas.close()


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
