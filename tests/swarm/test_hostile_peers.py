"""Peers that lie about a file, and local failures mid-pull: real peer servers in this process on
loopback, so each test can hand a peer a crafted manifest or make the local disk fail on cue."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.synth import random_file, rewrite_gguf, tiny_gguf

from tightwad.http import Server
from tightwad.swarm import puller as puller_module
from tightwad.swarm import storage
from tightwad.swarm.delta import Copy, Fill
from tightwad.swarm.library import Library, complete_entry
from tightwad.swarm.pieces import PieceManifest, build_manifest, fingerprint
from tightwad.swarm.puller import (
    ManifestContradicted,
    Puller,
    PullError,
    PullOptions,
    PullResult,
    choose_manifest,
)
from tightwad.swarm.reuse import feed_local
from tightwad.swarm.server import create_app

KIB = 1024
PIECE = 16 * KIB


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def library(path: Path, manifest: PieceManifest) -> Library:
    served = Library()
    served.add(complete_entry(path, manifest))
    return served


def pull(dest: Path, peers: list[Library], stall: float = 10, **what: Any) -> PullResult:
    """Serve each library from its own peer server, and pull into `dest` from them, in that order."""

    async def run() -> PullResult:
        servers = [Server(create_app(served), "127.0.0.1", 0, lifespan="off") for served in peers]
        for server in servers:
            await server.start()
        try:
            urls = [f"http://127.0.0.1:{server.port}" for server in servers]
            options = PullOptions(peers=urls, stall_timeout=stall, refresh=0.2)
            return await Puller(dest, options, **what).run()
        finally:
            for server in servers:
                await server.stop()

    dest.mkdir(exist_ok=True)
    return asyncio.run(run())


def state_files(dest: Path, sha: str) -> list[str]:
    return sorted(p.name for p in (dest / ".swarm").glob(f"{sha}*"))


@pytest.fixture
def payload(tmp_path: Path) -> tuple[Path, PieceManifest]:
    (tmp_path / "origin").mkdir()
    file = random_file(tmp_path / "origin" / "model.bin", 256 * KIB, seed=3)
    return file, build_manifest(file, PIECE)


def test_a_peer_cannot_choose_which_model_a_pull_by_sha256_replaces(
    tmp_path: Path, payload: tuple[Path, PieceManifest]
) -> None:
    file, honest = payload
    dest = tmp_path / "dest"
    dest.mkdir()
    other = random_file(dest / "other.bin", 64 * KIB, seed=4)
    other_sha = sha256(other)
    evil = library(file, dataclasses.replace(honest, name="other.bin"))
    with pytest.raises(PullError, match=r"other\.bin"):
        pull(dest, [evil], sha256=honest.sha256, name="model.bin")
    assert sha256(other) == other_sha and not (dest / "model.bin").exists()
    # With an honest peer too, the pull finishes under the name asked for; the liar is not used.
    result = pull(dest, [evil, library(file, honest)], sha256=honest.sha256, name="model.bin")
    assert result.path == dest / "model.bin" and sha256(result.path) == honest.sha256
    assert sha256(other) == other_sha


def test_a_manifest_claiming_another_size_is_outvoted_not_reused_and_its_peer_banned(
    tmp_path: Path, payload: tuple[Path, PieceManifest]
) -> None:
    file, honest = payload
    extra = tuple(hashlib.sha256(bytes([i])).hexdigest() for i in range(4))
    inflated = dataclasses.replace(honest, size=honest.size + 4 * PIECE, pieces=honest.pieces + extra)
    evil = library(file, inflated)
    dest = tmp_path / "dest"
    with pytest.raises(PullError):
        pull(dest, [evil], stall=2, sha256=honest.sha256)  # alone, the liar stalls the pull
    assert f"{honest.sha256}.manifest.json" in state_files(dest, honest.sha256)
    # The retry asks every peer again instead of trusting what the liar said last time.
    peers = [evil, library(file, honest), library(file, honest)]
    result = pull(dest, peers, sha256=honest.sha256)
    assert sha256(result.path) == honest.sha256 and result.manifest.size == honest.size
    banned = [url for url, peer in result.peers.items() if peer["banned"]]
    assert len(banned) == 1 and result.peers[banned[0]]["pieces"] == 0
    assert state_files(dest, honest.sha256) == []


def test_a_manifest_that_fails_the_whole_file_check_is_discarded_and_never_reused(
    tmp_path: Path, payload: tuple[Path, PieceManifest]
) -> None:
    file, honest = payload
    # A self-consistent forgery: every piece verifies against it, only the whole file does not.
    fake = random_file(tmp_path / "fake.bin", honest.size, seed=9)
    forged = dataclasses.replace(build_manifest(fake, PIECE), sha256=honest.sha256, name="model.bin")
    evil = library(fake, forged)
    dest = tmp_path / "dest"
    with pytest.raises(storage.DownloadCorrupt):
        pull(dest, [evil], sha256=honest.sha256)
    assert state_files(dest, honest.sha256) == [f"{honest.sha256}.rejected"]
    result = pull(dest, [evil, library(file, honest)], sha256=honest.sha256)
    assert sha256(result.path) == honest.sha256
    assert [peer["banned"] for peer in result.peers.values()] == [True, False]


def test_a_saved_manifest_every_peer_contradicts_is_dropped_not_retried_forever(
    tmp_path: Path, payload: tuple[Path, PieceManifest]
) -> None:
    file, honest = payload
    # A forgery no bytes match: a pull that trusts it bans every honest peer for "corrupt" pieces.
    garbage = tuple(hashlib.sha256(b"%d" % i).hexdigest() for i in range(honest.count))
    evil = library(file, dataclasses.replace(honest, pieces=garbage))
    dest = tmp_path / "dest"
    with pytest.raises(PullError, match="every peer is banned"):
        pull(dest, [evil], sha256=honest.sha256)
    assert f"{honest.sha256}.manifest.json" in state_files(dest, honest.sha256)  # saved to resume
    peers = [evil, library(file, honest)]
    with pytest.raises(ManifestContradicted):
        pull(dest, peers, sha256=honest.sha256)  # the saved forgery wins the tie, and is refuted
    assert state_files(dest, honest.sha256) == [f"{honest.sha256}.rejected"]
    result = pull(dest, peers, sha256=honest.sha256)
    assert sha256(result.path) == honest.sha256


def test_the_size_most_peers_agree_on_wins_and_liars_are_named() -> None:
    honest = PieceManifest("m.bin", 3 * PIECE, "a" * 64, PIECE, ("b" * 64,) * 3)
    big = dataclasses.replace(honest, size=4 * PIECE, pieces=("b" * 64,) * 4)
    renamed = dataclasses.replace(honest, name="other.bin")
    answers = {"http://e:1": big, "http://h:1": honest, "http://h:2": honest, "http://r:1": renamed}
    chosen, refused = choose_manifest(answers, want_name="m.bin", rejected=[], prefer=None)
    assert chosen == honest and set(refused) == {"http://e:1", "http://r:1"}
    assert "'other.bin'" in refused["http://r:1"] and "2 peers" in refused["http://e:1"]
    # A tie in size goes to the smaller claim; a forgery that proved false is never chosen again.
    chosen, refused = choose_manifest(
        {"http://e:1": big, "http://h:1": honest}, want_name=None, rejected=[], prefer=big
    )
    assert chosen == honest and list(refused) == ["http://e:1"]
    chosen, refused = choose_manifest(
        {"http://h:1": honest}, want_name=None, rejected=[fingerprint(honest)], prefer=None
    )
    assert chosen is None and list(refused) == ["http://h:1"]


def test_free_space_is_checked_before_the_file_is_allocated(
    tmp_path: Path, payload: tuple[Path, PieceManifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    file, honest = payload
    monkeypatch.setattr(storage, "free_bytes", lambda folder: 1000, raising=False)
    dest = tmp_path / "dest"
    with pytest.raises(PullError, match=rf"{dest}.*1000 bytes free.*{honest.size} bytes"):
        pull(dest, [library(file, honest)], sha256=honest.sha256)
    assert state_files(dest, honest.sha256) == []


def test_a_full_disk_discards_the_partial_file_and_its_manifest(
    tmp_path: Path, payload: tuple[Path, PieceManifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    file, honest = payload

    def disk_full(*args: object) -> bool:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage.PartialDownload, "write", disk_full)
    dest = tmp_path / "dest"
    with pytest.raises(PullError, match=r"no space left.*discarded"):
        pull(dest, [library(file, honest)], sha256=honest.sha256)
    assert state_files(dest, honest.sha256) == []


def test_a_local_file_that_shrinks_mid_pull_is_fetched_from_peers_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(5)
    tensors = {f"blk.{i}.weight": rng.standard_normal((32, 1024), dtype=np.float32) for i in range(6)}
    dest, origin = tmp_path / "dest", tmp_path / "origin"
    dest.mkdir()
    origin.mkdir()
    v1 = tiny_gguf(dest / "model.gguf", tensors, {"general.name": "v1"})
    v2 = rewrite_gguf(v1, origin / "model.gguf", extra_metadata={"general.note": "v2: new notes"})
    wanted = build_manifest(v2, PIECE)
    shrunk: list[Path] = []

    def shrinking(step: Copy | Fill, absorb: Any) -> None:
        # A piece that mixes local and fetched bytes reads the old file: it is cut short right then.
        if isinstance(step, Copy) and not shrunk:
            os.truncate(step.source, 0)
            shrunk.append(step.source)
        feed_local(step, absorb)

    monkeypatch.setattr(puller_module, "feed_local", shrinking)
    result = pull(dest, [library(v2, wanted)], sha256=wanted.sha256)
    assert shrunk and sha256(result.path) == wanted.sha256
