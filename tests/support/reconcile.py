"""Helpers for operator tests: a one-machine manifest on free ports, and `tightwad up` as a real
process whose status file the test reads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from tightwad.ports import free_port_below_ephemeral

from . import ROOT
from .procs import default_signals

Doc = dict[str, Any]


def local_manifest(name: str, *, drafter: bool = True, proxy: bool = True) -> dict[str, Any]:
    """examples/local.yaml on free ports (a running appliance or another test never collides),
    below the range the kernel hands to outgoing connections, as the planner's own ports are."""
    data = yaml.safe_load((ROOT / "examples" / "local.yaml").read_text())
    data["metadata"]["name"] = name
    spec = data["spec"]
    for gpu in spec["hosts"][0]["gpus"]:
        gpu["port"] = free_port_below_ephemeral()
    spec["target"]["port"] = free_port_below_ephemeral()
    spec["target"]["maxConversations"] = 2
    if drafter:
        spec["drafters"][0]["port"] = free_port_below_ephemeral()
    else:
        spec["drafters"] = []
        spec["proxy"]["mode"] = "passthrough"
    if proxy:
        spec["proxy"]["port"] = free_port_below_ephemeral()
    else:
        del spec["proxy"]
        spec["drafters"] = []
    return data


def write_manifest(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)  # as editors do: the watcher must follow a replaced file


class Operator:
    """`tightwad up FILE` as a real process, with its own state folder."""

    def __init__(self, manifest: Path, state_dir: Path, log: Path) -> None:
        self.manifest = manifest
        self.state_dir = state_dir
        self.log_path = log
        self.status_path = manifest.with_name(f"{manifest.stem}.status.json")
        self.process: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return {**os.environ, "TIGHTWAD_STATE_DIR": str(self.state_dir)}

    def start(self, *extra: str) -> None:
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tightwad.operator.cli", "up", str(self.manifest), *extra],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
                preexec_fn=default_signals,
            )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tightwad.operator.cli", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        try:
            return json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return {}

    def condition(self, kind: str, doc: dict[str, Any] | None = None) -> dict[str, Any]:
        doc = self.status() if doc is None else doc
        return next((c for c in doc.get("conditions", []) if c["type"] == kind), {})

    def units(self, doc: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        doc = self.status() if doc is None else doc
        return {u["name"]: u for u in doc.get("units", [])}

    def wait(
        self, what: str, test: Callable[[dict[str, Any]], bool], timeout: float = 180.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            doc = self.status()
            if doc and test(doc):
                return doc
            assert self.process is None or self.process.poll() is None, f"operator exited\n{self.log()}"
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what}\n{json.dumps(doc, indent=1)}\n{self.log()[-4000:]}"
                )
            time.sleep(0.2)

    def wait_ready(self, timeout: float = 180.0, **model: str) -> dict[str, Any]:
        def ready(doc: dict[str, Any]) -> bool:
            if self.condition("Ready", doc).get("status") != "True":
                return False
            return all(doc.get("model", {}).get(k) == v for k, v in model.items())

        return self.wait("Ready", ready, timeout)

    def interrupt(self, timeout: float = 60.0) -> int:
        """Stop `tightwad up` as a user would, once it is running its loop (it has written status):
        SIGTERM, which it handles like Ctrl-C whatever the test runner's own signal dispositions."""
        assert self.process is not None
        deadline = time.monotonic() + 60
        while not self.status() and self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        os.killpg(self.process.pid, signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill9(self) -> None:
        """Kill the operator alone (not its units, which run in their own sessions)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)


def chat(
    url: str,
    text: str = "Say hello.",
    max_tokens: int = 8,
    stream: bool = False,
    timeout: float = 120,
    token: str | None = None,
) -> str:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if not stream:
        response = httpx.post(f"{url}/chat/completions", json=body, headers=headers, timeout=timeout)
        response.raise_for_status()
        return str(response.json()["choices"][0]["message"]["content"])
    parts = []
    streamed = {**body, "stream": True}
    with httpx.stream(
        "POST", f"{url}/chat/completions", json=streamed, headers=headers, timeout=timeout
    ) as response:
        response.raise_for_status()
        done = False
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(f"stream error: {event['error']}")
                for choice in event.get("choices", []):
                    parts.append(choice.get("delta", {}).get("content") or "")
        if not done:
            raise RuntimeError("stream ended without [DONE]")
    return "".join(parts)


def answers_again(url: str, timeout: float = 120.0, token: str | None = None) -> float:
    """Seconds until a chat completion through `url` succeeds again (after a fault)."""
    began = time.monotonic()
    while True:
        try:
            if chat(url, timeout=30, token=token).strip():
                return time.monotonic() - began
        except (httpx.HTTPError, RuntimeError):
            pass
        if time.monotonic() - began > timeout:
            raise AssertionError(f"{url} did not answer again within {timeout:.0f}s")
        time.sleep(0.5)


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            alive.append(pid)
    return alive
