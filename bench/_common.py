"""What every benchmark in bench/ needs: processes started with their logs and always reaped, the
command lines of our own servers, the delay proxy, streamed (SSE) replies with arrival times,
result tables, and this thread's requests sent from inside a network namespace (`inside`).
Imported by the benchmarks as `_common` (they run as scripts, so bench/ is first on sys.path);
`make bench` skips files whose names start with `_`.

Importing this module also puts the checkout's tests/ folder on sys.path: the test tools the
benchmarks share with the tests (synthetic GGUF edits, hosts as network namespaces, the delay
proxy) live once, in tests/support/, and not in the shipped package.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
from rich.table import Table

from tightwad.launch import wait_for_http, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
if str(TESTS) not in sys.path:
    sys.path.append(str(TESTS))  # appended: nothing of the checkout may shadow an installed module

NETDELAY = TESTS / "support" / "netdelay.py"
STOP_GRACE = 15.0  # seconds a process gets to exit on SIGTERM before SIGKILL


def log_folder(name: str) -> Path:
    """A fresh folder for one run's logs (kept after the run, for reading when a number looks off)."""
    return Path(tempfile.mkdtemp(prefix=f"tightwad-bench-{name}-"))


class Processes:
    """Processes in their own sessions (so a server's children die with it), output in log files in
    one folder, every one stopped by `stop_all` or on leaving a `with` block."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        cmd: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        stdout_apart: bool = False,
    ) -> tuple[subprocess.Popen[bytes], Path]:
        """Start `cmd`; its output goes to NAME.log. With `stdout_apart`, stdout goes to NAME.out
        instead (see `out`), for commands whose stdout is a result to parse. Returns the log."""
        log = self.logs / f"{name}.log"
        with contextlib.ExitStack() as files:
            err = files.enter_context(log.open("wb"))
            out = files.enter_context(self.out(name).open("wb")) if stdout_apart else err
            process = subprocess.Popen(
                list(cmd),
                stdout=out,
                stderr=err,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        self.running.append(process)
        return process, log

    def out(self, name: str) -> Path:
        """Where a process started with `stdout_apart` writes its stdout."""
        return self.logs / f"{name}.out"

    def http(
        self, name: str, cmd: Sequence[str], url: str, path: str = "/health", timeout: float = 300
    ) -> str:
        """Start a server and wait until `url + path` answers 200; returns `url`."""
        process, log = self.start(name, cmd)
        wait_for_http(f"{url}{path}", timeout=timeout, process=process, log=log)
        return url

    def tcp(self, name: str, cmd: Sequence[str], port: int, timeout: float = 30) -> subprocess.Popen[bytes]:
        """Start a server that speaks no HTTP (an rpc worker, the delay proxy) and wait for its port."""
        process, log = self.start(name, cmd)
        wait_for_port("127.0.0.1", port, timeout=timeout, process=process, log=log)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        """SIGTERM to the process group, SIGKILL if it lingers; always reaped."""
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop_all(self) -> None:
        for process in reversed(self.running):  # clients before the servers they use
            self.stop(process)
        self.running.clear()


def engine_command(model: Path, port: int, *extra: str) -> list[str]:
    """`tightwad engine` on `model`, listening on 127.0.0.1:`port`."""
    return [sys.executable, "-m", "tightwad.engine.cli", "--model", str(model), "--port", str(port), *extra]


def proxy_command(port: int, engine: str, *extra: str) -> list[str]:
    """`tightwad proxy start` in front of the engine at `engine`."""
    return [
        sys.executable,
        "-m",
        "tightwad.proxy.cli",
        "start",
        "--target",
        engine,
        "--port",
        str(port),
        *extra,
    ]


def netdelay_command(listen_port: int, to: str, delay_ms: float, jitter_ms: float = 0.0) -> list[str]:
    """The delay proxy (tests/support/netdelay.py): 127.0.0.1:`listen_port` -> `to` (host:port),
    `delay_ms` ± `jitter_ms` added each way: a LAN (or a Wi-Fi link) between processes."""
    return [
        sys.executable,
        str(NETDELAY),
        "--listen",
        f"127.0.0.1:{listen_port}",
        "--to",
        to,
        "--delay-ms",
        str(delay_ms),
        "--jitter-ms",
        str(jitter_ms),
    ]


CLONE_NEWNET = 0x40000000  # setns(2): the fd is a network namespace


@contextlib.contextmanager
def inside(namespace: str | None) -> Iterator[None]:
    """This thread in network namespace `namespace` (an `ip netns` name) for the block, then back
    home; None: stay. The benchmark's own requests, port checks and the processes it starts meanwhile
    then see what a process on that host sees (its loopback, its routes). Needs root."""
    if namespace is None:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)  # os.setns is Python 3.12+

    def enter(fd: int, what: str) -> None:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {what} failed (needs root)")

    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        there = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
        try:
            enter(there, f"network namespace {namespace}")
        finally:
            os.close(there)
        try:
            yield
        finally:
            enter(home, "this thread's own network namespace")
    finally:
        os.close(home)


def sse_chunks(
    url: str, body: Mapping[str, Any], timeout: float = 600, headers: Mapping[str, str] | None = None
) -> Iterator[tuple[float, dict[str, Any]]]:
    """POST `body` and yield each server-sent JSON chunk with its arrival time (seconds since the
    request started), up to `data: [DONE]` or the end of the stream."""
    start = time.perf_counter()
    with httpx.stream("POST", url, json=dict(body), timeout=timeout, headers=headers) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            yield time.perf_counter() - start, chunk


def table(
    title: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[str]] = (),
    justify: Literal["left", "right"] = "left",
) -> Table:
    """A rich table with these columns and rows (more rows may be added before printing)."""
    result = Table(title=title)
    for column in columns:
        result.add_column(column, justify=justify)
    for row in rows:
        result.add_row(*row)
    return result


# ----------------------------------------------------------------------------------------------
# What the speculation and concurrency benchmarks share: the model pairs, prompts, pinning, load.

# Chat prompts, code first (where a small model of the family guesses most of the target's tokens).
PROMPTS = (
    "Write a Python function `merge_sorted(a, b)` that merges two sorted lists into one sorted list.",
    "Write a SQL query that returns the ten customers with the highest total order value, given "
    "tables customers(id, name) and orders(id, customer_id, amount).",
    "Write a bash script that prints the five largest files under the current directory.",
    "Explain in two short paragraphs how a hash table handles collisions.",
    "Write a short story about a lighthouse keeper.",
)


@dataclass(frozen=True)
class Pair:
    """A target and the draft model that speculates for it (catalog names), and how to label them."""

    key: str
    target: str
    draft: str
    label: str

    def paths(self) -> tuple[Path, Path]:
        from tightwad import models

        return models.resolve(self.target), models.resolve(self.draft)


PAIRS = {
    "qwen-f16": Pair(
        "qwen-f16",
        "qwen2.5-coder-1.5b-f16",
        "qwen2.5-coder-0.5b-q4_k_m",
        "Qwen2.5-Coder 1.5B F16 target (memory-bound), 0.5B Q4_K_M draft: a real, distinct pair",
    ),
    "qwen-q4": Pair(
        "qwen-q4",
        "qwen2.5-coder-1.5b-q4_k_m",
        "qwen2.5-coder-0.5b-q4_k_m",
        "Qwen2.5-Coder 1.5B Q4_K_M target (compute-bound on CPU), 0.5B Q4_K_M draft: a real pair",
    ),
    "smollm2": Pair(
        "smollm2",
        "smollm2-135m-f32",
        "smollm2-135m-q4_1",
        "SmolLM2-135M F32 target, its own Q4_1 as the draft: a SAME-MODEL pair (acceptance is high)",
    ),
}


def pick_pair(name: str | None) -> Pair:
    """The pair asked for; by default the Qwen pair when it is fetched (opt-in), else SmolLM2."""
    from tightwad import models

    if name is not None:
        pair = PAIRS[name]
        try:
            pair.paths()
        except models.ModelMissing as exc:
            raise SystemExit(f"{exc}; e.g. tightwad models fetch {pair.target} {pair.draft}") from None
        return pair
    for key in ("qwen-f16", "smollm2"):
        try:
            PAIRS[key].paths()
            return PAIRS[key]
        except models.ModelMissing:
            continue
    raise SystemExit("no model pair is fetched: run `tightwad models fetch`")


def pinned(cmd: Sequence[str], cores: str | None) -> list[str]:
    """`cmd` bound to `cores` (taskset -c), to model separate machines on one box; None: unpinned."""
    return ["taskset", "-c", cores, *cmd] if cores else list(cmd)


def load_note() -> str:
    """The machine's load average, printed with every table: figures from a busy box are noisy."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} CPUs"
