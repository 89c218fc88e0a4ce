"""Grammar-constrained decoding: a request's constraint -> GBNF -> libllama's grammar sampler.

A constraint is what `tightwad.openai.constraint_of` reads off a request (`response_format`
json_object / json_schema, or a required tool call) and what the verify API carries (`grammar`). It
compiles to GBNF here: JSON Schema through llama-cpp-python's converter, `json_object` through
llama.cpp's JSON grammar, tool calls through `tightwad.tools`.

`GrammarState` is one position of the grammar: it masks the target's logits (tokens the grammar
refuses get -inf; an end-of-generation token is allowed only once the grammar is complete), is
cloned per draft position, and is advanced over accepted tokens only. libllama's accept does not
return errors: a token the grammar refuses throws a C++ exception and an end-of-generation token on
an incomplete grammar aborts the process, so every token is checked with `allows` before `accept`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema
import numpy as np

from tightwad import tools
from tightwad.engine import libllama
from tightwad.engine.errors import BadRequest

SCHEMA_PARAM = "response_format.json_schema.schema"
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


@dataclass(frozen=True)
class Grammar:
    """Compiled GBNF, and the request field it came from (named by errors)."""

    gbnf: str
    param: str
    root: str = "root"


def compile_constraint(constraint: dict[str, Any]) -> Grammar:
    """A constraint (`{"response_format": ...}`, `{"tools": ..., "tool_choice": ...}` or
    `{"gbnf": ...}`) as GBNF; BadRequest names the field that cannot be compiled."""
    try:
        key = json.dumps(constraint, sort_keys=True)
    except (TypeError, ValueError, RecursionError) as exc:
        raise BadRequest(f"`grammar` must be JSON, nested less deep: {exc}", param="grammar") from None
    return _compile(key)


MAX_DEPTH = 1200  # nesting of ( ) in a GBNF text: llama.cpp parses and walks grammars recursively
MAX_GBNF = 4_000_000  # characters


def _check_gbnf(grammar: Grammar) -> Grammar:
    """Refuse a grammar that could exhaust llama.cpp's stack (its parser, left-recursion check and
    stack expansion recurse with nesting and with repetition counts) before libllama sees it."""
    text, depth, deepest, i = grammar.gbnf, 0, 0, 0
    if len(text) > MAX_GBNF:
        raise BadRequest(f"`{grammar.param}` makes a grammar over {MAX_GBNF} characters", param=grammar.param)
    while i < len(text):
        c = text[i]
        if c in '"[':  # a literal or a character class: skip it, escapes included
            close = '"' if c == '"' else "]"
            i += 1
            while i < len(text) and text[i] != close:
                i += 2 if text[i] == "\\" else 1
        elif c == "#":  # a comment
            while i < len(text) and text[i] != "\n":
                i += 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        elif c == "{":
            end = text.find("}", i)
            counts = [n for n in re.split(r"[,\s]+", text[i + 1 : end]) if n.isdigit()] if end > 0 else []
            if any(int(n) > MAX_REPEAT for n in counts):
                raise BadRequest(
                    f"`{grammar.param}` repeats something more than {MAX_REPEAT} times", param=grammar.param
                )
        i += 1
    if deepest > MAX_DEPTH:
        raise BadRequest(
            f"`{grammar.param}` makes a grammar nested {deepest} deep: at most {MAX_DEPTH} here "
            "(a long pattern repetition or maxLength?)",
            param=grammar.param,
        )
    return grammar


@functools.lru_cache(maxsize=64)
def _compile(key: str) -> Grammar:
    return _check_gbnf(_compile_unchecked(key))


def _compile_unchecked(key: str) -> Grammar:
    constraint = json.loads(key)
    if not isinstance(constraint, dict):
        raise BadRequest("`grammar` must be an object", param="grammar")
    if isinstance(constraint.get("gbnf"), str):
        return Grammar(constraint["gbnf"], "grammar")
    if "tools" in constraint:
        calls = tools.required_calls(constraint.get("tools"), constraint.get("tool_choice"))
        parallel = constraint.get("parallel_tool_calls") is not False
        family = constraint.get("family") or "hermes"
        if family not in tools.FAMILIES:
            raise BadRequest(f"`grammar.family` must be one of {', '.join(tools.FAMILIES)}", param="grammar")
        body = _schema_gbnf(tools.calls_schema(calls), "tools")
        return Grammar(tools.wrap_gbnf(body, family, parallel), "tool_choice")
    response_format = constraint.get("response_format")
    if not isinstance(response_format, dict):
        raise BadRequest("`grammar` needs `response_format`, `tools` or `gbnf`", param="grammar")
    kind = response_format.get("type")
    if kind == "json_object":
        libllama.llama()  # llama_cpp must load the pinned build before its first import
        from llama_cpp.llama_grammar import JSON_GBNF

        return Grammar(JSON_GBNF, "response_format")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name", ""), str):
            raise BadRequest(
                "`response_format.json_schema` must be an object with `name` and `schema`",
                param="response_format.json_schema",
            )
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise BadRequest(f"`{SCHEMA_PARAM}` must be a JSON Schema object", param=SCHEMA_PARAM)
        return Grammar(_schema_gbnf(schema, SCHEMA_PARAM), SCHEMA_PARAM)
    raise BadRequest(
        f"`response_format` type {kind!r} has no grammar (json_object or json_schema)",
        param="response_format",
    )


# The converter writes a length or count out as that many repetitions, nested as deep: bounded so
# a schema cannot make a grammar too big to build or too deep for llama.cpp's recursive parser.
MAX_REPEAT = 1000
_SIZES = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")


def _check_sizes(node: Any, param: str, where: str = "") -> None:
    if isinstance(node, list):
        for i, item in enumerate(node):
            _check_sizes(item, param, f"{where}/{i}")
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in _SIZES and isinstance(value, int | float) and value > MAX_REPEAT:
                raise BadRequest(
                    f"`{param}` asks for {key} {value} at {where or '/'}: at most {MAX_REPEAT} here",
                    param=param,
                )
            if key == "pattern" and isinstance(value, str):
                counts = re.findall(r"\{\s*(\d+)\s*(?:,\s*(\d*))?\s*\}", value)
                if any(int(n) > MAX_REPEAT for pair in counts for n in pair if n):
                    raise BadRequest(
                        f"`{param}` has a pattern at {where or '/'} repeating over {MAX_REPEAT} times",
                        param=param,
                    )
            _check_sizes(value, param, f"{where}/{key}")


def _schema_gbnf(schema: dict[str, Any], param: str) -> str:
    """A JSON Schema as GBNF (llama-cpp-python's converter), after checking it is a schema at all."""
    _check_sizes(schema, param)
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(
            schema
        )
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise BadRequest(
            f"`{param}` is not a valid JSON Schema{f' at {where}' if where else ''}: {exc.message}",
            param=param,
        ) from None
    except Exception as exc:  # a `$schema` jsonschema cannot even read
        raise BadRequest(f"`{param}` is not a JSON Schema this server can read: {exc}", param=param) from None
    libllama.llama()  # llama_cpp must load the pinned build before its first import
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter's own checks are asserts; anything it trips on is the schema's
        raise BadRequest(
            f"`{param}` cannot be turned into a grammar: {exc or type(exc).__name__}", param=param
        ) from None


class GrammarState:
    """libllama's grammar sampler at one position of the constrained text (see the module doc)."""

    def __init__(self, ptr: Any, is_eog: Callable[[int], bool], n_vocab: int) -> None:
        self._ptr = ptr
        self._is_eog = is_eog
        self._n_vocab = n_vocab

    @classmethod
    def start(cls, model: libllama.Model, grammar: Grammar) -> GrammarState:
        """The grammar's first position; BadRequest when llama.cpp cannot parse it."""
        ptr = libllama.llama().llama_sampler_init_grammar(
            model.vocab, grammar.gbnf.encode(), grammar.root.encode()
        )
        if not ptr:
            raise BadRequest(
                f"`{grammar.param}` gives a grammar llama.cpp cannot parse (the engine's log says why)",
                param=grammar.param,
            )
        return cls(ptr, model.is_end_of_generation, model.n_vocab)

    def __del__(self) -> None:
        ptr, self._ptr = getattr(self, "_ptr", None), None
        if ptr:
            with contextlib.suppress(Exception):  # at interpreter exit the bindings may be gone
                libllama.llama().llama_sampler_free(ptr)

    def clone(self) -> GrammarState:
        return GrammarState(libllama.llama().llama_sampler_clone(self._ptr), self._is_eog, self._n_vocab)

    def _apply(self, ids: np.ndarray) -> np.ndarray:
        """Which of `ids` the grammar allows here."""
        data = np.zeros(len(ids), dtype=_TOKEN_DATA)
        data["id"] = ids
        bindings = libllama.llama()
        array = bindings.llama_token_data_array(
            data=data.ctypes.data_as(ctypes.POINTER(bindings.llama_token_data)),
            size=len(ids),
            selected=-1,
            sorted=False,
        )
        bindings.llama_sampler_apply(self._ptr, ctypes.byref(array))
        return np.isfinite(data["logit"])

    def allows(self, token: int) -> bool:
        return bool(self._apply(np.array([token], dtype=np.int32))[0])

    def allowed(self) -> np.ndarray:
        """A boolean row over the vocabulary: the tokens the grammar allows next."""
        return self._apply(np.arange(self._n_vocab, dtype=np.int32))

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` with every token the grammar refuses at -inf."""
        return np.where(self.allowed(), logits, -np.inf).astype(logits.dtype, copy=False)

    def accept(self, token: int) -> None:
        """Advance over `token`, which `allows` said yes to (an end of generation ends the text and
        is not fed: libllama aborts on one it did not expect)."""
        if not self._is_eog(token):
            libllama.llama().llama_sampler_accept(self._ptr, int(token))

    def advanced(self, token: int) -> GrammarState | None:
        """A new state after `token`, or None when the grammar refuses it here."""
        if self._is_eog(token) or not self.allows(token):
            return None
        state = self.clone()
        state.accept(token)
        return state

    def advance_over(self, tokens: Sequence[int], where: str) -> None:
        """Accept text that must already follow the grammar (a reply being continued); BadRequest
        names `where` at the first token it refuses."""
        for i, token in enumerate(tokens):
            if self._is_eog(token) or not self.allows(token):
                raise BadRequest(
                    f"`{where}`: token {i} ({token}) of the generated text does not follow the grammar "
                    "of this request's response_format / tool_choice"
                )
            self.accept(token)
