"""A compiled yes/no check of a document against the manifest's JSON Schema.

jsonschema walks the schema for every value (and follows each `$ref` through its registry), which
is half a second per thousand hosts. This compiles the schema once into nested closures that only
answer "valid?"; a document it rejects goes to jsonschema, whose errors the manifest module turns
into messages. So the fast path decides nothing alone: it may only say "valid" where jsonschema
would, and `compile_schema` refuses (SchemaUnsupported) any keyword it does not implement rather
than ignore it.

Draft 2020-12 semantics for the keywords it knows: `integer` accepts 2.0, booleans are never
numbers, `pattern` searches (is not anchored), `const`/`enum`/`uniqueItems` tell true from 1.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

Check = Callable[[Any], bool]

# Keywords that say nothing about validity.
_ANNOTATIONS = frozenset(
    {"$schema", "$id", "$defs", "$comment", "title", "description", "default", "examples"}
)


class SchemaUnsupported(Exception):
    """The schema uses a keyword this compiler does not implement: validate with jsonschema alone."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_TYPES: dict[str, Check] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": _is_number,
    "integer": lambda v: _is_number(v) and (isinstance(v, int) or v.is_integer()),
}


def _PENDING(value: Any) -> bool:
    raise AssertionError("a $ref called before it was compiled")


def equal(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1, 1 is 1.0, lists and objects compared item by item."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    return type(a) is type(b) and a == b


def compile_schema(root: Mapping[str, Any]) -> Check:
    """`check(document) -> bool` for the schema `root` (local `$ref`s only)."""
    compiled: dict[str, Check] = {}

    def reference(ref: str) -> Check:
        if not ref.startswith("#"):
            raise SchemaUnsupported(f"remote $ref {ref}")
        if ref not in compiled:
            compiled[ref] = _PENDING  # a reference to itself while compiling: looked up when called
            target: Any = root
            for part in filter(None, ref[1:].split("/")):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            compiled[ref] = node(target)
        if compiled[ref] is _PENDING:
            return lambda v: compiled[ref](v)
        return compiled[ref]

    def node(schema: Any) -> Check:
        if schema is True:
            return lambda v: True
        if schema is False:
            return lambda v: False
        checks = [keyword(schema, key) for key in schema if key not in _ANNOTATIONS]
        checks = [c for c in checks if c is not None]
        if not checks:
            return lambda v: True
        if len(checks) == 1:
            return checks[0]
        return lambda v: all(check(v) for check in checks)

    def keyword(schema: Mapping[str, Any], key: str) -> Check | None:
        value = schema[key]
        if key.startswith("x-"):
            return None  # vendor extensions (Kubernetes' hints) are annotations
        match key:
            case "$ref":
                return reference(value)
            case "type":
                kinds = [_TYPES[value]] if isinstance(value, str) else [_TYPES[t] for t in value]
                return kinds[0] if len(kinds) == 1 else lambda v: any(k(v) for k in kinds)
            case "enum":
                choices = list(value)
                return lambda v: any(equal(v, c) for c in choices)
            case "const":
                return lambda v: equal(v, value)
            case "pattern":
                search = re.compile(value).search
                return lambda v: not isinstance(v, str) or search(v) is not None
            case "minLength":
                return lambda v: not isinstance(v, str) or len(v) >= value
            case "maxLength":
                return lambda v: not isinstance(v, str) or len(v) <= value
            case "minimum":
                return lambda v: not _is_number(v) or v >= value
            case "maximum":
                return lambda v: not _is_number(v) or v <= value
            case "minItems":
                return lambda v: not isinstance(v, list) or len(v) >= value
            case "uniqueItems":
                if not value:
                    return None
                return lambda v: (
                    not isinstance(v, list)
                    or not any(equal(v[i], v[j]) for i in range(len(v)) for j in range(i))
                )
            case "items":
                item = node(value)
                return lambda v: not isinstance(v, list) or all(item(x) for x in v)
            case "required":
                names = list(value)
                return lambda v: not isinstance(v, dict) or all(n in v for n in names)
            case "properties":
                props = {name: node(sub) for name, sub in value.items()}
                return lambda v: (
                    not isinstance(v, dict)
                    or all(check(v[name]) for name, check in props.items() if name in v)
                )
            case "additionalProperties":
                known = frozenset(schema.get("properties", {}))
                if "patternProperties" in schema:
                    raise SchemaUnsupported("additionalProperties beside patternProperties")
                if value is False:
                    return lambda v: not isinstance(v, dict) or all(k in known for k in v)
                extra = node(value)
                return lambda v: (
                    not isinstance(v, dict) or all(extra(x) for k, x in v.items() if k not in known)
                )
            case "allOf":
                parts = [node(sub) for sub in value]
                return lambda v: all(p(v) for p in parts)
            case "anyOf":
                parts = [node(sub) for sub in value]
                return lambda v: any(p(v) for p in parts)
            case "if":
                if "else" in schema:
                    raise SchemaUnsupported("if/else")
                condition = node(value)
                then = node(schema.get("then", True))
                return lambda v: not condition(v) or then(v)
            case "then":
                return None  # read by "if"
        raise SchemaUnsupported(f"keyword {key!r}")

    return node(root)
