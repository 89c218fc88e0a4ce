"""The engine against llama-server on the same model and the same llama.cpp build, in one run.

1. Plain greedy decoding: tokens per second of the engine's /v1/completions vs llama-server's
   /completion, both streamed, same prompt tokens, same length (ignore_eos), one thread each,
   measured alternately. Rate = (n - 1) / (time of last token - time of first token), i.e. decode
   speed without the prompt; end-to-end wall time is shown too. Goal: ratio >= 0.95.
2. Verify throughput: one /tightwad/v1/verify call scoring a K-token draft (K+1 positions in one
   decode) on a cached prefix, for K = 1, 4, 8, 16: target positions scored per second.
3. Speculative greedy decoding through the verify API with the Q4_1 draft in this process (a
   same-model pair: SmolLM2 Q4_1 drafting for its own F32 dequantization), vs plain greedy.
4. The pool: the target split across two rpc workers on loopback, engine vs `llama-server --rpc`
   (one after the other: a worker serves one client at a time).

Usage: .venv/bin/python bench/engine_vs_llama_server.py [--tokens 128] [--threads 1] [--no-pool]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from _common import Processes, engine_command, log_folder, sse_chunks, table
from rich.console import Console

from tightwad import models, toolchain
from tightwad.engine import libllama
from tightwad.launch import free_port, llama_server_command, rpc_worker_command, wait_for_http

PROMPT = "<|im_start|>user\nWrite a long story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"
console = Console()


def stream_times(url: str, body: dict) -> tuple[list[float], int]:  # type: ignore[type-arg]
    """POST a streaming request; returns the arrival time of each content chunk and the count."""
    stamps: list[float] = []
    for now, chunk in sse_chunks(url, body):
        # The engine answers in the OpenAI shape, llama-server's /completion with bare tokens.
        where = chunk["choices"][0] if "choices" in chunk else chunk
        stamps += [now] * len(where.get("tokens") or [])
    return stamps, len(stamps)


def decode_rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def engine_request(prompt: list[int], n: int) -> dict:  # type: ignore[type-arg]
    return {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}


def server_request(prompt: list[int], n: int) -> dict:  # type: ignore[type-arg]
    return {
        "prompt": prompt,
        "n_predict": n,
        "temperature": 0,
        "top_k": 1,
        "ignore_eos": True,
        "stream": True,
        "cache_prompt": False,
        "return_tokens": True,
    }


def measure(name: str, url: str, body: dict, n: int, runs: int) -> tuple[list[float], list[float]]:  # type: ignore[type-arg]
    """Decode rates and end-to-end times of `runs` streamed requests (after one short warm-up)."""
    warm = {**body, "max_tokens": 8} if "max_tokens" in body else {**body, "n_predict": 8}
    stream_times(url, warm)
    rates, walls = [], []
    for _ in range(runs):
        stamps, got = stream_times(url, body)
        if got != n:
            raise SystemExit(f"{name} returned {got} tokens, expected {n}")
        rates.append(decode_rate(stamps))
        walls.append(stamps[-1])
    return rates, walls


def greedy_table(title: str, rates: dict[str, list[float]], walls: dict[str, list[float]]) -> float:
    """Print the table and the engine / llama-server ratio of the best decode rates; return it."""
    best = {name: max(r) for name, r in rates.items()}
    rows = [
        (name, f"{best[name]:.1f}", f"{min(walls[name]):.2f}", " ".join(f"{r:.1f}" for r in rates[name]))
        for name in rates
    ]
    console.print(table(title, ("server", "decode tok/s", "end-to-end s", "all runs tok/s"), rows))
    ratio = best["engine"] / best["llama-server"]
    verdict = "[green]meets[/]" if ratio >= 0.95 else "[red]misses[/]"
    console.print(f"engine / llama-server decode ratio: [bold]{ratio:.3f}[/] ({verdict} the 0.95 goal)")
    return ratio


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="alternating measurements per server")
    ap.add_argument("--no-pool", dest="pool", action="store_false", help="skip the rpc pool comparison")
    args = ap.parse_args(argv)

    tc = toolchain.find()
    target = models.resolve("smollm2-135m-f32")
    draft_path = models.resolve("smollm2-135m-q4_1")
    logs = log_folder("engine")
    eport, sport = free_port(), free_port()
    engine_cmd = engine_command(
        target, eport, "--threads", str(args.threads), "--ctx", "2048", "--parallel", "2"
    )
    server_cmd = llama_server_command(tc, target, sport, ctx_size=2048, threads=args.threads)
    engine_url, server_url = f"http://127.0.0.1:{eport}", f"http://127.0.0.1:{sport}"
    console.print(f"model {target.name}, {args.threads} thread(s), logs in {logs}")

    with Processes(logs) as procs:
        eng, engine_log = procs.start("engine", engine_cmd)  # both load at once; then wait for both
        srv, server_log = procs.start("server", server_cmd)
        wait_for_http(f"{engine_url}/ready", timeout=180, process=eng, log=engine_log)
        wait_for_http(f"{server_url}/health", timeout=180, process=srv, log=server_log)
        prompt = httpx.post(
            f"{engine_url}/tokenize", json={"content": PROMPT, "add_special": True}, timeout=30
        ).json()["tokens"]

        # 1. plain greedy -------------------------------------------------------------------------
        rates: dict[str, list[float]] = {"engine": [], "llama-server": []}
        walls: dict[str, list[float]] = {"engine": [], "llama-server": []}
        for _ in range(args.rounds):  # alternate, so background load hits both alike
            for name, url, body in (
                ("engine", f"{engine_url}/v1/completions", {**engine_request(prompt, args.tokens)}),
                ("llama-server", f"{server_url}/completion", server_request(prompt, args.tokens)),
            ):
                if name == "engine":
                    body["return_tokens"] = True
                r, w = measure(name, url, body, args.tokens, 1)
                rates[name] += r
                walls[name] += w
        procs.stop(srv)  # free the core for the verify measurements
        best = {name: max(r) for name, r in rates.items()}
        greedy_table(f"plain greedy, local CPU, {args.tokens} tokens (best of {args.rounds})", rates, walls)

        # 2. verify throughput --------------------------------------------------------------------
        rng = np.random.default_rng(0)
        verify = table(
            "verify: one call scores K+1 positions in one decode (cached prefix)",
            ("K", "ms / verify", "positions / s", "vs 1-token decode"),
        )
        with httpx.Client(base_url=engine_url, timeout=120) as client:
            single_ms = 1000 / best["engine"]
            for k in (1, 4, 8, 16):
                times = []
                for i in range(12):
                    draft = [int(t) for t in rng.integers(1000, 40000, size=k)]
                    body = {
                        "conversation": "bench",
                        "tokens": prompt,
                        "reset": True,
                        "drafts": [{"tokens": draft}],
                    }
                    t0 = time.perf_counter()
                    response = client.post("/tightwad/v1/verify", json=body)
                    response.raise_for_status()
                    if i >= 2:  # the first calls warm the prefix cache
                        times.append(time.perf_counter() - t0)
                ms = statistics.median(times) * 1000
                verify.add_row(str(k), f"{ms:.1f}", f"{(k + 1) / ms * 1000:.1f}", f"{ms / single_ms:.2f}x")
            console.print(verify)

            # 3. speculative greedy through the verify API ---------------------------------------------
            libllama.set_verbose(False)
            drafter = libllama.Model(draft_path)
            dctx = libllama.Context(drafter, n_ctx=2048)
            batch = libllama.Batch(dctx.n_batch)
            speculative = table(
                f"speculative greedy via verify, {args.tokens} tokens (same-model pair)",
                ("K", "tok/s", "vs plain", "accepted", "tokens / round"),
            )
            for k in (4, 8):
                history, out, held = list(prompt), [], []
                rounds = accepted = drafted = 0
                t0 = time.perf_counter()
                first = True
                while len(out) < args.tokens:
                    keep = 0
                    while keep < min(len(held), len(history) - 1) and held[keep] == history[keep]:
                        keep += 1
                    dctx.remove(0, keep, -1)
                    index = dctx.prefill(batch, history[keep:], keep)
                    draft = []
                    pos = len(history)
                    while len(draft) < k:
                        draft.append(dctx.argmax(index))
                        batch.clear()
                        index = batch.add(draft[-1], pos, (0,), True)
                        dctx.decode(batch)
                        pos += 1
                    held = history + draft
                    body = {"conversation": f"spec-{k}", "tokens": prompt if first else [], "reset": first}
                    body["drafts"] = [{"tokens": draft}]
                    result = client.post("/tightwad/v1/verify", json=body).json()
                    first = False
                    history += result["tokens"]
                    out += result["tokens"]
                    rounds += 1
                    accepted += result["n_accepted"]
                    drafted += k
                rate = len(out) / (time.perf_counter() - t0)
                speculative.add_row(
                    str(k),
                    f"{rate:.1f}",
                    f"{rate / best['engine']:.2f}x",
                    f"{accepted / drafted:.0%}",
                    f"{len(out) / rounds:.2f}",
                )
            console.print(speculative)
            batch.close()
            dctx.close()
            drafter.close()

    # 4. the pool ---------------------------------------------------------------------------------
    if args.pool:
        pool(tc, target, prompt, args, logs)
    return 0


def pool(
    tc: toolchain.Toolchain, target: Path, prompt: list[int], args: argparse.Namespace, logs: Path
) -> None:
    worker_ports = [free_port(), free_port()]
    endpoints = [f"127.0.0.1:{p}" for p in worker_ports]
    rates: dict[str, list[float]] = {}
    walls: dict[str, list[float]] = {}
    with Processes(logs) as procs:
        for port in worker_ports:
            procs.tcp(f"rpc-{port}", rpc_worker_command(tc, port, threads=args.threads), port)
        eport, sport = free_port(), free_port()
        engine_cmd = engine_command(
            target, eport, "--threads", str(args.threads), "--ctx", "2048", "--rpc", ",".join(endpoints)
        )
        engine = procs.http("pool-engine", engine_cmd, f"http://127.0.0.1:{eport}", "/ready", timeout=180)
        body = {**engine_request(prompt, args.tokens), "return_tokens": True}
        rates["engine"], walls["engine"] = measure(
            "engine", f"{engine}/v1/completions", body, args.tokens, args.rounds
        )
        # A worker serves one client at a time: the engine lets go of the workers before llama-server.
        procs.stop(procs.running[-1])
        server_cmd = llama_server_command(
            tc, target, sport, ctx_size=2048, rpc=endpoints, threads=args.threads
        )
        server = procs.http("pool-server", server_cmd, f"http://127.0.0.1:{sport}", timeout=180)
        body = server_request(prompt, args.tokens)
        rates["llama-server"], walls["llama-server"] = measure(
            "llama-server", f"{server}/completion", body, args.tokens, args.rounds
        )
    greedy_table(
        f"plain greedy, pool of 2 rpc workers, {args.tokens} tokens (best of {args.rounds})", rates, walls
    )


if __name__ == "__main__":
    sys.exit(main())
