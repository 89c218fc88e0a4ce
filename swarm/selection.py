"""Which piece to ask a peer for next. Pure functions over have-maps; the puller supplies the state.

- Random first piece: until we hold something we have nothing to share, and the rarest piece is
  where every newcomer would collide; any piece is as good as another, so pick one at random.
- Rarest first (counted over the live have-maps): spreads pieces only a few peers hold before
  those peers leave, and keeps the origin busy with bytes no one else can serve.
- Endgame: once every missing piece is already requested, ask a second peer for the slowest ones;
  the first verified copy wins and the other request is cancelled.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Mapping

from tightwad.swarm.bitfield import Bitfield


def availability(count: int, have_maps: Iterable[Bitfield]) -> list[int]:
    """How many of the given peers hold each piece."""
    counts = [0] * count
    for have in have_maps:
        if have.count != count:
            continue
        for index in have:
            counts[index] += 1
    return counts


def pick_piece(
    peer_has: Bitfield,
    wanted: Collection[int],
    counts: list[int],
    rng: random.Random,
    *,
    random_first: bool,
    excluded: Collection[int] = (),
) -> int | None:
    """A piece from `wanted` (missing and not requested) that this peer holds: random while we hold
    nothing, else one of the rarest, ties broken at random. None when the peer has none of them."""
    if not peer_has:
        return None  # the common case for a newcomer's peers: nothing to scan
    whole = peer_has.complete and peer_has.count == len(counts)
    candidates = list(wanted) if whole else peer_has.select(wanted)
    if excluded:
        candidates = [index for index in candidates if index not in excluded]
    if not candidates:
        return None
    if random_first:
        return rng.choice(candidates)
    rarest = min(counts[index] for index in candidates)
    return rng.choice([index for index in candidates if counts[index] == rarest])


def pick_endgame(
    peer: str,
    peer_has: Bitfield,
    in_flight: Mapping[int, Collection[str]],
    started: Mapping[int, float],
    *,
    now: float,
    min_age: float = 0.0,
    max_fetchers: int = 2,
    excluded: Collection[int] = (),
) -> int | None:
    """A piece already being fetched from other peers that `peer` could race for: the one whose
    request started longest ago (most likely stuck on a slow peer), and only once that request is
    older than `min_age` (a request still on schedule is not worth a duplicate). None when nothing
    qualifies."""
    candidates = [
        index
        for index, fetchers in in_flight.items()
        if peer not in fetchers
        and len(fetchers) < max_fetchers
        and index in peer_has
        and index not in excluded
        and now - started.get(index, now) >= min_age
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda index: started.get(index, 0.0))
