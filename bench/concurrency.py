"""Many users at once: aggregate tokens per second and time to first token at 1, 4, 8 (16) clients.

The same pair as bench/speculation.py (--pair; by default the Qwen2.5-Coder pair when fetched),
the target split over two rpc workers behind a delay proxy (--delay-ms each way; --local: no pool).
Three ways to serve N clients, each started once with room for the most clients measured:
  target alone       llama-server -np N with the target only (the baseline)
  llama-server -md   llama-server -np N with its in-process speculation (--spec-draft-n-max)
  proxy              our engine (--parallel N), a llama-server drafter (-np N) and our proxy
Each level sends N streamed greedy chat requests at once (the prompts of bench/_common.py in turn)
and reports aggregate tok/s (all completion tokens / the wall time of the whole wave), TTFT p50 and
p95, and whether every client got exactly the tokens that client's prompt gets from the target
alone with one client (exactness per client).

Usage: .venv/bin/python bench/concurrency.py [--quick] [--pair ...] [--clients 1 4 8 16] [--local]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from dataclasses import dataclass

from _common import (
    PROMPTS,
    Pair,
    Processes,
    engine_command,
    load_note,
    log_folder,
    netdelay_command,
    pick_pair,
    proxy_command,
    sse_chunks,
    table,
)
from rich.console import Console

from tightwad import toolchain
from tightwad.launch import free_port, llama_server_command, rpc_worker_command

console = Console(width=160)
CTX = 4096  # per conversation


@dataclass
class Reply:
    text: str
    tokens: int  # completion tokens
    start: float
    ttft: float
    end: float


@dataclass
class Wave:
    clients: int
    replies: list[Reply]

    @property
    def aggregate(self) -> float:
        span = max(r.end for r in self.replies) - min(r.start for r in self.replies)
        return sum(r.tokens for r in self.replies) / span if span > 0 else 0.0

    def ttft(self, q: float) -> float:
        values = sorted(r.ttft for r in self.replies)
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def one(url: str, prompt: str, tokens: int, llama_server: bool) -> Reply:
    """One streamed greedy chat reply: its text, token count and times (seconds, perf_counter)."""
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if llama_server:
        body |= {"top_k": 1, "cache_prompt": False}
    start = time.perf_counter()
    text: list[str] = []
    ttft, pieces, usage = 0.0, 0, None
    for now, chunk in sse_chunks(f"{url}/v1/chat/completions", body):
        if "error" in chunk:
            raise SystemExit(f"{url} failed mid-stream: {chunk['error']}")
        for choice in chunk.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") or ""
            if piece:
                ttft = ttft or now
                pieces += 1
                text.append(piece)
        if chunk.get("usage"):
            usage = int(chunk["usage"]["completion_tokens"])
    return Reply("".join(text), usage if usage is not None else pieces, start, ttft, time.perf_counter())


def wave(url: str, clients: int, tokens: int, llama_server: bool) -> Wave:
    replies: list[Reply | None] = [None] * clients
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            replies[i] = one(url, PROMPTS[i % len(PROMPTS)], tokens, llama_server)
        except BaseException as exc:  # reported after the wave
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{url}: a client failed: {errors[0]}")
    return Wave(clients, [r for r in replies if r is not None])


def measure(name: str, url: str, args: argparse.Namespace, llama_server: bool) -> list[Wave]:
    one(url, "Hi", 4, llama_server)  # model pages and caches: not what is measured
    waves = []
    for n in args.clients:
        w = wave(url, n, args.tokens, llama_server)
        waves.append(w)
        console.print(f"  {name}, {n} clients: {w.aggregate:.1f} tok/s, TTFT p95 {w.ttft(0.95) * 1e3:.0f} ms")
    return waves


def pool(procs: Processes, tc: toolchain.Toolchain, delay_ms: float) -> list[str]:
    endpoints = []
    for _ in range(2):
        wport, dport = free_port(), free_port()
        procs.tcp(f"rpc-{wport}", rpc_worker_command(tc, wport, threads=1), wport)
        procs.tcp(f"netdelay-{dport}", netdelay_command(dport, f"127.0.0.1:{wport}", delay_ms), dport)
        endpoints.append(f"127.0.0.1:{dport}")
    return endpoints


def run_all(
    procs: Processes, tc: toolchain.Toolchain, pair: Pair, rpc: list[str], args: argparse.Namespace
) -> dict[str, list[Wave]]:
    target, draft = pair.paths()
    most = max(args.clients)
    results: dict[str, list[Wave]] = {}
    for name, extra in (
        ("target alone (llama-server)", []),
        (
            f"llama-server -md, n-max {args.draft_n}",
            ["--model-draft", str(draft), "--spec-draft-n-max", str(args.draft_n), "--threads-draft", "1"]
            + (["--spec-draft-device", "none"] if rpc else []),
        ),
    ):
        port = free_port()
        cmd = llama_server_command(
            tc, target, port, ctx_size=CTX * most, rpc=rpc, threads=1, parallel=most, extra=extra
        )
        url = procs.http(f"server-{port}", cmd, f"http://127.0.0.1:{port}", timeout=900)
        results[name] = measure(name, url, args, llama_server=True)
        procs.stop(procs.running[-1])

    eport, dport, pport = free_port(), free_port(), free_port()
    cmd = engine_command(target, eport, "--threads", "1", "--ctx", str(CTX * most), "--parallel", str(most))
    cmd += ["--rpc", ",".join(rpc)] if rpc else []
    engine = procs.http(f"engine-{eport}", cmd, f"http://127.0.0.1:{eport}", "/ready", timeout=900)
    dcmd = llama_server_command(tc, draft, dport, ctx_size=CTX * most, threads=1, parallel=most)
    drafter = procs.http(f"drafter-{dport}", dcmd, f"http://127.0.0.1:{dport}", timeout=300)
    proxy = procs.http(
        f"proxy-{pport}",
        proxy_command(pport, engine, "--draft", drafter),
        f"http://127.0.0.1:{pport}",
        "/ready",
        timeout=300,
    )
    results["proxy (K auto)"] = measure("proxy (K auto)", proxy, args, llama_server=False)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", choices=["qwen-f16", "qwen-q4", "smollm2"], default=None)
    ap.add_argument("--quick", action="store_true", help="1 and 4 clients, 32 tokens")
    ap.add_argument("--clients", type=int, nargs="+", default=None, help="levels (1 4 8 16; quick 1 4)")
    ap.add_argument("--tokens", type=int, default=None, help="completion tokens per client (64; quick 32)")
    ap.add_argument("--draft-n", type=int, default=4, help="llama-server's --spec-draft-n-max")
    ap.add_argument("--delay-ms", type=float, default=2.0)
    ap.add_argument("--local", action="store_true", help="the target on this CPU, no rpc pool")
    args = ap.parse_args(argv)
    args.clients = args.clients or ([1, 4] if args.quick else [1, 4, 8, 16])
    args.tokens = args.tokens or (32 if args.quick else 64)

    pair = pick_pair(args.pair)
    tc = toolchain.find()
    logs = log_folder("concurrency")
    console.print(f"{pair.label}; 1 thread per process; {load_note()}; logs in {logs}")
    started = time.perf_counter()
    with Processes(logs) as procs:
        rpc = [] if args.local else pool(procs, tc, args.delay_ms)
        results = run_all(procs, tc, pair, rpc, args)

    where = "local" if args.local else f"pooled (2 rpc workers, +{args.delay_ms:g} ms each way)"
    out = table(
        f"{args.tokens} tokens per client, greedy, {where}; {pair.label}; {load_note()}",
        (
            "method",
            "clients",
            "aggregate tok/s",
            "x target alone",
            "TTFT p50 ms",
            "TTFT p95 ms",
            "same text as target alone",
        ),
    )
    base = results["target alone (llama-server)"]
    reference: dict[int, str] = {}
    for w in base:  # the target alone's reply to each prompt, from the smallest wave that sent it
        for i, r in enumerate(w.replies):
            reference.setdefault(i % len(PROMPTS), r.text)
    for name, waves in results.items():
        for w, b in zip(waves, base, strict=True):
            same = sum(r.text == reference[i % len(PROMPTS)] for i, r in enumerate(w.replies))
            out.add_row(
                name,
                str(w.clients),
                f"{w.aggregate:.1f}",
                f"{w.aggregate / b.aggregate:.2f}x",
                f"{statistics.median(r.ttft for r in w.replies) * 1e3:.0f}",
                f"{w.ttft(0.95) * 1e3:.0f}",
                f"{same}/{w.clients}",
            )
    console.print(out)
    console.print(f"bench took {time.perf_counter() - started:.0f} s; {load_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
