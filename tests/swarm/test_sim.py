"""The swarm simulation (bench/swarm_sim.py) on networks small enough to know the answer: the product's
piece choices over modelled links come within a small factor of the lower bound, and a peer that
leaves mid-transfer does not stall the others. Plus the pure request choice it drives."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from swarm_sim import MBIT, MIB, Scenario, simulate

from tightwad.swarm.assign import plan_requests
from tightwad.swarm.bitfield import Bitfield
from tightwad.swarm.piecebook import PieceBook
from tightwad.swarm.pieces import PieceManifest
from tightwad.swarm.scoring import PeerScore

SIZE = 1024 * MIB
LINK = 100 * MBIT


def equal(hosts: int, **changes: object) -> Scenario:
    """1 origin + `hosts` peers, every link 100 Mbit/s both ways, 16 MiB pieces, no random churn."""
    settings: dict[str, object] = dict(
        size=SIZE,
        piece_size=16 * MIB,
        origin_up=LINK,
        uplinks=[LINK] * hosts,
        joins={},
        leaves={},
        neighbours=hosts,
        refresh=1.0,
    )
    settings.update(changes)
    return Scenario(hosts, **settings)  # type: ignore[arg-type]


def test_three_equal_peers_finish_near_the_bound() -> None:
    result = simulate(equal(3))
    # Every byte leaves the origin once: F / U. The summed uplinks (3F / 4U) bound it less.
    assert result.bound == pytest.approx(SIZE / LINK)
    assert result.stayed == 3 and len(result.per_host) == 3
    assert result.bound <= result.all_done <= 1.3 * result.bound, result
    # Peers take most pieces from each other: the origin sends little more than one copy.
    assert result.origin_uploaded < 1.5 * SIZE, result


def test_a_peer_leaving_mid_transfer_does_not_stall_the_others() -> None:
    steady = simulate(equal(3))
    leaving = simulate(equal(3, leaves={0: 0.4 * SIZE / LINK}))
    assert leaving.stayed == 2 and leaving.left == 1
    assert len(leaving.per_host) == 2
    # The two who stay lose a third of the upload capacity for the rest of the transfer, not more.
    assert leaving.all_done <= 1.5 * leaving.bound, leaving
    assert leaving.all_done <= 1.4 * steady.all_done, (leaving, steady)


def test_a_late_joiner_is_bounded_by_its_own_start() -> None:
    late = 0.5 * SIZE / LINK
    result = simulate(equal(3, joins={2: late}))
    assert result.bound == pytest.approx(late + SIZE / LINK)
    assert result.all_done <= 1.3 * result.bound, result


def test_the_slowest_downlink_sets_the_bound() -> None:
    slow = 10 * MBIT
    result = simulate(equal(3, uplinks=[LINK, LINK, slow]))
    assert result.bound == pytest.approx(SIZE / slow)  # its downlink equals its uplink
    assert result.all_done <= 1.2 * result.bound, result


def _book(count: int, held: tuple[int, ...] = ()) -> PieceBook[str]:
    manifest = PieceManifest("f", count * 10, "0" * 64, 10, tuple("0" * 64 for _ in range(count)))
    have = Bitfield(count, held)
    book: PieceBook[str] = PieceBook(manifest, have)
    book.plan(have, {})
    return book


class _Peer:
    def __init__(self, url: str, have: Bitfield, rate: float = 0.0) -> None:
        self.url = url
        self.have: Bitfield | None = have
        self.score = PeerScore(rate=rate)
        self.active: dict[int, str] = {}


def _start_all(book: PieceBook[str], peers: list[_Peer], now: float = 0.0) -> list[tuple[str, int, bool]]:
    started = []
    for peer, piece, duplicate in plan_requests(
        book, peers, random.Random(1), now=now, slots=2, min_age=1.0, memory=1 << 20
    ):
        book.start(piece, peer.url, peer.url, now=now, duplicate=duplicate)
        peer.active[piece] = peer.url
        started.append((peer.url, piece, duplicate))
    return started


def test_plan_requests_fills_two_slots_per_peer_fastest_first() -> None:
    book = _book(8, held=(7,))  # we hold something: rarest first, not random
    fast = _Peer("fast", Bitfield(8, range(8)), rate=1000.0)
    slow = _Peer("slow", Bitfield(8, [0, 1, 2]), rate=10.0)
    started = _start_all(book, [slow, fast])
    assert [url for url, _, _ in started] == ["fast", "fast", "slow", "slow"]
    # Pieces only "fast" holds are the rarest: it is asked for those first.
    assert {piece for url, piece, _ in started if url == "fast"} <= {3, 4, 5, 6}
    assert not any(duplicate for _, _, duplicate in started)


def test_plan_requests_races_old_requests_once_everything_is_requested() -> None:
    book = _book(2)
    first = _Peer("a", Bitfield(2, [0, 1]))
    assert len(_start_all(book, [first])) == 2 and book.all_requested
    second = _Peer("b", Bitfield(2, [0, 1]))
    assert _start_all(book, [first, second], now=0.5) == []  # younger than min_age
    raced = _start_all(book, [first, second], now=2.0)
    assert sorted(raced) == [("b", 0, True), ("b", 1, True)]


def test_bitfield_select_agrees_with_membership() -> None:
    rng = random.Random(3)
    field = Bitfield(77, rng.sample(range(77), 30))
    indexes = [rng.randrange(-5, 90) for _ in range(200)]
    assert field.select(indexes) == [i for i in indexes if i in field]
