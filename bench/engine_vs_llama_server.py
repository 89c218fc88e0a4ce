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
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from tightwad import models, toolchain
from tightwad.engine import libllama
from tightwad.launch import free_port, llama_server_command, rpc_worker_command, wait_for_http, wait_for_port

PROMPT = "<|im_start|>user\nWrite a long story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"
console = Console()


@contextmanager
def process(cmd: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def stream_times(url: str, body: dict) -> tuple[list[float], int]:  # type: ignore[type-arg]
    """POST a streaming request; returns the arrival time of each content chunk and the count."""
    start = time.perf_counter()
    stamps = []
    with httpx.stream("POST", url, json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "choices" in chunk:  # the engine (OpenAI shape)
                tokens = chunk["choices"][0].get("tokens") or []
            else:  # llama-server /completion
                tokens = chunk.get("tokens") or []
            stamps += [time.perf_counter() - start] * len(tokens)
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
    table = Table(title=title)
    for column in ("server", "decode tok/s", "end-to-end s", "all runs tok/s"):
        table.add_column(column)
    for name in rates:
        runs = " ".join(f"{r:.1f}" for r in rates[name])
        table.add_row(name, f"{best[name]:.1f}", f"{min(walls[name]):.2f}", runs)
    console.print(table)
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
    logs = Path(tempfile.mkdtemp(prefix="tightwad-bench-"))
    eport, sport = free_port(), free_port()
    engine_cmd = [sys.executable, "-m", "tightwad.engine.cli", "--model", str(target), "--port", str(eport)]
    engine_cmd += ["--threads", str(args.threads), "--ctx", "2048", "--parallel", "2"]
    server_cmd = llama_server_command(tc, target, sport, ctx_size=2048, threads=args.threads)
    engine_url, server_url = f"http://127.0.0.1:{eport}", f"http://127.0.0.1:{sport}"
    console.print(f"model {target.name}, {args.threads} thread(s), logs in {logs}")

    with process(engine_cmd, logs / "engine.log") as eng, process(server_cmd, logs / "server.log") as srv:
        wait_for_http(f"{engine_url}/ready", timeout=180, process=eng, log=logs / "engine.log")
        wait_for_http(f"{server_url}/health", timeout=180, process=srv, log=logs / "server.log")
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
        os.killpg(srv.pid, signal.SIGTERM)  # free the core for the verify measurements
        best = {name: max(r) for name, r in rates.items()}
        greedy_table(f"plain greedy, local CPU, {args.tokens} tokens (best of {args.rounds})", rates, walls)

        # 2. verify throughput --------------------------------------------------------------------
        rng = np.random.default_rng(0)
        table = Table(title="verify: one call scores K+1 positions in one decode (cached prefix)")
        for column in ("K", "ms / verify", "positions / s", "vs 1-token decode"):
            table.add_column(column)
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
                table.add_row(str(k), f"{ms:.1f}", f"{(k + 1) / ms * 1000:.1f}", f"{ms / single_ms:.2f}x")
            console.print(table)

            # 3. speculative greedy through the verify API ---------------------------------------------
            libllama.set_verbose(False)
            drafter = libllama.Model(draft_path)
            dctx = libllama.Context(drafter, n_ctx=2048)
            batch = libllama.Batch(dctx.n_batch)
            table = Table(title=f"speculative greedy via verify, {args.tokens} tokens (same-model pair)")
            for column in ("K", "tok/s", "vs plain", "accepted", "tokens / round"):
                table.add_column(column)
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
                    accepted += result["accepted"]
                    drafted += k
                rate = len(out) / (time.perf_counter() - t0)
                table.add_row(
                    str(k),
                    f"{rate:.1f}",
                    f"{rate / best['engine']:.2f}x",
                    f"{accepted / drafted:.0%}",
                    f"{len(out) / rounds:.2f}",
                )
            console.print(table)
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
    with contextlib.ExitStack() as stack:
        for port in worker_ports:
            cmd = rpc_worker_command(tc, port, threads=args.threads)
            worker = stack.enter_context(process(cmd, logs / f"rpc-{port}.log"))
            wait_for_port("127.0.0.1", port, process=worker, log=logs / f"rpc-{port}.log")
        eport, sport = free_port(), free_port()
        engine_cmd = [
            sys.executable,
            "-m",
            "tightwad.engine.cli",
            "--model",
            str(target),
            "--port",
            str(eport),
        ]
        engine_cmd += ["--threads", str(args.threads), "--ctx", "2048", "--rpc", ",".join(endpoints)]
        with process(engine_cmd, logs / "pool-engine.log") as eng:
            wait_for_http(
                f"http://127.0.0.1:{eport}/ready", timeout=180, process=eng, log=logs / "pool-engine.log"
            )
            body = {**engine_request(prompt, args.tokens), "return_tokens": True}
            url = f"http://127.0.0.1:{eport}/v1/completions"
            rates["engine"], walls["engine"] = measure("engine", url, body, args.tokens, args.rounds)
        server_cmd = llama_server_command(
            tc, target, sport, ctx_size=2048, rpc=endpoints, threads=args.threads
        )
        with process(server_cmd, logs / "pool-server.log") as srv:
            wait_for_http(
                f"http://127.0.0.1:{sport}/health", timeout=180, process=srv, log=logs / "pool-server.log"
            )
            url = f"http://127.0.0.1:{sport}/completion"
            body = server_request(prompt, args.tokens)
            rates["llama-server"], walls["llama-server"] = measure(
                "llama-server", url, body, args.tokens, args.rounds
            )
    greedy_table(
        f"plain greedy, pool of 2 rpc workers, {args.tokens} tokens (best of {args.rounds})", rates, walls
    )


if __name__ == "__main__":
    sys.exit(main())
