"""The typed manifest views agree with the JSON Schema they stand for: the same properties, the same
defaults, the same enums, and nothing required that the schema lets a manifest leave out."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator, Mapping
from typing import Any, Literal, get_args, get_origin

import pytest
from support import ROOT

from tightwad.manifest import _resolve, load_manifest, load_schema
from tightwad.manifest_views import ClusterSpec, Metadata, build_view, json_key


def _view_of(hint: Any) -> type | None:
    """The view class a field's type names (directly, optionally, or as the items of a tuple)."""
    if dataclasses.is_dataclass(hint):
        return hint  # type: ignore[return-value]
    for arg in get_args(hint):
        found = _view_of(arg)
        if found is not None:
            return found
    return None


def _literals(hint: Any) -> set[Any]:
    if get_origin(hint) is Literal:
        return set(get_args(hint))
    return {value for arg in get_args(hint) for value in _literals(arg)}


def _pairs() -> Iterator[tuple[str, Mapping[str, Any], type]]:
    """(document path, schema object, view) for every schema object that has a view."""
    root = load_schema()["properties"]
    todo: list[tuple[str, Mapping[str, Any], type]] = [
        ("metadata", _resolve(root["metadata"]), Metadata),
        ("spec", _resolve(root["spec"]), ClusterSpec),
    ]
    while todo:
        path, schema, view = todo.pop()
        yield path, schema, view
        hints = typing.get_type_hints(view)
        for item in dataclasses.fields(view):
            prop = _resolve(schema["properties"].get(json_key(item.name), {}))
            nested = _view_of(hints[item.name])
            if nested is not None:
                inner = _resolve(prop["items"]) if prop.get("type") == "array" else prop
                todo.append((f"{path}.{json_key(item.name)}", inner, nested))


PAIRS = list(_pairs())


def test_every_schema_object_below_metadata_and_spec_has_a_view() -> None:
    seen = {path for path, _, _ in PAIRS}
    assert {"spec.hosts.gpus", "spec.hosts.docker.tls", "spec.proxy.limits", "spec.gate.agents"} <= seen

    def objects(schema: Mapping[str, Any], path: str) -> Iterator[str]:
        schema = _resolve(schema)
        if schema.get("type") == "array" and isinstance(schema.get("items"), Mapping):
            yield from objects(schema["items"], path)
        elif "properties" in schema:
            yield path
            for key, sub in schema["properties"].items():
                yield from objects(sub, f"{path}.{key}")

    root = load_schema()["properties"]
    assert set(objects(root["metadata"], "metadata")) | set(objects(root["spec"], "spec")) == seen


@pytest.mark.parametrize(("path", "schema", "view"), PAIRS, ids=[path for path, _, _ in PAIRS])
def test_view_fields_are_the_schema_properties(path: str, schema: Mapping[str, Any], view: type) -> None:
    fields = [json_key(item.name) for item in dataclasses.fields(view)]
    assert sorted(fields) == sorted(schema["properties"]), f"{path}: {view.__name__} and the schema differ"


@pytest.mark.parametrize(("path", "schema", "view"), PAIRS, ids=[path for path, _, _ in PAIRS])
def test_view_defaults_are_the_schema_defaults(path: str, schema: Mapping[str, Any], view: type) -> None:
    hints = typing.get_type_hints(view)
    required = set(schema.get("required", []))
    for item in dataclasses.fields(view):
        key, prop = json_key(item.name), _resolve(schema["properties"][json_key(item.name)])
        if item.default is not dataclasses.MISSING:
            default = item.default
        elif item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        else:
            assert key in required, f"{path}.{key} is optional in the schema but has no default"
            continue
        assert key not in required, f"{path}.{key} is required in the schema but has a default"
        if "default" in prop:
            nested = _view_of(hints[item.name])
            expected = prop["default"]
            if nested is not None and isinstance(expected, Mapping):
                expected = build_view(nested, expected)
            elif isinstance(expected, list):
                expected = tuple(expected)
            assert default == expected, f"{path}.{key}: view default {default!r}, schema {expected!r}"
        else:  # nothing written: no value, or an empty collection
            assert default in (None, (), {}), f"{path}.{key}: the schema has no default, the view {default!r}"


@pytest.mark.parametrize(("path", "schema", "view"), PAIRS, ids=[path for path, _, _ in PAIRS])
def test_view_enums_are_the_schema_enums(path: str, schema: Mapping[str, Any], view: type) -> None:
    hints = typing.get_type_hints(view)
    for item in dataclasses.fields(view):
        prop = _resolve(schema["properties"][json_key(item.name)])
        if "enum" in prop:
            assert _literals(hints[item.name]) == set(prop["enum"]), f"{path}.{json_key(item.name)}"


def test_the_examples_read_as_views(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIGHTWAD_TOKEN", "t")
    manifest = load_manifest(ROOT / "examples" / "homelab.yaml")
    assert manifest.target.max_conversations == manifest.data["spec"]["target"]["maxConversations"]
    assert manifest.host("xeon").gpus[0].threads == 20 and manifest.host("xeon").gpus[0].memory_bytes
    assert manifest.proxy is not None and manifest.proxy.limits.max_tokens == 4096
    assert manifest.swarm.peers == ("http://nas.lan:8089",) and manifest.swarm.trackers == ()
    assert manifest.drafters[1].ngram_n == 3 and manifest.gate.reviewer.url == "engine"
    assert manifest.metadata.labels == {"owner": "alex"}
