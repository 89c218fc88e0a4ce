"""Typed, frozen views of a validated manifest: `Host`, `Gpu`, `Target`, `Drafter`, `ProxySpec`, ...

The JSON Schema (tightwad/schema/cluster.schema.json) stays the one source for validation, the
reference docs and the CRD; these classes only give its objects names and types, so code reads
`target.max_conversations` instead of `int(target["maxConversations"])`. Each field is a schema
property in snake_case (`modelDir` -> `model_dir`), and its default is the schema's, so defaults are
filled in once, by `tightwad.manifest`, and never repeated at the places that read them
(tests/core/test_manifest_views.py checks that views and schema agree).

Views are built by `build_view` from a document the schema has already accepted; they do not
validate anything themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args, get_origin

# The schema's enums, as types.
DeviceBackend = Literal["cuda", "rocm", "metal", "cpu"]
Runtime = Literal["process", "docker", "kubernetes", "native"]
DrafterKind = Literal["llama-server", "openai", "ollama", "ngram"]
ProxyMode = Literal["speculate", "race", "consensus", "passthrough"]
ConsensusPolicy = Literal["strict", "majority", "any_disagree"]
ExactMode = Literal["off", "strict"]

_SIZE = re.compile(r"^([0-9]+(?:\.[0-9]+)?) ?(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def parse_size(text: str) -> int:
    """Bytes in a manifest size such as `8GiB`, `12GB` or `512MiB`."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a size; write a number and a unit, e.g. 8GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


# ----------------------------------------------------------------------------------------------
# The views, one per schema object, in the schema's order


@dataclass(frozen=True)
class Metadata:
    """`metadata`: the cluster's identity."""

    name: str
    namespace: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Auth:
    """`spec.auth`: credentials shared by the servers Tightwad runs."""

    token: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    """`spec.models[]`: one GGUF model."""

    name: str
    source: str
    sha256: str | None = None
    context_size: int = 4096


@dataclass(frozen=True)
class DockerTls:
    """`spec.hosts[].docker.tls`: client TLS for a tcp:// Docker endpoint."""

    ca: str
    cert: str
    key: str


@dataclass(frozen=True)
class DockerAccess:
    """`spec.hosts[].docker`: how to reach a host's Docker daemon."""

    endpoint: str
    tls: DockerTls | None = None


@dataclass(frozen=True)
class Gpu:
    """`spec.hosts[].gpus[]`: one device lent to the pool, i.e. one rpc worker."""

    backend: DeviceBackend
    index: int = 0
    memory: str | None = None
    port: int | None = None
    threads: int | None = None

    @property
    def memory_bytes(self) -> int | None:
        """The memory this device declares, in bytes; None when it leaves it to the worker."""
        return parse_size(self.memory) if self.memory is not None else None


@dataclass(frozen=True)
class Host:
    """`spec.hosts[]`: one machine and the devices it lends."""

    name: str
    address: str
    runtime: Runtime = "process"
    docker: DockerAccess | None = None
    gpus: tuple[Gpu, ...] = ()
    memory: str | None = None
    model_dir: str = "/var/lib/tightwad/models"
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class QueueSettings:
    """`spec.target.queue`: how many requests may wait for a conversation, and for how long."""

    limit: Literal["auto"] | int = "auto"  # the engine's --queue
    timeout_seconds: int = 30  # the engine's --queue-timeout


@dataclass(frozen=True)
class Target:
    """`spec.target`: the big model, run by the engine across the pool."""

    model: str
    host: str
    port: int = 8080
    context_size: int | None = None  # None: the model's own
    tensor_split: Literal["auto"] | tuple[float, ...] = "auto"
    max_conversations: Literal["auto"] | int = 8  # KV sequences the engine keeps, one per conversation
    queue: QueueSettings = QueueSettings()  # requests beyond the conversations wait here, bounded
    aliases: tuple[str, ...] = ()  # other names a request's `model` may use
    exact: ExactMode = "off"  # strict: batch-invariant CPU kernels in the engine and its workers


@dataclass(frozen=True)
class NgramSettings:
    """`spec.drafters[].ngram`."""

    n: int = 3


@dataclass(frozen=True)
class Drafter:
    """`spec.drafters[]`: one source of draft tokens."""

    name: str
    kind: DrafterKind
    model: str | None = None
    host: str | None = None
    url: str | None = None
    port: int | None = None
    remote_model: str | None = None
    api_key: str | None = None
    ngram: NgramSettings | None = None

    @property
    def runs_here(self) -> bool:
        """A llama-server Tightwad runs (the other kinds are servers, or no server, it only uses)."""
        return self.kind == "llama-server"

    @property
    def ngram_n(self) -> int:
        return (self.ngram or NgramSettings()).n


@dataclass(frozen=True)
class ConsensusSettings:
    """`spec.proxy.consensus`."""

    policy: ConsensusPolicy = "strict"


@dataclass(frozen=True)
class ProxyLimits:
    """`spec.proxy.limits`: what one request may ask for."""

    max_body_bytes: int = 8388608
    max_tokens: int | None = None


@dataclass(frozen=True)
class ProxySpec:
    """`spec.proxy`: the front door."""

    host: str
    bind: str = "127.0.0.1"
    port: int = 8088
    mode: ProxyMode = "speculate"
    max_draft_tokens: Literal["auto"] | int = "auto"
    consensus: ConsensusSettings | None = None
    limits: ProxyLimits = ProxyLimits()

    @property
    def consensus_policy(self) -> ConsensusPolicy:
        return (self.consensus or ConsensusSettings()).policy


@dataclass(frozen=True)
class GateAgent:
    """`spec.gate.agents[]`: one cheap writer."""

    name: str
    url: str
    model: str
    api_key: str | None = None


@dataclass(frozen=True)
class GateReviewer:
    """`spec.gate.reviewer`: the strong model that judges every answer."""

    url: str = "engine"  # `engine`: the cluster's own target
    model: str | None = None
    api_key: str | None = None


@dataclass(frozen=True)
class GateSpec:
    """`spec.gate`."""

    enabled: bool = False
    agents: tuple[GateAgent, ...] = ()
    reviewer: GateReviewer = GateReviewer()
    fail_closed: bool = True
    cache_size: int = 256


@dataclass(frozen=True)
class SwarmSpec:
    """`spec.swarm`: peer-to-peer model distribution."""

    enabled: bool = True
    port: int = 8089
    piece_size: str = "64MiB"
    peers: tuple[str, ...] = ()
    trackers: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClusterSpec:
    """`spec`: the desired cluster."""

    models: tuple[ModelSpec, ...]
    hosts: tuple[Host, ...]
    target: Target
    auth: Auth = Auth()
    drafters: tuple[Drafter, ...] = ()
    proxy: ProxySpec | None = None
    gate: GateSpec = GateSpec()
    swarm: SwarmSpec = SwarmSpec()

    def host(self, name: str) -> Host:
        """The host called `name`; KeyError if there is none."""
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def model(self, name: str) -> ModelSpec:
        """The model called `name`; KeyError if there is none."""
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(name)

    @property
    def context_size(self) -> int:
        """The target's context window: its own `contextSize`, else its model's."""
        if self.target.context_size is not None:
            return self.target.context_size
        return self.model(self.target.model).context_size

    @property
    def token(self) -> str | None:
        """The bearer token servers beyond loopback require, or None when none is set."""
        return self.auth.token or None


# ----------------------------------------------------------------------------------------------
# Building views from the document


View = TypeVar("View")


def json_key(name: str) -> str:
    """The schema property a view field stands for: `model_dir` -> `modelDir`."""
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def build_view(cls: type[View], data: Mapping[str, Any]) -> View:
    """The view `cls` of the schema object `data` (validated, defaults filled in); keys the
    document leaves out take the field's default, which is the schema's."""
    values = {}
    for name, key, hint in _fields(cls):
        if key in data:
            values[name] = _convert(hint, data[key])
    return cls(**values)


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, str, Any], ...]:
    """(field, schema key, type) of a view class; worked out once per class (resolving the hints
    costs far more than building a view: a 1000-host manifest builds thousands)."""
    hints = typing.get_type_hints(cls)
    return tuple((item.name, json_key(item.name), hints[item.name]) for item in dataclasses.fields(cls))


def _convert(hint: Any, value: Any) -> Any:
    """A document value as the field typed `hint` holds it: objects as views, lists as tuples."""
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in get_args(hint):
            if dataclasses.is_dataclass(option) and isinstance(value, Mapping):
                return build_view(option, value)  # type: ignore[arg-type]
            if get_origin(option) is tuple and isinstance(value, list):
                return _convert(option, value)
        return value
    if origin is tuple:
        return tuple(_convert(get_args(hint)[0], item) for item in value)
    if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        return build_view(hint, value)  # type: ignore[arg-type]
    if isinstance(value, Mapping):
        return dict(value)
    return value
