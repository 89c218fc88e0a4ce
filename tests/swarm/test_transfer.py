"""The swarm end to end on loopback: real `tightwad.swarm.cli` processes talking real HTTP.

Seeders are slowed with --max-upload-rate so a transfer lasts long enough to corrupt, kill or watch.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from support.procs import Processes
from support.synth import random_file, rewrite_gguf, tiny_gguf

from tightwad.http import Server
from tightwad.launch import free_port, wait_for_http
from tightwad.swarm.bitfield import Bitfield
from tightwad.swarm.library import Library, complete_entry, store_manifest
from tightwad.swarm.pieces import PieceManifest, build_manifest
from tightwad.swarm.puller import Puller, PullError, PullOptions
from tightwad.swarm.server import create_app

KIB, MIB = 1024, 1024 * 1024
PIECE = 128 * KIB


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "tightwad.swarm.cli", *map(str, args)]


def seed(
    processes: Processes, name: str, file: Path, *extra: object, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process, log = processes.start(
        name, cli("seed", file, "--port", port, "--piece-size", PIECE, *extra), env
    )
    wait_for_http(f"http://127.0.0.1:{port}/swarm/v1/health", timeout=60, process=process, log=log)
    return process, f"http://127.0.0.1:{port}"


def pull(
    processes: Processes, name: str, sha: str, folder: Path, *extra: object
) -> tuple[subprocess.Popen[bytes], Path]:
    args = (
        "pull",
        sha,
        "--dir",
        folder,
        "--json",
        "--events",
        folder.parent / f"{name}.events",
        "--refresh",
        0.2,
    )
    return processes.start(name, cli(*args, *extra))


def finish(process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> dict[str, Any]:
    assert process.wait(timeout=timeout) == 0, log.read_text()
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def events(path: Path) -> list[dict[str, Any]]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def payload(tmp_path: Path) -> tuple[Path, str]:
    """12 MiB of random bytes (96 pieces of 128 KiB) in the origin's folder."""
    (tmp_path / "origin").mkdir()
    file = random_file(tmp_path / "origin" / "model.bin", 12 * MIB, seed=7)
    return file, sha256(file)


def test_pull_shows_progress_and_never_puts_a_partial_file_under_the_final_name(
    processes: Processes, tmp_path: Path, payload: tuple[Path, str]
) -> None:
    file, sha = payload
    _, url = seed(processes, "origin", file, "--max-upload-rate", "6MB")
    dest = tmp_path / "dest"
    process, log = pull(processes, "puller", sha, dest, "--peer", url, "--progress", "log")
    final = dest / "model.bin"
    partial = dest / ".swarm" / f"{sha}.partial"
    saw_partial = False
    while process.poll() is None:
        if partial.exists():
            saw_partial = True
            assert not final.exists() or process.poll() is not None  # only the finished file has the name
        time.sleep(0.01)
    report = finish(process, log)
    assert saw_partial and sha256(final) == sha and final.stat().st_mode & 0o777 == 0o644
    assert not partial.exists() and not list((dest / ".swarm").glob(f"{sha}*"))
    assert report["bytes_fetched"] == file.stat().st_size and report["pieces_fetched"] == 96
    assert "MB/s" in log.read_text() and "ETA" in log.read_text()
    # Pulling again is a no-op: the file is there and verified.
    again = finish(*pull(processes, "again", sha, dest, "--peer", url))
    assert again["bytes_fetched"] == 0


def test_a_corrupt_peer_is_caught_banned_and_its_pieces_fetched_elsewhere(
    processes: Processes, tmp_path: Path, payload: tuple[Path, str]
) -> None:
    file, sha = payload
    good = build_manifest(file, PIECE)
    # Bit rot on a peer: its copy differs in every piece, but it still trusts its cached manifest.
    (tmp_path / "rotten").mkdir()
    rotten = tmp_path / "rotten" / "model.bin"
    shutil.copyfile(file, rotten)
    with rotten.open("r+b") as f:
        for piece in range(good.count):
            f.seek(piece * PIECE + 1000)
            f.write(b"\xde\xad\xbe\xef")
    store_manifest(rotten, good)
    _, bad_url = seed(processes, "rotten", rotten)
    _, good_url = seed(processes, "good", file, "--max-upload-rate", "12MB")
    dest = tmp_path / "dest"
    report = finish(*pull(processes, "puller", sha, dest, "--peer", bad_url, "--peer", good_url))
    assert sha256(dest / "model.bin") == sha
    assert report["peers"][bad_url]["banned"] and report["peers"][bad_url]["corrupt"] == 2
    assert report["peers"][bad_url]["pieces"] == 0 and report["peers"][good_url]["pieces"] == good.count
    log = events(tmp_path / "puller.events")
    corrupt = {e["piece"] for e in log if e["event"] == "piece-corrupt"}
    assert corrupt and all(e["peer"] == bad_url for e in log if e["event"] == "piece-corrupt")
    refetched = {e["piece"] for e in log if e["event"] == "piece-ok" and e["peer"] == good_url}
    assert corrupt <= refetched
    assert any(e["event"] == "peer-banned" and e["peer"] == bad_url for e in log)


def test_killing_a_seeder_mid_transfer_the_others_finish_the_job(
    processes: Processes, tmp_path: Path, payload: tuple[Path, str]
) -> None:
    file, sha = payload
    victim, victim_url = seed(processes, "victim", file, "--max-upload-rate", "3MB")
    _, other_url = seed(processes, "other", file, "--max-upload-rate", "3MB")
    dest = tmp_path / "dest"
    process, log = pull(processes, "puller", sha, dest, "--peer", victim_url, "--peer", other_url)
    path = tmp_path / "puller.events"

    def victim_served_some() -> bool:
        return sum(1 for e in events(path) if e["event"] == "piece-ok" and e["peer"] == victim_url) >= 8

    wait_until(victim_served_some, 30, "pieces from the victim")
    os.killpg(victim.pid, signal.SIGKILL)
    killed_at = time.time()
    report = finish(process, log)
    assert sha256(dest / "model.bin") == sha
    log_events = events(path)
    assert any(
        e["event"] in ("fetch-error", "peer-unreachable") and e["peer"] == victim_url for e in log_events
    )
    late = [e for e in log_events if e["event"] == "piece-ok" and e["wall"] > killed_at + 0.5]
    assert late and all(e["peer"] == other_url for e in late)
    assert report["peers"][other_url]["pieces"] + report["peers"][victim_url]["pieces"] == 96


def test_a_killed_puller_resumes_and_refetches_only_what_was_in_flight(
    processes: Processes, tmp_path: Path, payload: tuple[Path, str]
) -> None:
    file, sha = payload
    _, url = seed(processes, "origin", file, "--max-upload-rate", "4MB")
    dest = tmp_path / "dest"
    have_file = dest / ".swarm" / f"{sha}.have"

    def persisted() -> set[int]:
        try:
            return set(Bitfield.decode(96, json.loads(have_file.read_text())["have"]))
        except (OSError, ValueError, KeyError):
            return set()

    first, _ = pull(processes, "first", sha, dest, "--peer", url)
    wait_until(lambda: len(persisted()) >= 30, 30, "a third of the pieces")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    kept = persisted()
    assert 30 <= len(kept) < 96 and not (dest / "model.bin").exists()
    run1 = events(tmp_path / "first.events")
    started = {e["piece"] for e in run1 if e["event"] == "fetch"}
    in_flight = started - kept

    report = finish(*pull(processes, "second", sha, dest, "--peer", url))
    assert sha256(dest / "model.bin") == sha
    assert report["pieces_resumed"] == len(kept)
    fetched = [e["piece"] for e in events(tmp_path / "second.events") if e["event"] == "piece-ok"]
    assert sorted(fetched) == sorted(set(range(96)) - kept)  # each missing piece once, nothing held again
    refetched = set(fetched) & started
    assert refetched <= in_flight and len(in_flight) <= 2  # --slots 2 to the one peer
    assert report["bytes_fetched"] == sum(min(PIECE, 12 * MIB - i * PIECE) for i in fetched)


def test_a_delta_update_moves_only_changed_bytes(processes: Processes, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    tensors = {f"blk.{i}.weight": rng.standard_normal((128, 1024), dtype=np.float32) for i in range(6)}
    (tmp_path / "holder").mkdir()
    (tmp_path / "origin").mkdir()
    v1 = tiny_gguf(tmp_path / "holder" / "model.gguf", tensors, {"general.name": "v1"})
    v2 = rewrite_gguf(
        v1, tmp_path / "origin" / "model.gguf", extra_metadata={"general.note": "v2: new notes"}
    )
    sha = sha256(v2)
    _, url = seed(processes, "origin", v2)
    report = finish(*pull(processes, "puller", sha, tmp_path / "holder", "--peer", url))
    assert sha256(tmp_path / "holder" / "model.gguf") == sha  # the update replaced v1 under the same name
    assert report["bytes_fetched"] < v2.stat().st_size // 20 and report["pieces_local"] > 0
    assert report["bytes_fetched"] + report["bytes_local"] >= v2.stat().st_size


def test_bearer_token_is_required_and_beyond_loopback_is_refused_without_one(
    processes: Processes, tmp_path: Path, payload: tuple[Path, str]
) -> None:
    file, sha = payload
    _, url = seed(processes, "origin", file, env={"TIGHTWAD_TOKEN": "s3cret"})
    files = f"{url}/swarm/v1/files"
    assert httpx.get(files).status_code == 401
    assert httpx.get(files, headers={"authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(files, headers={"authorization": "Bearer s3cret"}).json()["files"][0]["sha256"] == sha
    data = f"{url}/swarm/v1/files/{sha}/data"
    assert httpx.get(data, headers={"range": "bytes=0-9"}).status_code == 401
    head = httpx.head(data, headers={"range": "bytes=0-9", "authorization": "Bearer s3cret"})
    assert head.status_code == 206 and head.headers["content-length"] == "10"
    refused = finish_failing(*pull(processes, "no-token", sha, tmp_path / "dest", "--peer", url))
    assert "bearer token" in refused
    exposed = subprocess.run(
        cli("seed", file, "--bind", "0.0.0.0", "--port", free_port()), capture_output=True, text=True
    )
    assert exposed.returncode == 1 and "beyond loopback" in exposed.stderr


def finish_failing(process: subprocess.Popen[bytes], log: Path) -> str:
    assert process.wait(timeout=60) == 1
    return log.read_text()


def _raw_get(url: str, path: str) -> int:
    """Status of a GET with `path` sent byte for byte (clients normalise `..`; attackers do not)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return int(s.recv(100).split()[1])


def test_no_request_reaches_outside_the_served_files(processes: Processes, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    random_file(folder / "ok.bin", 100 * KIB)
    (folder / "escape.bin").symlink_to("/etc/passwd")
    (folder / ".hidden.bin").write_bytes(b"x" * 100)
    port = free_port()
    process, log = processes.start("serve", cli("serve", folder, "--port", port, "--piece-size", "16KiB"))
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/swarm/v1/health", timeout=60, process=process, log=log)
    wait_until(lambda: httpx.get(f"{url}/swarm/v1/files").json()["files"], 20, "the folder scan")
    assert [f["name"] for f in httpx.get(f"{url}/swarm/v1/files").json()["files"]] == ["ok.bin"]
    for path in (
        "/swarm/v1/files/../../../../etc/passwd",
        "/swarm/v1/files/..%2f..%2f..%2fetc%2fpasswd/data",
        "/swarm/v1/files/%2e%2e/data",
        f"/swarm/v1/files/{hashlib.sha256(Path('/etc/passwd').read_bytes()).hexdigest()}/data",
        "/swarm/v1/files/" + "A" * 64 + "/data",
        "/../../etc/passwd",
    ):
        assert _raw_get(url, path) == 404, path


def test_a_peer_cannot_make_the_puller_write_outside_its_folder(tmp_path: Path) -> None:
    file = random_file(tmp_path / "payload.bin", 64 * KIB)
    honest = build_manifest(file, 16 * KIB)
    evil = PieceManifest("../escaped.bin", honest.size, honest.sha256, honest.piece_size, honest.pieces)
    library = Library()
    library.add(complete_entry(file, evil))

    async def run() -> None:
        server = Server(create_app(library), "127.0.0.1", 0, lifespan="off")
        await server.start()
        try:
            options = PullOptions(peers=[f"http://127.0.0.1:{server.port}"], stall_timeout=5)
            with pytest.raises(PullError, match="refusing file name"):
                await Puller(tmp_path / "dest", options, sha256=honest.sha256).run()
        finally:
            await server.stop()

    (tmp_path / "dest").mkdir()
    asyncio.run(run())
    assert not (tmp_path / "escaped.bin").exists() and not list((tmp_path / "dest").iterdir())


def test_sidecars_fill_each_hosts_model_volume_from_the_manifest(
    processes: Processes, tmp_path: Path
) -> None:
    model = random_file(tmp_path / "tiny.gguf", 2 * MIB, seed=11)
    digest = sha256(model)
    port = free_port()
    volume_a, volume_b = tmp_path / "a", tmp_path / "b"
    volume_a.mkdir()
    shutil.copyfile(model, volume_a / "tiny.gguf")
    manifest = tmp_path / "cluster.yaml"
    manifest.write_text(
        f"""\
apiVersion: tightwad.dev/v1alpha1
kind: TightwadCluster
metadata:
  name: pair
spec:
  models:
    - name: tiny
      source: https://models.example/files/tiny.gguf
      sha256: {digest}
  hosts:
    - name: a
      address: 127.0.0.1
      modelDir: {volume_a}
      gpus: [{{backend: cpu, port: {free_port()}}}]
    - name: b
      address: 127.0.0.2
      modelDir: {volume_b}
  target:
    model: tiny
    host: b
  swarm:
    port: {port}
    pieceSize: 256KiB
"""
    )
    a, log_a = processes.start("sidecar-a", cli("sidecar", manifest, "--host", "a"))
    wait_for_http(f"http://127.0.0.1:{port}/swarm/v1/health", timeout=60, process=a, log=log_a)
    b, log_b = processes.start("sidecar-b", cli("sidecar", manifest, "--host", "b", "--once"))
    assert b.wait(timeout=60) == 0, log_b.read_text()
    assert sha256(volume_b / "tiny.gguf") == digest
    status = json.loads((volume_b / ".swarm" / "status.json").read_text())
    assert status["ready"] and status["models"]["tiny"]["state"] == "present"
    served = httpx.get(f"http://127.0.0.1:{port}/swarm/v1/status").json()
    assert served["host"] == "a" and served["files"][0]["sha256"] == digest
