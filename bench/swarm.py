"""Swarm vs plain HTTP, on hosts that are network namespaces with capped uplinks. One run prints one table.

    .venv/bin/python bench/swarm.py [--peers 4] [--rate 100mbit] [--piece-size 1MiB]

1 origin + N peers, every uplink capped by tc (tbf). Measured:
- swarm: all N peers pull the file at once from the origin and from each other (tightwad swarm pull
  --serve, the origin as tracker); time until the last peer holds the verified file;
- plain HTTP: all N peers GET the whole file from the origin at once (curl); same end condition;
- one peer alone GETs it (curl): what the origin's capped link delivers on this machine, the
  ceiling of any swarm's fraction of the bound (a busy machine pushes it below 1);
- the swarm's time as a fraction of the lower bound T* = max(F/U, N F/((N+1) U)) (every byte leaves
  the origin once; all copies go up through the uplinks together): with equal uplinks T* = F/U;
  beside it the aggregate throughput (N x size / time) over the sum of all N+1 uplinks, which with
  equal uplinks cannot pass N/(N+1) even at the bound;
- delta updates: a peer holding v1 pulls v2 (a metadata edit; some tensors re-quantised); bytes moved
  vs the file size; for a whole new quantisation (Q4_1 -> F32) the planned bytes only (540 MB);
- SHA-256 on one core, and building a manifest (three digests per byte).

Needs root and iproute2 (network namespaces); it says so and exits 2 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import gguf
from _common import Processes, table  # first: it puts tests/ on sys.path for `support`
from rich.console import Console
from support.synth import requantizer, rewrite_gguf
from support.testnet import Host, Hosts, namespaces_unavailable, sweep_stale

from tightwad import models
from tightwad.manifest import parse_size
from tightwad.swarm.delta import ContentIndex, fetched_bytes, plan_piece
from tightwad.swarm.hashing import measure_sha256, sha_extensions
from tightwad.swarm.pieces import build_manifest

PY = sys.executable
PORT = 8089
MB = 1e6
console = Console(highlight=False, width=130)


def start(
    procs: Processes, name: str, argv: list[str], env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], Path]:
    """A swarm command: its stdout (the --json report) in NAME.out, its log lines in NAME.log."""
    process, _ = procs.start(name, argv, env, stdout_apart=True)
    return process, procs.out(name)


def swarm_cli(*args: str) -> list[str]:
    return [PY, "-m", "tightwad.swarm.cli", *args]


def wait_for(predicate: Any, what: str, timeout: float, processes: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for process in processes:
            if process.poll() not in (None, 0):
                raise RuntimeError(f"{what}: a process exited with {process.returncode}; see the logs")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not done after {timeout:.0f}s")
        time.sleep(0.05)


def sha256(path: Path) -> str:
    return models.sha256_file(path)


def seed(
    procs: Processes,
    host: Host,
    file: Path,
    port: int,
    piece_size: int,
    env: dict[str, str],
    tag: str,
    *extra: str,
) -> tuple[str, subprocess.Popen[bytes]]:
    argv = swarm_cli(
        "seed",
        str(file),
        "--bind",
        host.address,
        "--port",
        str(port),
        "--piece-size",
        str(piece_size),
        *extra,
    )
    process, log = procs.start(tag, host.command(argv), env, stdout_apart=True)
    wait_for(lambda: "seeding" in log.read_text(errors="replace"), f"{tag} start", 120, [process])
    return f"http://{host.address}:{port}", process


def read_report(out: Path) -> dict[str, Any] | None:
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            return json.loads(line)
    return None


def events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_swarm(
    procs: Processes,
    origin_url: str,
    peers: list[Host],
    sha: str,
    work: Path,
    env: dict[str, str],
    slots: int,
    refresh: float,
    tag: str,
) -> dict[str, Any]:
    """All peers pull at once, serving each other; returns timings and byte counts."""
    launched = time.time()
    started = []
    for i, host in enumerate(peers, start=1):
        folder = work / f"{tag}{i}"
        folder.mkdir()
        argv = swarm_cli(
            "pull", sha, "--peer", origin_url, "--tracker", origin_url, "--dir", str(folder),
            "--serve", f"{host.address}:{PORT}", "--linger", "-1", "--json", "--progress", "none",
            "--refresh", str(refresh), "--slots", str(slots), "--events", str(work / f"{tag}{i}.events"),
        )  # fmt: skip
        started.append(start(procs, f"{tag}{i}", host.command(argv), env))
    reports: dict[int, dict[str, Any]] = {}
    done_at: dict[int, float] = {}

    def all_done() -> bool:
        for i, (_, out) in enumerate(started, start=1):
            if i not in reports and (report := read_report(out)) is not None:
                reports[i], done_at[i] = report, time.time()
        return len(reports) == len(started)

    wait_for(all_done, "swarm pull", 600, [p for p, _ in started])
    finished = max(done_at.values())
    for process, _ in started:
        procs.stop(process)
    logs = [events(work / f"{tag}{i}.events") for i in range(1, len(peers) + 1)]
    first_start = min(e["wall"] for log in logs for e in log if e["event"] == "start")
    last_complete = max(e["wall"] for log in logs for e in log if e["event"] == "complete")
    from_origin = sum(r["peers"].get(origin_url, {}).get("bytes", 0) for r in reports.values())
    fetched = sum(r["bytes_fetched"] for r in reports.values())
    for i in range(1, len(peers) + 1):
        if sha256(work / f"{tag}{i}" / Path(reports[i]["path"]).name) != sha:
            raise RuntimeError(f"peer {i}'s file does not match the SHA-256")
    return {
        "wall": finished - launched,
        "transfer": last_complete - first_start,
        "from_origin": from_origin,
        "fetched": fetched,
        "reports": reports,
    }


def run_plain(
    procs: Processes, origin_url: str, peers: list[Host], sha: str, work: Path, token: str
) -> float:
    launched = time.time()
    started = []
    for i, host in enumerate(peers, start=1):
        dest = work / f"plain{i}.gguf"
        argv = [
            "curl", "-sS", "--fail", "-o", str(dest), "-H", f"Authorization: Bearer {token}",
            f"{origin_url}/swarm/v1/files/{sha}/data",
        ]  # fmt: skip
        started.append((start(procs, f"plain{i}", host.command(argv), {})[0], dest))
    for process, _ in started:
        if process.wait(timeout=600) != 0:
            raise RuntimeError(f"curl exited with {process.returncode}; see {procs.logs}")
    seconds = time.time() - launched
    for _, dest in started:
        if sha256(dest) != sha:
            raise RuntimeError(f"{dest} does not match the SHA-256")
        dest.unlink()
    return seconds


def run_delta(
    procs: Processes,
    origin: Host,
    peer: Host,
    v2: Path,
    holder: Path,
    piece_size: int,
    env: dict[str, str],
    tag: str,
) -> dict[str, Any]:
    """`holder` (a peer folder holding v1 under v2's name) pulls v2 from a fresh seeder."""
    url, seeder = seed(procs, origin, v2, PORT + 1, piece_size, env, f"origin-{tag}")
    sha = sha256(v2)
    argv = swarm_cli("pull", sha, "--peer", url, "--dir", str(holder), "--json", "--progress", "none")
    process, out = start(procs, f"delta-{tag}", peer.command(argv), env)
    try:
        if process.wait(timeout=600) != 0:
            raise RuntimeError(f"the delta pull {tag} failed; see {procs.logs}")
    finally:
        procs.stop(seeder)
    report = read_report(out)
    if report is None or sha256(Path(report["path"])) != sha:
        raise RuntimeError(f"the delta pull {tag} did not produce the file")
    return report


def planned_delta(old: Path, new: Path, piece_size: int) -> tuple[int, int]:
    """(bytes a pull of `new` would fetch while holding `old`, size of `new`), from the manifests alone."""
    index = ContentIndex()
    index.add(build_manifest(old, piece_size), old)
    manifest = build_manifest(new, piece_size)
    return sum(fetched_bytes(plan_piece(manifest, i, index)) for i in range(manifest.count)), manifest.size


def rate_bytes(rate: str) -> float:
    """Bytes/s in a tc rate such as 100mbit or 1gbit."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for unit, scale in units.items():
        if rate.lower().endswith(unit):
            return float(rate[: -len(unit)]) * scale / 8
    raise SystemExit(f"--rate {rate!r}: write it as tc does, e.g. 100mbit")


def lower_bound(size: int, n: int, uplink: float) -> float:
    """The least time until N peers hold a file of `size` bytes, every uplink `uplink` bytes/s and
    downlinks not capped: max(F/U (every byte leaves the origin once), N F / ((N + 1) U) (all N
    copies go up through the N + 1 uplinks together)). With equal uplinks the first is the larger,
    so T* = F/U. (The aggregate figure, N F / T over the summed uplinks (N + 1) U, therefore tops
    out at N / (N + 1): 0.80 for 4 peers, though the swarm may reach the bound itself.)"""
    return max(size / uplink, n * size / ((n + 1) * uplink))


def swarm_rows(label: str, run: dict[str, Any], size: int, n: int, uplink: float) -> list[tuple[str, str]]:
    aggregate = n * size / run["transfer"]
    bound = lower_bound(size, n, uplink)
    return [
        (
            f"{label}: all {n} peers hold the file",
            f"{run['transfer']:.1f} s (from launch {run['wall']:.1f} s)",
        ),
        (
            f"{label}: lower bound T* / time (goal >= 0.90)",
            f"{bound / run['transfer']:.2f}: T* = max(F/U, N F/((N+1) U)) = {bound:.2f} s; aggregate / "
            f"sum of uplinks {aggregate / ((n + 1) * uplink):.2f} (its ceiling N/(N+1) = {n / (n + 1):.2f})",
        ),
        (
            f"{label}: origin uploaded",
            f"{run['from_origin'] / MB:.1f} MB = {run['from_origin'] / size:.2f}x the file; peers received "
            f"{run['fetched'] / (n * size):.2f}x what they needed",
        ),
    ]


def delta_row(label: str, report: dict[str, Any]) -> tuple[str, str]:
    moved, size, seconds = report["bytes_fetched"], report["size"], report["seconds"]
    share = 100 * moved / size
    return (
        f"delta: {label}",
        f"{moved / MB:.2f} MB moved of {size / MB:.1f} MB ({share:.1f}%), {seconds:.1f} s",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peers", type=int, default=4, help="peers besides the origin (default 4)")
    parser.add_argument(
        "--rate", default="100mbit", help="every host's uplink cap, tc syntax (default 100mbit)"
    )
    parser.add_argument("--piece-size", default="1MiB")
    parser.add_argument("--model", default="smollm2-135m-q4_1", help="catalog model to distribute")
    parser.add_argument("--slots", type=int, default=2, help="parallel requests per peer (pull --slots)")
    parser.add_argument(
        "--refresh", type=float, default=0.5, help="have-map refresh seconds (pull --refresh)"
    )
    parser.add_argument("--quick", action="store_true", help="only the default swarm run (for tuning)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, events)")
    args = parser.parse_args(argv)
    reason = namespaces_unavailable()
    if reason:
        console.print(f"[red]bench/swarm.py needs network namespaces:[/] {reason}")
        return 2
    piece_size = parse_size(args.piece_size)
    uplink = rate_bytes(args.rate)
    n = args.peers
    source = models.resolve(args.model)
    token = secrets.token_hex(16)
    env = {"TIGHTWAD_TOKEN": token}  # namespace addresses are beyond loopback: every server needs it
    work = Path(tempfile.mkdtemp(prefix="tightwad-bench-swarm-"))
    procs = Processes(work)
    sweep_stale("twb")
    rows: list[tuple[str, str]] = []
    try:
        with Hosts(f"twb{os.getpid()}", n + 1, rate=args.rate, subnet="10.232.0") as hosts:
            origin, peers = hosts[0], hosts[1:]
            (work / "origin").mkdir()
            file = work / "origin" / "model.gguf"
            shutil.copyfile(source, file)
            size, sha = file.stat().st_size, sha256(file)
            rows += [
                (
                    "file",
                    f"{args.model}: {size / MB:.1f} MB, {-(-size // piece_size)} pieces of {args.piece_size}",
                ),
                (
                    "hosts",
                    f"1 origin + {n} peers (network namespaces), every uplink capped at {args.rate} by tc",
                ),
            ]
            url, _ = seed(procs, origin, file, PORT, piece_size, env, "origin")
            console.print(f"origin {url} seeding {size / MB:.1f} MB to {n} peers; uplinks {args.rate}")
            # What one capped uplink carries here: no swarm can beat the origin's own link.
            alone = run_plain(procs, url, peers[:1], sha, work, token)
            rows.append(
                (
                    "one peer GETs the file alone (curl): the origin link's ceiling",
                    f"{alone:.1f} s = {size / uplink / alone:.2f} of F/U ({size / uplink:.2f} s)",
                )
            )
            swarm = run_swarm(procs, url, peers, sha, work, env, args.slots, args.refresh, "swarm")
            rows += swarm_rows("swarm", swarm, size, n, uplink)
            if not args.quick:
                plain_url, plain_seeder = seed(
                    procs, origin, file, PORT + 2, piece_size, env, "origin-plain", "--no-super-seed"
                )
                flat = run_swarm(procs, plain_url, peers, sha, work, env, args.slots, args.refresh, "flat")
                rows += swarm_rows("swarm, initial seeding off", flat, size, n, uplink)
                plain = run_plain(procs, plain_url, peers, sha, work, token)
                procs.stop(plain_seeder)
                rows += [
                    ("plain HTTP: all peers GET from the origin", f"{plain:.1f} s (curl, {n} at once)"),
                    ("swarm speed-up over plain HTTP", f"{plain / swarm['transfer']:.2f}x"),
                ]
                # Delta updates: swarm peer 1 holds v1 as model.gguf; v2 keeps the name.
                holder, deltas = work / "swarm1", work / "v2"
                deltas.mkdir()
                meta = rewrite_gguf(file, deltas / "model.gguf", extra_metadata={"tightwad.note": "edited"})
                report = run_delta(procs, origin, peers[0], meta, holder, piece_size, env, "meta")
                rows.append(delta_row("metadata edit (every tensor shifts)", report))
                meta = meta.rename(deltas / "meta.gguf")
                requantise = requantizer(
                    lambda name: name.endswith(("attn_v.weight", "ffn_down.weight")),
                    gguf.GGMLQuantizationType.Q8_0,
                )
                requant = rewrite_gguf(meta, deltas / "model.gguf", convert=requantise)
                report = run_delta(procs, origin, peers[0], requant, holder, piece_size, env, "requant")
                rows.append(delta_row("attn_v + ffn_down re-quantised Q4_1 -> Q8_0", report))
        if not args.quick and args.model == "smollm2-135m-q4_1":
            planned, new_size = planned_delta(source, models.resolve("smollm2-135m-f32"), piece_size)
            rows.append(
                (
                    "delta: whole new quantisation Q4_1 -> F32 (planned, not sent)",
                    f"{planned / MB:.2f} MB of {new_size / MB:.2f} MB ({(new_size - planned) / 1e3:.0f} kB "
                    "reused): every quantised tensor changed, and the unchanged 2.3 kB F32 norms are "
                    "fetched with their neighbours (runs under 4 KiB are not worth a request)",
                )
            )
        rate = measure_sha256(source, 2.0)
        began = time.perf_counter()
        build_manifest(source, piece_size)
        manifest_rate = size / (time.perf_counter() - began)
        sha_ni = "yes" if sha_extensions() else "no"
        rows += [
            ("SHA-256 on one core (1 MiB blocks)", f"{rate / 1e9:.2f} GB/s (CPU has SHA-NI: {sha_ni})"),
            ("building a manifest (3 digests per byte)", f"{manifest_rate / 1e9:.2f} GB/s of file"),
        ]
    finally:
        procs.stop_all()
        if args.keep:
            console.print(f"logs and events kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    console.print(
        table(
            "tightwad swarm benchmark (hosts are network namespaces on one machine)",
            ("measure", "result"),
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
