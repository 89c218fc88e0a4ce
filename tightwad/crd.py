"""The Kubernetes CRD `tightwadclusters.tightwad.dev`, generated from the one manifest JSON Schema.

The API server only takes *structural* OpenAPI schemas: no `$ref`, a `type` on every node, no
`const`, `if`/`then`, lookaround in patterns or `uniqueItems`, and inside `anyOf` only value checks
on a type given outside it. This module turns tightwad/schema/cluster.schema.json into that form
without losing a rule where Kubernetes can express it:

- `$ref`s are inlined (the referring node's own keys, e.g. a sharper description, win);
- `const` becomes a one-value `enum`; `uniqueItems` a `x-kubernetes-list-type: set`;
- `anyOf` over one type keeps its value checks; over several types (a field the schema already marks
  `x-kubernetes-int-or-string`) it becomes a CEL rule (`x-kubernetes-validations`);
- `if`/`then` (a field required when another has some value) becomes a CEL rule carrying the
  `then` description as its message;
- a pattern RE2 cannot run (lookaround) is replaced by its RE2 equivalent from `PATTERN_REWRITES`.

What Kubernetes cannot check at all (a field free-form by `x-kubernetes-preserve-unknown-fields`)
says so in its description, and is checked by the operator, which validates every object with the
full JSON Schema before acting on it.

    python -m tightwad.crd            # rewrite charts/tightwad/crds/tightwadclusters.yaml
    python -m tightwad.crd --check    # exit 1 when that file is stale
    python -m tightwad.crd --stdout   # print the CRD
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tightwad.errors import TightwadError
from tightwad.manifest import API_VERSION, KIND, load_schema

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "tightwadclusters"
SINGULAR = "tightwadcluster"
SHORT_NAMES = ["twc", "tightwad"]
CRD_NAME = f"{PLURAL}.{GROUP}"
CHART_CRD = Path(__file__).resolve().parent.parent / "charts" / "tightwad" / "crds" / f"{PLURAL}.yaml"

NOT_CHECKED_BY_SERVER = "The API server stores it as written; the operator checks it and reports problems."

# Patterns that use lookaround, which the API server's regular expressions (RE2) cannot run, with an
# RE2 pattern that accepts exactly the same strings (tests/operator/test_kube_crd.py checks that on samples).
PATTERN_REWRITES: dict[str, str] = {
    # a model source: catalog:NAME, an http(s) URL, or a path that does not start with a URL scheme
    r"^(catalog:[a-z0-9][a-z0-9._-]*|https?://[^\s/?#]+[^\s]*|(?![A-Za-z][A-Za-z0-9+.-]*:)[^\s].*)$": (
        r"^(catalog:[a-z0-9][a-z0-9._-]*|https?://[^\s/?#]+[^\s]*|[^\sA-Za-z].*"
        r"|[A-Za-z][A-Za-z0-9+.-]*([^A-Za-z0-9+.:-].*)?)$"
    ),
}

_LOOKAROUND = re.compile(r"\(\?<?[=!]|\(\?>|\\[1-9]")
# Keywords with no place in a structural schema; dropped (their meaning is carried elsewhere).
_DROPPED = {"$schema", "$id", "$defs", "$comment", "title", "examples"}
# Keywords a value check inside anyOf/allOf may not repeat (the structure is given outside).
_STRUCTURE_ONLY = {"type", "description", "default", "title", "nullable", "additionalProperties", "$comment"}


class SchemaNotStructural(TightwadError, ValueError):
    """The JSON Schema uses something the generator cannot turn into a structural schema."""


def _where(path: Sequence[str]) -> str:
    return ".".join(path) or "(root)"


class _Converter:
    def __init__(self, schema: Mapping[str, Any]) -> None:
        self.defs: Mapping[str, Any] = schema.get("$defs", {})

    # -- $ref ------------------------------------------------------------------------------------

    def inline(self, node: Any, path: tuple[str, ...], seen: tuple[str, ...] = ()) -> Any:
        """`node` with every `$ref` replaced by its target, merged under the node's own keys."""
        if isinstance(node, list):
            return [self.inline(item, path, seen) for item in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            ref = node["$ref"]
            if not ref.startswith("#/$defs/") or ref.removeprefix("#/$defs/") not in self.defs:
                raise SchemaNotStructural(
                    f"{_where(path)}: only local #/$defs/ references are supported ({ref})"
                )
            name = ref.removeprefix("#/$defs/")
            if name in seen:
                raise SchemaNotStructural(
                    f"{_where(path)}: recursive reference to {name}; a CRD cannot recurse"
                )
            target = self.inline(self.defs[name], path, (*seen, name))
            node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return {k: self.inline(v, (*path, k), seen) for k, v in node.items() if k != "$defs"}

    # -- one node --------------------------------------------------------------------------------

    def convert(self, node: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        rules: list[dict[str, str]] = []
        description = node.get("description")
        for key, value in node.items():
            if key in _DROPPED or key in ("anyOf", "allOf", "if", "then", "else"):
                continue
            if key == "const":
                out["enum"] = [value]
            elif key == "properties":
                out["properties"] = {k: self.convert(v, (*path, k)) for k, v in value.items()}
            elif key == "items":
                out["items"] = self.convert(value, (*path, "[]"))
            elif key == "additionalProperties":
                if isinstance(value, dict):
                    out["additionalProperties"] = self.convert(value, (*path, "*"))
                elif value is True:
                    out["x-kubernetes-preserve-unknown-fields"] = True
                # False: unknown fields are pruned (and reported by `kubectl apply` field validation)
            elif key == "uniqueItems":
                if value:
                    out["x-kubernetes-list-type"] = "set"
            elif key == "pattern" and _LOOKAROUND.search(value):
                if value not in PATTERN_REWRITES:
                    raise SchemaNotStructural(
                        f"{_where(path)}: pattern {value!r} uses lookaround or back-references, which the "
                        "API server's RE2 cannot run; add an RE2 equivalent to tightwad.crd.PATTERN_REWRITES"
                    )
                out["pattern"] = PATTERN_REWRITES[value]
            else:
                out[key] = copy.deepcopy(value)
        if description is not None:
            out["description"] = description
        if "anyOf" in node:
            self.any_of(node, out, rules, path)
        for part in node.get("allOf", []):
            self.all_of_part(part, out, rules, path)
        if "if" in node:
            rules.append(self.if_then(node, path))
        if rules:
            out["x-kubernetes-validations"] = rules
        if "type" not in out and not (
            out.get("x-kubernetes-int-or-string") or out.get("x-kubernetes-preserve-unknown-fields")
        ):
            raise SchemaNotStructural(
                f"{_where(path)}: no type; a structural schema needs one on every field"
            )
        if out.get("x-kubernetes-list-type") == "set" and out.get("items", {}).get("type") in (
            "object",
            "array",
        ):
            raise SchemaNotStructural(f"{_where(path)}: uniqueItems on a list of {out['items']['type']}s")
        return out

    def any_of(
        self, node: Mapping[str, Any], out: dict[str, Any], rules: list[dict[str, str]], path: tuple[str, ...]
    ) -> None:
        options = [self.inline(o, path) for o in node["anyOf"]]
        types = {o.get("type", node.get("type")) for o in options}
        if len(types) == 1 and None not in types:
            # One type: the structure stays outside, the alternatives keep only their value checks.
            out.setdefault("type", types.pop())
            out["anyOf"] = [self.value_checks(o, path) for o in options]
        elif out.get("x-kubernetes-int-or-string") and types <= {"integer", "string"}:
            rules.append({"rule": _cel_any(options), "message": f"must be {_any_words(options)}"})
        elif out.get("x-kubernetes-preserve-unknown-fields"):
            # CEL cannot see an untyped field, so the server keeps it as written.
            out["description"] = f"{node.get('description', '')} {NOT_CHECKED_BY_SERVER}".strip()
        else:
            raise SchemaNotStructural(
                f"{_where(path)}: anyOf over the types {sorted(map(str, types))}; mark the field "
                "x-kubernetes-int-or-string or x-kubernetes-preserve-unknown-fields"
            )

    def value_checks(self, option: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
        converted = self.convert({**option, "type": option.get("type", "string")}, path)
        checks = {k: v for k, v in converted.items() if k not in _STRUCTURE_ONLY}
        if "x-kubernetes-validations" in checks:
            raise SchemaNotStructural(f"{_where(path)}: an anyOf alternative needs a CEL rule; not supported")
        return checks

    def all_of_part(
        self, part: Mapping[str, Any], out: dict[str, Any], rules: list[dict[str, str]], path: tuple[str, ...]
    ) -> None:
        if "if" in part:
            rules.append(self.if_then(part, path))
            return
        raise SchemaNotStructural(f"{_where(path)}: allOf entries other than if/then are not supported")

    def if_then(self, node: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, str]:
        """`if: {required, properties: {key: {const|enum|pattern}}}, then: {required}` as CEL."""
        condition, then = node["if"], node["then"]
        if "else" in node or set(then) - {"required", "description"}:
            raise SchemaNotStructural(f"{_where(path)}: only if/then with `required` in then is supported")
        tests = [f"has(self.{key})" for key in condition.get("required", [])]
        for key, check in condition.get("properties", {}).items():
            tests.append(f"has(self.{key})")
            tests += _cel_value(check, f"self.{key}", path)
        needed = " && ".join(f"has(self.{key})" for key in then["required"])
        when = " && ".join(dict.fromkeys(tests))  # ordered, without repeats
        message = then.get("description") or f"{', '.join(then['required'])} required here"
        return {"rule": f"!({when}) || ({needed})", "message": message}


def _cel_literal(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def _cel_value(check: Mapping[str, Any], expr: str, path: tuple[str, ...]) -> list[str]:
    """CEL tests for the value checks of one JSON Schema node (type already known to match)."""
    tests: list[str] = []
    for key, value in check.items():
        if key == "const":
            tests.append(f"{expr} == {_cel_literal(value)}")
        elif key == "enum":
            tests.append(f"{expr} in [{', '.join(_cel_literal(v) for v in value)}]")
        elif key == "pattern":
            prefixes = _literal_prefixes(value)
            if prefixes:  # far cheaper than a regular expression in the API server's cost budget
                tests.append(
                    "(" + " || ".join(f"{expr}.startsWith({_cel_literal(p)})" for p in prefixes) + ")"
                )
            else:
                tests.append(f"{expr}.matches({_cel_literal(value)})")
        elif key == "minimum":
            tests.append(f"{expr} >= {value}")
        elif key == "maximum":
            tests.append(f"{expr} <= {value}")
        elif key not in ("type", "description", "title"):
            raise SchemaNotStructural(f"{_where(path)}: no CEL translation for {key!r}")
    return tests


def _literal_prefixes(pattern: str) -> list[str]:
    """The literal prefixes an anchored pattern such as `^https?://` stands for; [] when it is more."""
    if not pattern.startswith("^"):
        return []
    prefixes = [""]
    body = pattern[1:]
    i = 0
    while i < len(body):
        char = body[i]
        if not (char.isalnum() or char in ":/_-@"):
            return []
        if body[i + 1 : i + 2] == "?":
            prefixes = [p + extra for p in prefixes for extra in ("", char)]
            i += 2
        else:
            prefixes = [p + char for p in prefixes]
            i += 1
    return prefixes if len(prefixes) <= 8 else []


_CEL_TYPES = {"string": "string", "integer": "int"}


def _cel_any(options: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for option in options:
        tests = [f"type(self) == {_CEL_TYPES[option['type']]}", *_cel_value(option, "self", ())]
        parts.append("(" + " && ".join(tests) + ")")
    return " || ".join(parts)


def _any_words(options: Sequence[Mapping[str, Any]]) -> str:
    words = []
    for option in options:
        if "const" in option:
            words.append(repr(option["const"]))
        elif option.get("type") == "integer" and "minimum" in option and "maximum" in option:
            words.append(f"a whole number from {option['minimum']} to {option['maximum']}")
        else:
            words.append(f"a {option.get('type', 'value')}")
    return " or ".join(words)


def structural_schema(schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The CRD's openAPIV3Schema for the manifest JSON Schema (default: the project's)."""
    source = copy.deepcopy(dict(schema or load_schema()))
    converter = _Converter(source)
    inlined = converter.inline({k: v for k, v in source.items() if k != "$defs"}, ())
    props = inlined["properties"]
    root = {
        "type": "object",
        "description": inlined.get("description"),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": props["apiVersion"]["description"]},
            "kind": {"type": "string", "description": props["kind"]["description"]},
            # Only metadata.name may be restricted in a CRD; the cluster name prefixes every unit.
            "metadata": {
                "type": "object",
                "properties": {"name": {"type": "string", **_name_checks(props["metadata"])}},
            },
            "spec": converter.convert(props["spec"], ("spec",)),
            "status": converter.convert(props["status"], ("status",)),
        },
    }
    return root


def _name_checks(metadata: Mapping[str, Any]) -> dict[str, Any]:
    name = metadata["properties"]["name"]
    return {k: name[k] for k in ("maxLength", "pattern") if k in name}


PRINTER_COLUMNS = [
    {
        "name": "Ready",
        "type": "string",
        "description": "Whether the endpoint serves the target model",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
    },
    {"name": "Model", "type": "string", "description": "The target model", "jsonPath": ".spec.target.model"},
    {
        "name": "Workers",
        "type": "string",
        "description": "RPC workers healthy / desired",
        "jsonPath": ".status.workers",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd(schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The whole CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "annotations": {"tightwad.dev/generated-from": "tightwad/schema/cluster.schema.json"},
            "labels": {"app.kubernetes.io/name": "tightwad", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["tightwad"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": structural_schema(schema)},
                }
            ],
        },
    }


HEADER = (
    "# GENERATED by `python -m tightwad.crd` from tightwad/schema/cluster.schema.json; do not edit.\n"
    "# tests/packaging/test_helm_chart.py fails when this copy is stale.\n"
)


def render(schema: Mapping[str, Any] | None = None) -> str:
    """The CRD as the YAML file the chart ships."""
    body = yaml.safe_dump(crd(schema), sort_keys=False, width=110, allow_unicode=True)
    return HEADER + body


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tightwad.crd", description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="exit 1 when the chart's CRD is stale")
    group.add_argument("--stdout", action="store_true", help="print the CRD instead of writing it")
    parser.add_argument("--output", type=Path, default=CHART_CRD, help=f"default: {CHART_CRD}")
    args = parser.parse_args(argv)
    text = render()
    if args.stdout:
        sys.stdout.write(text)
        return 0
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale; regenerate it with: python -m tightwad.crd", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
