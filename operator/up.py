"""`tightwad up FILE`: run the reconcile loop in the foreground until Ctrl-C.

The loop converges this machine's hosts to the manifest and keeps watching the file: edit it (a new
target model, another drafter) and the change is applied, a model hot-swapped. The first time the
endpoint serves, it says so with a line to paste. Ctrl-C (or SIGTERM) stops every unit it runs,
front door first, and exits 0; with --keep-running the units stay up and the next `tightwad up`
adopts them.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Any

from rich.console import Console

from tightwad.errors import TightwadError
from tightwad.manifest import is_loopback
from tightwad.operator.agent_api import DEFAULT_PORT, AgentServer
from tightwad.operator.plan import PlannerPolicy
from tightwad.operator.reconcile import PassResult, Reconciler

console = Console(stderr=True, highlight=False, soft_wrap=True)


class _Announcer:
    """Says what changed, once: the endpoint coming up, the model switching, trouble starting."""

    def __init__(self) -> None:
        self.ready = False
        self.serving: str | None = None
        self.degraded: str | None = None

    def __call__(self, result: PassResult) -> None:
        conditions = {c["type"]: c for c in result.status.get("conditions", [])}
        ready = conditions.get("Ready", {}).get("status") == "True"
        serving = (result.status.get("model") or {}).get("serving")
        endpoint = result.status.get("endpoint")
        if ready and not self.ready:
            if self.serving is None:
                _announce(str(endpoint))
            else:
                console.print(f"[green]✓[/] serving again: {serving}")
        elif not ready and self.ready:
            console.print(f"[yellow]![/] not serving: {conditions.get('Ready', {}).get('message')}")
        if ready and self.serving and serving != self.serving:
            console.print(f"[green]✓[/] now serving {serving} (was {self.serving})")
        degraded = conditions.get("Degraded", {})
        message = degraded.get("message") if degraded.get("status") == "True" else None
        if message and message != self.degraded:
            console.print(f"[red]degraded:[/] {message}")
        self.degraded = message
        self.ready = ready
        self.serving = serving if ready else self.serving


def _announce(endpoint: str) -> None:
    console.print(f"\n[bold]Tightwad is up:[/] {endpoint}  (OpenAI-compatible; Ctrl-C stops it)")
    base = endpoint.removesuffix("/v1")
    body = '{"messages":[{"role":"user","content":"Say hello in five words."}],"max_tokens":32}'
    console.print(f"  curl -s {base}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'\n")


def _event(line: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {line}")


def _agent_server(reconciler: Reconciler, listen: str | None) -> AgentServer | None:
    """The API agents talk to, when the manifest has hosts that only an agent can run."""
    hosts = reconciler.agent_hosts()
    if not hosts and listen is None:
        return None
    manifest = reconciler.manifest
    token = manifest.token if manifest else None
    if not token:
        raise TightwadError(
            f"hosts {', '.join(hosts)} are run by agents, which authenticate with spec.auth.token: "
            "add `token: ${TIGHTWAD_TOKEN}` under spec.auth and export TIGHTWAD_TOKEN"
        )
    if listen is None:
        addresses = [reconciler.manifest.host(h).address for h in hosts] if reconciler.manifest else []
        bind = "127.0.0.1" if all(is_loopback(a) for a in addresses) else "0.0.0.0"
        listen = f"{bind}:{DEFAULT_PORT}"
    bind, _, port = listen.rpartition(":")
    server = AgentServer(reconciler, token, bind or "127.0.0.1", int(port))
    server.start()
    shown = ", ".join(hosts) or "NAME"
    console.print(f"agents ({shown}) connect with: tightwad agent --host NAME --manifest {server.url}")
    return server


def _interrupt(signum: int, frame: FrameType | None) -> Any:
    # Once: a second signal (make forwards SIGTERM to its children, a user presses Ctrl-C twice)
    # must not interrupt the orderly stop that the first one starts.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def up(
    manifest_path: str,
    keep_running: bool = False,
    policy: PlannerPolicy | None = None,
    agents_listen: str | None = None,
) -> int:
    # Ctrl-C and SIGTERM mean "stop what was started" from the first instant: a shell's background
    # job, nohup or a CI runner may have handed this process an ignored SIGINT.
    signal.signal(signal.SIGINT, _interrupt)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    reconciler: Reconciler | None = None
    agents: AgentServer | None = None
    stop = threading.Event()
    try:
        reconciler = Reconciler(manifest_path, events=_event, policy=policy)
        console.print(
            f"converging cluster [bold]{reconciler.cluster}[/] from {reconciler.path} "
            f"(status: {reconciler.status.path}; logs: {reconciler.state_dir / 'logs'})"
        )
        if taken := reconciler.ports_taken():
            # Before anything starts (and nothing to stop): one sentence per port, naming the holder.
            reconciler.close()
            reconciler = None
            raise TightwadError(
                "; ".join(taken) + "; stop that process or choose another port in the manifest"
            )
        agents = _agent_server(reconciler, agents_listen)
        reconciler.run(stop, on_pass=_Announcer())
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        # A second Ctrl-C must not leave half the units running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if reconciler is not None:
                _shut_down(reconciler, agents, keep_running)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)
    return 0


def _shut_down(reconciler: Reconciler, agents: AgentServer | None, keep_running: bool) -> None:
    if keep_running:
        console.print("leaving the units running; `tightwad up` adopts them, `tightwad down` stops them")
    else:
        console.print("stopping...")
        for name in reconciler.stop_all("`tightwad up` was stopped (Ctrl-C) and stopped every unit"):
            console.print(f"[dim]stopped {name}[/]")
    if agents is not None:
        agents.stop()
    reconciler.close()
