"""Which requests to start now: every usable peer's free slots filled, best-ranked peers first,
rarest pieces first, then (once every missing piece is requested) endgame duplicates of the
slowest requests. Pure: the puller (real requests) and the swarm simulation (bench/swarm_sim.py,
simulated links) both start what this yields, so the simulation measures the product's choices.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sized
from typing import Any, Protocol, TypeVar

from tightwad.swarm.bitfield import Bitfield
from tightwad.swarm.piecebook import PieceBook
from tightwad.swarm.scoring import PeerScore


class Peer(Protocol):
    """What the choice reads of a peer: its have-map (None: unknown), score and running requests."""

    @property
    def url(self) -> str: ...

    @property
    def have(self) -> Bitfield | None: ...

    @property
    def score(self) -> PeerScore: ...

    @property
    def active(self) -> Sized: ...


P = TypeVar("P", bound=Peer)


def plan_requests(
    book: PieceBook[Any],
    peers: Iterable[P],
    rng: random.Random,
    *,
    now: float,
    slots: int,
    min_age: float,
    memory: int,
) -> Iterator[tuple[P, int, bool]]:
    """Yield (peer, piece, duplicate) for each request to start. The caller starts each one (records
    it in `book` with `book.start` and in the peer's `active`) before asking for the next: the
    choices that follow depend on it."""
    live = [p for p in peers if p.have is not None and p.score.usable(now)]
    book.count_holders(p.have for p in live if p.have is not None)
    rng.shuffle(live)  # equal ranks in random order
    live.sort(key=lambda p: p.score.rank(), reverse=True)
    for peer in live:
        assert peer.have is not None
        while len(peer.active) < slots and book.wanted:
            piece = book.next_piece(peer.have, rng, peer.score.excluded)
            if piece is None:
                break
            yield peer, piece, False
    if not book.all_requested:
        return
    for peer in live:  # endgame: everything missing is requested; race the slow ones
        assert peer.have is not None
        while len(peer.active) < slots:
            piece = book.next_duplicate(
                peer.url,
                peer.have,
                now=now,
                min_age=min_age,
                memory=memory,
                excluded=peer.score.excluded,
            )
            if piece is None:
                break
            yield peer, piece, True
