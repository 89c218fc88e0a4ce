"""Race: two drafters of different speed and quality vs each of them alone vs the target alone, one run.

The target is SmolLM2-135M F32 in the engine (this machine's CPU, 1 thread). The drafters:
  q4      llama-server with the Q4_1 build of the same model: good proposals, a model's cost per
          token (a SAME-MODEL PAIR: acceptance is unusually high, not a small/large pair);
  lookup  the n-gram / prompt-lookup drafter: no model, instant, good only where the text repeats.
Optionally `--q4-delay-ms` puts the q4 drafter behind the delay proxy (a drafter on another host).

Same prompts, greedy (temperature 0), same max_tokens, for:
  (a) the target alone (the engine's /v1/completions);
  (b) the proxy speculating with q4 only;  (c) with lookup only;
  (d) the proxy in mode race with both.
It checks that every proxy reply equals (a) token for token, and prints tok/s per prompt and
overall, the race's table (who won how often, who was cut off) and race vs the best single drafter.
tok/s = completion tokens / wall time of the request (time to first token included), best of --runs.

Usage: .venv/bin/python bench/race.py [--tokens 96] [--runs 2] [--q4-delay-ms 0]
"""

from __future__ import annotations

import argparse
import sys
import time

import httpx
from _common import Processes, engine_command, log_folder, netdelay_command, proxy_command, table
from rich.console import Console

from tightwad import models, toolchain
from tightwad.launch import free_port, llama_server_command

PROMPTS = {
    "story": (
        "<|im_start|>user\nWrite a long story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"
    ),
    "repeat": (
        "<|im_start|>user\nCopy this list exactly, twice:\n"
        "apples, pears, plums, cherries, grapes, lemons, limes, melons, peaches, figs, dates, kiwis"
        "<|im_end|>\n<|im_start|>assistant\n"
    ),
}
console = Console(width=140)


def complete(url: str, prompt: str, n: int) -> tuple[list[int], float]:
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "return_tokens": True}
    started = time.perf_counter()
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    seconds = time.perf_counter() - started
    response.raise_for_status()
    return list(response.json()["choices"][0]["tokens"]), seconds


def proxy(procs: Processes, engine: str, *extra: str) -> str:
    port = free_port()
    return procs.http(
        f"proxy-{port}", proxy_command(port, engine, *extra), f"http://127.0.0.1:{port}", "/ready"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--q4-delay-ms", type=float, default=0.0, help="put the q4 drafter behind a delay")
    args = parser.parse_args()
    tc = toolchain.find()
    with Processes(log_folder("race")) as procs:
        port = free_port()
        target = models.resolve("smollm2-135m-f32")
        cmd = engine_command(target, port, "--threads", "1", "--ctx", "2048", "--parallel", "4")
        engine = procs.http("engine", cmd, f"http://127.0.0.1:{port}", "/ready")
        port = free_port()
        q4 = procs.http(
            "q4",
            llama_server_command(tc, models.resolve("smollm2-135m-q4_1"), port, threads=1),
            f"http://127.0.0.1:{port}",
        )
        if args.q4_delay_ms > 0:
            delayed = free_port()
            procs.tcp(
                "netdelay", netdelay_command(delayed, q4.removeprefix("http://"), args.q4_delay_ms), delayed
            )
            q4 = f"http://127.0.0.1:{delayed}"
        setups = {
            "target alone": engine,
            "speculate q4": proxy(procs, engine, "--draft", q4),
            "speculate lookup": proxy(procs, engine, "--draft-kind", "ngram"),
            "race q4+lookup": proxy(
                procs,
                engine,
                "--mode",
                "race",
                "--drafter",
                f"q4:llama-server:{q4}",
                "--drafter",
                "lookup:ngram",
            ),
        }
        for url in setups.values():  # warm up every path (prompt caches, cost model measurements)
            complete(url, PROMPTS["story"], 16)
        rates: dict[str, dict[str, float]] = {name: {} for name in setups}
        best: dict[tuple[str, str], tuple[list[int], float]] = {}
        for _ in range(args.runs):  # round-robin, so load from elsewhere hits every setup alike
            for label, prompt in PROMPTS.items():
                for name, url in setups.items():
                    tokens, seconds = complete(url, prompt, args.tokens)
                    if (name, label) not in best or seconds < best[name, label][1]:
                        best[name, label] = (tokens, seconds)
        totals: dict[str, tuple[int, float]] = {name: (0, 0.0) for name in setups}
        exact = True
        for label in PROMPTS:
            reference = best["target alone", label][0]
            for name in setups:
                tokens, seconds = best[name, label]
                if tokens != reference:
                    exact = False
                    console.print(f"[red]{name} differs from the target alone on {label!r}[/red]")
                rates[name][label] = len(tokens) / seconds
                n, s = totals[name]
                totals[name] = (n + len(tokens), s + seconds)
        rates_table = table(
            f"greedy tok/s, {args.tokens} tokens, best of {args.runs} (same-model pair, 1 thread)", ["setup"]
        )
        for column in (*PROMPTS, "overall", "vs target alone"):
            rates_table.add_column(column, justify="right")
        alone = totals["target alone"][0] / totals["target alone"][1]
        overall = {name: n / s for name, (n, s) in totals.items()}
        for name in setups:
            cells = [f"{rates[name][label]:.1f}" for label in PROMPTS]
            rates_table.add_row(name, *cells, f"{overall[name]:.1f}", f"{overall[name] / alone:.2f}x")
        console.print(rates_table)
        stats = httpx.get(f"{setups['race q4+lookup']}/tightwad/v1/stats", timeout=10).json()
        race = stats["race"]
        columns = ("drafter", "offered", "wins", "win rate", "accepted tokens", "cut off", "mean draft ms")
        wins = table(
            f"race: who won ({race['rounds']} rounds, all prompts and warm-up)", columns, justify="right"
        )
        for name, lane in race["drafters"].items():
            wins.add_row(
                name,
                str(lane["offered"]),
                str(lane["wins"]),
                f"{lane['win_rate']:.0%}" if lane["win_rate"] is not None else "-",
                str(lane["accepted_tokens"]),
                str(lane["cut"]),
                str(lane["mean_draft_ms"]),
            )
        wins.add_row("(no winner)", "", str(race["no_winner"]), "", "", "", "")
        console.print(wins)
        single = max(("speculate q4", "speculate lookup"), key=lambda n: overall[n])
        race_rate = overall["race q4+lookup"]
        per_prompt = []
        for label in PROMPTS:
            best_single = max(rates["speculate q4"][label], rates["speculate lookup"][label])
            per_prompt.append(f"{label} {rates['race q4+lookup'][label] / best_single:.2f}x")
        console.print(
            f"race vs best single drafter ({single}): {race_rate / overall[single]:.2f}x overall; "
            f"per prompt vs that prompt's best single drafter: {', '.join(per_prompt)}"
        )
        console.print(f"every reply equal to the target alone: {'yes' if exact else 'NO'}")
        return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
