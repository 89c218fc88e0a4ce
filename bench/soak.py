"""Soak: the local appliance (`tightwad up` on examples/local.yaml, free ports, loopback only) under
16 concurrent clients for 5 minutes, with one drafter kill and one rpc worker kill in the middle.

The clients mix streaming, non-streaming, cancelled-mid-stream and garbage requests, through the
proxy and straight to the engine (through the router when the manifest has one). Every request ends
in one of:

  served      a 200 with a whole reply (a stream with [DONE], no error event)
  clear error an error in the one OpenAI shape with a message (a 4xx for garbage, or a 502/503
              naming what is down while a killed unit is being restarted), or a stream that ends
              with one error event
  cancelled   the client closed a stream on purpose after its first chunks
  lost        anything else: a dropped connection, a stream that stops without [DONE] or an
              error, a body that is not our shape (goal 0)
  hung        no answer within --request-timeout (goal 0)

"Recovered" means: `tightwad up`'s reconcile loop has restarted the killed unit (and the engine, for
the worker: an engine cannot get a lost worker back in-process, it answers 503 naming it), and the
proxy answers the golden greedy request with exactly the tokens it gave before the soak. Two times
are printed per kill: until the status file shows a new, healthy process, and until the golden
reply is back (that request queues behind the 16 clients like any other, so it includes their
wait). RSS of the engine and the proxy is sampled every 5 s; growth is the last sample against the
first one taken after WARM_UP seconds of serving, per process (a restarted engine is a new process
and is reported apart). At the end the golden request is sent again, to the proxy and to the
engine, and must give the same tokens.

    .venv/bin/python bench/soak.py [--minutes 5] [--clients 16]
    make soak

Exits 1 when a request was lost or hung, a kill did not recover, or the greedy output changed.
Not part of `make test`: it takes the minutes it is told (`make bench` runs it too, for 5).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from _common import Processes, log_folder, table
from rich.console import Console
from support.reconcile import local_manifest

GOLDEN = {"prompt": "The capital of France is", "max_tokens": 24, "temperature": 0, "return_tokens": True}
CHAT_PROMPTS = ["Say hello.", "Name three colours.", "What is 2 + 2?", "Write a haiku about rain."]
TEXT_PROMPTS = ["Once upon a time", "The quick brown fox", "def fibonacci(n):", "Paris is"]
# Garbage: each must be refused with a clear error (or, for the odd-but-valid ones, served).
GARBAGE: list[tuple[str, str, Any]] = [
    ("POST", "/v1/completions", b"{not json"),
    ("POST", "/v1/chat/completions", {"messages": "hi"}),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": "many"}),
    ("POST", "/v1/completions", {"prompt": "x", "no_such_parameter": 1}),
    ("POST", "/v1/completions", {"prompt": "x", "stop": ["a"] * 100}),
    ("POST", "/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 4, "temperature": 1e-308}),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 4, "temperature": 1, "seed": -1}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image"}]}]}),
    ("POST", "/v1/completions", {"prompt": [[-5, 99999999]], "max_tokens": 2}),
    ("POST", "/v1/completions", b"[" * 100_000),
    ("POST", "/v1/completions", b'{"prompt": "' + b"x" * (9 * 2**20) + b'"}'),  # over the 8 MiB limit
    ("GET", "/v1/chat/completions", None),
    ("GET", "/no/such/path", None),
]


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)  # clear errors by request kind, status and code
    start: float = field(default_factory=time.monotonic)
    timeline: dict[int, Counter[str]] = field(default_factory=dict)  # per 30 s of the run: outcomes

    def record(self, kind: str, outcome: str, detail: str = "") -> None:
        self.kinds[kind] += 1
        self.outcomes[outcome] += 1
        self.timeline.setdefault(int((time.monotonic() - self.start) // 30), Counter())[outcome] += 1
        if outcome == "clear error":
            self.errors[f"{kind}: {detail}"] += 1
        if outcome in ("lost", "hung"):
            at = time.monotonic() - self.start
            self.lost.append(f"at {at:.0f} s: {kind}: {outcome}: {detail}"[:400])


@dataclass
class Appliance:
    """`tightwad up` and what its status file says about its units."""

    status_path: Path
    token: str | None = None

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.status_path.read_text()))
        except (OSError, ValueError):
            return {}

    def units(self, kind: str) -> list[dict[str, Any]]:
        return [u for u in self.status().get("units", []) if u["kind"] == kind and u["desired"] == "running"]

    def url(self, kind: str) -> str:
        return f"http://127.0.0.1:{self.units(kind)[0]['port']}"

    def ready(self) -> bool:
        conditions = self.status().get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _clear_error(body: Any) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and isinstance(error.get("message"), str) and bool(error["message"])


def _reason(status: int, body: Any) -> str:
    return f"{status} {body['error'].get('code')}"


async def _plain(client: httpx.AsyncClient, method: str, url: str, content: Any) -> tuple[str, str]:
    if isinstance(content, bytes):
        response = await client.request(method, url, content=content)
    else:
        response = await client.request(method, url, json=content)
    try:
        body = response.json()
    except ValueError:
        return "lost", f"{response.status_code} not JSON: {response.text[:200]}"
    if response.status_code == 200:
        ok = isinstance(body, dict) and body.get("choices")
        return ("served", "") if ok else ("lost", f"200 without choices: {str(body)[:200]}")
    if _clear_error(body):
        return "clear error", _reason(response.status_code, body)
    return "lost", f"{response.status_code} without a clear error: {str(body)[:200]}"


async def _stream(client: httpx.AsyncClient, url: str, body: dict[str, Any], cancel: bool) -> tuple[str, str]:
    async with client.stream("POST", url, json={**body, "stream": True}) as response:
        if response.status_code != 200:
            raw = await response.aread()
            try:
                parsed = json.loads(raw)
            except ValueError:
                return "lost", f"{response.status_code} not JSON: {raw[:200]!r}"
            if _clear_error(parsed):
                return "clear error", _reason(response.status_code, parsed)
            return "lost", f"{raw[:200]!r}"
        chunks = 0
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                return "served", ""
            event = json.loads(data)
            if "error" in event:
                if _clear_error(event):
                    return "clear error", _reason(200, event) + " (in the stream)"
                return "lost", data[:200]
            chunks += 1
            if cancel and chunks >= 2:
                return "cancelled", ""  # leaving the block closes the connection mid-stream
        return "lost", f"the stream ended after {chunks} chunks without [DONE] or an error"


def _request(rng: random.Random, urls: dict[str, str]) -> tuple[str, str, str, Any, bool]:
    """(kind, method, url, body, cancel) of one random request."""
    front = urls["proxy"] if rng.random() < 0.8 else urls["engine"]
    roll = rng.random()
    if roll < 0.2:
        method, path, body = rng.choice(GARBAGE)
        return "garbage", method, front + path, body, False
    chat = rng.random() < 0.5
    sampled = rng.random() < 0.3
    body: dict[str, Any] = {"max_tokens": rng.randint(4, 48), "temperature": 0.8 if sampled else 0}
    if sampled:
        body["seed"] = rng.randint(0, 2**31)
    if chat:
        body["messages"] = [{"role": "user", "content": rng.choice(CHAT_PROMPTS)}]
    else:
        body["prompt"] = rng.choice(TEXT_PROMPTS)
    url = front + ("/v1/chat/completions" if chat else "/v1/completions")
    if roll < 0.55:
        return "non-streaming", "POST", url, body, False
    if roll < 0.85:
        return "streaming", "POST", url, body, False
    body["max_tokens"] = 64
    return "cancelled mid-stream", "POST", url, body, True


async def client_loop(
    index: int, deadline: float, urls: dict[str, str], tally: Tally, headers: dict[str, str], timeout: float
) -> None:
    rng = random.Random(index)
    limits = httpx.Timeout(timeout, connect=10)
    async with httpx.AsyncClient(timeout=limits, headers=headers) as client:
        while time.monotonic() < deadline:
            kind, method, url, body, cancel = _request(rng, urls)
            try:
                if kind in ("streaming", "cancelled mid-stream"):
                    outcome, detail = await _stream(client, url, body, cancel)
                else:
                    outcome, detail = await _plain(client, method, url, body)
            except httpx.TimeoutException as exc:
                outcome, detail = "hung", f"{url}: {type(exc).__name__}"
            except (httpx.HTTPError, ValueError) as exc:
                what = f"{method} {url} {str(body)[:80] if not isinstance(body, bytes) else len(body)}"
                outcome, detail = "lost", f"{what}: {type(exc).__name__}: {exc!r}"
            tally.record(kind, outcome, detail)


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


Samples = dict[tuple[str, int], list[tuple[float, float]]]  # (unit kind, pid) -> [(time, MB)]
WARM_UP = 20.0  # seconds a process serves before its RSS baseline is taken


async def sample_rss(app: Appliance, deadline: float, samples: Samples) -> None:
    while time.monotonic() < deadline:
        for kind in ("engine", "proxy"):
            for unit in app.units(kind):
                pid = unit.get("pid")
                value = rss_mb(pid) if isinstance(pid, int) and unit.get("healthy") else None
                if value is not None:
                    samples.setdefault((kind, pid), []).append((time.monotonic(), value))
        await asyncio.sleep(5)


def rss_growth(values: list[tuple[float, float]]) -> tuple[float, float]:
    """(baseline, last) in MB: the baseline is the first sample once the process has served WARM_UP
    seconds (the model loaded, the first requests' buffers allocated)."""
    first = values[0][0]
    base = next((mb for t, mb in values if t - first >= WARM_UP), values[-1][1])
    return base, values[-1][1]


async def golden(client: httpx.AsyncClient, url: str) -> list[int] | None:
    try:
        response = await client.post(f"{url}/v1/completions", json=GOLDEN, timeout=60)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return list(response.json()["choices"][0]["tokens"])


async def kill_and_recover(
    app: Appliance, kind: str, at: float, expected: list[int], headers: dict[str, str], out: dict[str, Any]
) -> None:
    """At `at`, SIGKILL the first unit of `kind`; then time until the proxy's golden reply is back."""
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    unit = app.units(kind)[0]
    os.kill(int(unit["pid"]), signal.SIGKILL)
    killed = time.monotonic()
    out[kind] = {"unit": unit["name"], "pid": unit["pid"], "restarted_s": None, "recovered_s": None}
    proxy = app.url("proxy")
    async with httpx.AsyncClient(headers=headers) as client:
        await asyncio.sleep(2)  # let the kill be noticed before the first check
        while time.monotonic() - killed < 240:
            new = [u for u in app.units(kind) if u.get("pid") != unit["pid"] and u.get("healthy")]
            if new and out[kind]["restarted_s"] is None:  # a new process, healthy in the status file
                out[kind]["restarted_s"] = round(time.monotonic() - killed, 1)
                out[kind]["new_pid"] = new[0].get("pid")
            # The golden request queues behind the 16 clients like any other: this time includes it.
            if new and await golden(client, proxy) == expected:
                out[kind]["recovered_s"] = round(time.monotonic() - killed, 1)
                return
            await asyncio.sleep(1)


def write_manifest(folder: Path) -> Path:
    data = local_manifest("soak")
    data["spec"]["target"]["maxConversations"] = 4  # as examples/local.yaml
    path = folder / "soak.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def wait_ready(app: Appliance, up: Any, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not app.ready():
        if up.poll() is not None:
            raise SystemExit(f"tightwad up exited with {up.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"the appliance was not Ready within {timeout:.0f} s")
        time.sleep(0.5)


async def soak(args: argparse.Namespace, app: Appliance, console: Console) -> int:
    headers = {"Authorization": f"Bearer {app.token}"} if app.token else {}
    routers = app.units("router")
    urls = {"proxy": app.url("proxy"), "engine": app.url("router") if routers else app.url("engine")}
    async with httpx.AsyncClient(headers=headers) as client:
        before = {name: await golden(client, url) for name, url in urls.items()}
    expected = before["proxy"]
    if expected is None or before["engine"] != expected:
        console.print(f"the golden request failed before the soak: {before}")
        return 1
    start = time.monotonic()
    seconds = args.minutes * 60
    deadline = start + seconds
    tally = Tally()
    kills: dict[str, Any] = {}
    samples: Samples = {}
    console.print(f"soak: {args.clients} clients for {args.minutes:g} min; logs in {args.logs}")
    await asyncio.gather(
        *(client_loop(i, deadline, urls, tally, headers, args.request_timeout) for i in range(args.clients)),
        sample_rss(app, deadline, samples),
        kill_and_recover(app, "drafter", start + seconds / 3, expected, headers, kills),
        kill_and_recover(app, "rpc-worker", start + seconds / 2, expected, headers, kills),
    )
    elapsed = time.monotonic() - start
    for _ in range(120):  # the last restart may still be settling
        if app.ready():
            break
        await asyncio.sleep(1)
    async with httpx.AsyncClient(headers=headers) as client:
        after = {name: await golden(client, url) for name, url in urls.items()}

    console.print(
        table("requests", ["outcome", "count"], [[k, str(v)] for k, v in tally.outcomes.most_common()])
    )
    console.print(
        table("request kinds", ["kind", "count"], [[k, str(v)] for k, v in tally.kinds.most_common()])
    )
    names = ["served", "clear error", "cancelled", "lost", "hung"]
    rows = [
        [f"{30 * b}-{30 * b + 30} s", *(str(tally.timeline[b][n]) for n in names)]
        for b in sorted(tally.timeline)
    ]
    console.print(table("outcomes over time (kills at 1/3 and 1/2 of the run)", ["when", *names], rows))
    error_rows = [[k, str(v)] for k, v in tally.errors.most_common()]
    console.print(table("clear errors", ["kind: status code", "count"], error_rows))
    rss_rows = []
    for (kind, pid), values in samples.items():
        base, last = rss_growth(values)
        rss_rows.append(
            [
                kind,
                str(pid),
                str(len(values)),
                f"{base:.0f}",
                f"{last:.0f}",
                f"{last - base:+.1f}",
            ]
        )
    console.print(table("RSS (MB)", ["unit", "pid", "samples", "after warm-up", "last", "growth"], rss_rows))
    kill_rows = [[k, v["unit"], str(v["restarted_s"]), str(v["recovered_s"])] for k, v in kills.items()]
    columns = ["kind", "unit", "restarted and healthy after (s)", "golden reply again after (s)"]
    console.print(table("kills", columns, kill_rows))
    same = after["proxy"] == expected and after["engine"] == expected
    figures = {
        "minutes": round(elapsed / 60, 2),
        "clients": args.clients,
        "requests": sum(tally.outcomes.values()),
        "outcomes": dict(tally.outcomes),
        "clear_errors": dict(tally.errors),
        "kinds": dict(tally.kinds),
        "kills": kills,
        "timeline": {f"{30 * b}s": dict(c) for b, c in sorted(tally.timeline.items())},
        "rss_mb": {f"{k}:{p}": [round(mb, 1) for mb in rss_growth(v)] for (k, p), v in samples.items()},
        "greedy_after_identical": same,
    }
    (args.logs / "soak-figures.json").write_text(json.dumps(figures, indent=2))
    console.print(json.dumps(figures))
    for line in tally.lost[:20]:
        console.print(f"  {line}")
    recovered = all(v["recovered_s"] is not None for v in kills.values()) and len(kills) == 2
    console.print(f"greedy output after the soak identical to before: {same}")
    bad = tally.outcomes["lost"] + tally.outcomes["hung"]
    return 0 if same and recovered and not bad else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--request-timeout", type=float, default=120.0, help="seconds before a request is hung"
    )
    args = parser.parse_args(argv)
    console = Console()
    args.logs = log_folder("soak")
    manifest = write_manifest(args.logs)
    env = {"TIGHTWAD_STATE_DIR": str(args.logs / "state")}
    app = Appliance(manifest.with_name(f"{manifest.stem}.status.json"))
    with Processes(args.logs) as procs:
        up, _ = procs.start("up", [sys.executable, "-m", "tightwad.operator.cli", "up", str(manifest)], env)
        wait_ready(app, up)
        return asyncio.run(soak(args, app, console))


if __name__ == "__main__":
    sys.exit(main())
