"""The swarm's pure core: bitfields, GGUF layout, piece manifests, delta plans, piece selection, peer
scoring, the tracker, ranges, the upload cap and initial seeding. No processes, no network."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from support.synth import random_file, rewrite_gguf, tiny_gguf

from tightwad.swarm.bitfield import Bitfield
from tightwad.swarm.delta import ContentIndex, Copy, Fetch, Fill, fetched_bytes, plan_all, plan_piece
from tightwad.swarm.gguf_layout import read_layout
from tightwad.swarm.hashing import SplitHasher, hash_file
from tightwad.swarm.httprange import RangeError, parse_range
from tightwad.swarm.pieces import ManifestInvalid, PieceManifest, build_manifest, check_file_name, is_sha256
from tightwad.swarm.ratelimit import TokenBucket
from tightwad.swarm.scoring import BACKOFF_MAX, PeerScore
from tightwad.swarm.seeding import UploadLedger
from tightwad.swarm.selection import availability, pick_endgame, pick_piece
from tightwad.swarm.tracker import MAX_FILES, MAX_PEERS_PER_FILE, Tracker, normalise_peer_url

KIB = 1024


def _gguf(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    tensors = {
        "token_embd.weight": rng.standard_normal((96, 1024), dtype=np.float32),  # 384 KiB
        "blk.0.attn_norm.weight": rng.standard_normal(1001, dtype=np.float32),  # 4004 bytes: padded
        "blk.0.ffn_down.weight": rng.standard_normal((64, 1024), dtype=np.float32).astype(np.float16),
        "output.weight": rng.standard_normal((80, 1024), dtype=np.float32),
    }
    return tiny_gguf(path, tensors, {"general.name": "tiny"})


def _rebuild(manifest: PieceManifest, index: ContentIndex, new_file: Path) -> tuple[bytes, int]:
    """Execute every piece's plan (Fetch reads the new file, standing in for a peer); (bytes, fetched)."""
    data = bytearray(manifest.size)
    new = new_file.read_bytes()
    fetched = 0
    for piece in range(manifest.count):
        for step in plan_piece(manifest, piece, index):
            if isinstance(step, Copy):
                chunk = step.source.read_bytes()[step.source_offset : step.source_offset + step.length]
            elif isinstance(step, Fill):
                chunk = bytes(step.length)
            else:
                chunk = new[step.offset : step.offset + step.length]
                fetched += step.length
            data[step.offset : step.offset + step.length] = chunk
        start, end = manifest.span(piece)
        assert hashlib.sha256(data[start:end]).hexdigest() == manifest.pieces[piece], f"piece {piece}"
    return bytes(data), fetched


# -- bitfield


def test_bitfield_round_trips_and_rejects_stray_bits() -> None:
    field = Bitfield(13, [0, 7, 8, 12])
    assert len(field) == 4 and 12 in field and 11 not in field and 13 not in field
    assert list(field) == [0, 7, 8, 12] and list(field.missing())[:3] == [1, 2, 3]
    assert Bitfield.decode(13, field.encode()) == field
    with pytest.raises(ValueError, match="beyond the last piece"):
        Bitfield.decode(13, "//8=")  # two bytes with every bit set: bits 13..15 do not exist
    with pytest.raises(ValueError, match="needs 2 bytes"):
        Bitfield.decode(13, Bitfield(20).encode())
    field.discard(0)
    field.discard(0)
    assert len(field) == 3 and not field.complete and Bitfield(2, [0, 1]).complete


# -- GGUF layout and manifests


def test_layout_matches_the_gguf_reader(tmp_path: Path) -> None:
    path = _gguf(tmp_path / "t.gguf")
    layout = read_layout(path)
    reader = GGUFReader(path)
    assert layout is not None and layout.data_offset == reader.data_offset
    assert [(t.name, t.offset, t.length) for t in layout.tensors] == [
        (t.name, t.data_offset, t.n_bytes) for t in reader.tensors
    ]
    assert read_layout(random_file(tmp_path / "r.bin", 4096)) is None


def test_manifest_hashes_pieces_whole_file_and_segments(tmp_path: Path) -> None:
    path = _gguf(tmp_path / "model.gguf")
    manifest = build_manifest(path, 64 * KIB)
    data = path.read_bytes()
    assert manifest.sha256 == hashlib.sha256(data).hexdigest()
    assert manifest.count == -(-len(data) // (64 * KIB))
    for i, digest in enumerate(manifest.pieces):
        start, end = manifest.span(i)
        assert hashlib.sha256(data[start:end]).hexdigest() == digest
    kinds = [s.kind for s in manifest.segments]
    assert kinds[0] == "header" and kinds.count("tensor") == 4 and "zero" in kinds  # alignment padding
    assert sum(s.length for s in manifest.segments) == len(data)
    for segment in manifest.segments:
        assert hashlib.sha256(data[segment.offset : segment.end]).hexdigest() == segment.sha256
    assert PieceManifest.from_json(manifest.to_json()) == manifest


def test_split_hasher_and_hash_file_agree_with_hashlib(tmp_path: Path) -> None:
    path = random_file(tmp_path / "r.bin", 3 * 1024 * 1024 + 17, seed=3)
    data = path.read_bytes()
    bounds = [0, 10, 10, 1_500_000, len(data)]
    whole, (digests,) = hash_file(path, [bounds])
    assert whole == hashlib.sha256(data).hexdigest()
    assert digests == [hashlib.sha256(data[a:b]).hexdigest() for a, b in itertools.pairwise(bounds)]
    splitter = SplitHasher([0, 0])
    assert splitter.done and splitter.digests == [hashlib.sha256().hexdigest()]


@pytest.mark.parametrize(
    "name", ["../evil", "/etc/passwd", "a/b", "a\\b", ".swarm", "..", "", "x\x00y", "new\nline", "é" * 200]
)
def test_unsafe_file_names_are_refused(name: str) -> None:
    with pytest.raises(ManifestInvalid):
        check_file_name(name)


def test_a_manifest_from_a_peer_is_validated(tmp_path: Path) -> None:
    good = build_manifest(random_file(tmp_path / "f.bin", 100_000), 16 * KIB).to_json()
    assert PieceManifest.from_json(good).count == 7
    for change in (
        {"name": "../../root/.bashrc"},
        {"pieces": good["pieces"][:-1]},
        {"sha256": "ABC"},
        {"pieceSize": 1},
        {"size": -1},
        {"format": 99},
        {"segments": [[0, 10, good["sha256"], "tensor", "t"]]},  # does not reach the end
    ):
        with pytest.raises(ManifestInvalid):
            PieceManifest.from_json({**good, **change})


# -- delta updates


def test_metadata_edit_moves_only_the_header(tmp_path: Path) -> None:
    old = _gguf(tmp_path / "old.gguf")
    new = rewrite_gguf(old, tmp_path / "new.gguf", extra_metadata={"tightwad.note": "x" * 37})
    new_manifest = build_manifest(new, 64 * KIB)
    assert new.stat().st_size != old.stat().st_size  # every tensor moved
    index = ContentIndex()
    index.add(build_manifest(old, 64 * KIB), old)
    rebuilt, fetched = _rebuild(new_manifest, index, new)
    assert rebuilt == new.read_bytes()
    header = new_manifest.segments[0].length
    assert fetched <= header + 4096 and fetched < new.stat().st_size // 20


def test_a_file_with_nothing_local_is_fetched_whole(tmp_path: Path) -> None:
    path = random_file(tmp_path / "r.bin", 200_000)
    manifest = build_manifest(path, 64 * KIB)
    assert plan_all(manifest, ContentIndex()) == {}
    assert plan_piece(manifest, 3, ContentIndex()) == (Fetch(3 * 64 * KIB, 200_000 - 3 * 64 * KIB),)


def test_identical_pieces_are_copied_whole(tmp_path: Path) -> None:
    path = random_file(tmp_path / "r.bin", 200_000)
    manifest = build_manifest(path, 64 * KIB)
    index = ContentIndex()
    index.add(manifest, path)
    plans = plan_all(manifest, index)
    assert len(plans) == manifest.count and all(fetched_bytes(p) == 0 for p in plans.values())


# -- selection


def test_first_piece_is_random_then_rarest_first() -> None:
    rng = random.Random(1)
    peer = Bitfield(10, range(10))
    counts = [3, 1, 2, 1, 3, 3, 3, 3, 3, 3]
    firsts = {pick_piece(peer, set(range(10)), counts, rng, random_first=True) for _ in range(50)}
    assert len(firsts) > 5  # spread over the candidates
    rarest = {pick_piece(peer, set(range(10)), counts, rng, random_first=False) for _ in range(50)}
    assert rarest == {1, 3}
    assert pick_piece(peer, {1, 3, 5}, counts, rng, random_first=False, excluded={1, 3}) == 5
    assert pick_piece(Bitfield(10, [0]), {2}, counts, rng, random_first=False) is None


def test_availability_counts_live_have_maps() -> None:
    assert availability(4, [Bitfield(4, [0, 1]), Bitfield(4, [1]), Bitfield(5, [2])]) == [1, 2, 0, 0]


def test_endgame_races_the_oldest_request_only_when_it_is_late() -> None:
    have = Bitfield(5, range(5))
    in_flight = {1: {"a"}, 2: {"b"}, 3: {"me"}, 4: {"a", "b"}}
    started = {1: 10.0, 2: 5.0, 3: 1.0, 4: 0.0}
    assert pick_endgame("me", have, in_flight, started, now=12.0) == 2  # oldest that is not mine or full
    assert pick_endgame("me", have, in_flight, started, now=12.0, min_age=5.0) == 2
    assert pick_endgame("me", have, in_flight, started, now=12.0, min_age=8.0) is None
    assert pick_endgame("me", have, in_flight, started, now=12.0, excluded={1, 2}) is None


# -- scoring


def test_failures_back_off_and_corruption_bans() -> None:
    score = PeerScore(corrupt_limit=2)
    for _ in range(20):
        score.on_failure(now=100.0)
    assert score.backoff_until == 100.0 + BACKOFF_MAX and not score.usable(120.0) and score.usable(131.0)
    score.on_success(1_000_000, 0.5)
    assert score.failures == 0 and score.rate == 2_000_000
    score.on_corrupt(7, now=200.0)
    assert 7 in score.excluded and not score.banned
    score.on_corrupt(8, now=201.0)
    assert score.banned and not score.usable(1e9)
    assert PeerScore(rate=10.0).rank() > PeerScore(rate=10.0, corrupt=1).rank()


# -- tracker, ranges, upload cap, initial seeding


def test_tracker_forgets_peers_that_stop_announcing() -> None:
    now = [0.0]
    tracker = Tracker(ttl=10, clock=lambda: now[0])
    tracker.announce("a" * 64, "http://10.0.0.2:8089")
    now[0] = 5.0
    tracker.announce("a" * 64, "http://10.0.0.3:8089")
    assert tracker.peers("a" * 64) == ["http://10.0.0.2:8089", "http://10.0.0.3:8089"]
    now[0] = 12.0
    assert tracker.peers("a" * 64) == ["http://10.0.0.3:8089"]
    assert normalise_peer_url("http://h:1/") == "http://h:1"
    for bad in ("ftp://h", "http://u:p@h", "http://h/x", "http://h:99999", "h:1", None):
        assert normalise_peer_url(bad) is None


def test_tracker_forgets_files_nobody_announces_and_caps_what_it_holds() -> None:
    now = [0.0]
    tracker = Tracker(ttl=10, clock=lambda: now[0])
    tracker.announce("a" * 64, "http://10.0.0.2:8089")
    now[0] = 30.0
    tracker.announce("b" * 64, "http://10.0.0.2:8089")
    assert tracker.files == 1  # "a" expired without anyone asking for it
    for index in range(MAX_FILES + 10):
        tracker.announce(f"{index:064x}", "http://10.0.0.3:8089")
    assert tracker.files == MAX_FILES
    assert tracker.peers(f"{MAX_FILES + 9:064x}") == ["http://10.0.0.3:8089"]  # the newest are kept
    for index in range(MAX_PEERS_PER_FILE + 10):
        tracker.announce("c" * 64, f"http://10.1.{index // 250}.{index % 250}:8089")
    assert len(tracker.peers("c" * 64)) == MAX_PEERS_PER_FILE


def test_a_sha256_is_exactly_64_lowercase_hex_digits() -> None:
    assert is_sha256("a" * 64)
    for bad in ("a" * 64 + "\n", "a" * 63, "A" * 64, " " + "a" * 64, None):
        assert not is_sha256(bad)


def test_range_header_parsing() -> None:
    assert parse_range("bytes=0-99", 1000) == (0, 100)
    assert parse_range("bytes=900-", 1000) == (900, 1000)
    assert parse_range("bytes=-100", 1000) == (900, 1000)
    assert parse_range("bytes=990-2000", 1000) == (990, 1000)
    for bad in ("bytes=1000-", "bytes=0-1,5-6", "items=0-1", "bytes=-0", "bytes=5-2"):
        with pytest.raises(RangeError):
            parse_range(bad, 1000)


def test_upload_cap_holds_the_long_run_rate() -> None:
    now = [0.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    async def run() -> None:
        bucket = TokenBucket(1_000_000, burst=100_000, clock=lambda: now[0], sleep=sleep)
        for _ in range(50):
            await bucket.take(100_000)

    asyncio.run(run())
    assert 4.8 <= now[0] <= 5.0  # 5 MB at 1 MB/s, less the initial burst


def test_initial_seeding_offers_each_piece_once_then_everything() -> None:
    now = [0.0]
    ledger = UploadLedger(4, hold=10, clock=lambda: now[0])
    have = Bitfield(4, range(4))
    ledger.begin(range(0, 1))
    assert list(ledger.offer(have)) == [1, 2, 3]
    ledger.end(range(0, 1), complete=True)
    assert list(ledger.offer(have)) == [1, 2, 3]  # recently sent: a peer has it now
    ledger.begin(range(1, 2))
    ledger.end(range(1, 2), complete=False)  # aborted: offered again
    assert list(ledger.offer(have)) == [1, 2, 3]
    now[0] = 11.0
    assert list(ledger.offer(have)) == [0, 1, 2, 3]
    ledger.begin(range(1, 4))
    ledger.end(range(1, 4), complete=True)
    assert not ledger.initial and list(ledger.offer(have)) == [0, 1, 2, 3]
    ledger.begin(range(2, 3))  # after initial seeding only running uploads are hidden
    assert list(ledger.offer(have)) == [0, 1, 3]


def test_each_host_needs_the_files_of_what_it_runs(tmp_path: Path) -> None:
    from tightwad.manifest import parse_manifest
    from tightwad.swarm.sidecar import models_for_host

    (tmp_path / "draft.gguf").write_bytes(b"GGUF")
    manifest = parse_manifest(
        f"""\
apiVersion: tightwad.dev/v1alpha1
kind: TightwadCluster
metadata: {{name: two}}
spec:
  models:
    - {{name: big, source: "https://models.example/a%20b/big-q4.gguf?download=1", sha256: "{"a" * 64}"}}
    - {{name: small, source: draft.gguf}}
  hosts:
    - {{name: gpu, address: 127.0.0.1, gpus: [{{backend: cpu, port: 50152}}]}}
    - {{name: cpu, address: 127.0.0.2}}
  target: {{model: big, host: gpu}}
  drafters:
    - {{name: d, kind: llama-server, model: small, host: cpu, port: 8081}}
  proxy: {{host: gpu}}
""",
        base_dir=tmp_path,
    )
    (big,) = models_for_host(manifest, "gpu")
    assert (big.name, big.file_name, big.sha256, big.local_source) == ("big", "big-q4.gguf", "a" * 64, None)
    (small,) = models_for_host(manifest, "cpu")
    assert small.file_name == "draft.gguf" and small.local_source == tmp_path / "draft.gguf"
