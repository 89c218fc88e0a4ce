"""`tightwad benchmark`: the target alone vs speculation through the proxy, on a running cluster.

It sends each prompt, greedily (temperature 0), first to the engine's own chat endpoint (the target
alone, no drafts) and then to the proxy (speculation), one request at a time, and compares:
tokens per second end to end (completion tokens / wall time of the request, time to first token
included), time to first token, and whether the outputs are identical. The answer is one line users
can quote, e.g. `2.1x | 17.3 tok/s (was 8.2) | greedy: output = target alone`.

The pure part (results, summary, table rows, JSON, prompt files, endpoints from a manifest) is
separate from the HTTP part, so the numbers it prints are unit-tested.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from tightwad.errors import TightwadError
from tightwad.http import url_for
from tightwad.manifest import Manifest, load_manifest
from tightwad.netaddr import is_loopback

# A small mix: code (where a draft model guesses most tokens), prose, and a short reply (where a
# cold or slow start would show).
BUILTIN_PROMPTS: tuple[str, ...] = (
    "Write a Python function `is_palindrome(s: str) -> bool` that ignores case and punctuation, "
    "with a docstring and two doctests.",
    "Write a SQL query that returns the ten customers with the highest total order value, given "
    "tables customers(id, name) and orders(id, customer_id, amount).",
    "Write a bash script that compresses every .log file larger than 10 MB under the current "
    "directory with gzip, printing each file name.",
    "Explain in two short paragraphs how a hash table handles collisions.",
    "Say hello in one short sentence.",
)
STATS_PATH = "/tightwad/v1/stats"


class BenchmarkError(TightwadError):
    """The benchmark could not run; the message says what to fix."""


# ----------------------------------------------------------------------------------------------
# Pure: results and what is printed from them.


@dataclass(frozen=True)
class Reply:
    """One greedy reply as a client saw it."""

    text: str
    tokens: tuple[int, ...] | None  # token ids when the server returned them
    completion_tokens: int
    wall_s: float  # request start to the end of the reply
    ttft_s: float | None  # request start to the first content

    @property
    def rate(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else 0.0


def _same(a: Reply, b: Reply) -> bool:
    """The same output: token for token when both sides returned ids, else the same text."""
    if a.tokens is not None and b.tokens is not None:
        return a.tokens == b.tokens
    return a.text == b.text


@dataclass(frozen=True)
class PromptResult:
    """One prompt: the target alone and speculation, with what the proxy counted meanwhile."""

    prompt: str
    target: Reply
    speculated: Reply
    drafted: int | None = None  # draft tokens the proxy sent for verification during this prompt
    accepted: int | None = None  # of those, accepted by the target
    fallbacks: Mapping[str, int] = field(default_factory=dict)  # proxy fallbacks during this prompt
    runs_agree: bool = True  # with several runs: every run, alone or speculating, gave one output

    @property
    def identical(self) -> bool:
        return self.runs_agree and _same(self.target, self.speculated)

    @property
    def speedup(self) -> float:
        return self.speculated.rate / self.target.rate if self.target.rate > 0 else 0.0

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted and self.accepted is not None else None


@dataclass(frozen=True)
class Summary:
    prompts: int
    speedup: float  # aggregate speculative tok/s over aggregate target-alone tok/s
    tok_s: float  # speculation: all completion tokens / all wall time
    was_tok_s: float  # the target alone, the same way
    min_speedup: float
    max_speedup: float
    acceptance: float | None
    differing: tuple[int, ...]  # 1-based numbers of the prompts whose outputs differed
    fallbacks: Mapping[str, int]


def summarize(results: Sequence[PromptResult]) -> Summary:
    if not results:
        raise BenchmarkError("no prompts were measured; give at least one prompt")

    def aggregate(replies: list[Reply]) -> float:
        seconds = sum(r.wall_s for r in replies)
        return sum(r.completion_tokens for r in replies) / seconds if seconds > 0 else 0.0

    tok_s = aggregate([r.speculated for r in results])
    was = aggregate([r.target for r in results])
    drafted = sum(r.drafted or 0 for r in results)
    accepted = sum(r.accepted or 0 for r in results)
    fallbacks: dict[str, int] = {}
    for r in results:
        for reason, count in r.fallbacks.items():
            fallbacks[reason] = fallbacks.get(reason, 0) + count
    speedups = [r.speedup for r in results]
    return Summary(
        prompts=len(results),
        speedup=tok_s / was if was > 0 else 0.0,
        tok_s=tok_s,
        was_tok_s=was,
        min_speedup=min(speedups),
        max_speedup=max(speedups),
        acceptance=accepted / drafted if drafted else None,
        differing=tuple(i for i, r in enumerate(results, start=1) if not r.identical),
        fallbacks=fallbacks,
    )


def summary_line(summary: Summary) -> str:
    """The one line to quote: `2.1x | 17.3 tok/s (was 8.2) | greedy: output = target alone`."""
    if not summary.differing:
        exact = "greedy: output = target alone"
    else:
        which = ", ".join(str(i) for i in summary.differing)
        exact = f"greedy: output DIFFERS from target alone on prompt {which} of {summary.prompts}"
    return f"{summary.speedup:.1f}x | {summary.tok_s:.1f} tok/s (was {summary.was_tok_s:.1f}) | {exact}"


def _short(text: str, width: int = 28) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def table_rows(results: Sequence[PromptResult]) -> list[tuple[str, ...]]:
    """One row per prompt: #, prompt, tokens, tok/s alone, tok/s speculating, speedup, TTFT alone and
    speculating (ms), acceptance, identical."""
    rows = []
    for i, r in enumerate(results, start=1):
        ttft = "/".join(
            "-" if t is None else f"{t * 1e3:.0f}" for t in (r.target.ttft_s, r.speculated.ttft_s)
        )
        rows.append(
            (
                str(i),
                _short(r.prompt),
                str(r.speculated.completion_tokens),
                f"{r.target.rate:.1f}",
                f"{r.speculated.rate:.1f}",
                f"{r.speedup:.2f}x",
                ttft,
                "-" if r.acceptance is None else f"{r.acceptance:.0%}",
                "yes" if r.identical else "NO",
            )
        )
    return rows


TABLE_COLUMNS = (
    "#",
    "prompt",
    "tokens",
    "alone tok/s",
    "spec tok/s",
    "speedup",
    "TTFT ms alone/spec",
    "accepted",
    "same",
)


def results_table(results: Sequence[PromptResult], title: str) -> Table:
    table = Table(title=title)
    for i, column in enumerate(TABLE_COLUMNS):
        table.add_column(column, justify="left" if i == 1 else "right", no_wrap=True)
    for row in table_rows(results):
        table.add_row(*row)
    return table


def _reply_json(reply: Reply) -> dict[str, Any]:
    return {
        "completion_tokens": reply.completion_tokens,
        "wall_s": round(reply.wall_s, 4),
        "ttft_s": None if reply.ttft_s is None else round(reply.ttft_s, 4),
        "tok_s": round(reply.rate, 3),
    }


def to_json(results: Sequence[PromptResult], summary: Summary, meta: Mapping[str, Any]) -> dict[str, Any]:
    """What `--json` prints: the run's settings, the summary and every prompt."""
    return {
        **meta,
        "summary": {
            "line": summary_line(summary),
            "speedup": round(summary.speedup, 4),
            "tok_s": round(summary.tok_s, 3),
            "target_alone_tok_s": round(summary.was_tok_s, 3),
            "min_speedup": round(summary.min_speedup, 4),
            "max_speedup": round(summary.max_speedup, 4),
            "acceptance": None if summary.acceptance is None else round(summary.acceptance, 4),
            "identical": not summary.differing,
            "differing_prompts": list(summary.differing),
            "fallbacks": dict(summary.fallbacks),
        },
        "prompts": [
            {
                "prompt": r.prompt,
                "identical": r.identical,
                "speedup": round(r.speedup, 4),
                "acceptance": None if r.acceptance is None else round(r.acceptance, 4),
                "drafted": r.drafted,
                "accepted": r.accepted,
                "fallbacks": dict(r.fallbacks),
                "target_alone": _reply_json(r.target),
                "speculated": _reply_json(r.speculated),
            }
            for r in results
        ],
    }


def load_prompts(path: Path) -> list[str]:
    """Prompts from a file: a JSON list of strings (`.json`), else one prompt per non-empty line
    (lines starting with `#` are comments)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BenchmarkError(
            f"--prompts: {path} does not exist; give a text file, one prompt per line"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchmarkError(f"--prompts: cannot read {path} as UTF-8 text ({exc})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise BenchmarkError(f"--prompts: {path} is not valid JSON ({exc})") from None
        if not isinstance(data, list) or not all(isinstance(p, str) and p.strip() for p in data):
            raise BenchmarkError(f"--prompts: {path} must hold a JSON list of non-empty strings")
        prompts = list(data)
    else:
        prompts = [line.strip() for line in text.splitlines()]
        prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise BenchmarkError(f"--prompts: {path} holds no prompts; write one prompt per line")
    return prompts


@dataclass(frozen=True)
class Endpoints:
    proxy: str
    target: str
    token: str | None = None


def _client_address(bind: str, host_address: str) -> str:
    """Where a client reaches a server that binds `bind` on a host at `host_address`."""
    if bind in ("0.0.0.0", "::", ""):
        return host_address
    return "127.0.0.1" if is_loopback(bind) else bind


def endpoints_from_manifest(manifest: Manifest) -> Endpoints:
    """The proxy (the front door) and the engine (the target alone, through its router)."""
    if manifest.proxy is None:
        raise BenchmarkError(
            f"{manifest.source}: spec.proxy is missing, so there is no speculation to measure; "
            "add a proxy section (see examples/local.yaml)"
        )
    proxy_host = manifest.host(manifest.proxy.host)
    proxy = url_for(_client_address(manifest.proxy.bind, proxy_host.address), manifest.proxy.port)
    target = url_for(manifest.target_host.address, manifest.target.port)
    return Endpoints(proxy=proxy, target=target, token=manifest.token)


# ----------------------------------------------------------------------------------------------
# HTTP: one greedy streamed chat request, the proxy's counters, the whole run.


class _Client:
    def __init__(self, token: str | None, timeout: float) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _fail(self, what: str, url: str, exc: Exception) -> BenchmarkError:
        return BenchmarkError(
            f"cannot reach the {what} at {url} ({exc.__class__.__name__}: {exc}); is the cluster up "
            "(`tightwad up FILE`, `tightwad status FILE`)? Or pass --proxy/--target URLs"
        )

    def chat(self, what: str, base: str, prompt: str, max_tokens: int, model: str | None) -> Reply:
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_tokens": True,
        }
        if model:
            body["model"] = model
        url = f"{base}/v1/chat/completions"
        text: list[str] = []
        tokens: list[int] = []
        got_tokens = False
        usage: int | None = None
        ttft: float | None = None
        start = time.perf_counter()
        try:
            with self.http.stream("POST", url, json=body) as response:
                if response.status_code != 200:
                    response.read()
                    raise BenchmarkError(
                        f"the {what} at {url} answered {response.status_code}: {response.text[:300]}"
                    )
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line.removeprefix("data:").strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise BenchmarkError(f"the {what} at {url} failed mid-reply: {chunk['error']}")
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content") or ""
                        ids = choice.get("tokens")
                        if (piece or ids) and ttft is None:
                            ttft = time.perf_counter() - start
                        text.append(piece)
                        if ids is not None:
                            got_tokens = True
                            tokens += [int(t) for t in ids]
                    if chunk.get("usage"):
                        usage = int(chunk["usage"]["completion_tokens"])
        except httpx.HTTPError as exc:
            raise self._fail(what, url, exc) from None
        wall = time.perf_counter() - start
        count = usage if usage is not None else len(tokens)
        return Reply("".join(text), tuple(tokens) if got_tokens else None, count, wall, ttft)

    def stats(self, base: str) -> dict[str, Any] | None:
        """The proxy's counters, or None when it has none (then acceptance shows as '-')."""
        try:
            response = self.http.get(f"{base}{STATS_PATH}")
        except httpx.HTTPError as exc:
            raise self._fail("proxy", base, exc) from None
        return dict(response.json()) if response.status_code == 200 else None


def _delta(after: dict[str, Any] | None, before: dict[str, Any] | None, key: str) -> int | None:
    if after is None or before is None or key not in after:
        return None
    return int(after[key] or 0) - int(before.get(key) or 0)


def _fallback_delta(after: dict[str, Any] | None, before: dict[str, Any] | None) -> dict[str, int]:
    if after is None or before is None:
        return {}
    old = before.get("fallbacks") or {}
    changed = {k: int(v) - int(old.get(k, 0)) for k, v in (after.get("fallbacks") or {}).items()}
    return {k: v for k, v in changed.items() if v}


def _median_reply(replies: list[Reply]) -> Reply:
    """The reply with the median rate (the lower middle one of an even count)."""
    return sorted(replies, key=lambda r: r.rate)[(len(replies) - 1) // 2]


def run(
    endpoints: Endpoints,
    prompts: Sequence[str],
    max_tokens: int,
    runs: int = 1,
    warmup: bool = True,
    model: str | None = None,
    timeout: float = 600.0,
    on_prompt: Callable[[int, PromptResult], None] | None = None,
) -> list[PromptResult]:
    """Measure every prompt: the target alone, then through the proxy, `runs` times each (the run
    with the median rate is kept; every run's output must match for the prompt to count as identical)."""
    client = _Client(endpoints.token, timeout)
    try:
        if warmup:  # model pages, caches and the proxy's first-contact costs are not the question
            client.chat("engine", endpoints.target, "Hi", 4, model)
            client.chat("proxy", endpoints.proxy, "Hi", 4, model)
        results = []
        for i, prompt in enumerate(prompts, start=1):
            alone: list[Reply] = []
            spec: list[Reply] = []
            before = client.stats(endpoints.proxy)
            for _ in range(runs):
                alone.append(client.chat("engine", endpoints.target, prompt, max_tokens, model))
                spec.append(client.chat("proxy", endpoints.proxy, prompt, max_tokens, model))
            after = client.stats(endpoints.proxy)
            result = PromptResult(
                prompt=prompt,
                target=_median_reply(alone),
                speculated=_median_reply(spec),
                runs_agree=all(_same(r, alone[0]) for r in alone + spec),
                drafted=_delta(after, before, "draft_tokens"),
                accepted=_delta(after, before, "accepted_tokens"),
                fallbacks=_fallback_delta(after, before),
            )
            results.append(result)
            if on_prompt is not None:
                on_prompt(i, result)
        return results
    finally:
        client.close()


# ----------------------------------------------------------------------------------------------
# The command.


def command(
    manifest_path: str | None,
    proxy: str | None,
    target: str | None,
    prompts_file: str | None,
    max_tokens: int,
    runs: int,
    as_json: bool,
    token: str | None = None,
    model: str | None = None,
    warmup: bool = True,
) -> int:
    """`tightwad benchmark`: 0 when every output matched the target alone, 1 when one differed."""
    if max_tokens < 1:
        raise BenchmarkError(f"--tokens must be at least 1 (got {max_tokens})")
    if runs < 1:
        raise BenchmarkError(f"--runs must be at least 1 (got {runs})")
    if manifest_path is not None:
        if proxy or target:
            raise BenchmarkError("give either a manifest or --proxy and --target, not both")
        endpoints = endpoints_from_manifest(load_manifest(manifest_path))
        if token:
            endpoints = Endpoints(endpoints.proxy, endpoints.target, token)
    elif proxy and target:
        endpoints = Endpoints(
            proxy.rstrip("/"), target.rstrip("/"), token or os.environ.get("TIGHTWAD_TOKEN")
        )
    else:
        raise BenchmarkError(
            "say which cluster to measure: `tightwad benchmark cluster.yaml`, or "
            "`--proxy URL --target URL` (the proxy and the engine's own endpoint)"
        )
    prompts = load_prompts(Path(prompts_file)) if prompts_file else list(BUILTIN_PROMPTS)
    console = Console(stderr=as_json, highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 140)  # logs and pipes: one row per prompt, not wrapped
    loads = os.getloadavg()
    console.print(
        f"benchmark: {len(prompts)} prompts, {max_tokens} tokens each, greedy, {runs} run(s); "
        f"target alone {endpoints.target}, speculation {endpoints.proxy}; load {loads[0]:.2f}"
    )

    def progress(i: int, r: PromptResult) -> None:
        mark = "=" if r.identical else "DIFFERS"
        console.print(f"  {i}/{len(prompts)}: {r.target.rate:.1f} -> {r.speculated.rate:.1f} tok/s {mark}")

    results = run(endpoints, prompts, max_tokens, runs, warmup, model, on_prompt=progress)
    summary = summarize(results)
    if as_json:
        meta = {
            "proxy": endpoints.proxy,
            "target": endpoints.target,
            "max_tokens": max_tokens,
            "runs": runs,
            "loadavg": [round(x, 2) for x in loads],
        }
        print(json.dumps(to_json(results, summary, meta), indent=2))
    else:
        title = f"target alone vs speculation, greedy, {max_tokens} tokens (load {loads[0]:.2f})"
        console.print(results_table(results, title))
        if summary.fallbacks:
            console.print(f"proxy fallbacks meanwhile: {dict(summary.fallbacks)}")
        console.print(
            f"speedup per prompt {summary.min_speedup:.2f}x - {summary.max_speedup:.2f}x (median "
            f"{statistics.median(r.speedup for r in results):.2f}x)"
        )
        console.print(summary_line(summary), markup=False)
    return 0 if not summary.differing else 1
