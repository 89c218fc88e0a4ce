"""The swarm at 100 / 1000 / 10,000 hosts, simulated: the product's piece choices over a modelled network.

    .venv/bin/python bench/swarm_sim.py [--sizes 100,1000,10000] [--size 40GB] [--seed 1]

What is real: every choice a puller and the origin make is the product's code, called as the
puller calls it. `plan_requests` (swarm/assign.py) picks which piece to ask which peer for (random
first piece, rarest first, best-ranked peers first, two slots per peer, endgame duplicates within
the endgame memory); `PieceBook` keeps where each piece stands; `PeerScore` ranks peers and backs
off the ones that vanished; `Tally` times requests for the endgame; the origin shows peers what its
`UploadLedger` offers (initial seeding). What is modelled: the network and the clock.

- Hosts: one origin with a 10 Gbit/s uplink and N hosts whose NICs are 100 Mbit/s, 1 Gbit/s or
  10 Gbit/s (a third each, in random order); downlink = uplink unless --downlink says otherwise;
  a request's first byte arrives one round trip (--rtt) after it is sent.
- Flows share links: each link divides its capacity max-min fairly among its flows, each flow capped
  at its other end's equal share; a flow runs at the smaller of its two shares. Both links of a flow
  are recomputed when it starts or ends. This is a local form of max-min fairness: it never puts
  more on a link than it carries, and may leave a little idle (so the times are, if anything, long).
- Each host knows the origin and --neighbours hosts drawn at random (the tracker hands out up to
  200), sees their have-maps as they change, and runs the puller's choice when a request of its own
  ends and on every --refresh tick (the puller's have-map refresh).
- Churn: 10% of the hosts join at a random moment in the first half of the bound, 5% leave for good
  at a random moment (their uploads fail at the receivers, as a refused connection does).
- Departures from the product, for CPU: rarest-first counts holders over the whole swarm, not over
  each host's neighbours (recounting 50 have-maps on every refresh of every host is where the CPU
  would go); a request to the origin is checked against what it offers when it is chosen, not when
  it arrives one round trip later; pieces are 64 MiB (the product's default) while hosts x pieces
  stays under 100,000, coarser beyond (doubling up to the product's 1 GiB maximum: 512 MiB for
  1000 hosts, 1 GiB for 10,000), the have-map refresh keeps its ratio to a piece (1 s per 64 MiB)
  and the endgame memory too (the product's 256 MiB is 4 default pieces: 4 pieces here). Coarser
  pieces cost time: 100 hosts take 1.27x the bound with 512 MiB pieces, 1.10x with 64 MiB.

The lower bound on the time until every host holds the file, for a file of F bytes:

    T* = max( F / U_origin,                 every byte leaves the origin at least once
              max_h (join_h + F / D_h),     every host receives the whole file through its downlink
              N F / (U_origin + sum_h U_h)) all N copies go up through the uplinks together

(the third is what the network-namespace benchmark meets with equal uplinks: N / (N + 1) of the
first). Printed: time until every host that stays holds the file, T / T*, per-host download times
(p50, p99, from the host's start), bytes uploaded by the origin, CPU seconds of the simulation.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tightwad.swarm.assign import plan_requests
from tightwad.swarm.bitfield import Bitfield
from tightwad.swarm.piecebook import PieceBook
from tightwad.swarm.pieces import MAX_PIECE_SIZE, PieceManifest
from tightwad.swarm.puller import PullOptions
from tightwad.swarm.scoring import PeerScore
from tightwad.swarm.seeding import UploadLedger
from tightwad.swarm.tally import Tally

if TYPE_CHECKING:
    from rich.table import Table

MBIT = 1e6 / 8  # bytes/s
GB = 1e9
MIB = 1 << 20
REAL_PIECE = 64 * MIB  # the product's default piece size
TIERS = (100 * MBIT, 1000 * MBIT, 10_000 * MBIT)


@dataclass
class Scenario:
    hosts: int
    size: int = int(40 * GB)
    piece_size: int = REAL_PIECE
    origin_up: float = 10_000 * MBIT
    tiers: tuple[float, ...] = TIERS
    downlink: float | None = None  # None: each host's downlink equals its uplink
    neighbours: int = 50
    refresh: float = 1.0
    rtt: float = 0.001
    join_late: float = 0.10  # share of hosts joining mid-transfer
    leave: float = 0.05  # share of hosts leaving for good mid-transfer
    seed: int = 1
    slots: int = PullOptions.slots_per_peer
    # Events to set by hand (the unit tests): host index -> time. Override the random churn.
    joins: dict[int, float] | None = None
    leaves: dict[int, float] | None = None
    uplinks: list[float] | None = None  # per host; overrides the tiers


@dataclass
class Result:
    scenario: Scenario
    pieces: int
    all_done: float  # seconds until every staying host holds the file
    bound: float
    per_host: list[float]  # download seconds of each staying host, from its start
    origin_uploaded: float  # bytes
    received: float  # bytes received by all hosts, duplicates and cancelled requests included
    stayed: int
    left: int
    cpu: float
    requests: int
    endgame: int

    @property
    def ratio(self) -> float:
        return self.all_done / self.bound

    def percentile(self, q: float) -> float:
        ordered = sorted(self.per_host)
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


@dataclass(eq=False)
class Link:
    capacity: float
    flows: list[Flow] = field(default_factory=list)

    def equal_share(self) -> float:
        return self.capacity / max(1, len(self.flows))


@dataclass(eq=False)
class Flow:
    """One range request: `src` uploads `piece` to `dst`."""

    src: Host
    dst: Host
    view: View
    piece: int
    size: float
    duplicate: bool
    began: float
    remaining: float = 0.0
    rate: float = 0.0
    updated: float = 0.0
    version: int = 0
    up_share: float = 0.0
    down_share: float = 0.0
    running: bool = False  # on the links (after the round trip)
    over: bool = False


@dataclass(eq=False)
class View:
    """A peer as one puller sees it: what `plan_requests` reads (url, have, score, active)."""

    url: str
    host: Host
    score: PeerScore
    have: Bitfield | None = None
    active: dict[int, Flow] = field(default_factory=dict)


class SwarmBook(PieceBook[Flow]):
    """The product's PieceBook, with holders counted over the whole swarm (see the docstring)."""

    def __init__(self, manifest: PieceManifest, have: Bitfield, holders: list[int]) -> None:
        super().__init__(manifest, have)
        self._holders = holders

    def count_holders(self, have_maps: Any) -> list[int]:
        self._counts = self._holders
        return self._holders


@dataclass(eq=False)
class Host:
    name: str
    up: Link
    down: Link
    have: Bitfield
    join: float = 0.0
    leave: float | None = None
    online: bool = False
    book: SwarmBook | None = None
    views: list[View] = field(default_factory=list)
    tally: Tally = field(default_factory=Tally)
    rng: random.Random = field(default_factory=random.Random)
    done_at: float | None = None
    uploaded: float = 0.0
    version: int = 0  # pieces gained or lost: a neighbour's refresh compares the sum
    seen: int = -1  # the sum of the neighbours' versions at the last refresh's choice


class Swarm:
    def __init__(self, scenario: Scenario) -> None:
        self.s = scenario
        rng = random.Random(scenario.seed)
        self.rng = rng
        count = -(-scenario.size // scenario.piece_size)
        self.manifest = PieceManifest(
            "model.gguf", scenario.size, "0" * 64, scenario.piece_size, tuple("0" * 64 for _ in range(count))
        )
        self.count = count
        self.memory = 4 * scenario.piece_size  # the product's 256 MiB = 4 default pieces
        # The refresh keeps its ratio to a piece's transfer time: 1 s per 64 MiB piece.
        self.refresh = scenario.refresh * scenario.piece_size / REAL_PIECE
        self.now = 0.0
        self.heap: list[tuple[float, int, str, Any, int]] = []
        self.seq = itertools.count()
        self.holders = [1] * count  # the origin holds every piece
        origin_have = Bitfield(count, range(count))
        self.origin = Host("origin", Link(scenario.origin_up), Link(scenario.origin_up), origin_have)
        self.origin.online = True
        self.ledger = UploadLedger(count, clock=lambda: self.now)
        self.offered = origin_have.copy()  # what peers see of the origin: the ledger's offer
        self.offer_version = 0
        self.hosts: list[Host] = []
        n = scenario.hosts
        uplinks = scenario.uplinks or [scenario.tiers[i % len(scenario.tiers)] for i in range(n)]
        if scenario.uplinks is None:
            rng.shuffle(uplinks)
        for i, up in enumerate(uplinks):
            down = scenario.downlink or up
            host = Host(f"h{i:05d}", Link(up), Link(down), Bitfield(count), rng=random.Random(rng.random()))
            self.hosts.append(host)
        self.bound_before_churn = max(
            scenario.size / scenario.origin_up,
            max(scenario.size / h.down.capacity for h in self.hosts),
            n * scenario.size / (scenario.origin_up + sum(h.up.capacity for h in self.hosts)),
        )
        joins = scenario.joins
        leaves = scenario.leaves
        if joins is None:
            late = rng.sample(range(n), round(scenario.join_late * n))
            joins = {i: rng.uniform(0, 0.5 * self.bound_before_churn) for i in late}
        if leaves is None:
            stay_from_start = [i for i in range(n) if i not in joins]
            gone = rng.sample(stay_from_start, round(scenario.leave * n))
            leaves = {i: rng.uniform(0.1, 0.6) * self.bound_before_churn for i in gone}
        for i, host in enumerate(self.hosts):
            host.join = joins.get(i, 0.0)
            host.leave = leaves.get(i)
            self.push(host.join, "join", host)
            if host.leave is not None:
                self.push(host.leave, "leave", host)
        self.staying = [h for h in self.hosts if h.leave is None]
        self.waiting = len(self.staying)
        self.requests = 0
        self.endgame = 0

    # -- the clock

    def push(self, at: float, kind: str, what: Any, version: int = 0) -> None:
        heapq.heappush(self.heap, (at, next(self.seq), kind, what, version))

    def run(self) -> Result:
        began = time.process_time()
        while self.heap and self.waiting:
            at, _, kind, what, version = heapq.heappop(self.heap)
            if kind == "finish" and (what.over or version != what.version):
                continue  # a stale completion: the flow's rate changed since
            self.now = at
            getattr(self, f"on_{kind}")(what)
        if self.waiting:
            raise RuntimeError(f"{self.waiting} hosts never finished: the swarm stalled")
        staying = self.staying
        bound = max(
            self.s.size / self.s.origin_up,
            max(h.join + self.s.size / h.down.capacity for h in staying),
            len(staying) * self.s.size / (self.s.origin_up + sum(h.up.capacity for h in self.hosts)),
        )
        done = [h.done_at for h in staying if h.done_at is not None]
        return Result(
            scenario=self.s,
            pieces=self.count,
            all_done=max(done),
            bound=bound,
            per_host=[h.done_at - h.join for h in staying if h.done_at is not None],
            origin_uploaded=self.origin.uploaded,
            received=sum(h.tally.bytes_fetched for h in self.hosts),
            stayed=len(staying),
            left=len(self.hosts) - len(staying),
            cpu=time.process_time() - began,
            requests=self.requests,
            endgame=self.endgame,
        )

    # -- hosts come and go

    def on_join(self, host: Host) -> None:
        host.online = True
        host.book = SwarmBook(self.manifest, host.have, self.holders)
        host.book.plan(host.have, {})
        host.tally.last_progress = self.now
        others = [h for h in self.hosts if h is not host and (h.online or h.join <= self.now)]
        picked = self.rng.sample(others, min(self.s.neighbours, len(others)))
        views = [View("origin", self.origin, PeerScore(), self.offered)]
        views += [View(h.name, h, PeerScore(), h.have) for h in picked]
        host.views = views
        self.assign(host)
        self.push(self.now + self.refresh, "refresh", host)

    def on_leave(self, host: Host) -> None:
        host.online = False
        host.version += 1
        for piece in host.have:
            self.holders[piece] -= 1
        for flow in [f for f in host.up.flows] + [f for f in host.down.flows]:
            self.fail(flow)
        if host.book is not None:  # requests not yet on the wire
            for flow in host.book.handles():
                self.fail(flow)

    def on_refresh(self, host: Host) -> None:
        if not host.online or host.done_at is not None:
            return
        assert host.book is not None
        changed = False  # whether the choice could differ from the last one: else skip it (CPU)
        stamp = 0
        for view in host.views:
            stamp += self.offer_version if view.host is self.origin else view.host.version
            if not view.score.usable(self.now):
                changed = True  # a backoff that runs out changes the choice
                continue
            if not view.host.online:
                if view.host.join <= self.now:  # gone: the have-map request fails
                    view.score.on_failure(self.now)
                view.have = None
                changed = True
            elif view.have is None:
                view.have = self.offered if view.host is self.origin else view.host.have
                changed = True
        if changed or stamp != host.seen or host.book.all_requested:
            host.seen = stamp
            host.book.peers_changed()
            self.assign(host)
        self.push(self.now + self.refresh, "refresh", host)

    # -- requests

    def assign(self, host: Host) -> None:
        book = host.book
        if book is None or host.done_at is not None or not host.online:
            return
        chosen = plan_requests(
            book,
            host.views,
            host.rng,
            now=self.now,
            slots=self.s.slots,
            min_age=max(0.5, 2 * host.tally.piece_seconds),
            memory=self.memory,
        )
        for view, piece, duplicate in chosen:
            size = self.manifest.piece_length(piece)
            flow = Flow(view.host, host, view, piece, size, duplicate, self.now, remaining=size)
            book.start(piece, view.url, flow, now=self.now, duplicate=duplicate)
            view.active[piece] = flow
            self.requests += 1
            self.endgame += duplicate
            if view.host is self.origin:
                self.ledger.begin(range(piece, piece + 1))
                self.sync_offer()
            self.push(self.now + self.s.rtt, "open", flow)

    def on_open(self, flow: Flow) -> None:
        if flow.over:
            return
        if not flow.src.online:
            self.fail(flow)
            return
        flow.running = True
        flow.updated = self.now
        flow.src.up.flows.append(flow)
        flow.dst.down.flows.append(flow)
        self.rerate(flow.src.up, flow.dst.down)

    def end(self, flow: Flow) -> None:
        """Take `flow` off the links and out of the books; count what it moved."""
        flow.over = True
        if flow.running:
            self.settle(flow)
            flow.src.up.flows.remove(flow)
            flow.dst.down.flows.remove(flow)
            self.rerate(flow.src.up, flow.dst.down)
        moved = flow.size - flow.remaining
        flow.src.uploaded += moved
        flow.dst.tally.bytes_fetched += int(moved)
        book = flow.dst.book
        assert book is not None
        book.finish(flow.piece, flow.view.url, duplicate=flow.duplicate)
        flow.view.active.pop(flow.piece, None)
        if flow.src is self.origin:
            self.ledger.end(range(flow.piece, flow.piece + 1), complete=flow.remaining <= 0)
            self.sync_offer()
            if self.ledger.initial:  # the offer changes again when the hold runs out
                self.push(self.now + self.ledger.hold + 1e-6, "hold", None)

    def fail(self, flow: Flow) -> None:
        """A request whose peer vanished: the receiver backs the peer off and asks others."""
        if flow.over:
            return
        self.end(flow)
        dst = flow.dst
        if dst.online:
            flow.view.score.on_failure(self.now)
            flow.view.have = None
            assert dst.book is not None
            dst.book.peers_changed()
            self.assign(dst)

    def on_finish(self, flow: Flow) -> None:
        flow.remaining = 0.0
        dst = flow.dst
        book = dst.book
        assert book is not None
        won = book.can_commit(flow.piece)
        if won:
            dst.have.add(flow.piece)  # committed before the request ends, as in the puller
            dst.version += 1
            self.holders[flow.piece] += 1
            for _, rival in book.rivals(flow.piece, flow):
                self.end(rival)  # cancelled: the first verified copy wins
        self.end(flow)
        seconds = self.now - flow.began
        if won:
            flow.view.score.on_success(int(flow.size), seconds)
            dst.tally.request_took(seconds)
            dst.tally.fetched_piece(0, self.now)
            if dst.have.complete:
                dst.done_at = self.now
                for other in book.handles():
                    self.end(other)
                if dst.leave is None:
                    self.waiting -= 1
        self.assign(dst)

    def on_hold(self, _: None) -> None:
        self.sync_offer()

    def sync_offer(self) -> None:
        """Make the origin's shared view match what its ledger offers now."""
        offer = self.ledger.offer(self.origin.have)
        view = self.offered
        if len(offer) == len(view) and offer == view:
            return
        self.offer_version += 1
        for piece in range(self.count):
            if piece in offer:
                view.add(piece)
            else:
                view.discard(piece)

    # -- the network

    def settle(self, flow: Flow) -> None:
        flow.remaining = max(0.0, flow.remaining - flow.rate * (self.now - flow.updated))
        flow.updated = self.now

    def rerate(self, up: Link, down: Link) -> None:
        """Recompute the shares on the two links a flow started or ended on, and the affected rates."""
        waterfill(up, lambda f: f.dst.down.equal_share(), "up_share")
        waterfill(down, lambda f: f.src.up.equal_share(), "down_share")
        for flow in itertools.chain(up.flows, down.flows):
            rate = min(flow.up_share, flow.down_share)
            if rate == flow.rate:
                continue
            self.settle(flow)
            flow.rate = rate
            flow.version += 1
            if rate > 0:
                self.push(self.now + flow.remaining / rate, "finish", flow, flow.version)


def waterfill(link: Link, cap: Any, attr: str) -> None:
    """Max-min fair shares of `link` among its flows, each flow wanting at most `cap(flow)`."""
    flows = sorted(link.flows, key=cap)
    left, n = link.capacity, len(flows)
    for i, flow in enumerate(flows):
        fair = left / (n - i)
        share = min(cap(flow), fair)
        setattr(flow, attr, share)
        left -= share


def simulate(scenario: Scenario) -> Result:
    return Swarm(scenario).run()


def piece_size_for(hosts: int, size: int) -> int:
    """Real 64 MiB pieces while the event count allows, coarser (up to the product's 1 GiB) beyond."""
    piece = REAL_PIECE
    while piece < MAX_PIECE_SIZE and hosts * (size / piece) > 100_000:
        piece *= 2
    return piece


def rows(results: list[Result]) -> Iterator[tuple[str, ...]]:
    for r in results:
        s = r.scenario
        yield (
            f"{s.hosts} hosts",
            f"{r.pieces} x {s.piece_size // MIB} MiB",
            f"{r.all_done:.0f} s",
            f"{r.bound:.0f} s",
            f"{r.ratio:.2f}x",
            f"{r.percentile(0.5):.0f} / {r.percentile(0.99):.0f} s",
            f"{r.origin_uploaded / s.size:.2f}x",
            f"{r.stayed} + {r.left} left",
            f"{r.cpu:.1f} s",
        )


HEADER = (
    "swarm, simulated",
    "pieces",
    "all hold it",
    "bound T*",
    "T / T*",
    "per host p50 / p99",
    "origin sent",
    "hosts",
    "CPU",
)


def describe(scenario: Scenario) -> str:
    tiers = " / ".join(f"{t / MBIT:g}" for t in scenario.tiers)
    down = "= uplink" if scenario.downlink is None else f"{scenario.downlink / MBIT:g} Mbit/s"
    return (
        f"{scenario.size / GB:g} GB from one origin ({scenario.origin_up / MBIT:g} Mbit/s up); host uplinks "
        f"{tiers} Mbit/s, downlink {down}; {scenario.neighbours} neighbours, refresh {scenario.refresh:g} s, "
        f"{scenario.join_late:.0%} join late, {scenario.leave:.0%} leave"
    )


def simulate_sizes(
    sizes: list[int], *, size: int = int(40 * GB), log: Any = None, **settings: Any
) -> list[Result]:
    """One simulation per host count, pieces as `piece_size_for` says."""
    results = []
    for hosts in sizes:
        scenario = Scenario(hosts, size=size, piece_size=piece_size_for(hosts, size), **settings)
        results.append(simulate(scenario))
        if log is not None:
            log(f"simulated {hosts} hosts: {results[-1].cpu:.0f} s of CPU")
    return results


def swarm_table(results: list[Result]) -> Table:
    """The table bench/scale.py prints too."""
    from _common import table  # bench/ is on sys.path when a bench runs; not when tests import this

    title = f"Swarm, simulated: {describe(results[0].scenario)}"
    grow = growth(results)
    return table(title + (f"; {grow}" if grow else ""), HEADER, list(rows(results)))


def growth(results: list[Result]) -> str:
    """How the time until all hold the file grows with the host count, against log(N)."""
    if len(results) < 2:
        return ""
    first, last = results[0], results[-1]
    times = last.all_done / first.all_done
    bounds = last.bound / first.bound
    hosts = last.scenario.hosts / first.scenario.hosts
    return f"{hosts:g}x the hosts: {times:.2f}x the time, the bound {bounds:.2f}x"


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100,1000,10000", help="host counts (default 100,1000,10000)")
    parser.add_argument("--size", type=float, default=40.0, help="file size in GB (default 40)")
    parser.add_argument("--neighbours", type=int, default=50, help="hosts each host knows (default 50)")
    parser.add_argument("--refresh", type=float, default=1.0, help="have-map refresh per 64 MiB piece")
    parser.add_argument("--rtt", type=float, default=0.001, help="round trip, seconds (default 0.001)")
    parser.add_argument("--downlink", type=float, default=0, help="every downlink in Mbit/s (0: = uplink)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    console = Console(width=150, highlight=False)
    results = simulate_sizes(
        [int(n) for n in args.sizes.split(",")],
        size=int(args.size * GB),
        log=console.print,
        neighbours=args.neighbours,
        refresh=args.refresh,
        rtt=args.rtt,
        downlink=args.downlink * MBIT or None,
        seed=args.seed,
    )
    console.print(swarm_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
