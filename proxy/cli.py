"""`tightwad proxy`: the front door on :8088.

    tightwad proxy start --target URL --draft URL [--draft-kind llama-server|openai|ollama|ngram]
                         [--manifest FILE] [--port 8088] [--host 127.0.0.1] [--token T]
                         [--max-draft-tokens auto|N] [--no-pipeline] [--mode speculate|passthrough]
                         [--queue auto|N] [--queue-timeout SECONDS]
    tightwad proxy status [--url http://127.0.0.1:8088] [--token T] [--watch SECONDS] [--json]

With --manifest the engine, drafter and proxy settings come from its target/drafters/proxy
sections; flags given as well win. Listening beyond loopback needs a token (--token,
TIGHTWAD_TOKEN or spec.auth.token). Exit codes: 0 after a clean shutdown, 1 when it could not start.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from tightwad import http
from tightwad.errors import TightwadError
from tightwad.manifest import load_manifest
from tightwad.proxy.config import (
    APPROXIMATE_NOTE,
    CONSENSUS_POLICIES,
    DRAFTER_KINDS,
    MODES,
    DrafterConfig,
    GateConfig,
    GateEndpointConfig,
    ProxyConfig,
    from_manifest,
    parse_max_draft,
    parse_queue,
    with_overrides,
)

err = Console(stderr=True, highlight=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tightwad proxy", description="The speculative OpenAI-compatible proxy.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="serve the OpenAI API in front of the engine, with speculation")
    s.add_argument("--target", help="the engine's URL, e.g. http://127.0.0.1:8080")
    s.add_argument("--draft", help="the drafter's URL (not needed for --draft-kind ngram)")
    s.add_argument("--draft-kind", choices=DRAFTER_KINDS, default=None, help="default: llama-server")
    s.add_argument("--draft-model", default=None, help="model name to ask an openai/ollama drafter for")
    s.add_argument("--draft-api-key", default=None, help="API key of an openai drafter")
    s.add_argument("--ngram", type=int, default=3, help="n-gram length of the ngram drafter")
    s.add_argument("--manifest", default=None, help="take engine, drafter and proxy settings from this file")
    s.add_argument("--port", type=int, default=None, help="default 8088")
    s.add_argument(
        "--host", default=None, help="listen address, default 127.0.0.1 (beyond loopback: --token)"
    )
    s.add_argument("--token", default=None, help="bearer token clients must send (or TIGHTWAD_TOKEN)")
    s.add_argument("--target-token", default=None, help="token the engine wants (default: --token)")
    s.add_argument("--max-draft-tokens", default=None, help="'auto' (default) or a fixed K from 1 to 64")
    s.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="default speculate; race: several drafters (--drafter), exact; consensus: APPROXIMATE",
    )
    s.add_argument(
        "--drafter",
        action="append",
        default=None,
        metavar="NAME:KIND[:URL]",
        help="a race/consensus drafter (repeat), e.g. q4:llama-server:http://127.0.0.1:8081, lookup:ngram",
    )
    s.add_argument(
        "--consensus-policy",
        choices=CONSENSUS_POLICIES,
        default=None,
        help="mode consensus (APPROXIMATE): when the target is skipped (default strict)",
    )
    s.add_argument("--no-pipeline", action="store_true", help="do not draft round n+1 during verify n")
    s.add_argument(
        "--draft-timeout",
        type=float,
        default=None,
        help="seconds after which a draft call counts as failed (2)",
    )
    s.add_argument(
        "--gate-agent",
        action="append",
        default=None,
        metavar="NAME=URL[#MODEL]",
        help="serve the quality gate with this agent (repeat), e.g. qwen=http://127.0.0.1:11434/v1#qwen2.5:3b",
    )
    s.add_argument(
        "--gate-reviewer",
        default=None,
        metavar="engine|URL[#MODEL]",
        help="who reviews the gate's answers (default: the engine)",
    )
    s.add_argument(
        "--gate-fail-open",
        action="store_true",
        help="serve agents' answers unreviewed when the reviewer fails (default: fail closed)",
    )
    s.add_argument(
        "--queue",
        default=None,
        metavar="auto|N",
        help="requests that may wait for a conversation before new ones get 503 queue_full with "
        "Retry-After ('auto', default: the engine's own --queue)",
    )
    s.add_argument(
        "--queue-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="a request waiting longer for a conversation gets 503 queue_timeout with Retry-After "
        "(default: the engine's own --queue-timeout)",
    )
    s.add_argument("--max-body-bytes", type=int, default=None)
    s.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens a request may ask for")
    st = sub.add_parser("status", help="print a running proxy's live numbers")
    st.add_argument("--url", default="http://127.0.0.1:8088")
    st.add_argument("--token", default=None, help="(or TIGHTWAD_TOKEN)")
    st.add_argument("--watch", type=float, default=None, metavar="SECONDS", help="refresh until Ctrl-C")
    st.add_argument("--json", action="store_true", help="print the raw JSON")
    return p


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    token = args.token or os.environ.get("TIGHTWAD_TOKEN") or None
    if args.manifest:
        config = from_manifest(load_manifest(args.manifest))
    else:
        if not args.target:
            raise TightwadError("say where the engine is: --target URL (or --manifest FILE)")
        config = ProxyConfig(target_url=args.target)
    drafters = None
    if args.draft or args.draft_kind:
        kind = args.draft_kind or "llama-server"
        drafters = [
            DrafterConfig(
                kind=kind,
                url=args.draft,
                name=kind,
                remote_model=args.draft_model,
                api_key=args.draft_api_key,
                ngram_n=args.ngram,
            )
        ]
    if args.drafter:
        drafters = [*(drafters or []), *(parse_drafter(spec, args) for spec in args.drafter)]
    config = with_overrides(
        config,
        target_url=args.target,
        drafters=drafters,
        host=args.host,
        port=args.port,
        token=token,
        target_token=args.target_token or token,
        mode=args.mode,
        max_body_bytes=args.max_body_bytes,
        max_tokens=args.max_tokens,
        draft_timeout=args.draft_timeout,
        consensus_policy=args.consensus_policy,
        queue_limit=parse_queue(args.queue),
        queue_timeout=args.queue_timeout,
    )
    if args.gate_agent:
        config = replace(config, gate=gate_from_args(args, config))
    if config.mode == "consensus" and not any("APPROXIMATE" in n for n in config.notes):
        config = replace(
            config, notes=[*config.notes, APPROXIMATE_NOTE.format(policy=config.consensus_policy)]
        )
    if args.max_draft_tokens is not None:  # "auto" is None, which with_overrides would skip
        config = replace(config, max_draft_tokens=parse_max_draft(args.max_draft_tokens))
    if args.no_pipeline:
        config = replace(config, pipeline=False)
    return config.check()


def gate_from_args(args: argparse.Namespace, config: ProxyConfig) -> GateConfig:
    """--gate-agent NAME=URL[#MODEL] (repeatable) and --gate-reviewer engine|URL[#MODEL]."""
    agents = []
    for spec in args.gate_agent:
        name, sep, rest = spec.partition("=")
        url, _, model = rest.partition("#")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise TightwadError(
                f"--gate-agent {spec!r}: write NAME=URL[#MODEL], e.g. qwen=http://127.0.0.1:11434/v1#qwen2.5:3b"
            )
        agents.append(GateEndpointConfig(name, url, model or None))
    reviewer = args.gate_reviewer or "engine"
    if reviewer == "engine":
        judge = GateEndpointConfig("engine", config.target_url, None, config.target_token)
    else:
        url, _, model = reviewer.partition("#")
        judge = GateEndpointConfig("reviewer", url, model or None)
    return GateConfig(agents, judge, fail_closed=not args.gate_fail_open)


def parse_drafter(spec: str, args: argparse.Namespace) -> DrafterConfig:
    """`NAME:KIND[:URL]` (the URL may hold colons) -> one drafter of a race or consensus."""
    parts = spec.split(":", 2)
    if len(parts) < 2 or not parts[0] or parts[1] not in DRAFTER_KINDS:
        raise TightwadError(
            f"--drafter {spec!r}: write NAME:KIND[:URL] with KIND one of {', '.join(DRAFTER_KINDS)}, "
            "e.g. q4:llama-server:http://127.0.0.1:8081 or lookup:ngram"
        )
    return DrafterConfig(
        kind=parts[1],
        url=parts[2] if len(parts) == 3 else None,
        name=parts[0],
        remote_model=args.draft_model,
        api_key=args.draft_api_key,
        ngram_n=args.ngram,
    )


def start(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except TightwadError as exc:
        err.print(f"error: {exc}")
        return 1
    from tightwad.proxy.app import create_app

    for note in config.notes:
        err.print(f"note: {note}")
    app = create_app(config)
    drafter = config.drafters[0] if config.drafters and config.mode == "speculate" else None
    what = f"drafter {drafter.kind} {drafter.url or ''}".rstrip() if drafter else "passthrough"
    if config.mode in ("race", "consensus"):
        names = ", ".join(f"{d.name} ({d.kind})" for d in config.drafters)
        what = f"{config.mode} of {names}"
        if config.mode == "consensus":
            what += f", policy {config.consensus_policy}, APPROXIMATE"

    def announce(url: str) -> None:
        k = config.max_draft_tokens or "auto"
        print(f"tightwad proxy ready: {url} -> engine {config.target_url}, {what}, K={k}", flush=True)

    try:
        started = http.serve(app, config.host, config.port, token=config.token, on_ready=announce)
    except TightwadError as exc:  # the port is taken
        err.print(f"error: {exc}")
        return 1
    return 0 if started else 1


# status -------------------------------------------------------------------------------------------
def fetch_stats(url: str, token: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(f"{url.rstrip('/')}/tightwad/v1/stats", headers=headers, timeout=5)
    except httpx.HTTPError as exc:
        raise TightwadError(f"no proxy answers at {url} ({type(exc).__name__}): is it running?") from exc
    if response.status_code == 401:
        raise TightwadError(f"{url} wants a token: pass --token or set TIGHTWAD_TOKEN")
    if response.status_code != 200:
        raise TightwadError(f"{url}/tightwad/v1/stats answered HTTP {response.status_code}")
    return dict(response.json())


def _fmt(value: Any, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3g}{suffix}" if abs(value) < 100 else f"{value:,.0f}{suffix}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "-"
    return f"{value}{suffix}"


def _drafter_state(drafter: dict[str, Any]) -> str:
    state = "up" if drafter.get("available", True) else f"backing off: {drafter.get('last_error')}"
    return f"{drafter.get('kind', '-')} ({state})"


def _queue(admission: dict[str, Any]) -> str:
    if "conversations" not in admission:
        return "-"
    return (
        f"{admission['busy']}/{admission['conversations']} busy, {admission['waiting']} waiting "
        f"(at most {admission['queue_limit']}, {admission['queue_timeout_s']:g} s)"
    )


def render(stats: dict[str, Any]) -> Group:
    table = Table(
        title=f"tightwad proxy — {stats.get('mode')} — {stats.get('model') or 'engine not reached'}"
    )
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    policy = stats.get("policy") or {}
    drafter = stats.get("drafter") or {}
    rows = [
        ("requests", _fmt(stats.get("requests"))),
        ("rounds", _fmt(stats.get("rounds"))),
        ("acceptance (measured)", _fmt(stats.get("acceptance_measured"))),
        ("acceptance (estimate)", _fmt(policy.get("acceptance"))),
        ("tokens per round", _fmt(stats.get("tokens_per_round"))),
        ("K now", "off" if policy and not policy.get("speculating") else _fmt(policy.get("k"))),
        ("tok/s (recent replies)", _fmt(stats.get("tok_s"))),
        ("target alone tok/s (estimate)", _fmt(policy.get("target_alone_tok_s"))),
        ("speedup (recent replies / estimate)", _fmt(stats.get("speedup_measured"), "x")),
        ("speedup (cost model, this K)", _fmt(policy.get("expected_speedup"), "x")),
        ("time to first token", _fmt(stats.get("ttft_ms"), " ms")),
        ("fallbacks", _fmt(stats.get("fallbacks"))),
        ("errors", _fmt(stats.get("errors"))),
        ("conversations busy / waiting", _queue(stats.get("admission") or {})),
        ("refused (503, Retry-After)", _fmt((stats.get("admission") or {}).get("refused"))),
        (
            "drafter",
            f"{drafter.get('kind', '-')} ({'up' if drafter.get('available', True) else 'backing off'})",
        ),
        ("engine", _fmt(stats.get("engine"))),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return Group(table)


def status(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get("TIGHTWAD_TOKEN") or None
    console = Console()
    try:
        if args.json:
            print(json.dumps(fetch_stats(args.url, token), indent=2))
            return 0
        if args.watch is None:
            console.print(render(fetch_stats(args.url, token)))
            return 0
        with Live(render(fetch_stats(args.url, token)), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(args.watch)
                live.update(render(fetch_stats(args.url, token)))
    except TightwadError as exc:
        err.print(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "start":
        return start(args)
    return status(args)


if __name__ == "__main__":
    sys.exit(main())
