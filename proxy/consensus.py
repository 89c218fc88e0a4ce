"""Consensus rules — APPROXIMATE mode. Pure functions, no I/O.

When drafters agree on the next tokens, consensus mode emits them WITHOUT asking the target: faster,
but the output is no longer guaranteed to be the target's (an agreeing set of drafters can still be
wrong). It is opt-in and labelled approximate everywhere (config note, /v1/models metadata, the
`X-Tightwad-Approximate: consensus` response header, stats).

Given the drafts of one round (token tuples, one per drafter that answered, out of `n_drafters`
asked), `agreed(drafts, policy, n_drafters)` is the prefix the drafters agree on (nothing when
fewer than two drafters answered: one drafter alone is never a consensus):

- `strict`:       every drafter asked proposed a token at the position and all are identical.
- `majority`:     one token is proposed by more than half of the drafters asked, counting only
                  drafters whose draft followed the agreed prefix so far.
- `any_disagree`: skip while no drafter disagrees on a position that any of them proposed: a drafter
                  with a shorter draft (or none) does not object, a different token does.

On the same drafts the three differ, e.g. with drafts [A B C D], [A], [A B]: strict agrees on 1
token (the second drafter stops), majority on 2 (C has one vote of three), any_disagree on 4
(nobody contradicts C or D).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

POLICIES = ("strict", "majority", "any_disagree")
MIN_VOICES = 2  # drafts that must have answered before any policy may skip the target


def agreed(drafts: Sequence[Sequence[int]], policy: str, n_drafters: int | None = None) -> list[int]:
    """The tokens the drafters agree on under `policy` (possibly none)."""
    if policy not in POLICIES:
        raise ValueError(f"consensus policy {policy!r} is not one of {', '.join(POLICIES)}")
    n = max(n_drafters if n_drafters is not None else len(drafts), len(drafts))
    if len(drafts) < MIN_VOICES:
        return []  # one drafter alone is never a consensus
    if policy == "strict":
        return _strict(drafts, n)
    if policy == "majority":
        return _majority(drafts, n)
    return _any_disagree(drafts)


def _strict(drafts: Sequence[Sequence[int]], n: int) -> list[int]:
    if len(drafts) < n:
        return []  # a drafter that did not answer is not "all identical"
    out: list[int] = []
    for column in zip(*drafts, strict=False):  # stops at the shortest draft
        if len(set(column)) != 1:
            break
        out.append(column[0])
    return out


def _majority(drafts: Sequence[Sequence[int]], n: int) -> list[int]:
    out: list[int] = []
    alive = [tuple(d) for d in drafts]
    i = 0
    while True:
        votes = Counter(d[i] for d in alive if len(d) > i)
        if not votes:
            return out
        token, count = votes.most_common(1)[0]
        if 2 * count <= n:
            return out
        out.append(token)
        alive = [d for d in alive if len(d) > i and d[i] == token]
        i += 1


def _any_disagree(drafts: Sequence[Sequence[int]]) -> list[int]:
    out: list[int] = []
    i = 0
    while True:
        proposed = {d[i] for d in drafts if len(d) > i}
        if len(proposed) != 1:  # nobody proposed anything here, or someone disagrees
            return out
        out.append(proposed.pop())
        i += 1
