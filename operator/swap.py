"""`tightwad swap MODEL FILE`: change spec.target.model in the manifest, comments and all.

Only the value's characters change (found through the YAML node's position), so the file stays as
its author wrote it. The edited text is validated before it is written: a typo never reaches the
running loop, which then does the swap (verify, load beside, switch, drain).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

from tightwad.errors import TightwadError
from tightwad.manifest import ManifestError, parse_manifest


def _child(node: Node | None, key: str) -> Node | None:
    if not isinstance(node, MappingNode):
        return None
    for key_node, value in node.value:
        if isinstance(key_node, ScalarNode) and key_node.value == key:
            return value
    return None


def swap_text(text: str, model: str, source: str = "<manifest>") -> str:
    """`text` with spec.target.model set to `model`; raises TightwadError if that is not valid."""
    node = _child(_child(_child(yaml.compose(text, Loader=yaml.SafeLoader), "spec"), "target"), "model")
    if not isinstance(node, ScalarNode):
        raise TightwadError(f"{source}: no spec.target.model to change")
    start, end = node.start_mark.index, node.end_mark.index
    edited = text[:start] + model + text[end:]
    try:
        parse_manifest(edited, source, base_dir=None)
    except ManifestError as exc:
        raise TightwadError(f"not swapping: {exc}") from None
    return edited


def swap(path: Path, model: str) -> None:
    text = path.read_text(encoding="utf-8")
    edited = swap_text(text, model, str(path))
    tmp = path.with_name(f".{path.name}.swap")
    tmp.write_text(edited, encoding="utf-8")
    os.replace(tmp, path)
