"""The per-host sidecar: keep the models this host needs present in its model volume, serve every
file there to the other hosts, and report progress as status.

Which models a host needs is read from the cluster manifest: the target's model on the target's
host, each llama-server drafter's model on its host (rpc workers receive tensors over the network
and need no file). A model whose source is already on this machine (a `catalog:` model in the
cache, a local path) is copied in; anything else is pulled from the other hosts' sidecars and the
manifest's extra peers and trackers, by SHA-256 when the manifest gives one, else by file name.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rich.console import Console

from tightwad import models as catalog
from tightwad.errors import TightwadError
from tightwad.manifest import Manifest, load_manifest, parse_size
from tightwad.swarm.library import Library
from tightwad.swarm.node import Node, NodeOptions, watch_folder
from tightwad.swarm.pieces import ManifestInvalid, check_file_name
from tightwad.swarm.puller import Puller, PullOptions
from tightwad.swarm.storage import state_dir

RETRY_EVERY = 5.0


@dataclass(frozen=True)
class NeededModel:
    name: str
    file_name: str
    sha256: str | None
    local_source: Path | None  # where this machine already has it, if anywhere


def _file_name(source: str) -> str:
    if source.startswith(catalog.CATALOG_PREFIX):
        return catalog.catalog_model(source.removeprefix(catalog.CATALOG_PREFIX)).filename
    if re.match(r"^https?://", source, flags=re.IGNORECASE):
        # As the operator names it (operator/docker.py model_file): the URL path's last part, as written.
        return check_file_name(urlsplit(source).path.rsplit("/", 1)[-1])
    return check_file_name(Path(source).expanduser().name)


def _local_source(source: str, base_dir: Path | None) -> Path | None:
    if re.match(r"^https?://", source, flags=re.IGNORECASE):
        return None
    try:
        return catalog.resolve_source(source, base_dir)
    except TightwadError:
        return None


def models_for_host(manifest: Manifest, host: str) -> list[NeededModel]:
    """The models whose files must be in `host`'s model volume, in manifest order (pure but for the
    existence checks of local sources)."""
    wanted = []
    if manifest.target.host == host:
        wanted.append(manifest.target.model)
    for drafter in manifest.drafters:
        if drafter.runs_here and drafter.host == host and drafter.model:
            wanted.append(drafter.model)
    needed = []
    for name in dict.fromkeys(wanted):
        model = manifest.model(name)
        source = model.source
        try:
            file_name = _file_name(source)
        except (ManifestInvalid, KeyError):
            raise TightwadError(f"model {name!r}: cannot derive a file name from source {source!r}") from None
        needed.append(NeededModel(name, file_name, model.sha256, _local_source(source, manifest.base_dir)))
    return needed


def _copy_into(source: Path, dest: Path) -> None:
    with catalog.atomic_output(dest) as tmp:
        shutil.copyfile(source, tmp)


class Sidecar:
    def __init__(
        self, manifest: Manifest, host: str, bind: str | None = None, console: Console | None = None
    ):
        swarm = manifest.swarm
        if not swarm.enabled:
            raise TightwadError("spec.swarm.enabled is false in the manifest: there is no sidecar to run")
        try:
            me = manifest.host(host)
        except KeyError:
            names = ", ".join(h.name for h in manifest.hosts)
            raise TightwadError(f"no host {host!r} in the manifest; hosts are: {names}") from None
        port = swarm.port
        self.host = host
        self.folder = Path(me.model_dir).expanduser()
        self.console = console or Console(stderr=True, highlight=False)
        self.piece_size = parse_size(swarm.piece_size)
        # The token goes to the cluster's own hosts only: `swarm.peers` and `swarm.trackers` are
        # whatever the manifest's author wrote, and may be anyone's.
        own_hosts = frozenset(h.address.strip("[]") for h in manifest.hosts)
        self.node_options = NodeOptions(
            bind=bind or me.address,
            port=port,
            token=manifest.token,
            token_hosts=own_hosts,
            piece_size=self.piece_size,
            trackers=list(swarm.trackers),
            advertise=f"http://{me.address}:{port}",
        )
        self.peers = [f"http://{h.address}:{port}" for h in manifest.hosts if h.name != host]
        self.peers += list(swarm.peers)
        self.needed = models_for_host(manifest, host)
        self.states: dict[str, dict[str, Any]] = {
            m.name: {"file": m.file_name, "state": "waiting", "sha256": m.sha256} for m in self.needed
        }
        self.library = Library()

    def status(self) -> dict[str, Any]:
        return {"host": self.host, "models": self.states, "ready": self.ready}

    @property
    def ready(self) -> bool:
        return all(state["state"] == "present" for state in self.states.values())

    def _write_status(self) -> None:
        path = state_dir(self.folder) / "status.json"
        tmp = path.with_name("status.json.tmp")
        tmp.write_text(json.dumps(self.status(), indent=1), encoding="utf-8")
        os.replace(tmp, path)

    async def _ensure(self, model: NeededModel) -> None:
        state = self.states[model.name]
        dest = self.folder / model.file_name
        while True:
            if dest.is_file():
                state.update(state="present", path=str(dest), error=None)
                return
            try:
                if model.local_source is not None:
                    state.update(state="copying")
                    await asyncio.to_thread(_copy_into, model.local_source, dest)
                    continue
                state.update(state="pulling")
                options = PullOptions(
                    peers=self.peers,
                    trackers=self.node_options.trackers,
                    token=self.node_options.token,
                    token_hosts=self.node_options.token_hosts,
                    advertise=self.node_options.advertise,
                    stall_timeout=60.0,
                )
                puller = Puller(
                    self.folder,
                    options,
                    sha256=model.sha256,
                    name=model.file_name,  # the manifest decides where it lands, never a peer
                    library=self.library,
                    on_state=lambda s, state=state: state.update(s),
                )
                result = await puller.run()
                state.update(state="present", path=str(result.path), seconds=round(result.seconds, 2))
                return
            except (TightwadError, OSError) as exc:
                state.update(state="retrying", error=str(exc))
                self.console.print(f"[yellow]{model.name}[/]: {exc}; retrying in {RETRY_EVERY:.0f}s")
            await asyncio.sleep(RETRY_EVERY)

    async def run(self, once: bool = False) -> int:
        """Serve and fetch until stopped (or, with `once`, until every needed model is present)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        state_dir(self.folder).mkdir(exist_ok=True)
        async with Node(self.node_options, self.library, status=self.status) as node:
            self.console.print(
                f"swarm sidecar for host {self.host}: serving {self.folder} at {node.url}, "
                f"{len(self.needed)} models needed"
            )
            watcher = asyncio.ensure_future(watch_folder(self.library, self.folder, self.piece_size, None))
            workers = [asyncio.ensure_future(self._ensure(m)) for m in self.needed]
            try:
                while True:
                    self._write_status()
                    if once and all(w.done() for w in workers):
                        break
                    await asyncio.sleep(1.0)
                await asyncio.gather(*workers)
                self._write_status()
                if not once:
                    await node.wait()
            finally:
                for task in [watcher, *workers]:
                    task.cancel()
                await asyncio.gather(watcher, *workers, return_exceptions=True)
        return 0 if self.ready else 1


def run_sidecar(manifest_path: str, host: str, bind: str | None, once: bool) -> int:
    sidecar = Sidecar(load_manifest(manifest_path), host, bind)
    began = time.monotonic()
    code = asyncio.run(sidecar.run(once=once))
    sidecar.console.print(f"all {len(sidecar.needed)} models present after {time.monotonic() - began:.1f}s")
    return code
