"""`tightwad engine`: load a model across the pool's rpc workers and serve it.

    tightwad engine --model PATH [--rpc host:port,...] [--tensor-split auto|a,b,c] [--ctx N|auto]
                    [--port P] [--host 127.0.0.1] [--threads N] [--parallel N|auto] [--token T]
                    [--conversation-ctx N] [--queue N|auto] [--queue-timeout S]
                    [--alias NAME ...] [--exact on|off]

It refuses to start, with one clear line, when a worker is unreachable or runs another llama.cpp
build (libllama.rpc_devices probes each first), and when asked to listen beyond loopback without a
token (`--token` or TIGHTWAD_TOKEN). Once the model is loaded it prints one line:
`tightwad engine ready: http://HOST:PORT ...`, after a `tightwad engine capacity: ...` line that
says how many conversations it keeps and why (engine/capacity.py has the rules).

Exit codes: 0 after a clean shutdown, 1 when it could not start, 3 when it stopped after losing an
rpc worker (it keeps serving 503s until told to stop; restart it once the worker is back), 4 when
its teardown hung and the shutdown watchdog ended it.

SIGTERM always ends it within about --shutdown-grace seconds: requests still running get that long,
and a libllama teardown that hangs (freeing memory on an rpc worker that died meanwhile blocks, or
parks in the abort trap) is cut short by a watchdog that says so and exits without freeing.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from tightwad import http
from tightwad.engine import capacity, libllama
from tightwad.engine.api import DEFAULT_MAX_BODY, create_app
from tightwad.engine.chat import ChatFormatter
from tightwad.engine.core import Engine
from tightwad.engine.errors import PoolFailure
from tightwad.engine.workers import PoolMonitor, describe_loss
from tightwad.errors import TightwadError

EXIT_WORKER_LOST = 3
EXIT_TEARDOWN_HUNG = 4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tightwad engine",
        description="Serve a model loaded across rpc workers: OpenAI API + the verify API.",
    )
    p.add_argument("--model", required=True, help="path to a GGUF file")
    p.add_argument("--rpc", default="", help="comma-separated rpc workers, host:port,...")
    p.add_argument(
        "--tensor-split",
        default="auto",
        help="'auto' (proportional to each device's free memory) or one weight per device, a,b,c",
    )
    p.add_argument(
        "--ctx",
        type=count_or_auto("--ctx", 1),
        default=4096,
        help="KV cache cells shared by all conversations, or 'auto': half the memory the devices (or "
        "this host, on CPU) have free beside the weights, at most every conversation at the model's "
        "trained context (default 4096)",
    )
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1", help="listen address (beyond loopback needs a token)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument(
        "--parallel",
        type=count_or_auto("--parallel", 1),
        default=None,
        help="conversations kept in the KV cache at once, or 'auto' (default): --ctx divided by "
        f"--conversation-ctx, at least 1, at most 256 / --max-drafts (llama.cpp's {capacity.MAX_SEQUENCES} "
        "sequences, shared with the scratch ones of multi-draft verify calls)",
    )
    p.add_argument(
        "--conversation-ctx",
        type=count_or_auto("--conversation-ctx", 1, auto=False),
        default=capacity.DEFAULT_CONVERSATION_CELLS,
        help="KV cells one conversation is expected to use (prompt and reply), for --parallel auto "
        f"(default {capacity.DEFAULT_CONVERSATION_CELLS})",
    )
    p.add_argument(
        "--queue",
        type=count_or_auto("--queue", 0),
        default=None,
        help="requests that may wait for a conversation sequence; beyond it a request gets 503 "
        f"queue_full with Retry-After. 'auto' (default): {capacity.QUEUE_PER_SEQUENCE} x --parallel, "
        f"at least {capacity.MIN_QUEUE}",
    )
    p.add_argument(
        "--queue-timeout",
        type=positive_seconds,
        default=30.0,
        help="seconds a request may wait for a sequence before it gets 503 queue_timeout with "
        "Retry-After (default 30)",
    )
    p.add_argument("--batch", type=int, default=512, help="tokens per decode (n_batch)")
    p.add_argument("--max-drafts", type=int, default=4, help="candidate drafts per verify call")
    p.add_argument(
        "--flash-attn",
        choices=["auto", "on", "off"],
        default="auto",
        help="flash attention (as llama-server's -fa); in exact mode every setting scores a token "
        "inside a verify block bit for bit as alone",
    )
    p.add_argument("--cache-type", choices=["f16", "f32", "q8_0"], default="f16", help="KV cache type")
    p.add_argument(
        "--exact",
        choices=["on", "off"],
        default="off",
        help="'on': this process's CPU kernels compute a token's logits the same whether it is "
        "decoded alone or inside a verify block, so speculative greedy output is bit-identical to "
        "target-alone output even at float near-ties; prefill is about 1.5-1.9x slower and F16/F32 "
        "verify blocks of 9-17 tokens 1.3-2.4x. 'off' (default): stock ggml kernels. rpc workers "
        "follow their own environment (GGML_CPU_EXACT=1 on, 0 off; the pinned build's default is on)",
    )
    p.add_argument(
        "--alias",
        action="append",
        default=None,
        help="model name in the API (default: the file name); repeat it for more names: the first is "
        "the one replies carry, the others are aliases a request's `model` may also use",
    )
    p.add_argument("--token", default=None, help="bearer token required by the API (or TIGHTWAD_TOKEN)")
    p.add_argument(
        "--max-body-bytes", type=int, default=DEFAULT_MAX_BODY, help="largest request body (413 above it)"
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=15.0,
        help="seconds a shutdown may take before the engine exits without freeing (exit code 4)",
    )
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's info log")
    return p


def count_or_auto(flag: str, minimum: int, auto: bool = True) -> Callable[[str], int | None]:
    """An argparse type: an integer >= minimum, or 'auto' (None) where the flag takes it."""

    def parse(value: str) -> int | None:
        if auto and value == "auto":
            return None
        try:
            number = int(value)
        except ValueError:
            number = minimum - 1
        if number < minimum:
            allowed = f"an integer >= {minimum}" + (" or 'auto'" if auto else "")
            raise argparse.ArgumentTypeError(f"{flag} must be {allowed}, not {value!r}")
        return number

    return parse


def positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"--queue-timeout must be a number of seconds > 0, not {value!r}")
    return seconds


def _read_bytes(path: str) -> int | None:
    """A cgroup memory file's number; None when absent, unreadable or unlimited ('max')."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def cgroup_limits() -> list[tuple[int, int]]:
    """(limit, usage) in bytes of every memory cgroup around this process that has a limit."""
    try:
        with open("/proc/self/cgroup") as f:
            files = capacity.cgroup_memory_files(f.read())
    except OSError:
        return []
    found = []
    for limit_file, usage_file in files:
        limit, usage = _read_bytes(limit_file), _read_bytes(usage_file)
        if limit is not None and usage is not None:
            found.append((limit, usage))
    return found


def free_memory(devices: Sequence[libllama.Device]) -> int:
    """Bytes free where the weights and the KV cache go: the devices', else this host's RAM as far
    as this process's memory cgroup (a container's limit) allows."""
    if devices:
        return sum(d.free_bytes for d in devices)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return capacity.host_free_bytes(int(line.split()[1]) * 1024, cgroup_limits())
    except OSError:
        pass
    raise TightwadError("--ctx auto cannot read this host's free memory here: pass --ctx N")


def kv_cell_bytes(model: libllama.Model, kv_type: str) -> float:
    """What one KV cell costs for this model, from its GGUF metadata."""
    arch = model.metadata("general.architecture") or ""

    def number(key: str) -> int | None:
        value = model.metadata(f"{arch}.{key}")
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None  # a per-layer array: not a single number

    layers, heads = number("block_count"), number("attention.head_count")
    heads_kv = number("attention.head_count_kv") or heads
    width = number("embedding_length")
    head = width // heads if width and heads else None
    keys, values = number("attention.key_length") or head, number("attention.value_length") or head
    if not (layers and heads_kv and keys and values):
        raise TightwadError(
            f"--ctx auto cannot tell the KV size of a {arch or 'unknown'} model from its metadata: "
            "pass --ctx N"
        )
    return capacity.kv_bytes_per_cell(layers, heads_kv, keys, values, kv_type)


def start_watchdog(grace: float, lost: Callable[[], bool]) -> threading.Timer:
    """End the process `grace` seconds from now unless cancelled: a teardown that touches a dead rpc
    worker can block forever, and a supervisor waiting for us would block with it."""

    def expire() -> None:
        code = EXIT_WORKER_LOST if lost() else EXIT_TEARDOWN_HUNG
        print(
            f"tightwad engine: shutdown still not done after {grace:g} s (an rpc worker gone?); "
            f"exiting without freeing (exit code {code})",
            file=sys.stderr,
            flush=True,
        )
        os._exit(code)

    timer = threading.Timer(grace, expire)
    timer.daemon = True
    timer.start()
    return timer


def parse_endpoints(value: str) -> list[str]:
    endpoints = [e.strip() for e in value.split(",") if e.strip()]
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise TightwadError(f"--rpc entry {endpoint!r} is not host:port")
    return endpoints


def tensor_split(value: str, devices: Sequence[libllama.Device]) -> list[float] | None:
    """None for auto (llama.cpp then splits by each device's free memory, as llama-server does)."""
    if value == "auto" or not devices:
        return None
    try:
        weights = [float(v) for v in value.split(",")]
    except ValueError:
        raise TightwadError(f"--tensor-split {value!r} must be 'auto' or numbers like 3,1") from None
    if len(weights) != len(devices) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise TightwadError(
            f"--tensor-split needs {len(devices)} non-negative weights (one per device), got {value!r}"
        )
    return weights


def describe_split(devices: Sequence[libllama.Device], split: Sequence[float] | None) -> str:
    weights = list(split) if split else [float(d.free_bytes) for d in devices]
    total = sum(weights) or 1.0
    return ", ".join(
        f"{d.endpoint}/{d.name} {w / total:.0%} ({d.free_bytes / 2**30:.1f} GiB free)"
        for d, w in zip(devices, weights, strict=True)
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    token = args.token or os.environ.get("TIGHTWAD_TOKEN") or None
    try:
        http.check_bind(args.host, token)  # before loading a model that could not be served
    except TightwadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    libllama.set_verbose(args.verbose)
    libllama.set_exact(args.exact == "on")
    try:
        if not Path(args.model).is_file():
            raise TightwadError(f"model file {args.model} does not exist")
        endpoints = parse_endpoints(args.rpc)
        devices = libllama.local_gpu_devices()
        if endpoints:
            devices += libllama.rpc_devices(endpoints)
        split = tensor_split(args.tensor_split, devices)
        free = free_memory(devices) if args.ctx is None else 0  # before the weights take their share
        model = libllama.Model(args.model, devices, split)
        n_ctx = args.ctx
        if n_ctx is None:
            per_cell = kv_cell_bytes(model, args.cache_type)
            n_ctx = capacity.kv_cells_for(
                free, model.size_bytes, per_cell, model.n_ctx_train, args.max_drafts
            )
            print(
                f"tightwad engine: --ctx auto: {n_ctx} KV cells ({n_ctx * per_cell / 2**20:.0f} MiB at "
                f"{per_cell / 1024:.1f} KiB a cell) of {free / 2**30:.1f} GiB free",
                flush=True,
            )
        monitor = None
        if endpoints:
            monitor = PoolMonitor(endpoints)
            monitor.attach()
        engine = Engine(
            model,
            n_ctx=n_ctx,
            parallel=args.parallel,
            n_batch=args.batch,
            threads=args.threads,
            max_drafts=args.max_drafts,
            pool=monitor,
            flash_attn=args.flash_attn,
            kv_type=args.cache_type,
            conversation_cells=args.conversation_ctx,
            queue_limit=args.queue,
            queue_timeout=args.queue_timeout,
        )
        print(
            f"tightwad engine capacity: parallel={engine.parallel} ({engine.capacity_rule()}), "
            f"queue={engine.queue_limit} waiting at most {engine.queue_timeout:g} s",
            flush=True,
        )
        # From here on a fatal libggml error (a worker lost mid-decode) parks the failing thread
        # and turns into 503s instead of killing the process.
        libllama.install_abort_trap(engine.on_fatal_ggml_error)
        engine.start()
        name = args.alias[0] if args.alias else Path(args.model).name
        app = create_app(
            engine,
            name,
            monitor=monitor,
            token=token,
            formatter=ChatFormatter(model),
            max_body=args.max_body_bytes,
            aliases=args.alias[1:] if args.alias else (),
        )
    except (TightwadError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    where = f"{len(devices)} device(s): {describe_split(devices, split)}" if devices else "local CPU"

    def announce(url: str) -> None:
        print(
            f"tightwad engine ready: {url} model={name} ctx={engine.n_ctx} "
            f"parallel={engine.parallel} queue={engine.queue_limit} on {where}",
            flush=True,
        )

    started = False
    try:
        # Requests still running at SIGTERM get half the grace; the teardown below the rest.
        server = http.Server(app, args.host, args.port, token=token, graceful_timeout=args.shutdown_grace / 2)
        started = server.run(on_ready=announce)
    except TightwadError as exc:  # the port is taken
        print(f"error: {exc}", file=sys.stderr)
    finally:
        watchdog = start_watchdog(args.shutdown_grace, lambda: engine.failure is not None)
        if engine.failure is None and monitor is not None:
            dead = monitor.dead(max_age=0)
            if dead:  # lost while idle, or while stopping: nobody asked, so nobody noticed yet
                engine.fail(PoolFailure(describe_loss(dead)))
        if engine.failure is not None:
            print(f"tightwad engine: stopped after a failure: {engine.failure}", file=sys.stderr, flush=True)
            # Freeing memory held on a dead rpc worker would abort; the OS reclaims everything.
            os._exit(EXIT_WORKER_LOST)
        engine.stop(timeout=args.shutdown_grace / 4)
        model.close()
        if monitor is not None:
            monitor.close()
        watchdog.cancel()
    return 0 if started else 1


if __name__ == "__main__":
    sys.exit(main())
