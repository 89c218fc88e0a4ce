"""The manifest reference (docs/manifest.md), generated from the one JSON Schema.

`python -m tightwad.schemadoc` rewrites it; `--check` fails when it is stale (a test runs that), so
the reference can never drift from what `tightwad validate` enforces.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tightwad.manifest import load_schema

DOC = Path(__file__).resolve().parent.parent / "docs" / "manifest.md"
HEADER = """# Manifest reference

Generated from `tightwad/schema/cluster.schema.json` by `python -m tightwad.schemadoc`; do not edit
by hand. Every key is checked by `tightwad validate`; unknown keys are errors. Strings may use
`${VAR}` or `${VAR:-default}` from the environment (`$${` for a literal `${`).

Ports left out are assigned per host from 18052 up, always below 32768: Linux hands ports from 32768
up to outgoing connections, so a server there can find its port taken by an unrelated client. Pick
ports you write yourself below 32768 too (and outside 30000-32767 on Kubernetes, its NodePort range).

| key | type | default | description |
|---|---|---|---|
"""


def _resolve(node: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        node = {**schema["$defs"][name], **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _type(node: dict[str, Any], schema: dict[str, Any]) -> str:
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    if "const" in node:
        return f"`{node['const']}`"
    if "anyOf" in node or "oneOf" in node:
        options = node.get("anyOf", node.get("oneOf", []))
        return " or ".join(_type(_resolve(n, schema), schema) for n in options)
    kind = node.get("type", "any")
    if kind == "array":
        return f"list of {_type(_resolve(node.get('items', {}), schema), schema)}"
    return " or ".join(kind) if isinstance(kind, list) else str(kind)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _rows(node: dict[str, Any], path: str, schema: dict[str, Any]) -> list[str]:
    node = _resolve(node, schema)
    rows: list[str] = []
    if path:
        default = f"`{json.dumps(node['default'])}`" if "default" in node else ""
        description = _cell(node.get("description", ""))
        rows.append(f"| `{path}` | {_type(node, schema)} | {default} | {description} |")
    children = node.get("properties")
    if children is None and node.get("type") == "array":
        item = _resolve(node.get("items", {}), schema)
        for key, child in item.get("properties", {}).items():
            rows += _rows(child, f"{path}[].{key}", schema)
        return rows
    for key, child in (children or {}).items():
        rows += _rows(child, f"{path}.{key}" if path else key, schema)
    return rows


def render() -> str:
    schema = load_schema()
    return HEADER + "\n".join(_rows(schema, "", schema)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tightwad.schemadoc", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/manifest.md is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is stale: run `python -m tightwad.schemadoc`", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
