"""The proxy's settings, from command-line flags or from a manifest's target/drafters/proxy
sections (flags win where both say something). Pure: no network, no processes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tightwad.errors import TightwadError
from tightwad.http import check_bind
from tightwad.manifest import Manifest

DRAFTER_KINDS = ("llama-server", "openai", "ollama", "ngram")
MODES = ("speculate", "race", "consensus", "passthrough")
CONSENSUS_POLICIES = ("strict", "majority", "any_disagree")
APPROXIMATE_NOTE = (
    "mode consensus is APPROXIMATE: tokens the drafters agree on ({policy}) are emitted without the "
    "target checking them, so replies are not guaranteed to be the target's"
)
DEFAULT_MAX_BODY = 8 * 1024 * 1024


@dataclass(frozen=True)
class DrafterConfig:
    kind: str
    url: str | None = None
    name: str = "drafter"
    remote_model: str | None = None  # openai / ollama: the model to ask for
    api_key: str | None = None
    ngram_n: int = 3


@dataclass(frozen=True)
class GateEndpointConfig:
    name: str
    url: str
    model: str | None = None
    api_key: str | None = None


@dataclass(frozen=True)
class GateConfig:
    """The quality gate (gate.py): agents write answers, the reviewer judges them."""

    agents: list[GateEndpointConfig]
    reviewer: GateEndpointConfig
    fail_closed: bool = True
    cache_size: int = 256


@dataclass(frozen=True)
class ProxyConfig:
    target_url: str
    drafters: list[DrafterConfig] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8088
    token: str | None = None  # clients must send it (required beyond loopback)
    target_token: str | None = None  # what the proxy sends to the engine
    mode: str = "speculate"  # race: several drafters, exact; consensus: APPROXIMATE (see consensus.py)
    consensus_policy: str = "strict"  # consensus only: strict | majority | any_disagree
    max_draft_tokens: int | None = None  # None = auto
    max_body_bytes: int = DEFAULT_MAX_BODY
    max_tokens: int | None = None  # the largest max_tokens a request may ask for
    pipeline: bool = True
    draft_timeout: float = 2.0  # a draft call slower than this (in a running reply) is a failure
    # Requests waiting for a conversation (conversations.py); None: as the engine's own queue.
    queue_limit: int | None = None
    queue_timeout: float | None = None  # seconds
    notes: list[str] = field(default_factory=list)  # things the user should know (printed at start)
    gate: GateConfig | None = None  # serves POST /tightwad/v1/gate/chat/completions when set

    def check(self) -> ProxyConfig:
        if self.mode not in MODES:
            raise TightwadError(f"mode {self.mode!r} is not served by this proxy yet; use one of {MODES}")
        if self.mode == "speculate" and not self.drafters:
            raise TightwadError("speculation needs a drafter: pass --draft URL (or --draft-kind ngram)")
        if self.mode == "race" and not self.drafters:
            raise TightwadError(
                "mode race needs drafters: spec.drafters, or --draft/--draft-kind per drafter"
            )
        if self.mode == "consensus" and len(self.drafters) < 2:
            raise TightwadError(
                "mode consensus needs at least two drafters to compare (spec.drafters, or --draft/"
                "--draft-kind more than once); with one drafter use mode speculate or race"
            )
        if self.mode in ("race", "consensus"):
            names = [d.name for d in self.drafters]
            if len(set(names)) != len(names):
                raise TightwadError(f"drafters need distinct names, got {names}")
        if self.consensus_policy not in CONSENSUS_POLICIES:
            raise TightwadError(
                f"consensus policy {self.consensus_policy!r} is not one of {', '.join(CONSENSUS_POLICIES)}"
            )
        for d in self.drafters:
            if d.kind not in DRAFTER_KINDS:
                raise TightwadError(f"drafter kind {d.kind!r} is not one of {', '.join(DRAFTER_KINDS)}")
            if d.kind != "ngram" and not d.url:
                raise TightwadError(f"a {d.kind} drafter needs a URL (--draft URL)")
        if self.max_draft_tokens is not None and not 1 <= self.max_draft_tokens <= 64:
            raise TightwadError("--max-draft-tokens must be 'auto' or a number from 1 to 64")
        if self.queue_limit is not None and self.queue_limit < 0:
            raise TightwadError(f"--queue must be 'auto' or a number >= 0, got {self.queue_limit}")
        if self.queue_timeout is not None and not self.queue_timeout > 0:
            raise TightwadError(f"--queue-timeout must be a number of seconds > 0, got {self.queue_timeout}")
        check_bind(self.host, self.token)  # the loopback rule, before anything starts
        return self


def parse_max_draft(value: str | int | None) -> int | None:
    if value is None or value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise TightwadError(f"--max-draft-tokens must be 'auto' or a number, got {value!r}") from None


def parse_queue(value: str | int | None) -> int | None:
    """--queue: 'auto' (None: the engine's own queue_limit) or how many requests may wait."""
    if value is None or value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise TightwadError(f"--queue must be 'auto' or a number, got {value!r}") from None


def _url(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}"


def from_manifest(manifest: Manifest) -> ProxyConfig:
    """Where the engine and drafters of a manifest listen, and the proxy section's settings."""
    section = manifest.proxy
    if section is None:
        raise TightwadError(f"{manifest.source} has no spec.proxy section: add one, or pass --target/--draft")
    target = manifest.target
    target_url = _url(manifest.host(target.host).address, target.port)
    notes: list[str] = []
    drafters = []
    for d in manifest.drafters:
        url = d.url
        if d.runs_here:
            if not d.port or d.host is None:
                raise TightwadError(
                    f"drafter {d.name!r} has no port: set spec.drafters[].port so the proxy can find it"
                )
            url = _url(manifest.host(d.host).address, d.port)
        drafters.append(
            DrafterConfig(
                kind=d.kind,
                url=url,
                name=d.name,
                remote_model=d.remote_model,
                # Drafters Tightwad runs are started with the cluster's token as their API key.
                api_key=manifest.token if d.runs_here else d.api_key,
                ngram_n=d.ngram_n,
            )
        )
    mode = section.mode
    policy = section.consensus_policy
    if mode == "consensus":
        notes.append(APPROXIMATE_NOTE.format(policy=policy))
    gate = None
    gate_section = manifest.gate
    if gate_section.enabled:
        reviewer = gate_section.reviewer
        review_url = reviewer.url
        gate = GateConfig(
            agents=[GateEndpointConfig(a.name, a.url, a.model, a.api_key) for a in gate_section.agents],
            reviewer=GateEndpointConfig(
                "engine" if review_url == "engine" else "reviewer",
                target_url if review_url == "engine" else review_url,
                reviewer.model,
                manifest.token if review_url == "engine" else reviewer.api_key,
            ),
            fail_closed=gate_section.fail_closed,
            cache_size=gate_section.cache_size,
        )
    limits = section.limits
    max_draft = section.max_draft_tokens
    return ProxyConfig(
        target_url=target_url,
        drafters=drafters[:1] if mode == "speculate" else drafters,
        host=section.bind,
        port=section.port,
        token=manifest.token,
        target_token=manifest.token,
        mode=mode,
        consensus_policy=policy,
        gate=gate,
        max_draft_tokens=parse_max_draft(max_draft),
        max_body_bytes=limits.max_body_bytes,
        max_tokens=limits.max_tokens,
        notes=notes,
    )


def with_overrides(config: ProxyConfig, **changes: object) -> ProxyConfig:
    """`config` with every change that is not None."""
    return replace(config, **{k: v for k, v in changes.items() if v is not None})
