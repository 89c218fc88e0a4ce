"""OpenAI tool calling, the pure parts: checking `tools` / `tool_choice`, the schema of a required
call, and tool calls parsed out of a model's text per template family. No I/O, no libllama.

A model calls a tool by writing it in its own format, which its chat template teaches it:

  hermes   (Hermes, Qwen 2.5 / 3)   <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>
  llama3   (Llama 3.1 - 3.3)        {"name": ..., "parameters": {...}}   (the whole reply)
  mistral  (Mistral, Mixtral)       [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]

`family_of` tells the family from the template's source; `parse` splits a finished reply into its
text and its calls; `ToolStream` does the same for a stream, holding back text that may start a call.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from tightwad.openai import InvalidRequest, get_field

FAMILIES = ("hermes", "llama3", "mistral")
_OPEN = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama3": "<|python_tag|>"}


def family_of(template: str | None) -> str | None:
    """The tool-call format a chat template teaches, or None when it does not take `tools`."""
    if not template or "tools" not in template:
        return None
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or "ipython" in template or '"parameters"' in template:
        return "llama3"
    return "hermes"  # a template that takes tools without saying how to call them: the common format


# request checks ---------------------------------------------------------------------------------
def check_tools(value: Any) -> list[dict[str, Any]]:
    """`tools`: a list of `{"type": "function", "function": {"name", "description"?, "parameters"?}}`;
    the functions, or InvalidRequest naming the entry that is wrong."""
    if not isinstance(value, list):
        raise InvalidRequest("`tools` must be a list of tools", param="tools")
    functions = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise InvalidRequest(
                f'`{where}` must be {{"type": "function", "function": {{...}}}}', param=where
            )
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequest(f"`{where}.function` must be an object with a string `name`", param=where)
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", function["name"]):
            raise InvalidRequest(
                f"`{where}.function.name` must be 1 to 64 letters, digits, `_`, `.` or `-`", param=where
            )
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise InvalidRequest(f"`{where}.function.parameters` must be a JSON Schema object", param=where)
        functions.append({**function, "parameters": parameters})
    names = [f["name"] for f in functions]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise InvalidRequest(f"`tools` names the function {dup!r} twice", param="tools")
    return functions


def choice_of(tool_choice: Any, functions: list[dict[str, Any]]) -> str:
    """`tool_choice` as "none", "auto", "required" or the name of the function that must be called."""
    if tool_choice is None:
        return "auto" if functions else "none"
    if tool_choice in ("none", "auto", "required"):
        if tool_choice == "required" and not functions:
            raise InvalidRequest("`tool_choice` is required but `tools` is empty", param="tool_choice")
        return str(tool_choice)
    name = None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise InvalidRequest(
            '`tool_choice` must be "none", "auto", "required" or '
            '{"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if name not in {f["name"] for f in functions}:
        raise InvalidRequest(f"`tool_choice` names {name!r}, which is not in `tools`", param="tool_choice")
    return name


def required_calls(tools: Any, tool_choice: Any) -> list[dict[str, Any]]:
    """The functions a reply must call from (all of them for "required", one when named)."""
    functions = check_tools(tools)
    choice = choice_of(tool_choice, functions)
    if choice in ("none", "auto"):
        raise InvalidRequest(f"`tool_choice` {choice!r} requires no call", param="tool_choice")
    return functions if choice == "required" else [f for f in functions if f["name"] == choice]


def calls_schema(functions: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON Schema of one call of one of `functions`: `{"name": ..., "arguments": {...}}`."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
            "required": ["name", "arguments"],
        }
        for f in functions
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def wrap_gbnf(call_gbnf: str, family: str, parallel: bool = True) -> str:
    """A grammar for a reply made only of calls, in `family`'s format, from the GBNF of one call
    (its `root` rule renamed `tightwad-call`); one call only unless `parallel`."""
    body = re.sub(r"^root ::=", "tightwad-call ::=", call_gbnf, flags=re.MULTILINE)
    if family == "mistral":
        more = ' ("," space tightwad-call)*' if parallel else ""
        root = f'root ::= "[TOOL_CALLS]" "[" tightwad-call{more} "]"'
    elif family == "llama3":
        root = "root ::= tightwad-call"
    else:
        one = '"<tool_call>\\n" tightwad-call "\\n</tool_call>"'
        more = f' ("\\n" {one})*' if parallel else ""
        root = f"root ::= {one}{more}"
    if "space ::=" not in body:
        body += '\nspace ::= " "?'
    return f"{root}\n{body}"


# parsing replies --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def to_json(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id or f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if index is not None:
            out["index"] = index
        return out


def _call(obj: Any) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        return ToolCall(obj["name"], args)
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _json_values(text: str) -> list[Any] | None:
    """Every JSON value in `text` (whitespace and `;` between them), or None if it is anything else."""
    decoder = json.JSONDecoder()
    values, i = [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)


def _bare_calls(text: str, names: Collection[str] | None) -> list[ToolCall]:
    """A reply that is nothing but call objects (a JSON object or list of them, perhaps in a code
    fence or after Llama's <|python_tag|>): small models often drop their family's tags. Only calls
    of the request's functions count, so JSON content is never mistaken for a call."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.DOTALL)
    values = _json_values(fenced.group(1) if fenced else body)
    flat = [v for value in values or [] for v in (value if isinstance(value, list) else [value])]
    calls = [_call(v) for v in flat]
    if not calls or any(c is None for c in calls):
        return []
    found = [c for c in calls if c is not None]
    if names is not None and any(c.name not in names for c in found):
        return []
    return found


def parse(text: str, family: str, names: Collection[str] | None = None) -> tuple[str, list[ToolCall]]:
    """A finished reply as (its text, its calls); `names`: the request's functions. A reply whose
    calls cannot be read stays text."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tool-call family {family!r}")
    if family == "hermes" and "<tool_call>" in text:
        calls: list[ToolCall] = []
        blocks = re.findall(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, flags=re.DOTALL)
        for block in blocks:
            values = _json_values(block)
            call = _call(values[0]) if values and len(values) == 1 else None
            if call is None:
                return text, []
            calls.append(call)
        content = re.sub(r"<tool_call>.*?(?:</tool_call>|$)", "", text, flags=re.DOTALL).strip()
        return content, calls
    if family == "mistral" and "[TOOL_CALLS]" in text:
        at = text.find("[TOOL_CALLS]")
        calls = _bare_calls(text[at + len("[TOOL_CALLS]") :], None)
        return (text[:at].strip(), calls) if calls else (text, [])
    # Llama 3 writes the call as the whole reply; the others do when they drop their tags.
    calls = _bare_calls(text, names)
    return ("", calls) if calls else (text, [])


class ToolStream:
    """A streamed reply split into text to send now and calls to send at the end. Text is held from
    where a call may start: the family's tag, or a reply that begins like JSON (a bare call)."""

    def __init__(self, family: str, names: Collection[str] | None = None) -> None:
        self.family = family
        self.names = names
        self.marker = _OPEN[family]
        self.text = ""
        self.sent = 0  # characters of `text` already given out as content
        self.holding = False  # a call may have started: everything from here is held

    def feed(self, piece: str) -> str:
        """Content that is safe to send now."""
        self.text += piece
        if self.holding:
            return ""
        rest = self.text[self.sent :]
        if self.sent == 0:
            head = rest.lstrip()
            if not head or any(m.startswith(head) for m in (self.marker, "<|python_tag|>", "```")):
                return ""  # too early to say
            if head.startswith(("{", "[", "```", "<|python_tag|>", self.marker)):
                self.holding = True
                return ""
        at = rest.find(self.marker)
        if at >= 0:
            self.holding = True
            out = rest[:at]
        else:
            longest = min(len(self.marker) - 1, len(rest))
            keep = next((n for n in range(longest, 0, -1) if self.marker.startswith(rest[-n:])), 0)
            out = rest[: len(rest) - keep]
        self.sent += len(out)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The held text that turns out to be content, and the calls."""
        content, calls = parse(self.text, self.family, self.names)
        sent = self.text[: self.sent]
        self.sent = len(self.text)
        if not calls:
            return self.text[len(sent) :], []
        done = sent.strip()
        return (content[len(done) :].strip() if content.startswith(done) else ""), calls


@dataclass(frozen=True)
class ToolPlan:
    """A chat request's tools, as the engine's chat route and the proxy's both treat them: the
    functions the template is shown, the grammar that enforces a required or named call, and how
    calls are read back out of the reply."""

    tools: list[dict[str, Any]]  # as the template takes them ({"type": "function", "function": ...})
    family: str
    parallel: bool
    grammar: dict[str, Any] | None

    @staticmethod
    def of(body: dict[str, Any], family: str | None) -> ToolPlan | None:
        """None when the request gives no tools or says `tool_choice: "none"` (the model is then not
        shown them); a 400 naming `tools` when the model's template cannot take tools."""
        raw = body.get("tools")
        if not raw:
            if body.get("tool_choice") not in (None, "none", "auto"):
                raise InvalidRequest(
                    "`tool_choice` asks for a call but `tools` is empty", param="tool_choice"
                )
            return None
        functions = check_tools(raw)
        choice = choice_of(body.get("tool_choice"), functions)
        if family is None:
            raise unsupported()
        parallel = get_field(body, "parallel_tool_calls", bool, True)
        if choice == "none":
            return None
        grammar = None
        if choice != "auto":  # required or named: a grammar admits nothing but calls
            grammar = {
                "tools": raw,
                "tool_choice": body.get("tool_choice"),
                "family": family,
                "parallel_tool_calls": parallel,
            }
        given = [{"type": "function", "function": f} for f in functions]
        return ToolPlan(given, family, parallel, grammar)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t["function"]["name"] for t in self.tools)

    def stream(self) -> ToolStream:
        return ToolStream(self.family, self.names)

    def calls_json(self, calls: list[ToolCall]) -> list[dict[str, Any]]:
        """The calls as `delta.tool_calls` entries (with `index`); one only without parallel calls."""
        kept = calls if self.parallel else calls[:1]
        return [call.to_json(index=i) for i, call in enumerate(kept)]

    def shape_message(self, choice: dict[str, Any]) -> None:
        """A finished chat choice with the calls in its text moved to `message.tool_calls`."""
        message = choice["message"]
        content, calls = parse(message.get("content") or "", self.family, self.names)
        if calls:
            message["content"] = content or None
            message["tool_calls"] = [
                {k: v for k, v in call.items() if k != "index"} for call in self.calls_json(calls)
            ]
            choice["finish_reason"] = "tool_calls"


def unsupported() -> InvalidRequest:
    """The 400 for `tools` on a model whose chat template does not take them (engine and proxy)."""
    return InvalidRequest(
        "this model's chat template has no tool support (it does not use `tools`), so it cannot be "
        "given tools or call them: send the request without `tools`, or serve a model whose template "
        "takes them (Qwen 2.5, Llama 3.1+, Mistral, Hermes)",
        param="tools",
        code="unsupported_parameter",
    )


def engine_takes_tools(models_body: Any) -> bool | None:
    """Whether an engine's `/v1/models` says its chat template takes tools (`meta.tools`, the
    family); None when it does not say (an older engine: it answers for itself)."""
    data = models_body.get("data") if isinstance(models_body, dict) else None
    meta = data[0].get("meta") if isinstance(data, list) and data and isinstance(data[0], dict) else None
    if not isinstance(meta, dict) or "tools" not in meta:
        return None
    return meta["tools"] is not None
