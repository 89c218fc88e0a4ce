"""The cluster manifest: read the YAML, interpolate `${VAR}`, validate it against the JSON Schema and
the rules a schema cannot express, and report every problem with its place in the file.

Pure: no network, no processes. `load_manifest` / `parse_manifest` either return a `Manifest` or raise
one `ManifestError` that carries all the problems found, each with a document path such as
`spec.hosts[2].gpus[0].backend`, its line and column, and a message that says how to fix it.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import gc
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from yaml.error import Mark
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from tightwad.errors import TightwadError
from tightwad.manifest_views import (
    ClusterSpec,
    Drafter,
    GateSpec,
    Host,
    Metadata,
    ModelSpec,
    ProxySpec,
    SwarmSpec,
    Target,
    build_view,
)
from tightwad.manifest_views import parse_size as parse_size  # re-exported: a manifest's sizes
from tightwad.netaddr import is_loopback as is_loopback  # re-exported: the one loopback rule
from tightwad.schemacheck import SchemaUnsupported, compile_schema

if TYPE_CHECKING:  # jsonschema is imported only for a document the compiled check rejects
    from jsonschema import Draft202012Validator, ValidationError

API_VERSION = "tightwad.dev/v1alpha1"
KIND = "TightwadCluster"

# A place in the document: mapping keys and sequence indexes from the root.
DocPath = tuple[Any, ...]

_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


# ----------------------------------------------------------------------------------------------
# Public types


@dataclass(frozen=True)
class ManifestProblem:
    """One thing wrong with a manifest, and where: `path` in document notation, 1-based line/column."""

    path: str
    message: str
    line: int | None = None
    column: int | None = None

    def format(self, source: str) -> str:
        """`FILE:LINE:COL: path: message`, the form editors and CI logs can jump to."""
        where = f"{source}:{self.line}:{self.column}" if self.line is not None else source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ManifestError(TightwadError):
    """A manifest that cannot be used; `problems` lists everything wrong with it, in file order."""

    def __init__(self, source: str, problems: Sequence[ManifestProblem]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__("\n".join(problem.format(source) for problem in self.problems))


@dataclass(frozen=True)
class Manifest:
    """A validated manifest with the schema's defaults filled in.

    `data` is the whole document (environment variables already interpolated), kept for what must
    reproduce it exactly (the CRD, the copy agents and pods read); treat it as read-only. Everything
    else reads the typed views: `metadata`, `spec` and the shortcuts below, built once from `data`.
    """

    data: dict[str, Any]
    source: str = "<string>"
    base_dir: Path | None = None  # folder that relative model paths are resolved against
    metadata: Metadata = field(init=False, repr=False, compare=False)
    spec: ClusterSpec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "metadata", build_view(Metadata, self.data["metadata"]))
        object.__setattr__(self, "spec", build_view(ClusterSpec, self.data["spec"]))

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def hosts(self) -> tuple[Host, ...]:
        return self.spec.hosts

    def host(self, name: str) -> Host:
        """The host called `name`; KeyError if there is none."""
        return self.spec.host(name)

    @property
    def models(self) -> dict[str, ModelSpec]:
        """Models by name, in file order."""
        return {model.name: model for model in self.spec.models}

    def model(self, name: str) -> ModelSpec:
        """The model called `name`; KeyError if there is none."""
        return self.spec.model(name)

    @property
    def target(self) -> Target:
        return self.spec.target

    @property
    def target_model(self) -> ModelSpec:
        return self.model(self.target.model)

    @property
    def target_host(self) -> Host:
        return self.host(self.target.host)

    @property
    def context_size(self) -> int:
        """The target's context window: its own `contextSize`, else its model's."""
        return self.spec.context_size

    @property
    def drafters(self) -> tuple[Drafter, ...]:
        return self.spec.drafters

    @property
    def proxy(self) -> ProxySpec | None:
        """The proxy section, or None when the engine is served without one."""
        return self.spec.proxy

    @property
    def gate(self) -> GateSpec:
        return self.spec.gate

    @property
    def swarm(self) -> SwarmSpec:
        return self.spec.swarm

    @property
    def token(self) -> str | None:
        """The bearer token servers beyond loopback require, or None when none is set."""
        return self.spec.token


# ----------------------------------------------------------------------------------------------
# Public functions


def load_manifest(path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None) -> Manifest:
    """Read and validate the manifest file at `path`; raise ManifestError listing every problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(source, [ManifestProblem("", "no such file; check the path")]) from None
    except IsADirectoryError:
        raise ManifestError(
            source, [ManifestProblem("", "is a folder; give the manifest file itself")]
        ) from None
    except UnicodeDecodeError as exc:
        message = f"is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        raise ManifestError(source, [ManifestProblem("", message)]) from None
    except OSError as exc:
        raise ManifestError(source, [ManifestProblem("", f"cannot be read: {exc.strerror or exc}")]) from None
    return parse_manifest(text, source, environ=environ, base_dir=Path(path).resolve().parent)


def parse_manifest(
    text: str,
    source_name: str = "<string>",
    *,
    environ: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> Manifest:
    """Parse, interpolate and validate manifest YAML `text`, named `source_name` in problems.

    `${VAR}` is looked up in `environ` (default: os.environ); `base_dir` is recorded on the Manifest
    for resolving relative model paths. Raises ManifestError with every problem found.
    """
    with gc_paused():
        return _parse_manifest(text, source_name, environ, base_dir)


def _parse_manifest(
    text: str, source_name: str, environ: Mapping[str, str] | None, base_dir: Path | None
) -> Manifest:
    root = _compose(text, source_name)
    walker = _Walker(os.environ if environ is None else environ)
    walker.walk(root)
    try:
        data = _construct(root)
    except yaml.MarkedYAMLError as exc:
        raise ManifestError(source_name, [_yaml_problem(exc, "quote the value or remove its tag")]) from None
    schema_problems, filled = _check(data, walker.places)
    problems = [*walker.problems, *schema_problems]
    # A value whose ${VAR} failed is still the raw text; other complaints about it would be noise.
    problems = [p for p in problems if p in walker.problems or p.path not in walker.failed_paths]
    _raise_if_any(source_name, problems)
    return Manifest(filled, source_name, base_dir)


def manifest_from_dict(data: Mapping[str, Any], source_name: str = "<object>") -> Manifest:
    """Validate an already-parsed manifest (e.g. a Kubernetes custom resource); no interpolation."""
    with gc_paused():
        plain = copy.deepcopy(dict(data))
        problems, filled = _check(plain, _Places())
        _raise_if_any(source_name, problems)
        return Manifest(filled, source_name)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a manifest is read: reading builds a few objects per byte,
    all reachable, and each collection would walk every one of them again (reading 10,000 hosts
    took twice as long with it). What is garbage is collected when it resumes."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@functools.cache
def load_schema() -> dict[str, Any]:
    """The manifest's JSON Schema (shared, do not modify): the single source for validation,
    the CRD and the docs."""
    text = resources.files("tightwad").joinpath("schema/cluster.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def format_path(path: Iterable[Any]) -> str:
    """`("spec", "hosts", 2, "name")` -> `spec.hosts[2].name`."""
    text = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            text += f"[{part}]"
        elif isinstance(part, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part):
            text += f".{part}" if text else part
        else:
            text += f"[{str(part)!r}]"
    return text


# ----------------------------------------------------------------------------------------------
# YAML: parse, remember where everything is, interpolate ${VAR}


# libyaml's parser is some 20 times faster than PyYAML's own; the pure-Python one stays for the
# (rare) broken file, whose messages people and tests know.
_C_LOADER: Any = getattr(yaml, "CSafeLoader", None)


if _C_LOADER is not None:

    class _FastLoader(_C_LOADER):  # type: ignore[misc,valid-type]
        """libyaml's parser, with each plain scalar's implicit tag worked out once per distinct
        text (a fleet repeats `cuda`, `docker`, its ports, thousands of times)."""

        def __init__(self, stream: str) -> None:
            super().__init__(stream)
            self._tags: dict[str, str] = {}

        def resolve(self, kind: type[Node], value: Any, implicit: Any) -> Any:
            if kind is not ScalarNode or not implicit[0]:
                return super().resolve(kind, value, implicit)
            tag = self._tags.get(value)  # for a plain scalar the tag depends on its text alone
            if tag is None:
                tag = self._tags[value] = super().resolve(kind, value, implicit)
            return tag


_FAST_LOADER: Any = _FastLoader if _C_LOADER is not None else None


def _compose(text: str, source: str) -> Node:
    if _FAST_LOADER is not None:
        try:
            root = yaml.compose(text, Loader=_FAST_LOADER)
        except yaml.YAMLError:
            pass  # parsed again below, for the pure-Python parser's wording of the problem
        else:
            return _non_empty(root, source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        raise ManifestError(source, [_yaml_problem(exc)]) from None
    except yaml.YAMLError as exc:  # errors without a position, e.g. bad characters
        raise ManifestError(source, [ManifestProblem("", f"invalid YAML: {exc}")]) from None
    return _non_empty(root, source)


def _non_empty(root: Node | None, source: str) -> Node:
    if root is None:
        message = f"the file is empty; a manifest starts with `apiVersion: {API_VERSION}`"
        raise ManifestError(source, [ManifestProblem("", message, 1, 1)])
    return root


def _yaml_problem(
    exc: yaml.MarkedYAMLError, hint: str = "check the indentation and quoting"
) -> ManifestProblem:
    mark = exc.problem_mark or exc.context_mark
    detail = f"{exc.problem} ({exc.context})" if exc.context else str(exc.problem)
    if "'\\t'" in detail:
        hint = "indent with spaces, YAML does not allow tabs"
    elif "another document" in detail:
        hint = "a manifest is one YAML document; put each cluster in its own file"
    message = f"invalid YAML: {detail}; {hint}"
    return ManifestProblem("", message, mark.line + 1 if mark else None, mark.column + 1 if mark else None)


class _Loader(yaml.SafeLoader):
    """SafeLoader whose bad values (`!!int abc`) fail with their place instead of a bare ValueError."""

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, OverflowError) as exc:
            problem = f"cannot read this value ({exc})"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


class _Unusual(Exception):
    """A node the quick construction leaves to PyYAML's constructor."""


_QUICK_SCALARS = {
    "tag:yaml.org,2002:int": yaml.SafeLoader.construct_yaml_int,
    "tag:yaml.org,2002:float": yaml.SafeLoader.construct_yaml_float,
    "tag:yaml.org,2002:bool": yaml.SafeLoader.construct_yaml_bool,
    "tag:yaml.org,2002:null": yaml.SafeLoader.construct_yaml_null,
}
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MAP_TAG = "tag:yaml.org,2002:map"


def _construct(root: Node) -> Any:
    """The composed document as Python values. A plain tree (strings, numbers, booleans, lists,
    mappings: nearly every manifest) is built directly, three times quicker than PyYAML's
    constructor; anything else (aliases, merge keys, other tags, a bad value) goes to PyYAML's."""
    try:
        return _quick(root, _Loader(""), set())
    except _Unusual:
        return _Loader("").construct_document(root)


def _quick(node: Node, loader: _Loader, seen: set[int]) -> Any:
    if id(node) in seen:
        raise _Unusual  # an alias: PyYAML's constructor shares the object (and survives recursion)
    seen.add(id(node))
    tag = node.tag
    if isinstance(node, ScalarNode):
        if tag == _STR_TAG:
            return node.value
        construct = _QUICK_SCALARS.get(tag)
        if construct is None:
            raise _Unusual
        try:
            return construct(loader, node)
        except Exception:
            raise _Unusual from None  # PyYAML's constructor reports it with its place
    if isinstance(node, SequenceNode) and tag == _SEQ_TAG:
        return [_quick(item, loader, seen) for item in node.value]
    if isinstance(node, MappingNode) and tag == _MAP_TAG:
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                raise _Unusual
            mapping[_quick(key_node, loader, seen)] = _quick(value_node, loader, seen)
        return mapping
    raise _Unusual


class _Places:
    """Where each document path starts in the file: the value's mark (for a mapping or list under a
    key, the key's line) and the key's own mark, used for complaints about the key itself."""

    def __init__(self) -> None:
        self.values: dict[DocPath, Mark] = {}
        self.keys: dict[DocPath, Mark] = {}

    def problem(self, path: DocPath, message: str, *, at_key: bool = False) -> ManifestProblem:
        mark = self.keys.get(path) if at_key else None
        # A value that was never written (a default, a missing key) points at its nearest parent.
        probe = path
        while mark is None:
            mark = self.values.get(probe)
            if not probe:
                break
            probe = probe[:-1]
        if mark is None:
            return ManifestProblem(format_path(path), message)
        return ManifestProblem(format_path(path), message, mark.line + 1, mark.column + 1)

    def written(self, path: DocPath) -> bool:
        return path in self.values


_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_VARIABLE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


def _interpolate(text: str, environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """Expand `${VAR}` and `${VAR:-default}` (default when unset or empty); `$${` is a literal `${`."""
    errors: list[str] = []

    def expand(match: re.Match[str]) -> str:
        whole = match.group(0)
        if whole == "$${":
            return "${"
        variable = _VARIABLE.fullmatch(match.group(1) or "")
        if match.group(1) is None or variable is None:
            errors.append(
                f"{whole!r} is not a variable reference; write ${{NAME}} or ${{NAME:-default}}, "
                "or $${ for a literal ${"
            )
            return whole
        name, default = variable.group(1), variable.group(2)
        value = environ.get(name)
        if value:
            return value
        if default is not None:
            return default
        if value is None:
            errors.append(f"environment variable {name} is not set; export it or write ${{{name}:-value}}")
            return whole
        return value  # set but empty, and no default: empty is what was asked for

    return _REFERENCE.sub(expand, text), errors


class _Walker:
    """One pass over the composed YAML before it becomes Python objects: records where every value
    is, reports duplicate keys (YAML silently keeps the last one) and interpolates `${VAR}` in
    string scalars. A plain (unquoted) scalar is re-typed after interpolation, so `port: ${PORT}`
    becomes an integer."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.places = _Places()
        self.problems: list[ManifestProblem] = []
        self.failed_paths: set[str] = set()
        self._done: set[int] = set()  # scalars already interpolated (an alias reaches a node twice)
        self._loader = _Loader("")  # only for resolving tags and constructing keys

    def walk(
        self, node: Node, path: DocPath = (), mark: Mark | None = None, stack: frozenset[int] = frozenset()
    ) -> None:
        self.places.values.setdefault(path, mark or node.start_mark)
        if isinstance(node, ScalarNode):
            self._scalar(node, path)
        elif id(node) in stack:
            return  # a recursive alias; the schema rejects the shape anyway
        elif isinstance(node, MappingNode):
            self._mapping(node, path, stack | {id(node)})
        elif isinstance(node, SequenceNode):
            for index, item in enumerate(node.value):
                self.walk(item, (*path, index), None, stack | {id(node)})

    def _mapping(self, node: MappingNode, path: DocPath, stack: frozenset[int]) -> None:
        seen: set[Any] = set()
        merges: list[Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
                continue
            key = self._key(key_node)
            child = (*path, key)
            if key in seen:
                message = f"duplicate key {key!r}; YAML keeps only the last one, so remove the other"
                mark = key_node.start_mark
                self.problems.append(
                    ManifestProblem(format_path(child), message, mark.line + 1, mark.column + 1)
                )
            seen.add(key)
            self.places.keys.setdefault(child, key_node.start_mark)
            # For a nested mapping or list, the line of its key is the natural place to point at.
            mark = value_node.start_mark if isinstance(value_node, ScalarNode) else key_node.start_mark
            self.walk(value_node, child, mark, stack)
        for merge in merges:  # `<<: *anchor` keys count where the anchor defined them
            for source in merge.value if isinstance(merge, SequenceNode) else [merge]:
                if isinstance(source, MappingNode) and id(source) not in stack:
                    self._mapping(source, path, stack | {id(source)})

    def _key(self, node: Node) -> Any:
        if not isinstance(node, ScalarNode):
            return f"<{node.id} key>"
        try:
            return self._loader.construct_object(node)
        except yaml.YAMLError:
            return node.value

    def _scalar(self, node: ScalarNode, path: DocPath) -> None:
        if node.tag != _STR_TAG or "${" not in node.value or id(node) in self._done:
            return
        self._done.add(id(node))
        value, errors = _interpolate(node.value, self.environ)
        if errors:
            mark = node.start_mark
            for error in errors:
                self.problems.append(
                    ManifestProblem(format_path(path), error, mark.line + 1, mark.column + 1)
                )
            self.failed_paths.add(format_path(path))
            return
        node.value = value
        # Plain (unquoted): style None from PyYAML, "" from libyaml. An empty result stays "",
        # not YAML's empty-means-null.
        if not node.style and value:
            node.tag = self._loader.resolve(ScalarNode, value, (True, False))


def _raise_if_any(source: str, problems: Iterable[ManifestProblem]) -> None:
    unique = list(dict.fromkeys(problems))
    if unique:
        unique.sort(key=lambda p: (p.line or 0, p.column or 0))
        raise ManifestError(source, unique)


def _check(data: Any, places: _Places) -> tuple[list[ManifestProblem], Any]:
    """Schema problems, then the rules a schema cannot express (on the document with defaults);
    and the document with its defaults filled in (a copy: `data` is left as it was)."""
    problems = [] if _fast_check()(data) else _schema_problems(data, places)
    filled = _with_defaults(data)
    if isinstance(filled, dict) and isinstance(filled.get("spec"), dict):
        for path, message, at_key in _semantic_findings(filled["spec"], places):
            problems.append(places.problem(("spec", *path), message, at_key=at_key))
    return problems, filled


def _schema_problems(data: Any, places: _Places) -> list[ManifestProblem]:
    errors = list(_validator().iter_errors(data))
    # A value of the wrong type fails its other keywords too; the type is the one thing to say.
    mistyped = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
    errors = [e for e in errors if e.validator == "type" or tuple(e.absolute_path) not in mistyped]
    return [problem for error in errors for problem in _explain(error, places)]


def _jsonschema_says_valid(data: Any) -> bool:
    return _validator().is_valid(data)


@functools.cache
def _fast_check() -> Callable[[Any], bool]:
    """The schema compiled once into a yes/no check (tightwad.schemacheck): a valid document, the
    usual case, never reaches jsonschema. A schema it cannot compile goes to jsonschema always."""
    try:
        return compile_schema(load_schema())
    except SchemaUnsupported:
        return _jsonschema_says_valid


# ----------------------------------------------------------------------------------------------
# The schema: validation errors in words a person can act on, and defaults


@functools.cache
def _validator() -> Draft202012Validator:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(load_schema())


def _resolve(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A subschema with its local `$ref` followed; keywords beside the `$ref` win."""
    merged = dict(schema)
    while "$ref" in merged:
        ref = merged.pop("$ref")
        target: Any = load_schema()
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
        merged = {**target, **merged}
    return merged


def _with_defaults(data: Any) -> Any:
    """A copy of `data` with every missing key that has a schema default filled in."""
    return _filled(data, load_schema())


@dataclass(frozen=True)
class _DefaultsOf:
    """What filling defaults needs of one schema node, its `$ref`s followed once (not per value)."""

    properties: dict[str, Mapping[str, Any]]  # each property's resolved schema
    defaults: dict[str, Any]  # the properties that have a default
    items: Mapping[str, Any] | None


_DEFAULTS_OF: dict[int, tuple[Mapping[str, Any], _DefaultsOf]] = {}


def _defaults_of(schema: Mapping[str, Any]) -> _DefaultsOf:
    known = _DEFAULTS_OF.get(id(schema))
    if known is not None and known[0] is schema:
        return known[1]
    resolved = _resolve(schema)
    properties = {key: _resolve(sub) for key, sub in resolved.get("properties", {}).items()}
    items = resolved.get("items")
    found = _DefaultsOf(
        properties,
        {key: sub["default"] for key, sub in properties.items() if "default" in sub},
        items if isinstance(items, Mapping) else None,
    )
    _DEFAULTS_OF[id(schema)] = (schema, found)  # the schema kept alive, so its id stays its own
    return found


def _filled(instance: Any, schema: Mapping[str, Any] | None) -> Any:
    """`instance` copied (every mapping and list anew), defaults added where `schema` has them."""
    if isinstance(instance, dict):
        if schema is None:
            return {key: _filled(value, None) for key, value in instance.items()}
        of = _defaults_of(schema)
        out = {key: _filled(value, of.properties.get(key)) for key, value in instance.items()}
        for key, default in of.defaults.items():
            if key not in out:
                out[key] = _filled(default, of.properties[key])  # a copy: the schema's stays intact
        return out
    if isinstance(instance, list):
        items = _defaults_of(schema).items if schema is not None else None
        return [_filled(item, items) for item in instance]
    return instance


_TYPE_WORDS = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "true or false",
    "object": "a mapping",
    "array": "a list",
    "null": "nothing",
}

# Words people type for a backend, mapped to the backend they mean.
_ALIASES = {"nvidia": "cuda", "amd": "rocm", "hip": "rocm", "apple": "metal", "mps": "metal"}


def _explain(error: ValidationError, places: _Places) -> Iterator[ManifestProblem]:
    path = tuple(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = list(error.schema.get("properties", {}))
        for key in error.instance:
            if key not in allowed:
                yield places.problem((*path, key), _unknown_key(str(key), allowed), at_key=True)
    elif error.validator == "required" and isinstance(error.instance, dict):
        for key in error.validator_value:
            if key not in error.instance:
                yield places.problem(path, _missing_key(key, error))
    else:
        yield places.problem(path, _message(error))


def _unknown_key(key: str, allowed: list[str]) -> str:
    message = f"unknown key; allowed keys are {', '.join(allowed)}"
    guess = _closest(key, allowed)
    return f"{message}; did you mean {guess!r}?" if guess else message


def _closest(word: str, choices: Sequence[str]) -> str | None:
    def fold(text: str) -> str:
        return re.sub(r"[-_ ]", "", text.lower())

    for choice in choices:  # contextsize, context_size -> contextSize
        if fold(choice) == fold(word):
            return choice
    if (alias := _ALIASES.get(word.lower())) in choices:
        return alias
    matches = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _missing_key(key: str, error: ValidationError) -> str:
    message = f"missing required key {key!r}"
    if "then" in error.schema_path:  # required only in some cases; the `then` says which
        return f"{message}: {error.schema.get('description', 'required here')}"
    prop = _resolve(error.schema.get("properties", {}).get(key, {}))
    if "const" in prop:
        return f"{message}; add `{key}: {prop['const']}`"
    description = prop.get("description")
    return f"{message}; add it ({_sentence(description)})" if description else message


def _message(error: ValidationError) -> str:
    value, expected, schema = error.instance, error.validator_value, error.schema
    match error.validator:
        case "type":
            return f"expected {_type_words(expected)}, got {_show(value)}{_yaml_boolean_hint(value)}"
        case "enum":
            message = f"{_show(value)} is not one of {', '.join(map(str, expected))}"
            if isinstance(value, bool):
                return message + _yaml_boolean_hint(value)
            guess = _closest(str(value), [str(choice) for choice in expected])
            return f"{message}; did you mean {guess!r}?" if guess else message
        case "const":
            return f"must be {expected}, got {_show(value)}"
        case "pattern":
            title = schema.get("title", "value")
            rule = schema.get("description", f"it must match {expected}")
            return f"{_show(value)} is not a valid {title}; {_sentence(rule)}"
        case "minimum":
            return f"expected at least {expected}, got {_show(value)}"
        case "maximum":
            return f"expected at most {expected}, got {_show(value)}"
        case "minLength":
            return "must not be empty" if expected == 1 else f"expected at least {expected} characters"
        case "maxLength":
            return f"is {len(value)} characters long; at most {expected} are allowed"
        case "minItems":
            return f"needs at least {expected} {'entry' if expected == 1 else 'entries'}; add one"
        case "uniqueItems":
            return "lists the same entry twice; remove the duplicate"
        case "anyOf" | "oneOf":
            return _alternatives(error)
    return error.message


def _yaml_boolean_hint(value: Any) -> str:
    """YAML 1.1 reads a bare off/on/yes/no as a boolean, so `exact: off` arrives as false."""
    if not isinstance(value, bool):
        return ""
    word = "off" if value is False else "on"
    return f'; YAML reads a bare off/on/yes/no as a boolean: quote the word, e.g. "{word}"'


def _alternatives(error: ValidationError) -> str:
    """For "auto or a number from 1 to 64": explain the branch the value was evidently meant for,
    else list the choices."""
    branches = [_resolve(branch) for branch in error.validator_value]
    fitting = [i for i, branch in enumerate(branches) if _fits_type(error.instance, branch)]
    if len(fitting) == 1:
        for sub in error.context or []:
            if sub.relative_schema_path and sub.relative_schema_path[0] == fitting[0]:
                return _message(sub)
    choices = " or ".join(_describe(branch) for branch in branches)
    return f"expected {choices}, got {_show(error.instance)}"


def _fits_type(value: Any, schema: Mapping[str, Any]) -> bool:
    kind = schema.get("type")
    if kind is None or "const" in schema:
        return False  # a constant is a keyword, not a type the value was meant to be
    return _validator().is_type(value, kind)


def _describe(schema: Mapping[str, Any]) -> str:
    if "const" in schema:
        return repr(schema["const"])
    if "title" in schema:
        article = "an" if schema["title"][0] in "aeiouh" else "a"
        return f"{article} {schema['title']}"
    words = _type_words(schema.get("type", "value"))
    if schema.get("type") == "array" and isinstance(schema.get("items"), Mapping):
        item_type = schema["items"].get("type")
        return f"a list of {item_type}s" if isinstance(item_type, str) else words
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None and high is not None:
        return f"{words} from {low} to {high}"
    return f"{words} of at least {low}" if low is not None else words


def _type_words(expected: str | Sequence[str]) -> str:
    kinds = [expected] if isinstance(expected, str) else list(expected)
    return " or ".join(_TYPE_WORDS.get(kind, kind) for kind in kinds)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, int | float):
        return str(value)
    return repr(str(value))


def _sentence(text: str) -> str:
    """A description's first sentence as the tail of a message: first letter lowered (unless an
    acronym), no period."""
    text = re.split(r"(?<!e\.g)(?<!i\.e)\.\s", text.strip(), maxsplit=1)[0].rstrip(".")
    if len(text) > 1 and text[0].isupper() and not text[1].isupper():
        text = text[0].lower() + text[1:]
    return text


# ----------------------------------------------------------------------------------------------
# Rules a schema cannot express. Each check yields (path under spec, message, at_key) and reads the
# spec defensively: it also runs on documents the schema rejected, to report everything at once.

_Finding = tuple[DocPath, str, bool]


def _semantic_findings(spec: dict[str, Any], places: _Places) -> Iterator[_Finding]:
    yield from _check_unique_names(spec)
    yield from _check_references(spec)
    yield from _check_devices(spec)
    yield from _check_ports(spec, places)
    yield from _check_modes(spec)
    yield from _check_exposure(spec)


def _entries(section: Any, key: str) -> list[tuple[int, dict[str, Any]]]:
    """(index, entry) for the mapping entries of the list `section[key]`; anything else is skipped."""
    items = section.get(key) if isinstance(section, dict) else None
    if not isinstance(items, list):
        return []
    return [(i, item) for i, item in enumerate(items) if isinstance(item, dict)]


def _section(spec: dict[str, Any], key: str) -> dict[str, Any]:
    value = spec.get(key)
    return value if isinstance(value, dict) else {}


def _names(spec: dict[str, Any], key: str) -> list[str]:
    return [entry["name"] for _, entry in _entries(spec, key) if isinstance(entry.get("name"), str)]


_NAMED_LISTS: tuple[tuple[DocPath, str], ...] = (
    (("hosts",), "host"),
    (("models",), "model"),
    (("drafters",), "drafter"),
    (("gate", "agents"), "agent"),
)


def _check_unique_names(spec: dict[str, Any]) -> Iterator[_Finding]:
    for where, noun in _NAMED_LISTS:
        parent = spec if len(where) == 1 else _section(spec, where[0])
        first: dict[str, DocPath] = {}
        for index, entry in _entries(parent, where[-1]):
            name, path = entry.get("name"), (*where, index, "name")
            if not isinstance(name, str):
                continue
            if name in first:
                message = (
                    f"duplicate {noun} name {name!r} (also at {format_path(('spec', *first[name]))}); "
                    f"{noun} names must be unique, so rename one"
                )
                yield path, message, False
            first.setdefault(name, path)


def _unknown(label: str, noun: str, name: str, known: list[str]) -> str:
    message = f"{label}: {name!r} is not in spec.{noun}s, which has {', '.join(known) or 'nothing'}"
    guess = _closest(name, known)
    return f"{message}; did you mean {guess!r}?" if guess else f"{message}; add it there or fix the name"


def _check_references(spec: dict[str, Any]) -> Iterator[_Finding]:
    models, hosts = _names(spec, "models"), _names(spec, "hosts")
    target = _section(spec, "target")
    if isinstance(target.get("model"), str) and target["model"] not in models:
        yield ("target", "model"), _unknown("missing target model", "model", target["model"], models), False
    refs: list[tuple[DocPath, str, Any]] = [(("target", "host"), "host", target.get("host"))]
    for index, drafter in _entries(spec, "drafters"):
        refs.append((("drafters", index, "model"), "model", drafter.get("model")))
        refs.append((("drafters", index, "host"), "host", drafter.get("host")))
    refs.append((("proxy", "host"), "host", _section(spec, "proxy").get("host")))
    for path, noun, name in refs:
        known = models if noun == "model" else hosts
        if isinstance(name, str) and name not in known:
            yield path, _unknown(f"unknown {noun}", noun, name, known), False


def _check_devices(spec: dict[str, Any]) -> Iterator[_Finding]:
    for h, host in _entries(spec, "hosts"):
        runtime = host.get("runtime")
        if "docker" in host and runtime != "docker":
            message = "docker settings only apply to `runtime: docker`; remove them or set runtime: docker"
            yield ("hosts", h, "docker"), message, True
        seen: dict[tuple[Any, Any], int] = {}
        for g, gpu in _entries(host, "gpus"):
            backend = gpu.get("backend")
            if "threads" in gpu and backend in ("cuda", "rocm", "metal"):
                yield (
                    ("hosts", h, "gpus", g, "threads"),
                    "threads only applies to `backend: cpu`; remove it",
                    True,
                )
            if backend == "metal" and runtime in ("docker", "kubernetes"):
                message = (
                    f"Metal is not reachable from a container ({runtime}); set the host's runtime to "
                    "native (run `nix run .#worker` on the Mac) or process"
                )
                yield ("hosts", h, "gpus", g, "backend"), message, False
            device = (backend, gpu.get("index"))
            if backend != "cpu" and device in seen:
                message = (
                    f"{backend} device {device[1]} is already listed at "
                    f"spec.hosts[{h}].gpus[{seen[device]}]; list each device once or fix the index"
                )
                yield ("hosts", h, "gpus", g), message, False
            seen.setdefault(device, g)


def _port_claims(spec: dict[str, Any]) -> Iterator[tuple[Any, Any, DocPath, str]]:
    """(host name, port, path, what) for every port a unit of the manifest listens on."""
    hosts = _entries(spec, "hosts")
    for h, host in hosts:
        for g, gpu in _entries(host, "gpus"):
            path = ("hosts", h, "gpus", g, "port")
            yield (
                host.get("name"),
                gpu.get("port"),
                path,
                f"the rpc worker at {format_path(('spec', *path[:-1]))}",
            )
    target = _section(spec, "target")
    yield target.get("host"), target.get("port"), ("target", "port"), "the engine (spec.target)"
    for d, drafter in _entries(spec, "drafters"):
        if drafter.get("kind") == "llama-server":
            yield (
                drafter.get("host"),
                drafter.get("port"),
                ("drafters", d, "port"),
                f"drafter {drafter.get('name')!r}",
            )
    proxy = _section(spec, "proxy")
    if proxy:
        yield proxy.get("host"), proxy.get("port"), ("proxy", "port"), "the proxy"
    swarm = _section(spec, "swarm")
    if swarm.get("enabled") is True:
        for _, host in hosts:
            yield host.get("name"), swarm.get("port"), ("swarm", "port"), "the swarm sidecar"


def _check_ports(spec: dict[str, Any], places: _Places) -> Iterator[_Finding]:
    taken: dict[tuple[str, int], tuple[DocPath, str]] = {}
    for host, port, path, what in _port_claims(spec):
        if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool):
            continue
        if (host, port) not in taken:
            taken[(host, port)] = (path, what)
            continue
        other_path, other_what = taken[(host, port)]
        # Complain where the user wrote the port; a default they never saw is the wrong place.
        if not places.written(("spec", *path)) and places.written(("spec", *other_path)):
            path, what, other_what = other_path, other_what, what
        message = f"port {port} on host {host!r} is already used by {other_what}; pick another port"
        yield path, message, False


def _check_modes(spec: dict[str, Any]) -> Iterator[_Finding]:
    proxy, drafters = _section(spec, "proxy"), _entries(spec, "drafters")
    mode = proxy.get("mode")
    if proxy and mode in ("speculate", "race") and not drafters:
        message = (
            f"mode {mode} needs at least one entry in spec.drafters; add a drafter or set mode: passthrough"
        )
        yield ("proxy", "mode"), message, False
    if proxy and mode == "consensus" and len(drafters) < 2:
        message = "consensus needs at least two drafters to compare; add drafters or use mode: race"
        yield ("proxy", "mode"), message, False
    if drafters and not proxy:
        yield ("drafters",), "drafters are used by the proxy; add spec.proxy or remove them", True
    gate = _section(spec, "gate")
    if gate.get("enabled") is True:
        if not _entries(gate, "agents"):
            yield (
                ("gate", "agents"),
                "the gate is enabled but has no agents; add some or set enabled: false",
                False,
            )
        if not proxy:
            yield ("gate", "enabled"), "the gate is served by the proxy; add spec.proxy", False


def _exposures(spec: dict[str, Any]) -> Iterator[tuple[DocPath, str, str]]:
    """(path, what, the other way out) for each server that listens beyond loopback."""
    addresses = {h.get("name"): h.get("address") for _, h in _entries(spec, "hosts")}

    def beyond(host: Any) -> bool:
        address = addresses.get(host)
        return isinstance(address, str) and not is_loopback(address)

    proxy = _section(spec, "proxy")
    bind = proxy.get("bind")
    if proxy and isinstance(bind, str) and not is_loopback(bind):
        yield ("proxy", "bind"), f"the proxy binds {bind}", "or bind 127.0.0.1"
    swarm = _section(spec, "swarm")
    if swarm.get("enabled") is True:
        for name, address in addresses.items():
            if beyond(name):
                what = f"the swarm sidecar listens on host {name!r} at {address}"
                yield ("swarm", "enabled"), what, "or set enabled: false"
                break
    # The engine and llama-server drafters must be reachable by a proxy on another host.
    target = _section(spec, "target")
    host = target.get("host")
    if beyond(host) and proxy.get("host") != host:
        yield ("target", "host"), f"the engine listens on host {host!r} at {addresses[host]}", ""
    for d, drafter in _entries(spec, "drafters"):
        host = drafter.get("host")
        if drafter.get("kind") == "llama-server" and beyond(host) and proxy.get("host") != host:
            what = f"drafter {drafter.get('name')!r} listens on host {host!r} at {addresses[host]}"
            yield ("drafters", d, "host"), what, ""


def _check_exposure(spec: dict[str, Any]) -> Iterator[_Finding]:
    token = _section(spec, "auth").get("token")
    if isinstance(token, str) and token:
        return
    for path, what, alternative in _exposures(spec):
        message = (
            f"{what}, beyond loopback, so spec.auth.token must be set; add `token: ${{TIGHTWAD_TOKEN}}` "
            "under spec.auth and export TIGHTWAD_TOKEN"
        )
        yield path, f"{message}, {alternative}" if alternative else message, False
