"""`tightwad proxy start` flags for race, consensus (APPROXIMATE) and the gate."""

from __future__ import annotations

import pytest
from support.proxies import cli_config

from tightwad.errors import TightwadError
from tightwad.proxy.config import ProxyConfig


def config(*argv: str) -> ProxyConfig:
    return cli_config("--target", "http://127.0.0.1:8080", *argv)


def test_race_takes_several_named_drafters() -> None:
    c = config(
        "--mode", "race", "--drafter", "q4:llama-server:http://127.0.0.1:8081", "--drafter", "lookup:ngram"
    )
    assert c.mode == "race" and [(d.name, d.kind, d.url) for d in c.drafters] == [
        ("q4", "llama-server", "http://127.0.0.1:8081"),
        ("lookup", "ngram", None),
    ]
    assert not c.notes
    with pytest.raises(TightwadError, match="NAME:KIND"):
        config("--mode", "race", "--drafter", "q4")


def test_consensus_is_announced_as_approximate() -> None:
    c = config(
        "--mode",
        "consensus",
        "--consensus-policy",
        "majority",
        "--drafter",
        "a:ngram",
        "--drafter",
        "b:ngram",
    )
    assert c.consensus_policy == "majority" and any("APPROXIMATE" in n and "majority" in n for n in c.notes)
    with pytest.raises(TightwadError, match="at least two drafters"):
        config("--mode", "consensus", "--drafter", "a:ngram")


def test_gate_flags() -> None:
    c = config(
        "--mode", "passthrough", "--gate-agent", "qwen=http://127.0.0.1:11434/v1#qwen2.5:3b", "--token", "t"
    )
    assert c.gate is not None and c.gate.fail_closed
    assert (c.gate.agents[0].name, c.gate.agents[0].url, c.gate.agents[0].model) == (
        "qwen",
        "http://127.0.0.1:11434/v1",
        "qwen2.5:3b",
    )
    assert c.gate.reviewer.url == "http://127.0.0.1:8080" and c.gate.reviewer.api_key == "t"
    with pytest.raises(TightwadError, match="NAME=URL"):
        config("--mode", "passthrough", "--gate-agent", "qwen")
