"""Chat messages -> prompt tokens, with the model's own chat template.

The template is the Jinja source stored in the GGUF (`tokenizer.chat_template`), rendered with
jinja2 the way Hugging Face renders it (sandboxed, trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, `strftime_now`, `bos_token`/`eos_token` as the vocabulary spells them). A GGUF
without one (the Gemma 3 270M build here has none) falls back to llama.cpp's built-in template named
after the model architecture ("gemma3" -> "gemma"), when llama.cpp has one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

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


def normalise_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string `role`")
        out.append(
            {"role": message["role"], "content": message_text(message.get("content"), f"messages[{i}]")}
        )
    return out


class ChatFormatter:
    """Renders messages with the model's template and tokenizes the result."""

    def __init__(self, model: libllama.Model) -> None:
        self.model = model
        self.bos_text = model.token_text(model.bos) if model.bos >= 0 else ""
        self.eos_text = model.token_text(model.eos) if model.eos >= 0 else ""
        self.source = model.chat_template()
        self.builtin: str | None = None
        self._template: jinja2.Template | None = None
        if self.source:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
            )
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
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

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self._template is not None:
            try:
                return self._template.render(
                    messages=list(messages),
                    bos_token=self.bos_text,
                    eos_token=self.eos_text,
                    add_generation_prompt=add_generation_prompt,
                    tools=None,
                )
            except jinja2.TemplateError as exc:
                raise BadRequest(f"the model's chat template rejected these messages: {exc}") from exc
        if self.builtin is not None:
            pairs = [(m["role"], m["content"]) for m in messages]
            text = libllama.builtin_chat_template(self.builtin, pairs, add_generation_prompt)
            if text is None:
                raise BadRequest(f"llama.cpp's {self.builtin!r} template rejected these messages")
            return text
        raise BadRequest(
            "this model's GGUF has no chat template and llama.cpp has no built-in one for it: "
            "use /v1/completions with a prompt you format yourself"
        )

    def tokens(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Prompt tokens for a chat: rendered, then tokenized with special tokens parsed. A BOS the
        template wrote is dropped when the tokenizer adds one itself (never two)."""
        text = self.render(messages)
        if self.model.adds_bos and self.bos_text and text.startswith(self.bos_text):
            text = text[len(self.bos_text) :]
        return self.model.tokenize(text, add_special=True, parse_special=True)


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)
