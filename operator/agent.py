"""`tightwad agent --host NAME --manifest FILE|URL`: run one host's units for an operator elsewhere.

What `nix run .#worker` starts on a Mac. Each pass: read the manifest (the file, or the operator's
`/v1/manifest`), observe this host's units with the process driver, learn every other unit from the
operator's `/v1/observed` (an engine here needs workers there), plan with the same `plan()` limited
to this host, act, and report this host's units back. State lives where `tightwad up` keeps it, so a
restarted agent adopts its units. Ctrl-C stops them and exits 0; any other failure of a pass is
logged and retried, the units left running.

The token never crosses the network in clear text: an operator URL must be https://, or plain http
to a loopback address (the end of an ssh tunnel: `ssh -N -L 8090:127.0.0.1:8090 OPERATOR`). The
manifest copy this host's units read holds the token and API keys: it is written 0600, atomically.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import yaml
from rich.console import Console

from tightwad.errors import TightwadError
from tightwad.manifest import Manifest, ManifestError, is_loopback, load_manifest, manifest_from_dict
from tightwad.operator.desired import Desired, available_components, desired_state
from tightwad.operator.modelcheck import ModelChecker
from tightwad.operator.observed import (
    Observed,
    UnitState,
    checks_from_json,
    checks_to_json,
    state_from_json,
    state_to_json,
)
from tightwad.operator.plan import Action, Route, Start, Stop, VerifyModel, plan
from tightwad.operator.process import ProcessDriver
from tightwad.operator.reconcile import pinned_binaries, route, state_root

console = Console(stderr=True, highlight=False, soft_wrap=True)


class AgentError(TightwadError):
    pass


RETRY_AFTER_S = 5.0  # after a pass that failed unexpectedly: the units keep running meanwhile


def check_operator_url(url: str, token: str | None) -> None:
    """The token is the whole cluster's key: it never travels in clear text beyond this machine.
    Plain http is fine to a loopback address (e.g. an ssh tunnel's end), https anywhere."""
    parsed = httpx.URL(url)
    if token and parsed.scheme == "http" and not is_loopback(parsed.host):
        raise AgentError(
            f"refusing to send the token over plain http to {parsed.host}: use an https:// URL for "
            "the operator, or reach it over loopback, e.g. through an ssh tunnel (ssh -N -L "
            f"{parsed.port or 80}:127.0.0.1:{parsed.port or 80} {parsed.host}, then --manifest "
            f"http://127.0.0.1:{parsed.port or 80})"
        )


class Agent:
    def __init__(self, host: str, manifest: str, operator: str | None, token: str | None) -> None:
        self.host = host
        self.remote = bool(re.match(r"^https?://", manifest))
        self.source = manifest
        self.operator = (operator or (manifest if self.remote else None) or "").rstrip("/") or None
        self.token = token
        if self.operator is not None:
            check_operator_url(self.operator, token)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(headers=headers, timeout=10.0)
        self.manifest = self.fetch()
        self.check_host(self.manifest)
        self.state_dir = state_root() / self.manifest.name / f"agent-{host}"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.copy = self.state_dir / "manifest.yaml"  # what this host's proxy or sidecar reads
        base = Path(manifest).resolve().parent if not self.remote else self.state_dir
        checker = ModelChecker(base, cache_file=self.state_dir / "model-digests.json")
        local = str(self.copy) if self.remote else str(Path(manifest).resolve())
        self.driver = ProcessDriver(self.state_dir, checker, pinned_binaries(), manifest_path=local)
        self.configure(self.manifest)

    # -- the manifest ----------------------------------------------------------------------------

    def fetch(self) -> Manifest:
        if not self.remote:
            return load_manifest(self.source)
        try:
            response = self.http.get(f"{self.operator}/v1/manifest")
        except httpx.HTTPError as exc:
            raise AgentError(f"cannot reach the operator at {self.operator}: {exc}") from None
        if response.status_code == 401:
            raise AgentError(f"{self.operator} refused the token: pass --token or set TIGHTWAD_TOKEN")
        if response.status_code != 200:
            raise AgentError(
                f"{self.operator}/v1/manifest answered HTTP {response.status_code}: {response.text[:200]}"
            )
        # A 200 that is not the API's answer (a captive portal, another server on the port) is an
        # error to report, never a crash: a crash would stop every unit on this host.
        try:
            body = response.json()
        except ValueError:
            body = None
        manifest = body.get("manifest") if isinstance(body, dict) else None
        if not isinstance(manifest, dict):
            raise AgentError(
                f"{self.operator}/v1/manifest answered something that is not the operator's manifest "
                f"({response.headers.get('content-type', 'no content type')}: {response.text[:120]!r}); "
                "is --manifest the operator's agent API?"
            )
        return manifest_from_dict(manifest, f"{self.operator}/v1/manifest")

    def check_host(self, manifest: Manifest) -> None:
        try:
            entry = manifest.host(self.host)
        except KeyError:
            names = ", ".join(h.name for h in manifest.hosts)
            raise AgentError(f"host {self.host!r} is not in the manifest (it has {names})") from None
        if entry.runtime not in ("native", "process"):
            raise AgentError(
                f"host {self.host!r} has runtime {entry.runtime}: agents run native/process hosts"
            )

    def configure(self, manifest: Manifest) -> None:
        if self.remote:
            write_private(self.copy, yaml.safe_dump(manifest.data, sort_keys=False))
        model_dirs: dict[str, str | None] = {h.name: h.model_dir for h in manifest.hosts}
        self.driver.checker.configure(self.driver.checker.base_dir, model_dirs, manifest.swarm.enabled)

    def desired(self) -> Desired:
        return desired_state(self.manifest, components=available_components())

    # -- one pass --------------------------------------------------------------------------------

    def others(self) -> tuple[dict[str, UnitState], dict[Any, Any]]:
        """Every other host's units and model checks, as the operator last saw them."""
        if self.operator is None:
            return {}, {}
        try:
            body = self.http.get(f"{self.operator}/v1/observed").json()
            units = {
                s.name: s for s in map(state_from_json, body.get("units", [])) if s.unit.host != self.host
            }
            checks = {k: v for k, v in checks_from_json(body.get("models", [])).items() if k[0] != self.host}
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
            console.print(f"[yellow]no usable view of the other hosts from {self.operator}:[/] {exc}")
            return {}, {}
        return units, checks

    def pass_once(self) -> list[Action]:
        try:
            manifest = self.fetch()
            self.check_host(manifest)
            if manifest.data != self.manifest.data:
                self.manifest = manifest
                self.configure(manifest)
        except (AgentError, ManifestError) as exc:
            console.print(f"[yellow]keeping the last good manifest:[/] {exc}")
        now = time.time()
        local = self.driver.observe(now)
        checks = self.driver.models()
        units, remote_checks = self.others()
        observed = Observed(now=now, units={**units, **local}, models={**remote_checks, **checks})
        result = plan(self.desired(), observed, scope={self.host})
        for action in result.actions:
            self.execute(action)
        self.report(local, checks)
        return list(result.actions)

    def execute(self, action: Action) -> None:
        match action:
            case Start(unit=unit, reason=reason, failed=failed):
                console.print(f"start {unit.name} ({reason})")
                self.driver.start(unit, reason, failed)
            case Stop(unit=unit, reason=reason):
                console.print(f"stop {unit.name} ({reason})")
                self.driver.stop(unit, reason)
            case VerifyModel(host=host, model=model):
                self.driver.verify(host, model)
            case Route(router=router, backend=backend):
                error = route(router, backend, token=self.token)
                console.print(f"route {router.name} -> {backend.name}" + (f": {error}" if error else ""))

    def report(self, local: dict[str, UnitState], checks: dict[Any, Any]) -> None:
        if self.operator is None:
            return
        mine = {k: v for k, v in checks.items() if k[0] == self.host}
        body = {"units": [state_to_json(s) for s in local.values()], "models": checks_to_json(mine)}
        try:
            self.http.post(f"{self.operator}/v1/hosts/{self.host}/report", json=body)
        except httpx.HTTPError as exc:
            console.print(f"[yellow]could not report to {self.operator}:[/] {exc}")

    def run(self, stop: threading.Event, retry_after: float = RETRY_AFTER_S) -> None:
        while not stop.is_set():
            try:
                acted = self.pass_once()
            except Exception as exc:  # a bug or a surprise must not stop this host's units
                console.print(
                    f"[red]agent pass failed, units left running, retrying in {retry_after:g}s:[/] "
                    f"{type(exc).__name__}: {exc}"
                )
                stop.wait(retry_after)
                continue
            stop.wait(0.2 if acted else 1.0)

    def shutdown(self) -> None:
        for name in self.driver.stop_all():
            console.print(f"stopped {name}")
        self.report({}, {})
        self.driver.close()
        self.http.close()


def write_private(path: Path, text: str) -> None:
    """Write `path` readable by this user only (it holds the token and API keys), whole or not at
    all: a temporary file made 0600 from the start, then renamed over the old copy."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def run_agent(host: str, manifest: str, operator: str | None = None, token: str | None = None) -> int:
    token = token or os.environ.get("TIGHTWAD_TOKEN") or None
    target = operator or (manifest if re.match(r"^https?://", manifest) else None)
    if target and not token and not is_loopback(httpx.URL(target).host):
        raise AgentError("the operator is beyond loopback: pass --token or set TIGHTWAD_TOKEN")
    agent = Agent(host, manifest, operator, token)
    console.print(
        f"agent for host [bold]{host}[/] of cluster {agent.manifest.name} (state: {agent.state_dir})"
    )
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> Any:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        agent.run(stop)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        agent.shutdown()
    return 0
