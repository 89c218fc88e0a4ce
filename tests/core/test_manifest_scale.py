"""The manifest path at scale keeps its words: libyaml parses, places stay exact, and the compiled
schema check never calls valid what jsonschema rejects (or the reverse)."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from support import ROOT
from support.fleet import fleet_manifest, fleet_yaml

from tightwad import manifest as manifest_module
from tightwad.manifest import ManifestError, load_schema, parse_manifest
from tightwad.schemacheck import compile_schema


def test_the_c_parser_is_the_one_in_use() -> None:
    assert manifest_module._FAST_LOADER is not None
    assert issubclass(manifest_module._FAST_LOADER, yaml.CSafeLoader)


def test_a_problem_deep_in_a_big_manifest_keeps_its_line_and_column() -> None:
    text = fleet_yaml(500).replace("backend: metal", "backend: apple", 1)  # host 3's device
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "backend: apple" in row)
    column = text.splitlines()[line - 1].index("apple") + 1
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text, "fleet.yaml")
    assert str(caught.value) == (
        f"fleet.yaml:{line}:{column}: spec.hosts[3].gpus[0].backend: 'apple' is not one of "
        "cuda, rocm, metal, cpu; did you mean 'metal'?"
    )


def test_a_duplicate_host_name_points_at_the_second_one() -> None:
    text = fleet_yaml(50).replace("name: h00003", "name: h00002")
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text, "fleet.yaml")
    second = [i for i, row in enumerate(text.splitlines(), 1) if "name: h00002" in row][1]
    where = rf"fleet\.yaml:{second}:\d+: spec\.hosts\[3\]\.name: duplicate host name"
    assert re.match(where, str(caught.value))


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("apiVersion: x\n\tkind: y\n", "found character '\\t' that cannot start any token"),
        ("a: [1, 2\n", "expected ',' or ']', but got '<stream end>'"),
        ("a: *nowhere\n", "found undefined alias 'nowhere'"),
    ],
)
def test_broken_yaml_keeps_the_pure_python_parsers_words(text: str, words: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text, "x.yaml")
    assert words in str(caught.value) and re.match(r"x\.yaml:\d+:\d+: invalid YAML", str(caught.value))


def test_aliases_merge_keys_and_tags_still_construct_as_before() -> None:
    text = (ROOT / "examples" / "homelab.yaml").read_text()
    fast = parse_manifest(text, "homelab.yaml", environ={"TIGHTWAD_TOKEN": "t"}).data
    document = yaml.safe_load(text.replace("${TIGHTWAD_TOKEN}", "t"))
    assert fast["spec"]["hosts"][0]["name"] == document["spec"]["hosts"][0]["name"]
    anchored = "x: &port 9000\ny: *port\nz: {<<: {a: 1}, b: 2}\nw: !!str 12\n"
    assert manifest_module._construct(yaml.compose(anchored, Loader=manifest_module._FAST_LOADER)) == {
        "x": 9000,
        "y": 9000,
        "z": {"a": 1, "b": 2},
        "w": "12",
    }


# -- the compiled check against jsonschema, on many broken variants of a real manifest ---------


def _leaves(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*path, key)
            yield from _leaves(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield (*path, index)
            yield from _leaves(value, (*path, index))


def _variants(data: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield data
    replacements: list[Any] = [None, True, 1, 0, -1, 2.5, 2.0, "", "x", "9000", [], {}, ["a", "a"], 70000]
    for path in _leaves(data):
        for value in replacements:
            doc = copy.deepcopy(data)
            parent = doc
            for part in path[:-1]:
                parent = parent[part]
            parent[path[-1]] = value
            yield doc
        doc = copy.deepcopy(data)
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        if isinstance(parent, dict):
            del parent[path[-1]]
            parent["unknownKey"] = 1
            yield doc


def test_the_compiled_check_agrees_with_jsonschema_on_every_variant() -> None:
    schema = load_schema()
    check, reference = compile_schema(schema), Draft202012Validator(schema)
    base = fleet_manifest(8)
    base["spec"]["gate"] = {"enabled": True, "agents": [{"name": "a", "url": "http://a:1/v1"}]}
    examples = [
        yaml.safe_load(p.read_text().replace("${TIGHTWAD_TOKEN}", "t"))
        for p in (ROOT / "examples").glob("*.yaml")
    ]
    count = 0
    for data in [base, *examples]:
        for doc in _variants(data):
            count += 1
            assert check(doc) == reference.is_valid(doc), doc
    assert count > 1000
