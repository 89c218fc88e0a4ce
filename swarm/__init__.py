"""tightwad.swarm: peer-to-peer GGUF distribution in SHA-256-verified pieces.

Pure core (unit-tested without I/O):
    pieces.py       the piece manifest: file SHA-256, per-piece SHA-256, content segments (GGUF tensors)
    gguf_layout.py  where a GGUF's header and tensors are (the `gguf` package's constants, a fast walk)
    delta.py        which bytes of a wanted file already exist locally, found by content
    selection.py    which piece next: random first, rarest first, endgame
    piecebook.py    one pull's bookkeeping: wanted, local, in flight from whom, endgame memory
    tally.py        one pull's counters: bytes and pieces moved, requests in progress
    scoring.py      peer throughput, backoff after failures, bans after corrupt pieces
    seeding.py      initial seeding: the origin offers each piece once before offering it twice
    bitfield.py, tracker.py, httprange.py, ratelimit.py, hashing.py

Thin adapters:
    server.py (starlette peer server + tracker, served by tightwad.http in our loop), client.py (httpx),
    storage.py (partial file, persisted have-map, atomic rename), library.py (what a node serves),
    puller.py (one download: the I/O around a PieceBook), node.py (a running node),
    sidecar.py (the per-host loop),
    progress.py (rich bar, log lines, JSON events), cli.py (`tightwad swarm ...`)

Test and benchmark tools (synthetic files and GGUF edits, hosts as network namespaces) live in
tests/support/, not in the shipped package.
"""
