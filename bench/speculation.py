"""Speculation through the proxy vs the target alone vs llama-server's own speculation, one run.

Two setups:
  local   the target (SmolLM2-135M F32) in the engine on this machine's CPU;
  pooled  the target split over two rpc workers, each behind a delay proxy adding 2 ms each way
          (tests/support/netdelay.py): a pool on a LAN.
Three ways to decode the same prompt greedily (temperature 0), same token ids, same length:
  (a) the target alone: the engine's /v1/completions;
  (b) llama-server's in-process speculation with the same pair
      (`-m target -md draft --spec-type draft-simple --spec-draft-n-max N`), on the same workers;
  (c) the proxy: the engine verifies, a llama-server with the draft model drafts, K chosen by the
      cost model (`--max-draft-tokens auto`), pipelined; (c') the same without pipelining.
The pair is the same model at two precisions (Q4_1 drafts for its own F32 dequantization): a
SAME-MODEL PAIR with unusually high acceptance, not a small/large pair. Every process runs 1 thread.

Then the proxy's passthrough overhead (`--mode passthrough` vs the engine directly, local setup):
time to first token added and the decode-rate ratio, alternating runs, medians.

tok/s is end to end: completion tokens / wall time of the request (time to first token included).

Usage: .venv/bin/python bench/speculation.py [--tokens 96] [--runs 2] [--draft-n 8] [--delay-ms 2]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from _common import (
    Processes,
    engine_command,
    log_folder,
    netdelay_command,
    proxy_command,
    sse_chunks,
    table,
)
from rich.console import Console

from tightwad import models, toolchain
from tightwad.launch import free_port, llama_server_command, rpc_worker_command

PROMPT = "<|im_start|>user\nWrite a long story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"
SHORT = "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"
console = Console(width=150)


@dataclass
class Run:
    tokens: list[int]
    wall: float  # seconds, request start to last token
    ttft: float  # seconds, request start to first token
    stamps: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return len(self.tokens) / self.wall

    @property
    def decode_rate(self) -> float:
        return (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0]) if len(self.stamps) > 1 else 0.0


def stream(url: str, body: dict, llama_server: bool = False) -> Run:  # type: ignore[type-arg]
    """One streamed greedy request; token ids and arrival times."""
    tokens: list[int] = []
    stamps: list[float] = []
    for now, chunk in sse_chunks(url, {**body, "stream": True}):
        if "error" in chunk:
            raise SystemExit(f"{url} failed mid-stream: {chunk['error']}")
        new = chunk.get("tokens") or [] if llama_server else chunk["choices"][0].get("tokens") or []
        tokens += new
        stamps += [now] * len(new)
    if not stamps:
        raise SystemExit(f"{url} streamed no tokens")
    return Run(tokens, stamps[-1], stamps[0], stamps)


def openai_body(prompt: list[int], n: int) -> dict:  # type: ignore[type-arg]
    return {"prompt": prompt, "max_tokens": n, "temperature": 0, "return_tokens": True}


def server_body(prompt: list[int], n: int) -> dict:  # type: ignore[type-arg]
    return {
        "prompt": prompt,
        "n_predict": n,
        "temperature": 0,
        "top_k": 1,
        "cache_prompt": True,
        "return_tokens": True,
    }


def best(name: str, url: str, body: dict, runs: int, llama_server: bool = False) -> Run:  # type: ignore[type-arg]
    """A short warm-up, then the fastest of `runs` runs."""
    short = {**body, "n_predict": 8} if llama_server else {**body, "max_tokens": 8}
    stream(url, short, llama_server)
    results = [stream(url, body, llama_server) for _ in range(runs)]
    run = max(results, key=lambda r: r.rate)
    console.print(f"  {name}: " + " ".join(f"{r.rate:.1f}" for r in results) + " tok/s")
    return run


@dataclass
class Row:
    setup: str
    variant: str
    run: Run
    note: str = ""


def engine_cmd(target: Path, port: int, rpc: list[str]) -> list[str]:
    cmd = engine_command(target, port, "--threads", "1", "--ctx", "2048", "--parallel", "2")
    return [*cmd, "--rpc", ",".join(rpc)] if rpc else cmd


def setup_rows(
    procs: Processes,
    tc: toolchain.Toolchain,
    setup: str,
    rpc: list[str],
    args: argparse.Namespace,
    passthrough: bool = False,
) -> tuple[list[Row], tuple[float, float, float] | None]:
    """(a), (b), (c) on one setup, and the passthrough overhead if asked: rows, overhead."""
    target, draft = models.resolve("smollm2-135m-f32"), models.resolve("smollm2-135m-q4_1")
    console.print(f"[bold]{setup}[/]")
    mark = len(procs.running)
    eport = free_port()
    engine = procs.http(
        f"{setup}-engine", engine_cmd(target, eport, rpc), f"http://127.0.0.1:{eport}", "/ready"
    )
    prompt = httpx.post(f"{engine}/tokenize", json={"content": PROMPT, "add_special": True}).json()["tokens"]
    rows = [
        Row(
            setup,
            "(a) target alone",
            best("(a)", f"{engine}/v1/completions", openai_body(prompt, args.tokens), args.runs),
        )
    ]

    # (c) the proxy, with a llama-server drafter on this machine's CPU.
    dport = free_port()
    drafter_cmd = llama_server_command(tc, draft, dport, ctx_size=2048, threads=1)
    drafter = procs.http(f"{setup}-drafter", drafter_cmd, f"http://127.0.0.1:{dport}")
    proxy_rows = []
    for name, flags in (
        ("(c) tightwad proxy", []),
        ("(c') tightwad proxy, no pipelining", ["--no-pipeline"]),
    ):
        if flags and not args.no_pipeline_row:
            continue
        pport = free_port()
        cmd = proxy_command(pport, engine, "--draft", drafter, *flags)
        proxy = procs.http(f"{setup}-proxy-{pport}", cmd, f"http://127.0.0.1:{pport}", "/ready")
        run = best(name[:4], f"{proxy}/v1/completions", openai_body(prompt, args.tokens), args.runs)
        stats = httpx.get(f"{proxy}/tightwad/v1/stats").json()
        note = (
            f"accepted {stats['acceptance_measured']:.0%}, {stats['tokens_per_round']:.1f} tok/round, "
            f"K now {stats.get('policy', {}).get('k')}"
        )
        proxy_rows.append(Row(setup, name, run, note))
        procs.stop(procs.running[-1])
    overhead = passthrough_overhead(procs, engine, args) if passthrough else None
    # An rpc worker serves one client at a time: the engine lets go of the workers before (b).
    for proc in procs.running[mark:]:
        procs.stop(proc)

    # (b) llama-server's own speculation with the same pair, target on the same devices.
    sport = free_port()
    extra = [
        "--model-draft",
        str(draft),
        "--spec-type",
        "draft-simple",
        "--spec-draft-n-max",
        str(args.draft_n),
    ]
    extra += ["--threads-draft", "1"]
    if rpc:
        extra += ["--spec-draft-device", "none"]  # the draft on this machine's CPU, like (c)'s drafter
    server_cmd = llama_server_command(tc, target, sport, ctx_size=2048, rpc=rpc, threads=1, extra=extra)
    server = procs.http(f"{setup}-llama-server-spec", server_cmd, f"http://127.0.0.1:{sport}")
    run = best("(b)", f"{server}/completion", server_body(prompt, args.tokens), args.runs, llama_server=True)
    rows.append(Row(setup, f"(b) llama-server -md, N={args.draft_n}", run))
    procs.stop(procs.running[-1])
    rows += proxy_rows
    return rows, overhead


def passthrough_overhead(
    procs: Processes, engine: str, args: argparse.Namespace
) -> tuple[float, float, float]:
    """(TTFT added in ms, decode-rate ratio proxy/direct, end-to-end ratio): medians over pairs of
    back-to-back runs, direct then through the proxy."""
    pport = free_port()
    proxy = procs.http(
        "passthrough-proxy",
        proxy_command(pport, engine, "--mode", "passthrough"),
        f"http://127.0.0.1:{pport}",
        "/ready",
    )
    prompt = httpx.post(f"{engine}/tokenize", json={"content": SHORT, "add_special": True}).json()["tokens"]
    body = {**openai_body(prompt, args.passthrough_tokens)}
    direct, through = [], []
    stream(f"{engine}/v1/completions", body)
    stream(f"{proxy}/v1/completions", body)
    for _ in range(args.passthrough_runs):
        direct.append(stream(f"{engine}/v1/completions", body))
        through.append(stream(f"{proxy}/v1/completions", body))
    # Back-to-back pairs, so background load drifting over the run hits both sides of a pair alike.
    pairs = list(zip(through, direct, strict=True))
    ttft = statistics.median(t.ttft - d.ttft for t, d in pairs)
    decode = statistics.median(t.decode_rate / d.decode_rate for t, d in pairs)
    e2e = statistics.median(t.rate / d.rate for t, d in pairs)
    return ttft * 1e3, decode, e2e


@contextlib.contextmanager
def pool(procs: Processes, tc: toolchain.Toolchain, delay_ms: float) -> Iterator[list[str]]:
    """Two rpc workers, each reached through its own delay proxy."""
    endpoints = []
    for _ in range(2):
        wport, dport = free_port(), free_port()
        procs.tcp(f"rpc-{wport}", rpc_worker_command(tc, wport, threads=1), wport)
        procs.tcp(f"netdelay-{dport}", netdelay_command(dport, f"127.0.0.1:{wport}", delay_ms), dport)
        endpoints.append(f"127.0.0.1:{dport}")
    yield endpoints


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=96, help="completion tokens per request")
    ap.add_argument("--runs", type=int, default=2, help="runs per variant (the fastest is reported)")
    ap.add_argument("--draft-n", type=int, default=8, help="llama-server's --spec-draft-n-max")
    ap.add_argument("--delay-ms", type=float, default=2.0, help="added latency each way in the pool")
    ap.add_argument("--passthrough-runs", type=int, default=9)
    ap.add_argument("--passthrough-tokens", type=int, default=32)
    ap.add_argument("--only", choices=["local", "pooled"], default=None)
    ap.add_argument(
        "--no-pipeline-row",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the proxy without pipelining (c')",
    )
    args = ap.parse_args(argv)

    tc = toolchain.find()
    logs = log_folder("spec")
    console.print(
        f"same-model pair: SmolLM2-135M F32 target, Q4_1 draft; 1 thread per process; logs in {logs}"
    )
    started = time.perf_counter()
    rows: list[Row] = []
    overhead = None
    procs = Processes(logs)
    try:
        if args.only in (None, "local"):
            local_rows, overhead = setup_rows(procs, tc, "local", [], args, passthrough=True)
            rows += local_rows
            procs.stop_all()
        if args.only in (None, "pooled"):
            with pool(procs, tc, args.delay_ms) as endpoints:
                rows += setup_rows(
                    procs, tc, f"pooled (2 rpc workers, +{args.delay_ms:g} ms each way)", endpoints, args
                )[0]
    finally:
        procs.stop_all()

    results = table(
        f"greedy decoding, {args.tokens} tokens, same-model pair (SmolLM2-135M F32 / Q4_1)",
        ("setup", "variant", "tok/s", "x target alone", "same tokens as (a)", "notes"),
    )
    alone: dict[str, Run] = {}
    for row in rows:
        alone.setdefault(row.setup, row.run)
        base = alone[row.setup]
        n = min(len(row.run.tokens), len(base.tokens))
        same = (
            "yes"
            if row.run.tokens == base.tokens
            else f"no (first {n} equal: {row.run.tokens[:n] == base.tokens[:n]})"
        )
        results.add_row(
            row.setup, row.variant, f"{row.run.rate:.1f}", f"{row.run.rate / base.rate:.2f}x", same, row.note
        )
    console.print(results)
    if overhead is not None:
        ttft, decode, e2e = overhead
        console.print(
            f"passthrough overhead (local, {args.passthrough_tokens} tokens, "
            f"median of {args.passthrough_runs} pairs): "
            f"TTFT {ttft:+.1f} ms (goal <= 5), decode tok/s ratio {decode:.3f}, end-to-end ratio {e2e:.3f} "
            "(goal >= 0.97)"
        )
    console.print(f"bench took {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
