"""The bookkeeping of one pull: which pieces are wanted, rebuilt locally, requested from whom, being
committed, and how much memory endgame duplicates hold. Pure (no I/O, no clock, no event loop):
the puller records what it does here and asks it what to do next, so every rule can be tested
with plain values.

A piece is in exactly one of these places until it is held:
- `local_pending`: every byte of it exists locally; a worker thread rebuilds it (no peer needed);
- `wanted`: missing and not requested; the next free peer slot that holds it takes it;
- `in_flight`: requested from one peer, or from two during the endgame (piece -> peer -> handle).
A request that ends without the piece puts it back into `wanted`; one that commits it ends there.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Mapping
from typing import Generic, TypeVar

from tightwad.swarm.bitfield import Bitfield
from tightwad.swarm.delta import Fetch, Step
from tightwad.swarm.pieces import PieceManifest
from tightwad.swarm.selection import availability, pick_endgame, pick_piece

Handle = TypeVar("Handle")  # what stands for one request: the puller's asyncio task, anything in tests


class PieceBook(Generic[Handle]):
    """Where each piece of `manifest` stands. `have` is the download's own have-map (shared, marked
    by the storage layer when a piece is committed), so "held" has one source of truth."""

    def __init__(self, manifest: PieceManifest, have: Bitfield) -> None:
        self.manifest = manifest
        self.have = have
        self.plans: dict[int, tuple[Step, ...]] = {}  # delta plans: pieces with some bytes local
        self.wanted: set[int] = set()
        self.local_pending: set[int] = set()
        self.in_flight: dict[int, dict[str, Handle]] = {}
        self.started: dict[int, float] = {}  # when the piece's oldest live request started
        self.committing: set[int] = set()
        self.endgame_bytes = 0  # duplicates buffer whole pieces in memory: capped by the caller
        self._counts: list[int] | None = None  # holders per piece, over the live have-maps

    # -- the start

    def plan(self, resumed: Bitfield, plans: Mapping[int, tuple[Step, ...]]) -> None:
        """Start from what a resumed download already holds and the delta plans: pieces whose every
        byte is local are rebuilt locally, every other missing piece is wanted from peers."""
        self.plans = {index: steps for index, steps in plans.items() if index not in resumed}
        self.local_pending = {
            index for index, steps in self.plans.items() if not any(isinstance(step, Fetch) for step in steps)
        }
        self.wanted = set(resumed.missing()) - self.local_pending

    @property
    def partly_local(self) -> int:
        """Pieces that mix local bytes with fetched ones."""
        return len(self.plans) - len(self.local_pending)

    def steps(self, piece: int) -> tuple[Step, ...]:
        """How to rebuild `piece`: its delta plan, or one fetch of the whole piece."""
        start, end = self.manifest.span(piece)
        return self.plans.get(piece) or (Fetch(start, end - start),)

    def drop_plan(self, piece: int) -> None:
        """The local bytes of `piece` proved stale: fetch the whole piece from now on."""
        self.plans.pop(piece, None)

    def local_done(self, piece: int, ok: bool) -> None:
        """A local rebuild ended; one that did not verify (a local file changed) is fetched instead."""
        self.local_pending.discard(piece)
        if not ok:
            self.plans.pop(piece, None)
            self.wanted.add(piece)

    # -- choosing

    def peers_changed(self) -> None:
        """A have-map appeared, changed or went away: count holders again before the next choice."""
        self._counts = None

    def count_holders(self, have_maps: Iterable[Bitfield]) -> list[int]:
        """Holders per piece (the rarest-first input), recounted only after `peers_changed`."""
        if self._counts is None:
            self._counts = availability(self.manifest.count, have_maps)
        return self._counts

    def next_piece(
        self, peer_has: Bitfield, rng: random.Random, excluded: Collection[int] = ()
    ) -> int | None:
        """A wanted piece this peer holds: random while we hold nothing, else one of the rarest."""
        if self._counts is None:
            raise RuntimeError("count_holders() comes before next_piece()")
        return pick_piece(
            peer_has,
            self.wanted,
            self._counts,
            rng,
            random_first=len(self.have) == 0,
            excluded=excluded,
        )

    @property
    def all_requested(self) -> bool:
        """Nothing is left to hand out: the endgame may duplicate slow requests."""
        return not self.wanted and not self.local_pending

    def next_duplicate(
        self,
        peer: str,
        peer_has: Bitfield,
        *,
        now: float,
        min_age: float,
        memory: int,
        excluded: Collection[int] = (),
    ) -> int | None:
        """An endgame race for `peer`: the oldest request it could duplicate, if the duplicate's
        buffer still fits in `memory` bytes."""
        smallest = self.manifest.piece_length(self.manifest.count - 1) if self.manifest.count else 0
        if self.endgame_bytes + min(smallest, self.manifest.piece_size) > memory:
            return None  # not even the smallest piece fits: no need to look for one
        piece = pick_endgame(
            peer, peer_has, self.in_flight, self.started, now=now, min_age=min_age, excluded=excluded
        )
        if piece is None or self.endgame_bytes + self.manifest.piece_length(piece) > memory:
            return None
        return piece

    # -- requests

    def start(self, piece: int, peer: str, handle: Handle, *, now: float, duplicate: bool) -> None:
        """`peer` was asked for `piece`."""
        self.in_flight.setdefault(piece, {})[peer] = handle
        self.started.setdefault(piece, now)
        self.wanted.discard(piece)
        if duplicate:
            self.endgame_bytes += self.manifest.piece_length(piece)

    def finish(self, piece: int, peer: str, *, duplicate: bool) -> None:
        """`peer`'s request for `piece` ended, however it ended; an unheld piece is wanted again."""
        fetchers = self.in_flight.get(piece, {})
        fetchers.pop(peer, None)
        if not fetchers:
            self.in_flight.pop(piece, None)
            self.started.pop(piece, None)
        if duplicate:
            self.endgame_bytes -= self.manifest.piece_length(piece)
        if piece not in self.have and piece not in self.in_flight:
            self.wanted.add(piece)

    def rivals(self, piece: int, handle: Handle) -> list[tuple[str, Handle]]:
        """The other live requests for `piece` (peer, handle): cancelled when this one commits."""
        return [(peer, other) for peer, other in self.in_flight.get(piece, {}).items() if other is not handle]

    def handles(self) -> list[Handle]:
        """Every live request, to cancel when the pull stops."""
        return [handle for fetchers in self.in_flight.values() for handle in fetchers.values()]

    # -- committing

    def can_commit(self, piece: int) -> bool:
        """False once another request for `piece` has committed it or is committing it now."""
        return piece not in self.have and piece not in self.committing

    def begin_commit(self, piece: int) -> None:
        self.committing.add(piece)

    def end_commit(self, piece: int) -> None:
        self.committing.discard(piece)

    # -- what is held

    @property
    def missing(self) -> int:
        return self.manifest.count - len(self.have)

    def held_bytes(self) -> int:
        return sum(self.manifest.piece_length(index) for index in self.have)
