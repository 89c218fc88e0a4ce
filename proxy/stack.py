"""Wiring: a `ProxyConfig` -> the objects that serve it. No routes, no requests, no I/O at build time.

Mode speculate gets one guarded drafter; modes race and consensus get every configured drafter,
each guarded, behind one `RaceDrafter`. Either way a `KController` chooses K and a `Speculator`
runs the loop. Mode passthrough (or no drafter) builds no loop: every request goes to the engine.
The quality gate is built when the config has a gate section, whatever the mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tightwad.proxy.config import DrafterConfig, GateConfig, ProxyConfig
from tightwad.proxy.conversations import ConversationPool
from tightwad.proxy.drafters.base import Drafter
from tightwad.proxy.drafters.guard import GuardedDrafter
from tightwad.proxy.drafters.llama_server import LlamaServerDrafter
from tightwad.proxy.drafters.ngram import NgramDrafter
from tightwad.proxy.drafters.race import RaceDrafter
from tightwad.proxy.drafters.text import OllamaDrafter, OpenAIDrafter
from tightwad.proxy.gate import Endpoint, Gate
from tightwad.proxy.kpolicy.controller import KController, KPolicy
from tightwad.proxy.speculate import SpeculationSettings, Speculator
from tightwad.proxy.telemetry import Telemetry
from tightwad.proxy.upstream import EngineClient

SPECULATING_MODES = ("speculate", "race", "consensus")
# Until the engine says how many conversations it keeps (the proxy learns it at start).
DEFAULT_CONVERSATIONS = 4


@dataclass
class SpeculationStack:
    """The speculation loop and the two parts of it that routes report on."""

    drafter: GuardedDrafter | RaceDrafter
    controller: KController
    speculator: Speculator


def make_drafter(config: DrafterConfig, engine: EngineClient, engine_token: str | None = None) -> Drafter:
    """One drafter of the configured kind (text drafters re-tokenize with the engine's tokenizer).
    A llama-server drafter is one Tightwad runs, with the cluster's token as its API key (the
    engine's token, `engine_token`) unless the config names another key."""
    if config.kind == "llama-server":
        assert config.url
        return LlamaServerDrafter(config.url, name=config.name, api_key=config.api_key or engine_token)
    if config.kind in ("openai", "ollama"):
        assert config.url
        cls = OpenAIDrafter if config.kind == "openai" else OllamaDrafter
        return cls(
            config.url, engine.tokenize, model=config.remote_model, api_key=config.api_key, name=config.name
        )
    return NgramDrafter(config.ngram_n, name=config.name)


def build_speculation(
    config: ProxyConfig, engine: EngineClient, telemetry: Telemetry, n_vocab: Callable[[], int]
) -> SpeculationStack | None:
    """The loop for the config's mode, or None when requests are only passed through.
    `n_vocab` is read at each draft: the vocabulary is known only once the engine answered."""
    if config.mode not in SPECULATING_MODES or not config.drafters:
        return None
    if config.mode == "speculate":
        single = make_drafter(config.drafters[0], engine, config.target_token)
        guards = [GuardedDrafter(single, n_vocab=n_vocab)]
        # An n-gram lookup is instant: drafting it during the verify would gain nothing.
        pipelined = config.pipeline and single.kind != "ngram"
    else:  # race / consensus: every drafter each round, verified in one pass (drafters/race.py)
        guards = [
            GuardedDrafter(make_drafter(d, engine, config.target_token), n_vocab=n_vocab)
            for d in config.drafters
        ]
        pipelined = config.pipeline  # drafts the next round on the best-guess candidate
    controller = KController(KPolicy(fixed_k=config.max_draft_tokens, pipelined=pipelined))
    # The race reads the controller's costs to decide how long to wait for slower drafters.
    drafter = guards[0] if config.mode == "speculate" else RaceDrafter(guards, costs=controller.costs)
    speculator = Speculator(
        engine,
        drafter,
        controller,
        ConversationPool(DEFAULT_CONVERSATIONS),
        telemetry,
        SpeculationSettings(
            pipeline=pipelined,
            draft_timeout=config.draft_timeout,
            consensus=config.consensus_policy if config.mode == "consensus" else None,
        ),
    )
    return SpeculationStack(drafter, controller, speculator)


def build_gate(config: GateConfig) -> Gate:
    """The quality gate's agents and reviewer, as plain OpenAI-compatible endpoints."""
    return Gate(
        [Endpoint(a.name, a.url, a.model, a.api_key) for a in config.agents],
        Endpoint(config.reviewer.name, config.reviewer.url, config.reviewer.model, config.reviewer.api_key),
        fail_closed=config.fail_closed,
        cache_size=config.cache_size,
    )
