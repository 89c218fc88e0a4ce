"""Speculation through the proxy vs the target alone vs llama-server's own speculation, one run.

The pair (--pair): by default the Qwen2.5-Coder pair when it is fetched (the 1.5B dequantized to
F16 as a memory-bound target, the 0.5B Q4_K_M drafting; opt-in: `tightwad models fetch
qwen2.5-coder-1.5b-f16 qwen2.5-coder-0.5b-q4_k_m`), else the SmolLM2 same-model pair.

Setups: local (the target in the engine on this CPU) and pooled (the target split over two rpc
workers, each behind a delay proxy adding --delay-ms each way: a LAN). Each setup runs unpinned
and, with --pin, pinned: the target's processes (rpc workers, engine, llama-server target) on one
core and the drafter and the proxy on the other, modelling a drafter on another machine.

Methods, greedy, the same prompts (chat, code first), the same length:
  target alone       llama-server with the target only (the baseline every ratio is against)
  engine alone       our engine's own /v1/completions
  llama-server -md   llama-server's in-process speculation with the same pair, best of --draft-n
  proxy              our proxy, K chosen by the cost model, a llama-server drafter
  proxy n-gram       our proxy with prompt-lookup (n-gram) drafting, no draft model
  proxy race         the drafter and the n-gram lookup raced each round
Every row says whether its tokens equal the engine alone's (the proxy's promise) on every prompt.

Then, per setup, what the speed should be: the verify cost curve (a block of K draft tokens, K+1
positions, against one plain step, K = 0..16, through the engine's verify API), the drafter's time
per token as it runs there, the acceptance per prompt, and from them the speedup an ideal loop
would reach (one that only paid for drafting and verifying: max over K of E(K) / (c(K) + K d)),
against the measured one.

tok/s is end to end: completion tokens / wall time of the request (time to first token included).
Every table prints the load average: on a shared machine compare rows of one run, never across runs.

Usage: .venv/bin/python bench/speculation.py [--quick] [--pair qwen-f16|qwen-q4|smollm2] [--pin]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
from _common import (
    PROMPTS,
    Pair,
    Processes,
    engine_command,
    load_note,
    log_folder,
    netdelay_command,
    pick_pair,
    pinned,
    proxy_command,
    sse_chunks,
    table,
)
from rich.console import Console

from tightwad import toolchain
from tightwad.launch import free_port, llama_server_command, rpc_worker_command
from tightwad.proxy.kpolicy.costmodel import expected_tokens

console = Console(width=160)
TARGET_CORE, DRAFT_CORE = "1", "0"  # pinned: the target's processes on one core, the drafter's on the other
CTX = 4096


@dataclass
class Run:
    tokens: list[int]
    wall: float  # seconds, request start to last token
    ttft: float  # seconds, request start to first token

    @property
    def rate(self) -> float:
        return len(self.tokens) / self.wall if self.wall > 0 else 0.0


@dataclass
class Method:
    name: str
    runs: list[Run] = field(default_factory=list)  # one per prompt
    note: str = ""
    acceptance: list[float | None] = field(default_factory=list)  # per prompt (proxy rows)

    def median_rate(self) -> float:
        return statistics.median(r.rate for r in self.runs)


def stream(url: str, body: dict, llama_server: bool = False) -> Run:  # type: ignore[type-arg]
    """One streamed greedy request; its token ids and times."""
    tokens: list[int] = []
    first = last = 0.0
    for now, chunk in sse_chunks(url, {**body, "stream": True}):
        if "error" in chunk:
            raise SystemExit(f"{url} failed mid-stream: {chunk['error']}")
        new = (chunk.get("tokens") or []) if llama_server else (chunk["choices"][0].get("tokens") or [])
        if new and not tokens:
            first = now
        tokens += new
        last = now if new else last
    if not tokens:
        raise SystemExit(f"{url} streamed no tokens")
    return Run(tokens, last, first)


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


def best_of(url: str, body: dict, runs: int, llama_server: bool = False) -> Run:  # type: ignore[type-arg]
    """The fastest of `runs` runs (the slower ones met background load)."""
    return max((stream(url, body, llama_server) for _ in range(runs)), key=lambda r: r.rate)


def per_prompt(
    name: str, url: str, prompts: list[list[int]], args: argparse.Namespace, server: bool = False
) -> Method:
    method = Method(name)
    warm = {**server_body(prompts[0], 4)} if server else openai_body(prompts[0], 4)
    stream(url, warm, server)  # model pages and caches: not what is measured
    for prompt in prompts:
        body = server_body(prompt, args.tokens) if server else openai_body(prompt, args.tokens)
        method.runs.append(best_of(url, body, args.runs, server))
    console.print(f"  {name}: " + " ".join(f"{r.rate:.1f}" for r in method.runs) + " tok/s")
    return method


def proxy_method(name: str, url: str, prompts: list[list[int]], args: argparse.Namespace) -> Method:
    """Like per_prompt, with the acceptance of each prompt from the proxy's counters."""
    method = Method(name)
    stream(f"{url}/v1/completions", openai_body(prompts[0], 4))
    for prompt in prompts:
        before = httpx.get(f"{url}/tightwad/v1/stats").json()
        method.runs.append(best_of(f"{url}/v1/completions", openai_body(prompt, args.tokens), args.runs))
        after = httpx.get(f"{url}/tightwad/v1/stats").json()
        drafted = after["draft_tokens"] - before["draft_tokens"]
        method.acceptance.append(
            (after["accepted_tokens"] - before["accepted_tokens"]) / drafted if drafted else None
        )
    stats = httpx.get(f"{url}/tightwad/v1/stats").json()
    policy = stats.get("policy") or {}
    method.note = f"K now {policy.get('k')}, fallbacks {stats.get('fallbacks') or {}}"
    console.print(f"  {name}: " + " ".join(f"{r.rate:.1f}" for r in method.runs) + " tok/s")
    return method


@dataclass
class Physics:
    """What the speed should be on this setup."""

    step_s: float  # one plain decode step through verify (K = 0)
    curve: dict[int, float]  # K -> time of a block of K draft tokens / one step
    draft_s_per_token: float  # the drafter's time per drafted token, as it runs here

    def ideal(self, alpha: float, k_max: int = 16) -> tuple[float, int]:
        """The speedup of a loop that pays only for drafting and verifying, and its K."""
        d = self.draft_s_per_token / self.step_s
        best = max(range(1, k_max + 1), key=lambda k: expected_tokens(alpha, k) / (self.curve[k] + k * d))
        return expected_tokens(alpha, best) / (self.curve[best] + best * d), best


def verify_curve(engine: str, prompt: list[int], samples: int) -> tuple[float, dict[int, float]]:
    """Median time of a verify of K = 0..16 draft tokens, on a cached prompt, relative to K = 0."""
    times: dict[int, float] = {}
    with httpx.Client(base_url=engine, timeout=600) as client:
        body = {"conversation": "curve", "tokens": prompt, "reset": True, "drafts": []}
        client.post("/tightwad/v1/verify", json=body).raise_for_status()  # the prompt, read once
        for k in range(17):
            spent = []
            for _ in range(samples):
                draft = prompt[-k:] if k else []
                body = {
                    "conversation": "curve",
                    "tokens": prompt,
                    "reset": True,
                    "drafts": [{"tokens": draft}],
                }
                t = time.perf_counter()
                client.post("/tightwad/v1/verify", json=body).raise_for_status()
                spent.append(time.perf_counter() - t)
            times[k] = statistics.median(spent)
    return times[0], {k: t / times[0] for k, t in times.items()}


def drafter_time_per_token(url: str, prompt: list[int]) -> float:
    """The drafter's seconds per drafted token: (time of 17 tokens - time of 1) / 16, prompt cached."""
    with httpx.Client(timeout=600) as client:

        def timed(n: int) -> float:
            t = time.perf_counter()
            client.post(f"{url}/completion", json=server_body(prompt, n)).raise_for_status()
            return time.perf_counter() - t

        timed(1)
        return max(statistics.median(timed(17) - timed(1) for _ in range(3)) / 16, 1e-6)


def tokenize(engine: str, prompts: list[str]) -> list[list[int]]:
    out = []
    for text in prompts:
        # The engine renders the chat with the model's own template (`/tokenize` with messages).
        messages = [{"role": "user", "content": text}]
        response = httpx.post(f"{engine}/tokenize", json={"messages": messages}, timeout=60)
        response.raise_for_status()
        out.append(list(response.json()["tokens"]))
    return out


def setup_methods(
    procs: Processes,
    tc: toolchain.Toolchain,
    pair: Pair,
    rpc: list[str],
    pin: bool,
    args: argparse.Namespace,
) -> tuple[list[Method], Physics]:
    target, draft = pair.paths()
    tcores, dcores = (TARGET_CORE, DRAFT_CORE) if pin else (None, None)
    mark = len(procs.running)
    eport = free_port()
    cmd = engine_command(target, eport, "--threads", "1", "--ctx", str(CTX), "--parallel", "2")
    cmd += ["--rpc", ",".join(rpc)] if rpc else []
    engine = procs.http(
        f"engine-{eport}", pinned(cmd, tcores), f"http://127.0.0.1:{eport}", "/ready", timeout=900
    )
    prompts = tokenize(engine, list(PROMPTS[: args.prompts]))
    methods = [per_prompt("engine alone", f"{engine}/v1/completions", prompts, args)]
    step_s, curve = verify_curve(engine, prompts[0], args.curve_samples)

    dport = free_port()
    dcmd = llama_server_command(tc, draft, dport, ctx_size=CTX, threads=1)
    drafter = procs.http(f"drafter-{dport}", pinned(dcmd, dcores), f"http://127.0.0.1:{dport}", timeout=300)
    draft_s = drafter_time_per_token(drafter, prompts[0])
    variants = [("proxy (K auto)", ["--draft", drafter])]
    if not args.quick:
        variants += [
            ("proxy n-gram", ["--draft-kind", "ngram"]),
            ("proxy race (drafter + n-gram)", ["--mode", "race", "--drafter", f"q4:llama-server:{drafter}"]),
        ]
    for name, flags in variants:
        if "race" in name:
            flags = [*flags, "--drafter", "lookup:ngram"]
        pport = free_port()
        pcmd = pinned(proxy_command(pport, engine, *flags), dcores)
        proxy = procs.http(f"proxy-{pport}", pcmd, f"http://127.0.0.1:{pport}", "/ready", timeout=300)
        methods.append(proxy_method(name, proxy, prompts, args))
        procs.stop(procs.running[-1])
    # An rpc worker serves one client at a time: the engine lets go of the workers before llama-server.
    for proc in procs.running[mark:]:
        procs.stop(proc)

    sport = free_port()
    scmd = llama_server_command(tc, target, sport, ctx_size=CTX, rpc=rpc, threads=1)
    server = procs.http(
        f"target-alone-{sport}", pinned(scmd, tcores), f"http://127.0.0.1:{sport}", timeout=900
    )
    methods.insert(
        0, per_prompt("target alone (llama-server)", f"{server}/completion", prompts, args, server=True)
    )
    procs.stop(procs.running[-1])
    best: Method | None = None
    for n in args.draft_n:
        extra = ["--model-draft", str(draft), "--spec-type", "draft-simple", "--spec-draft-n-max", str(n)]
        extra += ["--threads-draft", "1"]
        if rpc:
            extra += ["--spec-draft-device", "none"]  # the draft on this CPU, like the proxy's drafter
        sport = free_port()
        scmd = llama_server_command(tc, target, sport, ctx_size=CTX, rpc=rpc, threads=1, extra=extra)
        server = procs.http(
            f"spec-{n}-{sport}", pinned(scmd, tcores), f"http://127.0.0.1:{sport}", timeout=900
        )
        method = per_prompt(
            f"llama-server -md, n-max {n}", f"{server}/completion", prompts, args, server=True
        )
        procs.stop(procs.running[-1])
        if best is None or method.median_rate() > best.median_rate():
            best = method
    assert best is not None
    best.note = f"best of n-max {', '.join(map(str, args.draft_n))}"
    methods.insert(2, best)
    return methods, Physics(step_s, curve, draft_s)


@contextlib.contextmanager
def pool(
    procs: Processes, tc: toolchain.Toolchain, delay_ms: float, cores: str | None
) -> Iterator[list[str]]:
    """Two rpc workers, each reached through its own delay proxy."""
    endpoints = []
    for _ in range(2):
        wport, dport = free_port(), free_port()
        procs.tcp(f"rpc-{wport}", pinned(rpc_worker_command(tc, wport, threads=1), cores), wport)
        procs.tcp(f"netdelay-{dport}", netdelay_command(dport, f"127.0.0.1:{wport}", delay_ms), dport)
        endpoints.append(f"127.0.0.1:{dport}")
    yield endpoints


def report(setup: str, methods: list[Method], physics: Physics, args: argparse.Namespace, pair: Pair) -> None:
    base = methods[0]
    engine = next(m for m in methods if m.name == "engine alone")
    results = table(
        f"{setup}: greedy, {args.tokens} tokens, {len(base.runs)} prompts; {pair.label}; {load_note()}",
        (
            "method",
            "median tok/s",
            "x target alone",
            "per prompt (x target alone)",
            "same tokens as engine",
            "notes",
        ),
    )
    for m in methods:
        ratios = [r.rate / b.rate for r, b in zip(m.runs, base.runs, strict=True)]
        same = [r.tokens == e.tokens for r, e in zip(m.runs, engine.runs, strict=True)]
        results.add_row(
            m.name,
            f"{m.median_rate():.2f}",
            f"{m.median_rate() / base.median_rate():.2f}x",
            " ".join(f"{x:.2f}" for x in ratios),
            "yes" if all(same) else f"no ({sum(same)}/{len(same)})",
            m.note,
        )
    console.print(results)
    step_ms, draft_ms = physics.step_s * 1e3, physics.draft_s_per_token * 1e3
    curve = table(
        f"{setup}: verify cost curve, a block of K draft tokens / one step ({step_ms:.1f} ms); the drafter: "
        f"{draft_ms:.1f} ms per token = {draft_ms / step_ms:.2f} steps",
        [str(k) for k in range(17)],
    )
    curve.add_row(*(f"{physics.curve[k]:.2f}" for k in range(17)))
    console.print(curve)
    proxy = next(m for m in methods if m.name.startswith("proxy (K auto)"))
    ideal = table(
        f"{setup}: the proxy's speedup over the engine alone vs an ideal loop (drafting + verifying only)",
        ("prompt", "acceptance", "ideal speedup (K)", "measured", "measured / ideal"),
    )
    for i, (run, e, alpha) in enumerate(zip(proxy.runs, engine.runs, proxy.acceptance, strict=True)):
        # α per draft token from the measured fraction accepted (a geometric run of acceptances).
        a = alpha if alpha is not None else 0.0
        speed, k = physics.ideal(min(a, 0.99))
        measured = run.rate / e.rate
        ideal.add_row(
            str(i + 1), f"{a:.0%}", f"{speed:.2f}x (K={k})", f"{measured:.2f}x", f"{measured / speed:.2f}"
        )
    console.print(ideal)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", choices=["qwen-f16", "qwen-q4", "smollm2"], default=None)
    ap.add_argument(
        "--quick", action="store_true", help="64 tokens, 3 prompts, pooled only, n-max 4, proxy K auto"
    )
    ap.add_argument("--tokens", type=int, default=None, help="completion tokens per request (128; quick 64)")
    ap.add_argument(
        "--prompts", type=int, default=None, help=f"how many prompts (max {len(PROMPTS)}; quick 3)"
    )
    ap.add_argument("--runs", type=int, default=1, help="runs per prompt (the fastest is kept)")
    ap.add_argument("--draft-n", type=int, nargs="+", default=None, help="llama-server n-max values (4 8)")
    ap.add_argument("--delay-ms", type=float, default=2.0, help="added latency each way in the pool")
    ap.add_argument("--only", choices=["local", "pooled"], default=None)
    ap.add_argument("--pin", action="store_true", help="also run each setup pinned (target / drafter cores)")
    ap.add_argument("--curve-samples", type=int, default=3)
    args = ap.parse_args(argv)
    args.tokens = args.tokens or (64 if args.quick else 128)
    args.prompts = min(args.prompts or (3 if args.quick else len(PROMPTS)), len(PROMPTS))
    args.draft_n = args.draft_n or ([4] if args.quick else [4, 8])
    only = args.only or ("pooled" if args.quick else None)

    pair = pick_pair(args.pair)
    tc = toolchain.find()
    logs = log_folder("spec")
    console.print(f"{pair.label}; 1 thread per process; {load_note()}; logs in {logs}")
    started = time.perf_counter()
    with Processes(logs) as procs:
        for pin in (False, True) if args.pin else (False,):
            pinning = (
                f"pinned: target on core {TARGET_CORE}, drafter+proxy on core {DRAFT_CORE}"
                if pin
                else "unpinned"
            )
            if only in (None, "local"):
                console.print(f"[bold]local, {pinning}[/]")
                methods, physics = setup_methods(procs, tc, pair, [], pin, args)
                report(f"local, {pinning}", methods, physics, args, pair)
                procs.stop_all()
            if only in (None, "pooled"):
                setup = f"pooled (2 rpc workers, +{args.delay_ms:g} ms each way), {pinning}"
                console.print(f"[bold]{setup}[/]")
                with pool(procs, tc, args.delay_ms, TARGET_CORE if pin else None) as endpoints:
                    methods, physics = setup_methods(procs, tc, pair, endpoints, pin, args)
                report(setup, methods, physics, args, pair)
                procs.stop_all()
    console.print(f"bench took {time.perf_counter() - started:.0f} s; {load_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
