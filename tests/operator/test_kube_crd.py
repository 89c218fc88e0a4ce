"""The CRD generated from the manifest JSON Schema: structural, as Kubernetes requires, and losing no
rule it can express. (The real API server accepting it, and enforcing it, is in
test_kube_operator.py; the chart's copy being current is in test_helm_chart.py.)"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from typing import Any

import pytest
from support.kubeapi import validate

from tightwad.crd import PATTERN_REWRITES, SchemaNotStructural, _literal_prefixes, crd, structural_schema
from tightwad.manifest import load_schema

FORBIDDEN = {"$ref", "$defs", "$schema", "$id", "const", "if", "then", "else", "uniqueItems", "$comment"}


def nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node (not value checks inside anyOf) with its path."""
    yield path, schema
    for key, sub in schema.get("properties", {}).items():
        yield from nodes(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        yield from nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from nodes(schema["additionalProperties"], f"{path}.*")


def test_the_crd_is_a_valid_kubernetes_object() -> None:
    validate(crd())


def test_every_node_is_structural() -> None:
    for path, node in nodes(structural_schema()):
        assert not FORBIDDEN & set(node), f"{path}: {FORBIDDEN & set(node)}"
        typed = (
            "type" in node
            or node.get("x-kubernetes-int-or-string")
            or node.get("x-kubernetes-preserve-unknown-fields")
        )
        assert typed, f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        for option in node.get("anyOf", []):
            assert not {"type", "description", "default"} & set(option), (
                f"{path}: anyOf must only check values"
            )


def test_the_schemas_rules_survive() -> None:
    spec = structural_schema()["properties"]["spec"]["properties"]
    model = spec["models"]["items"]
    assert model["required"] == ["name", "source"]
    assert model["properties"]["contextSize"] == {
        "description": model["properties"]["contextSize"]["description"],
        "type": "integer",
        "minimum": 128,
        "default": 4096,
    }
    rule = model["x-kubernetes-validations"][0]
    assert "startsWith('https://')" in rule["rule"] and "has(self.sha256)" in rule["rule"]
    assert rule["message"].startswith("an http(s) source is downloaded and must be verified")
    proxy = spec["proxy"]["properties"]
    assert proxy["mode"]["enum"] == ["speculate", "race", "consensus", "passthrough"]
    assert proxy["maxDraftTokens"]["x-kubernetes-int-or-string"] is True
    assert "self >= 1 && self <= 64" in proxy["maxDraftTokens"]["x-kubernetes-validations"][0]["rule"]
    assert spec["swarm"]["properties"]["peers"]["x-kubernetes-list-type"] == "set"
    reviewer_url = spec["gate"]["properties"]["reviewer"]["properties"]["url"]
    assert reviewer_url["type"] == "string" and reviewer_url["anyOf"][0] == {"enum": ["engine"]}
    split = spec["target"]["properties"]["tensorSplit"]
    assert (
        split["x-kubernetes-preserve-unknown-fields"] is True and "operator checks it" in split["description"]
    )
    assert structural_schema()["properties"]["metadata"]["properties"]["name"]["maxLength"] == 63


def test_rewritten_patterns_accept_exactly_what_the_originals_accept() -> None:
    rng = random.Random(7)
    alphabet = "aZ09+.-:/ \t_~c#?hC\\"
    samples = [
        "catalog:tiny",
        "catalog:Tiny",
        "https://h/x.gguf",
        "ftp://x",
        "C:\\m.gguf",
        "./m",
        "/m",
        "~/m",
        " m",
    ]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(20000)]
    for original, rewritten in PATTERN_REWRITES.items():
        assert not re.search(r"\(\?[=!<]", rewritten), "RE2 has no lookaround"
        for text in samples:
            assert bool(re.match(original, text)) == bool(re.match(rewritten, text)), (original, text)


def test_what_a_crd_cannot_say_is_refused_clearly() -> None:
    base = load_schema()
    mixed = {**base, "properties": {**base["properties"], "spec": {"type": "object", "properties": {
        "x": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}}}}  # fmt: skip
    with pytest.raises(SchemaNotStructural, match=r"spec\.x: anyOf over the types"):
        structural_schema(mixed)
    lookahead = {**base, "properties": {**base["properties"], "spec": {"type": "object", "properties": {
        "y": {"type": "string", "pattern": "^(?!no)"}}}}}  # fmt: skip
    with pytest.raises(SchemaNotStructural, match="add an RE2 equivalent"):
        structural_schema(lookahead)


def test_literal_prefixes() -> None:
    assert _literal_prefixes("^https?://") == ["http://", "https://"]
    assert _literal_prefixes("^catalog:") == ["catalog:"]
    assert _literal_prefixes("^[a-z]+") == []
    assert _literal_prefixes("https") == []
