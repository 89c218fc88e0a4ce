"""Chat messages -> prompt tokens, with the model's own chat template.

The template is the Jinja source stored in the GGUF (`tokenizer.chat_template`), rendered with
jinja2 the way Hugging Face renders it (sandboxed, trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, `strftime_now`, `bos_token`/`eos_token` as the vocabulary spells them). A GGUF
without one (the Gemma 3 270M build here has none) falls back to llama.cpp's built-in template named
after the model architecture ("gemma3" -> "gemma"), when llama.cpp has one.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tightwad import tools as tool_calls
from tightwad.engine import libllama
from tightwad.engine.errors import BadRequest


def message_text(content: Any, where: str) -> str:
    """OpenAI message content: a string, null, or a list of parts of which text parts are used."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise BadRequest(f"{where}.content[{i}] is not a text part; this engine reads text only")
            texts.append(part["text"])
        return "".join(texts)
    raise BadRequest(f"{where}.content must be a string or a list of text parts")


def normalise_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI messages as chat templates take them: text content; an assistant's `tool_calls` (their
    JSON arguments parsed, as Hugging Face templates expect) and a tool reply's `tool_call_id`/`name`."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty list")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string `role`")
        entry: dict[str, Any] = {
            "role": message["role"],
            "content": message_text(message.get("content"), f"messages[{i}]"),
        }
        calls = message.get("tool_calls")
        if calls:
            entry["tool_calls"] = _tool_calls(calls, f"messages[{i}].tool_calls")
        for key in ("tool_call_id", "name"):
            if isinstance(message.get(key), str):
                entry[key] = message[key]
        out.append(entry)
    return out


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise BadRequest(f"`{where}` must be a list of tool calls", param=where)
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest(f"`{where}[{j}]` must have a `function` with a string `name`", param=where)
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            with contextlib.suppress(ValueError):  # not JSON: the template gets the text as sent
                arguments = json.loads(arguments or "{}")
        out.append({**call, "function": {"name": function["name"], "arguments": arguments}})
    return out


class ChatFormatter:
    """Renders messages with the model's template and tokenizes the result."""

    def __init__(self, model: libllama.Model, template: str | None = None) -> None:
        """`template`: Jinja source to use instead of the GGUF's own."""
        self.model = model
        self.bos_text = model.token_text(model.bos) if model.bos >= 0 else ""
        self.eos_text = model.token_text(model.eos) if model.eos >= 0 else ""
        self.source = template or model.chat_template()
        self.builtin: str | None = None
        self._template: jinja2.Template | None = None
        # How the template teaches the model to call tools (tightwad.tools), or None: no tools.
        self.tool_family = tool_calls.family_of(self.source)
        if self.source:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
            )
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = _tojson  # as Hugging Face renders it (jinja2's escapes HTML)
            self._template = env.from_string(self.source)
        else:
            self.builtin = self._find_builtin()

    @property
    def available(self) -> bool:
        return self._template is not None or self.builtin is not None

    def describe(self) -> str:
        if self._template is not None:
            return "GGUF tokenizer.chat_template"
        return f"llama.cpp built-in {self.builtin!r}" if self.builtin else "none"

    def _find_builtin(self) -> str | None:
        arch = self.model.metadata("general.architecture") or ""
        probe = [("user", "hi")]
        for name in dict.fromkeys([arch, re.sub(r"\d+$", "", arch)]):
            if name and libllama.builtin_chat_template(name, probe, True) is not None:
                return name
        return None

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        if tools and self.tool_family is None:
            raise tool_calls.unsupported()
        if self._template is not None:
            try:
                return self._template.render(
                    messages=list(messages),
                    bos_token=self.bos_text,
                    eos_token=self.eos_text,
                    add_generation_prompt=add_generation_prompt,
                    tools=tools or None,
                )
            except jinja2.TemplateError as exc:
                raise BadRequest(f"the model's chat template rejected these messages: {exc}") from exc
        if self.builtin is not None:
            pairs = [(str(m["role"]), str(m["content"])) for m in messages]
            text = libllama.builtin_chat_template(self.builtin, pairs, add_generation_prompt)
            if text is None:
                raise BadRequest(f"llama.cpp's {self.builtin!r} template rejected these messages")
            return text
        raise BadRequest(
            "this model's GGUF has no chat template and llama.cpp has no built-in one for it: "
            "use /v1/completions with a prompt you format yourself"
        )

    def tokens(
        self, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Prompt tokens for a chat: rendered (with `tools` when given), then tokenized with special
        tokens parsed. A BOS the template wrote is dropped when the tokenizer adds one itself."""
        text = self.render(messages, tools=tools)
        if self.model.adds_bos and self.bos_text and text.startswith(self.bos_text):
            text = text[len(self.bos_text) :]
        return self.model.tokenize(text, add_special=True, parse_special=True)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)
