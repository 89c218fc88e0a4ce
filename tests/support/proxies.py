"""The proxy as a real process (`python -m tightwad.proxy.cli start`) and a llama-server drafter, for
the proxy's integration tests; and the configuration its command line builds, for the quick ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from support.procs import Processes
from tightwad import models
from tightwad.launch import free_port, llama_server_command, wait_for_http
from tightwad.proxy.cli import build_parser, config_from_args
from tightwad.proxy.config import ProxyConfig
from tightwad.toolchain import Toolchain

TOKEN = "proxy-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class ProxyProcess:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def post(self, path: str, body: dict, **kw) -> httpx.Response:  # type: ignore[no-untyped-def, type-arg]
        return httpx.post(f"{self.url}{path}", json=body, headers=kw.pop("headers", AUTH), timeout=120, **kw)

    def get(self, path: str, **kw) -> httpx.Response:  # type: ignore[no-untyped-def]
        return httpx.get(f"{self.url}{path}", headers=kw.pop("headers", AUTH), timeout=30, **kw)

    def stats(self) -> dict:  # type: ignore[type-arg]
        return dict(self.get("/tightwad/v1/stats").json())


def cli_config(*argv: str) -> ProxyConfig:
    """The configuration `tightwad proxy start ARGV...` would serve (checked), without serving it."""
    return config_from_args(build_parser().parse_args(["start", *argv]))


def start_proxy(
    procs: Processes, target: str, *args: str, draft: str | None = None, ready: bool = True
) -> ProxyProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "tightwad.proxy.cli", "start", "--target", target, "--port", str(port)]
    cmd += ["--token", TOKEN]
    if draft:
        cmd += ["--draft", draft]
    process, log = procs.start(f"proxy-{port}", [*cmd, *args])
    url = f"http://127.0.0.1:{port}"
    if ready:
        wait_for_http(f"{url}/ready", timeout=60, process=process, log=log)
    else:
        _wait_listening(url, process, log)
    return ProxyProcess(url, process, log)


def _wait_listening(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            httpx.get(f"{url}/health", timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"the proxy did not listen: {log.read_text()}")


def start_drafter(procs: Processes, toolchain: Toolchain) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    cmd = llama_server_command(toolchain, models.resolve("smollm2-135m-q4_1"), port, threads=1, ctx_size=4096)
    process, log = procs.start(f"drafter-{port}", cmd)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", timeout=60, process=process, log=log)
    return url, process


def kill(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def sse(response: httpx.Response) -> Iterator[str]:
    for line in response.iter_lines():
        if line.startswith("data:"):
            yield line.removeprefix("data:").strip()


def stream_reply(proxy: ProxyProcess, path: str, body: dict) -> tuple[str, list[int], list[dict]]:  # type: ignore[type-arg]
    """Text, token ids and all parsed events of a streamed reply."""
    text, tokens, events = "", [], []
    with httpx.stream(
        "POST", f"{proxy.url}{path}", json={**body, "stream": True}, headers=AUTH, timeout=120
    ) as r:
        assert r.status_code == 200, r.read()
        for data in sse(r):
            if data == "[DONE]":
                events.append({"done": True})
                break
            event = json.loads(data)
            events.append(event)
            for choice in event.get("choices", []):
                text += choice.get("text") or choice.get("delta", {}).get("content") or ""
                tokens += choice.get("tokens") or []
    return text, tokens, events
