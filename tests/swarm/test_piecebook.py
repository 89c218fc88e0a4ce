"""PieceBook, the pull's bookkeeping, on plain values: where each piece stands from the start of a
pull to its end, what is chosen next, endgame duplicates and their memory cap, the commit race.
The puller's tasks are stood in for by strings."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tightwad.swarm.bitfield import Bitfield
from tightwad.swarm.delta import Copy, Fetch, Fill, Step
from tightwad.swarm.piecebook import PieceBook
from tightwad.swarm.pieces import PieceManifest
from tightwad.swarm.tally import Tally

PIECE = 100


def manifest(count: int = 4, last: int = PIECE) -> PieceManifest:
    """`count` pieces of PIECE bytes, the last one `last` bytes long (hashes are never checked here)."""
    size = (count - 1) * PIECE + last
    return PieceManifest("f.bin", size, "0" * 64, PIECE, tuple(f"{i:064x}" for i in range(count)))


def book(count: int = 4, held: tuple[int, ...] = (), last: int = PIECE) -> PieceBook[str]:
    """A book at the start of a pull that resumed holding `held`, with no local bytes."""
    have = Bitfield(count, held)
    fresh: PieceBook[str] = PieceBook(manifest(count, last), have)
    fresh.plan(have.copy(), {})
    return fresh


def everyone(count: int) -> Bitfield:
    return Bitfield(count, range(count))


def test_a_fresh_pull_wants_every_piece_it_does_not_hold() -> None:
    b = book(4, held=(1,))
    assert b.wanted == {0, 2, 3} and not b.local_pending and not b.in_flight
    assert b.missing == 3 and b.held_bytes() == PIECE and not b.all_requested


def test_the_plan_splits_local_pieces_from_fetched_ones_and_ignores_resumed_ones() -> None:
    m = manifest(4)
    local: tuple[Step, ...] = (Copy(0, PIECE, Path("old.gguf"), 0),)
    mixed: tuple[Step, ...] = (Fill(PIECE, 10), Fetch(PIECE + 10, PIECE - 10))
    resumed = Bitfield(4, [3])
    b: PieceBook[str] = PieceBook(m, resumed.copy())
    b.plan(resumed, {0: local, 1: mixed, 3: local})
    assert b.local_pending == {0}  # every byte local: rebuilt without a peer
    assert b.wanted == {1, 2}  # piece 1 mixes local and fetched bytes: a peer is still needed
    assert b.partly_local == 1 and 3 not in b.plans
    assert b.steps(1) == mixed
    assert b.steps(2) == (Fetch(2 * PIECE, PIECE),)  # no plan: the whole piece


def test_a_local_rebuild_that_fails_is_fetched_whole() -> None:
    m = manifest(2)
    resumed = Bitfield(2)
    b: PieceBook[str] = PieceBook(m, resumed.copy())
    b.plan(resumed, {0: (Copy(0, PIECE, Path("old.gguf"), 0),), 1: (Copy(PIECE, PIECE, Path("old"), 0),)})
    b.local_done(0, ok=True)
    b.local_done(1, ok=False)
    assert not b.local_pending and b.wanted == {1}
    assert b.steps(1) == (Fetch(PIECE, PIECE),)


def test_dropping_a_stale_plan_fetches_the_piece_whole_next_time() -> None:
    resumed = Bitfield(2)
    b: PieceBook[str] = PieceBook(manifest(2), resumed.copy())
    b.plan(resumed, {1: (Fill(PIECE, 10), Fetch(PIECE + 10, PIECE - 10))})
    b.drop_plan(1)
    assert b.steps(1) == (Fetch(PIECE, PIECE),)


def test_a_request_takes_the_piece_out_of_wanted_and_an_unsuccessful_end_puts_it_back() -> None:
    b = book(3)
    b.start(1, "http://a", "task-a", now=5.0, duplicate=False)
    assert b.wanted == {0, 2} and b.in_flight == {1: {"http://a": "task-a"}} and b.started == {1: 5.0}
    b.finish(1, "http://a", duplicate=False)  # ended without the piece (error, cancelled, corrupt)
    assert b.wanted == {0, 1, 2} and not b.in_flight and not b.started


def test_a_committed_piece_is_not_wanted_again() -> None:
    b = book(2)
    b.start(0, "http://a", "task-a", now=0.0, duplicate=False)
    assert b.can_commit(0)
    b.begin_commit(0)
    assert not b.can_commit(0)  # a rival that verifies now loses the race
    b.have.add(0)  # what the storage layer's mark_have does
    b.end_commit(0)
    b.finish(0, "http://a", duplicate=False)
    assert not b.can_commit(0) and b.wanted == {1} and not b.in_flight and b.missing == 1


def test_the_first_piece_is_random_then_rarest_first() -> None:
    b = book(4)
    holders = [everyone(4), everyone(4), Bitfield(4, [2, 3]), Bitfield(4, [3])]
    counts = b.count_holders(holders)
    assert counts == [2, 2, 3, 4]
    first = {b.next_piece(everyone(4), random.Random(seed)) for seed in range(40)}
    assert first == {0, 1, 2, 3}  # nothing held yet: any piece at all
    b.have.add(3)
    b.wanted.discard(3)
    picks = {b.next_piece(everyone(4), random.Random(seed)) for seed in range(40)}
    assert picks == {0, 1}  # the rarest wanted pieces, ties broken at random


def test_a_peer_is_offered_only_pieces_it_holds_and_has_not_failed() -> None:
    b = book(4, held=(0,))
    b.count_holders([everyone(4)])
    assert b.next_piece(Bitfield(4, [0]), random.Random(0)) is None  # it holds only what we hold
    assert b.next_piece(Bitfield(4, [1, 2]), random.Random(0), excluded={1, 2}) is None
    assert b.next_piece(Bitfield(4, [1, 2]), random.Random(0), excluded={1}) == 2


def test_holders_are_recounted_only_after_the_peers_change() -> None:
    b = book(2)
    assert b.count_holders([Bitfield(2, [0])]) == [1, 0]
    assert b.count_holders([everyone(2), everyone(2)]) == [1, 0]  # cached: nothing said it changed
    b.peers_changed()
    assert b.count_holders([everyone(2), everyone(2)]) == [2, 2]


def test_choosing_before_counting_is_a_programming_error() -> None:
    with pytest.raises(RuntimeError):
        book(2).next_piece(everyone(2), random.Random(0))


def test_endgame_starts_only_when_everything_is_requested_or_held() -> None:
    resumed = Bitfield(2)
    b: PieceBook[str] = PieceBook(manifest(2), resumed.copy())
    b.plan(resumed, {0: (Copy(0, PIECE, Path("old.gguf"), 0),)})
    b.start(1, "http://a", "a1", now=0.0, duplicate=False)
    assert not b.all_requested  # piece 0 is still being rebuilt locally
    b.local_done(0, ok=True)
    assert b.all_requested


def test_endgame_duplicates_the_oldest_request_another_peer_could_serve() -> None:
    b = book(3)
    b.start(0, "http://a", "a0", now=1.0, duplicate=False)
    b.start(1, "http://a", "a1", now=2.0, duplicate=False)
    b.start(2, "http://b", "b2", now=3.0, duplicate=False)
    pick = b.next_duplicate("http://b", everyone(3), now=10.0, min_age=0.5, memory=1 << 20)
    assert pick == 0  # the oldest request not already its own
    assert b.next_duplicate("http://b", everyone(3), now=1.2, min_age=0.5, memory=1 << 20) is None
    assert b.next_duplicate("http://c", Bitfield(3, [2]), now=10.0, min_age=0.5, memory=1 << 20) == 2


def test_endgame_duplicates_fit_in_their_memory_and_release_it_when_they_end() -> None:
    b = book(3, last=40)
    for piece, when in ((0, 0.0), (2, 1.0), (1, 2.0)):  # oldest first: 0, then the short last piece
        b.start(piece, "http://a", f"a{piece}", now=when, duplicate=False)
    assert b.next_duplicate("http://b", everyone(3), now=9.0, min_age=0.0, memory=PIECE - 1) is None
    piece = b.next_duplicate("http://b", everyone(3), now=9.0, min_age=0.0, memory=PIECE)
    assert piece == 0
    b.start(0, "http://b", "b0", now=9.0, duplicate=True)
    assert b.endgame_bytes == PIECE and b.in_flight[0] == {"http://a": "a0", "http://b": "b0"}
    assert b.started[0] == 0.0  # the piece's age is its oldest request's
    # The next oldest is the short last piece (40 bytes): it fits beside the first duplicate or not.
    assert b.next_duplicate("http://b", everyone(3), now=9.0, min_age=0.0, memory=PIECE + 39) is None
    assert b.next_duplicate("http://b", everyone(3), now=9.0, min_age=0.0, memory=PIECE + 40) == 2
    b.finish(0, "http://b", duplicate=True)
    assert b.endgame_bytes == 0 and b.in_flight[0] == {"http://a": "a0"} and 0 not in b.wanted


def test_the_winner_cancels_its_rivals_and_a_stop_cancels_everything() -> None:
    b = book(2)
    b.start(0, "http://a", "a0", now=0.0, duplicate=False)
    b.start(0, "http://b", "b0", now=1.0, duplicate=True)
    b.start(1, "http://b", "b1", now=1.0, duplicate=False)
    assert b.rivals(0, "b0") == [("http://a", "a0")]
    assert b.rivals(1, "b1") == []
    assert sorted(b.handles()) == ["a0", "b0", "b1"]


def test_the_tally_counts_bytes_by_origin_and_requests_in_progress() -> None:
    tally = Tally(last_progress=0.0)
    tally.received("r1", 10, 10)
    tally.received("r1", 5, 15)
    tally.received("r2", 7, 7)
    assert tally.bytes_fetched == 22 and tally.in_progress == 22
    tally.request_ended("r1")
    assert tally.in_progress == 7 and tally.bytes_fetched == 22
    tally.fetched_piece(local_bytes=30, now=4.0)
    tally.local_piece(100, now=6.0)
    assert (tally.pieces_fetched, tally.pieces_local, tally.bytes_local) == (1, 1, 130)
    assert tally.idle(9.0) == 3.0
    tally.request_took(2.0)
    tally.request_took(1.0)
    assert tally.piece_seconds == pytest.approx(1.8)  # the first one, then a moving average
