"""Speculation through the proxy vs the target alone vs llama-server's own speculation, one run.

The pair (--pair): by default the Qwen2.5-Coder pair when it is fetched (the 1.5B dequantized to
F16 as a memory-bound target, the 0.5B Q4_K_M drafting; opt-in: `tightwad models fetch
qwen2.5-coder-1.5b-f16 qwen2.5-coder-0.5b-q4_k_m`), else the SmolLM2 same-model pair.

Setups (--setups):
  local    the target in the engine on this CPU
  pooled   the target split over two rpc workers, each behind a delay proxy adding --delay-ms each
           way (a LAN)
  remote   the product's case, "drafter on a laptop, target pooled on the servers": two hosts as
           network namespaces (scripts/netns-hosts.sh). The servers host runs the engine (or
           llama-server) on the pooled target (its two rpc workers behind --delay-ms, as pooled);
           the laptop host runs the drafter, the proxy beside it and the client. Every verify round,
           and every baseline's request, crosses the link between them: each of --links in turn
           (2 ms, and 10 ms ± 5 ms jitter, a Wi-Fi pool, each way), made by tc netem on both
           uplinks when the kernel has sch_netem, else by the user-space delay proxy on the laptop
           (the tables say which ran). llama-server -md has its drafter in-process, so it cannot
           have it across the link: its row runs on the servers host, as the reference. Needs root.
Each setup runs unpinned and, with --pin, pinned: the target's processes (rpc workers, engine,
llama-server target) on one core and the drafter and the proxy on the other, modelling a drafter on
another machine (the delay proxies, being the network, are not pinned).

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
would reach (one that only paid for drafting and verifying: max over K of E(K) / (c(K) + K d);
remote: + r, the link's round trip in steps, measured as GET /health through the link less the same
on the servers host), against the measured one.

tok/s is end to end: completion tokens / wall time of the request (time to first token included).
Every table prints the load average: on a shared machine compare rows of one run, never across runs.

Usage: .venv/bin/python bench/speculation.py [--quick] [--pair qwen-f16|qwen-q4|smollm2] [--pin]
           [--setups local pooled remote] [--links 2 10:5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import httpx
from _common import (
    PROMPTS,
    Pair,
    Processes,
    engine_command,
    inside,
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
from support import testnet

from tightwad import toolchain
from tightwad.launch import free_port, llama_server_command, rpc_worker_command
from tightwad.proxy.kpolicy.costmodel import expected_tokens

console = Console(width=160)
TARGET_CORE, DRAFT_CORE = "1", "0"  # pinned: the target's processes on one core, the drafter's on the other
CTX = 4096
SETUPS = ("local", "pooled", "remote")


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


Headers = Mapping[str, str] | None


def stream(url: str, body: dict, llama_server: bool = False, headers: Headers = None) -> Run:  # type: ignore[type-arg]
    """One streamed greedy request; its token ids and times."""
    tokens: list[int] = []
    first = last = 0.0
    for now, chunk in sse_chunks(url, {**body, "stream": True}, headers=headers):
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


def best_of(url: str, body: dict, runs: int, llama_server: bool = False, headers: Headers = None) -> Run:  # type: ignore[type-arg]
    """The fastest of `runs` runs (the slower ones met background load)."""
    return max((stream(url, body, llama_server, headers) for _ in range(runs)), key=lambda r: r.rate)


def per_prompt(
    name: str,
    url: str,
    prompts: list[list[int]],
    args: argparse.Namespace,
    server: bool = False,
    headers: Headers = None,
) -> Method:
    method = Method(name)
    warm = {**server_body(prompts[0], 4)} if server else openai_body(prompts[0], 4)
    stream(url, warm, server, headers)  # model pages and caches: not what is measured
    for prompt in prompts:
        body = server_body(prompt, args.tokens) if server else openai_body(prompt, args.tokens)
        method.runs.append(best_of(url, body, args.runs, server, headers))
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

    step_s: float  # one plain decode step through verify (K = 0), on the engine's host
    curve: dict[int, float]  # K -> time of a block of K draft tokens / one step
    draft_s_per_token: float  # the drafter's time per drafted token, as it runs here
    rtt_s: float = 0.0  # what each verify round adds crossing the link (remote; 0 on one host)

    def ideal(self, alpha: float, k_max: int = 16) -> tuple[float, int]:
        """The speedup of a loop that pays only for drafting, verifying and the link, and its K."""
        d, r = self.draft_s_per_token / self.step_s, self.rtt_s / self.step_s

        def speed(k: int) -> float:
            return expected_tokens(alpha, k) / (self.curve[k] + k * d + r)

        best = max(range(1, k_max + 1), key=speed)
        return speed(best), best


def verify_curve(
    engine: str, prompt: list[int], samples: int, headers: Headers = None
) -> tuple[float, dict[int, float]]:
    """Median time of a verify of K = 0..16 draft tokens, on a cached prompt, relative to K = 0."""
    times: dict[int, float] = {}
    with httpx.Client(base_url=engine, timeout=600, headers=headers) as client:
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


def round_trip(url: str, samples: int = 20) -> float:
    """Mean seconds of GET /health on one kept-alive connection, as a verify round's HTTP rides one
    (the mean, not the median: a jittery link costs its average)."""
    with httpx.Client(timeout=60) as client:
        client.get(f"{url}/health").raise_for_status()  # connected: not what is measured
        spent = []
        for _ in range(samples):
            t = time.perf_counter()
            client.get(f"{url}/health").raise_for_status()
            spent.append(time.perf_counter() - t)
    return statistics.mean(spent)


def drafter_time_per_token(url: str, prompt: list[int]) -> float:
    """The drafter's seconds per drafted token: (time of 17 tokens - time of 1) / 16, prompt cached."""
    with httpx.Client(timeout=600) as client:

        def timed(n: int) -> float:
            t = time.perf_counter()
            client.post(f"{url}/completion", json=server_body(prompt, n)).raise_for_status()
            return time.perf_counter() - t

        timed(1)
        return max(statistics.median(timed(17) - timed(1) for _ in range(3)) / 16, 1e-6)


def tokenize(engine: str, prompts: list[str], headers: Headers = None) -> list[list[int]]:
    out = []
    for text in prompts:
        # The engine renders the chat with the model's own template (`/tokenize` with messages).
        messages = [{"role": "user", "content": text}]
        response = httpx.post(f"{engine}/tokenize", json={"messages": messages}, timeout=60, headers=headers)
        response.raise_for_status()
        out.append(list(response.json()["tokens"]))
    return out


@dataclass(frozen=True)
class Link:
    """The network between the laptop and the servers: a latency each way, ± a uniform jitter."""

    delay_ms: float
    jitter_ms: float = 0.0

    def __str__(self) -> str:
        spread = f" ± {self.jitter_ms:g}" if self.jitter_ms else ""
        return f"{self.delay_ms:g}{spread} ms each way"


def parse_link(text: str) -> Link:
    """`2` (2 ms each way) or `10:5` (10 ms ± 5 ms each way)."""
    delay, _, jitter = text.partition(":")
    try:
        link = Link(float(delay), float(jitter or 0))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a link: give DELAY_MS or DELAY_MS:JITTER_MS, e.g. --links 2 10:5"
        ) from None
    if not 0 <= link.jitter_ms <= link.delay_ms:
        raise argparse.ArgumentTypeError(f"{text!r}: the jitter must be between 0 and the delay, e.g. 10:5")
    return link


class Place:
    """Where a setup's processes run and how the client and the proxy reach the target's servers.

    On one host (local, pooled; `servers` None) everything is on this machine's loopback and every
    URL is direct. Remote: the servers host (engine or llama-server, rpc workers) and the laptop host
    (drafter, proxy, and the benchmark itself, which runs its requests from inside it), with each of
    `links` between them in turn: tc netem on both uplinks (`netem`, switched with netns-hosts.sh
    link), or a delay proxy on the laptop in front of each servers' port the laptop uses.
    """

    def __init__(
        self,
        procs: Processes,
        servers: testnet.Host | None = None,
        laptop: testnet.Host | None = None,
        links: Sequence[Link] = (),
        hosts_name: str | None = None,
        netem: bool = False,
    ) -> None:
        self.procs = procs
        self.servers, self.laptop = servers, laptop
        self.links: tuple[Link | None, ...] = tuple(links) if servers else (None,)
        self.hosts_name = hosts_name
        self.netem = netem
        self.netem_now: Link | None = self.links[0] if netem else None  # the hosts start with it
        self.token = secrets.token_urlsafe(16) if servers else None  # beyond loopback needs one
        self.delays: dict[tuple[Link, int], str] = {}

    @property
    def bind(self) -> str:
        return self.servers.address if self.servers else "127.0.0.1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def on_servers(self, cmd: Sequence[str]) -> list[str]:
        return self.servers.command(list(cmd)) if self.servers else list(cmd)

    def on_laptop(self, cmd: Sequence[str]) -> list[str]:
        return self.laptop.command(list(cmd)) if self.laptop else list(cmd)

    def at_servers(self) -> contextlib.AbstractContextManager[None]:
        """The benchmark's own requests from the servers host for the block (the cost curve)."""
        return inside(self.servers.namespace if self.servers else None)

    def direct(self, port: int) -> str:
        return f"http://{self.bind}:{port}"

    def url(self, link: Link | None, port: int) -> str:
        """The servers' `port` as the laptop reaches it over `link` (None: directly)."""
        if link is None:
            return self.direct(port)
        if self.netem:
            if link != self.netem_now:
                flags = ["--delay", f"{link.delay_ms:g}ms"]
                flags += ["--jitter", f"{link.jitter_ms:g}ms"] if link.jitter_ms else []
                subprocess.run([str(testnet.SCRIPT), "link", str(self.hosts_name), *flags], check=True)
                self.netem_now = link
            return self.direct(port)
        if (link, port) not in self.delays:
            lport = free_port()
            cmd = netdelay_command(lport, f"{self.bind}:{port}", link.delay_ms, link.jitter_ms)
            self.procs.tcp(f"link-{lport}", self.on_laptop(cmd), lport)
            self.delays[link, port] = f"http://127.0.0.1:{lport}"
        return self.delays[link, port]

    def how(self) -> str:
        if not self.servers:
            return "one host"
        if self.netem:
            return "link: tc netem on both hosts' uplinks"
        return "link: the user-space delay proxy on the laptop (this kernel has no sch_netem)"


Results = dict[Link | None, tuple[list[Method], Physics]]


def setup_methods(
    tc: toolchain.Toolchain,
    pair: Pair,
    rpc: list[str],
    pin: bool,
    args: argparse.Namespace,
    place: Place,
) -> Results:
    """Every method on this setup, over each of its links; the physics of each link."""
    procs = place.procs
    target, draft = pair.paths()
    tcores, dcores = (TARGET_CORE, DRAFT_CORE) if pin else (None, None)
    remote = place.servers is not None
    links = place.links
    mark = len(procs.running)
    eport = free_port()
    cmd = engine_command(target, eport, "--threads", "1", "--ctx", str(CTX), "--parallel", "2")
    cmd += ["--host", place.bind] + (["--token", place.token] if place.token else [])
    cmd += ["--rpc", ",".join(rpc)] if rpc else []
    engine = procs.http(
        f"engine-{eport}", place.on_servers(pinned(cmd, tcores)), place.direct(eport), "/ready", timeout=900
    )
    auth = place.headers
    prompts = tokenize(engine, list(PROMPTS[: args.prompts]), auth)
    methods: dict[Link | None, list[Method]] = {link: [] for link in links}
    for link in links:
        url = f"{place.url(link, eport)}/v1/completions"
        methods[link].append(per_prompt("engine alone", url, prompts, args, headers=auth))
    with place.at_servers():
        step_s, curve = verify_curve(engine, prompts[0], args.curve_samples, auth)
        near = round_trip(engine) if remote else 0.0
    # What each round adds by crossing the link: the same request through it less on the servers host.
    rtts = {link: max(round_trip(place.url(link, eport)) - near, 0.0) if link else 0.0 for link in links}

    dport = free_port()
    dcmd = llama_server_command(tc, draft, dport, ctx_size=CTX, threads=1)
    drafter = procs.http(
        f"drafter-{dport}", place.on_laptop(pinned(dcmd, dcores)), f"http://127.0.0.1:{dport}", timeout=300
    )
    draft_s = drafter_time_per_token(drafter, prompts[0])
    variants = [("proxy (K auto)", ["--draft", drafter])]
    if remote or not args.quick:
        variants += [
            ("proxy n-gram", ["--draft-kind", "ngram"]),
            ("proxy race (drafter + n-gram)", ["--mode", "race", "--drafter", f"q4:llama-server:{drafter}"]),
        ]
    for name, flags in variants:
        if "race" in name:
            flags = [*flags, "--drafter", "lookup:ngram"]
        flags = [*flags, "--target-token", place.token] if place.token else flags
        for link in links:
            pport = free_port()
            pcmd = place.on_laptop(pinned(proxy_command(pport, place.url(link, eport), *flags), dcores))
            proxy = procs.http(f"proxy-{pport}", pcmd, f"http://127.0.0.1:{pport}", "/ready", timeout=300)
            methods[link].append(proxy_method(name, proxy, prompts, args))
            procs.stop(procs.running[-1])
    # An rpc worker serves one client at a time: the engine lets go of the workers before llama-server.
    for proc in procs.running[mark:]:
        procs.stop(proc)
    place.delays.clear()  # those delay proxies led to the engine's port

    sport = free_port()
    scmd = llama_server_command(tc, target, sport, bind=place.bind, ctx_size=CTX, rpc=rpc, threads=1)
    procs.http(
        f"target-alone-{sport}", place.on_servers(pinned(scmd, tcores)), place.direct(sport), timeout=900
    )
    for link in links:
        url = f"{place.url(link, sport)}/completion"
        methods[link].insert(0, per_prompt("target alone (llama-server)", url, prompts, args, server=True))
    for proc in procs.running[mark:]:
        procs.stop(proc)
    place.delays.clear()
    best: dict[Link | None, Method] = {}
    for n in args.draft_n:
        extra = ["--model-draft", str(draft), "--spec-type", "draft-simple", "--spec-draft-n-max", str(n)]
        extra += ["--threads-draft", "1"]
        if rpc:
            extra += ["--spec-draft-device", "none"]  # the draft on this CPU, like the proxy's drafter
        sport = free_port()
        scmd = llama_server_command(
            tc, target, sport, bind=place.bind, ctx_size=CTX, rpc=rpc, threads=1, extra=extra
        )
        procs.http(
            f"spec-{n}-{sport}", place.on_servers(pinned(scmd, tcores)), place.direct(sport), timeout=900
        )
        for link in links:
            url = f"{place.url(link, sport)}/completion"
            method = per_prompt(f"llama-server -md, n-max {n}", url, prompts, args, server=True)
            if link not in best or method.median_rate() > best[link].median_rate():
                best[link] = method
        for proc in procs.running[mark:]:
            procs.stop(proc)
        place.delays.clear()
    physics = Physics(step_s, curve, draft_s)
    results: Results = {}
    for link in links:
        best[link].note = f"best of n-max {', '.join(map(str, args.draft_n))}" + (
            "; its drafter in-process, on the servers host (the reference)" if remote else ""
        )
        methods[link].insert(2, best[link])
        results[link] = (methods[link], replace(physics, rtt_s=rtts[link]))
    return results


@contextlib.contextmanager
def pool(
    procs: Processes, tc: toolchain.Toolchain, delay_ms: float, cores: str | None, place: Place
) -> Iterator[list[str]]:
    """Two rpc workers on the servers' host, each reached through its own delay proxy."""
    endpoints = []
    with place.at_servers():  # their ports are on the servers' loopback
        for _ in range(2):
            wport, dport = free_port(), free_port()
            wcmd = place.on_servers(pinned(rpc_worker_command(tc, wport, threads=1), cores))
            procs.tcp(f"rpc-{wport}", wcmd, wport)
            dcmd = place.on_servers(netdelay_command(dport, f"127.0.0.1:{wport}", delay_ms))
            procs.tcp(f"netdelay-{dport}", dcmd, dport)
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
    rtt = f"; the link's round trip: {physics.rtt_s * 1e3:.1f} ms" if physics.rtt_s else ""
    curve = table(
        f"{setup}: verify cost curve, a block of K draft tokens / one step ({step_ms:.1f} ms); the drafter: "
        f"{draft_ms:.1f} ms per token = {draft_ms / step_ms:.2f} steps{rtt}",
        [str(k) for k in range(17)],
    )
    curve.add_row(*(f"{physics.curve[k]:.2f}" for k in range(17)))
    console.print(curve)
    proxy = next(m for m in methods if m.name.startswith("proxy (K auto)"))
    paid = "drafting + verifying + the link's round trip" if physics.rtt_s else "drafting + verifying"
    ideal = table(
        f"{setup}: the proxy's speedup over the engine alone vs an ideal loop ({paid} only)",
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


def remote_setup(
    procs: Processes, tc: toolchain.Toolchain, pair: Pair, pin: bool, args: argparse.Namespace, pinning: str
) -> None:
    """The drafter on another host than the engine: two network namespaces, every link in turn."""
    testnet.sweep_stale("twr")
    netem = subprocess.run([str(testnet.SCRIPT), "netem"], capture_output=True).returncode == 0
    first: Link = args.links[0]
    delay = dict(delay=f"{first.delay_ms:g}ms", jitter=f"{first.jitter_ms:g}ms" if first.jitter_ms else None)
    name = f"twr{os.getpid()}"
    with testnet.Hosts(name, 2, subnet="10.234.0", **(delay if netem else {})) as (servers, laptop):
        place = Place(procs, servers, laptop, args.links, name, netem)
        try:
            cores = TARGET_CORE if pin else None
            # The benchmark is the client, on the laptop; the pool is on the servers host.
            with inside(laptop.namespace), pool(procs, tc, args.delay_ms, cores, place) as endpoints:
                results = setup_methods(tc, pair, endpoints, pin, args, place)
        finally:
            procs.stop_all()  # before the namespaces go
    for link, (methods, physics) in results.items():
        setup = (
            f"remote drafter over {link} ({place.how()}): servers host = the engine or llama-server + 2 rpc "
            f"workers (+{args.delay_ms:g} ms each way), laptop host = drafter + proxy + client; {pinning}"
        )
        report(setup, methods, physics, args, pair)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", choices=["qwen-f16", "qwen-q4", "smollm2"], default=None)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="64 tokens, 3 prompts, pooled only, n-max 4, proxy K auto; with the remote setup 32 tokens "
        "and 2 prompts, every proxy row (it measures each method over every link)",
    )
    ap.add_argument("--tokens", type=int, default=None, help="completion tokens per request (128; quick 64)")
    ap.add_argument(
        "--prompts", type=int, default=None, help=f"how many prompts (max {len(PROMPTS)}; quick 3)"
    )
    ap.add_argument("--runs", type=int, default=1, help="runs per prompt (the fastest is kept)")
    ap.add_argument("--draft-n", type=int, nargs="+", default=None, help="llama-server n-max values (4 8)")
    ap.add_argument("--delay-ms", type=float, default=2.0, help="added latency each way in the pool")
    ap.add_argument(
        "--setups",
        nargs="+",
        choices=SETUPS,
        default=None,
        help="which setups to run, in this order (default: all; quick: pooled); remote needs root",
    )
    ap.add_argument(
        "--links",
        nargs="+",
        type=parse_link,
        default=[Link(2.0), Link(10.0, 5.0)],
        metavar="DELAY_MS[:JITTER_MS]",
        help="the remote setup's links between laptop and servers, each way (default: 2 10:5)",
    )
    ap.add_argument("--pin", action="store_true", help="also run each setup pinned (target / drafter cores)")
    ap.add_argument("--curve-samples", type=int, default=3)
    args = ap.parse_args(argv)
    setups = args.setups or (["pooled"] if args.quick else list(SETUPS))
    why = testnet.namespaces_unavailable() if "remote" in setups else None
    if why and not args.setups:  # by default (make bench) skip it; asked for by name, it must run
        console.print(f"skipping the remote setup: {why}")
        setups.remove("remote")
    elif why:
        raise SystemExit(f"--setups remote needs network namespaces: {why}")
    remote_quick = args.quick and "remote" in setups
    args.tokens = args.tokens or (32 if remote_quick else 64 if args.quick else 128)
    args.prompts = min(
        args.prompts or (2 if remote_quick else 3 if args.quick else len(PROMPTS)), len(PROMPTS)
    )
    args.draft_n = args.draft_n or ([4] if args.quick else [4, 8])
    # A SIGTERM (a CI timeout, kill) unwinds like Ctrl-C: every process and namespace is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

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
            for setup in setups:
                if setup == "local":
                    console.print(f"[bold]local, {pinning}[/]")
                    ((methods, physics),) = setup_methods(tc, pair, [], pin, args, Place(procs)).values()
                    report(f"local, {pinning}", methods, physics, args, pair)
                elif setup == "pooled":
                    title = f"pooled (2 rpc workers, +{args.delay_ms:g} ms each way), {pinning}"
                    console.print(f"[bold]{title}[/]")
                    place = Place(procs)
                    with pool(procs, tc, args.delay_ms, TARGET_CORE if pin else None, place) as endpoints:
                        ((methods, physics),) = setup_methods(tc, pair, endpoints, pin, args, place).values()
                    report(title, methods, physics, args, pair)
                else:
                    links = ", ".join(map(str, args.links))
                    console.print(f"[bold]remote drafter, links {links}, {pinning}[/]")
                    remote_setup(procs, tc, pair, pin, args, pinning)
                procs.stop_all()
    console.print(f"bench took {time.perf_counter() - started:.0f} s; {load_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
