"""Block vs single-token logits, bit for bit, and what exact mode costs: one run, every setting.

For each model, place (this CPU, or one rpc worker), mode (exact: the pinned build's default;
default: the same build with GGML_CPU_EXACT=0, i.e. stock ggml) and attention setting (flash
attention off/on x KV cache F16/F32), the engine's libllama bindings evaluate the greedy
continuation of a prompt one token per decode, then in blocks of 2..17 tokens with logits at every
position (as verify does), and compare the rows (engine/invariance.py). Printed per setting:
positions whose row differs in any bit (out of positions x block sizes), the largest |diff|, greedy
flips, and the speeds: one-token decode (tokens/s), a verify block of 5/9/17 as a multiple of one
step, and the prompt prefill.

Each (model, place, mode) runs in a process of its own: ggml reads GGML_CPU_EXACT when it creates
a CPU backend, and the rpc worker gets the same environment. Every process runs 1 thread.

Usage: .venv/bin/python bench/invariance.py [--models smollm2-135m-f32,...] [--positions 17]
       [--blocks 2-17] [--places local,rpc] [--modes exact,default] [--prompt-tokens 300]
       [--attention off:f16,off:f32,on:f16,on:f32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from _common import Processes, log_folder, table
from rich.console import Console

from tightwad import models, toolchain
from tightwad.launch import free_port, rpc_worker_command, wait_for_port

DEFAULT_MODELS = "smollm2-135m-f32,smollm2-135m-q4_1,gemma3-270m-f16,gemma3-270m-q4_k_m"
ATTENTION = "off:f16,off:f32,on:f16,on:f32"  # flash attention : KV cache type
COST_BLOCKS = (5, 9, 17)
TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of oil "
    "and a cloth for the great lens. Ships passed far out at sea, their lights small and steady. "
)
console = Console(width=170)


def parse_blocks(text: str) -> list[int]:
    if "-" in text:
        low, high = (int(x) for x in text.split("-"))
        return list(range(low, high + 1))
    return [int(x) for x in text.split(",")]


def child(spec: dict[str, Any]) -> None:
    """One process: one model, one place, one mode; every attention setting. JSON lines out."""
    from tightwad.engine import invariance, libllama

    devices = libllama.rpc_devices(spec["rpc"]) if spec["rpc"] else []
    model = libllama.Model(spec["path"], devices)
    prompt = model.tokenize(TEXT * 40)[: spec["prompt_tokens"]]
    for setting in spec["attention"].split(","):
        flash_attn, kv_type = setting.split(":")
        ctx = libllama.Context(model, n_ctx=1024, n_batch=512, flash_attn=flash_attn, kv_type=kv_type)
        try:
            m = invariance.measure(ctx, prompt, spec["positions"], spec["blocks"])
        finally:
            ctx.close()
        print(
            json.dumps(
                {
                    "fa": flash_attn,
                    "kv": kv_type,
                    "positions": m.positions,
                    "differing": sum(b.differing for b in m.blocks),
                    "compared": sum(b.positions for b in m.blocks),
                    "max_abs_diff": max(b.max_abs_diff for b in m.blocks),
                    "flips": sum(b.argmax_flips for b in m.blocks),
                    "first_bad_block": next((b.block for b in m.blocks if b.differing), None),
                    "tok_s": 1 / m.seconds_per_token,
                    "cost": {b.block: b.seconds_per_block / m.seconds_per_token for b in m.blocks},
                    "prefill_s": m.prefill_seconds,
                }
            ),
            flush=True,
        )
    model.close()


def run_one(
    procs: Processes, tc: toolchain.Toolchain, name: str, place: str, mode: str, args: argparse.Namespace
) -> list[dict[str, Any]]:
    env = {"GGML_CPU_EXACT": "1" if mode == "exact" else "0"}
    rpc: list[str] = []
    worker = None
    if place == "rpc":
        port = free_port()
        worker, log = procs.start(f"rpc-{name}-{mode}", rpc_worker_command(tc, port, threads=1), env=env)
        wait_for_port("127.0.0.1", port, process=worker, log=log)
        rpc = [f"127.0.0.1:{port}"]
    spec = {
        "path": str(models.resolve(name)),
        "rpc": rpc,
        "positions": args.positions,
        "blocks": parse_blocks(args.blocks),
        "prompt_tokens": args.prompt_tokens,
        "attention": args.attention,
    }
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    if worker is not None:
        procs.stop(worker)
    if out.returncode != 0:
        console.print(f"[red]{name} {place} {mode} failed[/red]\n{out.stderr[-3000:]}")
        return []
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=DEFAULT_MODELS, help="catalog names, comma-separated")
    parser.add_argument("--positions", type=int, default=17, help="positions compared per setting")
    parser.add_argument("--blocks", default="2-17", help="block sizes: LOW-HIGH or a comma list")
    parser.add_argument("--places", default="local,rpc")
    parser.add_argument("--modes", default="exact,default")
    parser.add_argument("--prompt-tokens", type=int, default=300, help="prompt length (>256: 512 KV cells)")
    parser.add_argument("--attention", default=ATTENTION, help="flash attention:KV type settings")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    tc = toolchain.find()
    rows: list[list[str]] = []
    results: list[dict[str, Any]] = []
    with Processes(log_folder("invariance")) as procs:
        for name in args.models.split(","):
            for place in args.places.split(","):
                for mode in args.modes.split(","):
                    for r in run_one(procs, tc, name, place, mode, args):
                        results.append({"model": name, "place": place, "mode": mode, **r})
                        cost = r["cost"]
                        rows.append(
                            [
                                name,
                                place,
                                mode,
                                f"fa {r['fa']} kv {r['kv']}",
                                f"{r['differing']}/{r['compared']}",
                                f"{r['max_abs_diff']:.3g}",
                                str(r["flips"]),
                                str(r["first_bad_block"] or "-"),
                                f"{r['tok_s']:.1f}",
                                *(f"{cost.get(str(b), cost.get(b, 0)):.2f}x" for b in COST_BLOCKS),
                                f"{r['prefill_s']:.2f}",
                            ]
                        )
                        console.print(" | ".join(rows[-1]))
    console.print(
        table(
            "block vs single-token logits (bitwise) and speed, 1 thread",
            [
                "model",
                "place",
                "mode",
                "attention",
                "rows differing",
                "max |diff|",
                "flips",
                "first bad B",
                "tok/s",
                *(f"B={b} cost" for b in COST_BLOCKS),
                "prefill s",
            ],
            rows,
        )
    )
    if out := os.environ.get("INVARIANCE_JSON"):
        Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
