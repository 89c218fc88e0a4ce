"""Parsing OpenAI request bodies: what the speculation loop needs, or why it cannot serve them.

Speculation serves one choice of plain text from a prompt or chat messages, greedy or sampled with
temperature / top_p / top_k / seed, with stop sequences and max_tokens, and chats with tools
(tightwad.tools.ToolPlan, shared with the engine's own chat route). Anything else the engine
honours (n > 1, several prompts, ...) would change the output if it were ignored, so such requests
go to the engine unchanged (`passthrough_reason`). What neither serves is refused before that, by
the one parameter table (tightwad.openai.PARAMS, `check_params`).

Pure but for `read_body`, which reads the body off the connection under the proxy's size limit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from tightwad import tools
from tightwad.http import read_limited
from tightwad.logprobs import requested
from tightwad.openai import PARAMS, InvalidRequest, constraint_of, is_neutral, passthrough_keys
from tightwad.verify_api import Sampling, sampling_error, shaping_fields

_PASSTHROUGH_KEYS = passthrough_keys()
MAX_STOPS = 16


@dataclass(frozen=True)
class Params:
    sampling: Sampling
    max_tokens: int | None  # None: until the end of generation or the context
    stops: list[str]
    stream: bool
    include_usage: bool
    return_tokens: bool
    model: str | None
    logprobs: int | None = None  # None: none; n: each token's logprob and n alternatives (tightwad.logprobs)
    grammar: dict[str, Any] | None = None  # a decoding constraint (tightwad.openai.constraint_of)


async def read_body(request: Request, limit: int) -> tuple[bytes, dict[str, Any]]:
    """The raw body (passthrough sends it on unchanged) and its JSON object. Refused once it is
    over `limit` bytes, by its declared length or while it arrives, so a huge body is never held."""
    raw = await read_limited(request, limit, "this proxy")
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise InvalidRequest(f"the request body is not valid JSON ({exc})") from exc
    except RecursionError:  # `[[[[...` thousands deep: the parser's stack, not a server fault
        raise InvalidRequest("the request body nests arrays or objects too deeply; flatten it") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return raw, body


def passthrough_reason(body: dict[str, Any]) -> str | None:
    """Why the speculation loop cannot serve `body` (the engine then serves it), or None. Which
    parameters the loop serves is the `speculated` column of tightwad.openai.PARAMS."""
    for key in _PASSTHROUGH_KEYS:
        if key in body and not is_neutral(PARAMS[key], body[key]):
            return "n > 1" if key == "n" else key
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) and len(prompt) > 1:
        return "several prompts"
    return None


def tool_family(models_body: Any) -> str | None:
    """The tool-call family an engine's `/v1/models` names (`meta.tools`), or None."""
    data = models_body.get("data") if isinstance(models_body, dict) else None
    meta = data[0].get("meta") if isinstance(data, list) and data and isinstance(data[0], dict) else None
    family = meta.get("tools") if isinstance(meta, dict) else None
    return family if family in tools.FAMILIES else None


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"`{key}` must be a number")
    if not low <= value <= high:
        raise InvalidRequest(f"`{key}` must be between {low:g} and {high:g}, got {value}")
    return float(value)


def _integer(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"`{key}` must be an integer, got {json.dumps(value)[:40]}", param=key)
    return value


TOKEN_COUNT_FIELDS = ("max_tokens", "max_completion_tokens")  # OpenAI's old name and its new one


def token_counts(body: dict[str, Any], limit: int | None) -> dict[str, int]:
    """The token counts a request asks for, by field name, each a whole number from 1 to `limit`
    (0 too with `echo`: the prompt alone, scored). Both names are checked: a limit that only knew
    one would be bypassed by the other."""
    counts: dict[str, int] = {}
    least = 0 if body.get("echo") is True else 1
    for key in TOKEN_COUNT_FIELDS:
        value = _integer(body, key)
        if value is None:
            continue
        if value < least:
            raise InvalidRequest(
                f"`{key}` must be at least 1 (0 only with `echo: true`), got {value}", param=key
            )
        if limit is not None and value > limit:
            raise InvalidRequest(
                f"`{key}` is {value} but this proxy allows at most {limit} (spec.proxy.limits.maxTokens)",
                param=key,
            )
        counts[key] = value
    return counts


def parse_params(
    body: dict[str, Any], max_tokens_limit: int | None, default_max_tokens: int | None
) -> Params:
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0:
        raise InvalidRequest("`top_p` must be greater than 0")
    top_k = _integer(body, "top_k") or 0
    if top_k < 0:
        raise InvalidRequest("`top_k` must be >= 0")
    counts = token_counts(body, max_tokens_limit)
    max_tokens = counts.get("max_tokens", counts.get("max_completion_tokens"))
    if max_tokens is None:
        max_tokens = default_max_tokens
        if max_tokens_limit is not None:
            max_tokens = min(max_tokens or max_tokens_limit, max_tokens_limit)
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise InvalidRequest("`stop` must be a string or a list of strings")
    if len(stops) > MAX_STOPS:
        raise InvalidRequest(f"at most {MAX_STOPS} stop sequences")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("`stream` must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidRequest("`stream_options` must be an object")
    model = body.get("model")
    seed = _integer(body, "seed")
    try:  # penalties and logit_bias: checked by Sampling, the 400 names the field
        sampling = Sampling(
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, **shaping_fields(body)
        )
    except ValueError as exc:
        raise sampling_error(exc) from exc
    return Params(
        sampling=sampling,
        logprobs=requested(body, chat=body.get("messages") is not None),
        max_tokens=max_tokens,
        stops=[s for s in stops if s],
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        return_tokens=bool(body.get("return_tokens")),
        model=model if isinstance(model, str) else None,
        grammar=constraint_of(body),
    )


def parse_prompt(body: dict[str, Any]) -> str | list[int]:
    """A /v1/completions prompt: a string, a list of one string, or a list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return list(prompt)
    raise InvalidRequest("`prompt` must be a string, or a non-empty list of token ids")


def parse_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("`messages` must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"messages[{i}] must be an object with a string `role`")
    return messages
