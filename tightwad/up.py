"""`tightwad up FILE`: bring a single-machine manifest up in the foreground.

Interim, until the engine, proxy and reconcile loop land: each CPU entry of the local host becomes
a real `ggml-rpc-server`, and the front door is `llama-server --rpc` on the proxy's address, with
the first llama-server drafter as its in-process draft model. The plan is pure (`plan_local`); the
rest starts the processes, waits for them, and stops them all on Ctrl-C or when one dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from tightwad import models, toolchain
from tightwad.errors import TightwadError
from tightwad.launch import llama_server_command, rpc_worker_command, wait_for_http, wait_for_port
from tightwad.manifest import Manifest, load_manifest

console = Console(stderr=True, highlight=False, soft_wrap=True)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
FIRST_RPC_PORT = 50152
DRAFT_TOKENS = 8


@dataclass(frozen=True)
class LocalProcess:
    name: str
    cmd: list[str]
    port: int
    base_url: str | None = None  # an HTTP server: ready when {base_url}/health answers 200


def plan_local(manifest: Manifest, tc: toolchain.Toolchain) -> list[LocalProcess]:
    """The processes that serve `manifest` on this machine, in start order."""
    spec: dict[str, Any] = manifest.spec
    hosts = {h["name"]: h for h in spec["hosts"]}
    target = spec["target"]
    host = hosts[target["host"]]
    if host.get("runtime", "process") != "process" or host["address"] not in LOOPBACK:
        raise TightwadError(
            f"spec.target.host: `tightwad up` runs one machine for now; host '{host['name']}' must have "
            "runtime: process and a loopback address (multi-host clusters come with the reconcile loop)"
        )
    workers: list[LocalProcess] = []
    for i, gpu in enumerate(host.get("gpus", [])):
        if gpu["backend"] != "cpu":
            raise TightwadError(
                f"spec.hosts[{host['name']}].gpus[{i}].backend: `tightwad up` starts CPU workers only for "
                f"now; '{gpu['backend']}' workers need the docker or native runtime"
            )
        port = int(gpu.get("port") or FIRST_RPC_PORT + i)
        cmd = rpc_worker_command(tc, port, threads=gpu.get("threads") or 1)
        workers.append(LocalProcess(f"rpc-worker-{i}", cmd, port))

    by_name = {m["name"]: m for m in spec["models"]}
    target_model = by_name[target["model"]]
    ctx = int(target.get("contextSize") or target_model.get("contextSize") or 4096)
    proxy = spec.get("proxy", {})
    bind, port = proxy.get("bind", "127.0.0.1"), int(proxy.get("port", 8088))
    extra: list[str] = []
    drafter = next((d for d in spec.get("drafters", []) if d.get("kind") == "llama-server"), None)
    if drafter:
        draft_path = models.resolve_source(by_name[drafter["model"]]["source"], manifest.base_dir)
        extra = ["--model-draft", str(draft_path), "--spec-type", "draft-simple"]
        extra += ["--spec-draft-n-max", str(DRAFT_TOKENS)]
    reachable = "127.0.0.1" if bind in ("0.0.0.0", "::") else bind
    front = LocalProcess(
        "front-door",
        llama_server_command(
            tc,
            models.resolve_source(target_model["source"], manifest.base_dir),
            port,
            bind=bind,
            ctx_size=ctx,
            rpc=[f"127.0.0.1:{w.port}" for w in workers],
            extra=["--alias", target_model["name"], *extra],
        ),
        port,
        base_url=f"http://{reachable}:{port}",
    )
    return [*workers, front]


def _stop(running: list[subprocess.Popen[bytes]]) -> None:
    for process in reversed(running):
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in running:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def up(manifest_path: str) -> int:
    manifest = load_manifest(manifest_path)
    tc = toolchain.find()
    plan = plan_local(manifest, tc)
    log_dir = toolchain.cache_root() / "run" / manifest.name / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    running: list[subprocess.Popen[bytes]] = []
    try:
        for unit in plan:
            log = log_dir / f"{unit.name}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    unit.cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            running.append(process)
            with console.status(f"starting {unit.name}..."):
                if unit.base_url:
                    wait_for_http(f"{unit.base_url}/health", timeout=300, process=process, log=log)
                else:
                    wait_for_port("127.0.0.1", unit.port, process=process, log=log)
            console.print(f"[green]✓[/] {unit.name} is up (log: {log})")
        _announce(plan[-1])
        while all(p.poll() is None for p in running):
            time.sleep(0.5)
        dead = next(u for u, p in zip(plan, running, strict=True) if p.poll() is not None)
        raise TightwadError(f"{dead.name} exited; see {log_dir / (dead.name + '.log')}")
    except KeyboardInterrupt:
        console.print("stopping...")
        return 0
    finally:
        _stop(running)


def _announce(front: LocalProcess) -> None:
    url = front.base_url
    console.print(f"\n[bold]Tightwad is up:[/] {url}/v1  (OpenAI-compatible; Ctrl-C stops it)")
    body = '{"messages":[{"role":"user","content":"Say hello in five words."}],"max_tokens":32}'
    console.print(f"  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'\n")
