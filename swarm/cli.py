"""`tightwad swarm ...`: seed, serve, pull, status, manifest, sidecar. Thin: parse, call, print.

Also runnable as `python -m tightwad.swarm.cli` (the tests and bench/swarm.py do).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from tightwad.errors import TightwadError
from tightwad.manifest import parse_size
from tightwad.swarm.hashing import measure_sha256, sha_extensions
from tightwad.swarm.library import Library, cached_manifest, complete_entry, servable_files
from tightwad.swarm.node import Node, NodeOptions, hash_with_rate, watch_folder
from tightwad.swarm.pieces import DEFAULT_PIECE_SIZE, build_manifest, is_sha256
from tightwad.swarm.progress import EventLog, choose_progress
from tightwad.swarm.puller import Puller, PullOptions
from tightwad.swarm.server import API
from tightwad.swarm.storage import interrupted_downloads

err = Console(stderr=True, highlight=False, soft_wrap=True)


def _size(text: str) -> int:
    """Bytes from `123`, `64MiB`, `12MB` (a rate is bytes per second)."""
    if text.isdigit():
        return int(text)
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT, e.g. 127.0.0.1:8089")
    return host.strip("[]"), int(port)


def _token(args: argparse.Namespace) -> str | None:
    return args.token or os.environ.get("TIGHTWAD_TOKEN") or None


def _node_options(args: argparse.Namespace, bind: str, port: int) -> NodeOptions:
    return NodeOptions(
        bind=bind,
        port=port,
        token=_token(args),
        piece_size=getattr(args, "piece_size", DEFAULT_PIECE_SIZE),
        trackers=[t.rstrip("/") for t in args.tracker],
        advertise=args.advertise,
        max_upload_rate=args.max_upload_rate,
    )


# -- seed / serve


async def _seed(args: argparse.Namespace) -> int:
    library = Library()
    for name in args.files:
        path = Path(name)
        if not path.is_file():
            raise TightwadError(f"{path} is not a file; give the GGUF (or any file) to seed")
        manifest = await asyncio.to_thread(hash_with_rate, path, args.piece_size, err)
        library.add(complete_entry(path.resolve(), manifest, super_seed=not args.no_super_seed))
    async with Node(_node_options(args, args.bind, args.port), library) as node:
        url = node.url or f"http://{args.bind}:{node.server.port}"
        err.print(f"seeding {len(library)} file(s) at {url}")
        for entry in library:
            err.print(f"  pull with: tightwad swarm pull {entry.manifest.sha256} --peer {url}")
        await node.wait()
    return 0


async def _serve(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    if not folder.is_dir():
        raise TightwadError(f"{folder} is not a folder; give the model folder to serve")
    library = Library()
    async with Node(_node_options(args, args.bind, args.port), library) as node:
        err.print(f"serving the files in {folder} at {node.url or node.server.port}")
        watcher = asyncio.ensure_future(
            watch_folder(library, folder.resolve(), args.piece_size, err, super_seed=not args.no_super_seed)
        )
        try:
            await node.wait()
        finally:
            watcher.cancel()
    return 0


# -- pull


async def _pull(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    target = args.target
    options = PullOptions(
        peers=[p.rstrip("/") for p in args.peer],
        trackers=[t.rstrip("/") for t in args.tracker],
        token=_token(args),
        slots_per_peer=args.slots,
        refresh=args.refresh,
        stall_timeout=args.stall_timeout,
        reuse=[Path(r) for r in args.reuse],
        advertise=args.advertise,
    )
    events = EventLog(Path(args.events) if args.events else None)
    progress = choose_progress(args.progress)
    library = Library()

    async def pull() -> dict[str, Any]:
        puller = Puller(
            folder,
            options,
            sha256=target if is_sha256(target) else None,
            name=args.name if is_sha256(target) else target,
            library=library,
            events=events,
            progress=progress,
        )
        result = await puller.run()
        return {
            "path": str(result.path),
            "sha256": result.manifest.sha256,
            "size": result.manifest.size,
            "seconds": round(result.seconds, 3),
            "bytes_fetched": result.bytes_fetched,
            "bytes_local": result.bytes_local,
            "pieces_fetched": result.pieces_fetched,
            "pieces_local": result.pieces_local,
            "pieces_resumed": result.pieces_resumed,
            "peers": result.peers,
        }

    try:
        if args.serve is None:
            report = await pull()
        else:
            bind, port = args.serve
            async with Node(_node_options(args, bind, port), library) as node:
                options.advertise = node.url
                report = await pull()
                _print_report(report, args.json)
                if args.linger < 0:
                    await node.wait()
                else:
                    await asyncio.sleep(args.linger)
                return 0
    finally:
        events.close()
    _print_report(report, args.json)
    return 0


def _print_report(report: dict[str, Any], as_json: bool) -> None:
    print(json.dumps(report) if as_json else report["path"], flush=True)


# -- status / manifest


def _status_urls(args: argparse.Namespace) -> None:
    token = _token(args)
    headers = {"authorization": f"Bearer {token}"} if token else {}
    for url in args.urls:
        try:
            response = httpx.get(
                f"{url.rstrip('/')}{API}/status", headers=headers, timeout=5.0, trust_env=False
            )
            response.raise_for_status()
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            err.print(f"[red]{url}[/]: {exc}")
            continue
        if args.json:
            print(json.dumps({"url": url, **body}))
            continue
        table = Table(title=f"{url}")
        for column in ("file", "sha256", "size", "pieces", "state"):
            table.add_column(column)
        for item in body.get("files", []):
            state = "complete" if item.get("complete") else f"{item.get('have')}/{item.get('pieces')}"
            size = f"{item.get('size', 0) / 1e6:.1f} MB"
            table.add_row(
                item.get("name"), str(item.get("sha256"))[:12], size, str(item.get("pieces")), state
            )
        Console().print(table)
        for name, model in body.get("models", {}).items():
            Console().print(f"model {name}: {model.get('state')} {model.get('error') or ''}")


def _status_dir(args: argparse.Namespace) -> None:
    folder = Path(args.dir)
    table = Table(title=f"{folder}")
    for column in ("file", "sha256", "size", "state"):
        table.add_column(column)
    for path in servable_files(folder):
        known = cached_manifest(path, None)
        digest = known.sha256[:12] if known else "(not hashed yet)"
        table.add_row(path.name, digest, f"{path.stat().st_size / 1e6:.1f} MB", "complete")
    for manifest, held in interrupted_downloads(folder):
        state = f"partial: {held}/{manifest.count} pieces"
        table.add_row(manifest.name, manifest.sha256[:12], f"{manifest.size / 1e6:.1f} MB", state)
    Console().print(table)


def _status(args: argparse.Namespace) -> int:
    if not args.urls and not args.dir:
        raise TightwadError("say what to look at: peer URLs (http://host:8089) and/or --dir MODEL_DIR")
    if args.urls:
        _status_urls(args)
    if args.dir:
        _status_dir(args)
    return 0


def _manifest(args: argparse.Namespace) -> int:
    path = Path(args.file)
    manifest = build_manifest(path, args.piece_size)
    if args.json:
        print(json.dumps(manifest.to_json()))
        return 0
    tensors = [s for s in manifest.segments if s.kind == "tensor"]
    print(f"{manifest.name}: {manifest.size} bytes, sha256 {manifest.sha256}")
    print(f"{manifest.count} pieces of {manifest.piece_size} bytes; {len(tensors)} tensors keyed by content")
    rate = measure_sha256(path, 0.5)
    print(f"SHA-256 on one core: {rate / 1e9:.2f} GB/s (SHA-NI: {'yes' if sha_extensions() else 'no'})")
    return 0


def _sidecar(args: argparse.Namespace) -> int:
    from tightwad.swarm.sidecar import run_sidecar

    return run_sidecar(args.manifest, args.host, args.bind, args.once)


# -- parser


def _add_server_options(p: argparse.ArgumentParser, default_port: int = 8089) -> None:
    p.add_argument("--bind", default="127.0.0.1", help="address to listen on (beyond loopback needs a token)")
    p.add_argument("--port", type=int, default=default_port)
    p.add_argument(
        "--no-super-seed",
        action="store_true",
        help="offer every piece at once (default: offer pieces not yet uploaded first)",
    )
    _add_common(p)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", help="bearer token (default: $TIGHTWAD_TOKEN); required beyond loopback")
    p.add_argument(
        "--tracker", action="append", default=[], metavar="URL", help="tracker to announce to / ask"
    )
    p.add_argument("--advertise", metavar="URL", help="URL other peers reach this node at")
    p.add_argument("--max-upload-rate", type=_size, metavar="RATE", help="upload cap in bytes/s, e.g. 12MB")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tightwad swarm", description="Peer-to-peer model distribution in SHA-256-verified pieces."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("seed", help="serve files to peers (hashes them once; the manifest is cached)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--piece-size", type=_size, default=DEFAULT_PIECE_SIZE, help="e.g. 64MiB (default)")
    _add_server_options(p)
    p.set_defaults(handler=lambda a: asyncio.run(_seed(a)))

    p = sub.add_parser("serve", help="serve every file in a model folder, following changes")
    p.add_argument("folder", metavar="DIR")
    p.add_argument("--piece-size", type=_size, default=DEFAULT_PIECE_SIZE)
    _add_server_options(p)
    p.set_defaults(handler=lambda a: asyncio.run(_serve(a)))

    p = sub.add_parser("pull", help="fetch a file from peers into a folder (resumes where it stopped)")
    p.add_argument("target", metavar="SHA256|NAME", help="the file's SHA-256, or its name on the peers")
    p.add_argument("--peer", action="append", default=[], metavar="URL", help="a peer, e.g. http://host:8089")
    p.add_argument("--dir", default=".", help="folder to put the file in (default: .)")
    p.add_argument(
        "--name",
        help="with a SHA256: the file name to save it under; peers serving another name are refused "
        "(without it, the peers' name is used and may replace a file of that name)",
    )
    p.add_argument("--serve", type=_host_port, metavar="HOST:PORT", help="serve pieces to others meanwhile")
    p.add_argument(
        "--linger", type=float, default=0.0, help="with --serve: seconds to keep seeding (-1: forever)"
    )
    p.add_argument(
        "--reuse", action="append", default=[], metavar="DIR", help="more folders to reuse bytes from"
    )
    p.add_argument("--slots", type=int, default=2, help="parallel requests per peer")
    p.add_argument("--refresh", type=float, default=1.0, help="seconds between have-map refreshes")
    p.add_argument(
        "--stall-timeout", type=float, default=120.0, help="give up after this long without progress"
    )
    p.add_argument("--events", metavar="FILE", help="append JSON-lines events here")
    p.add_argument("--progress", choices=["auto", "bar", "log", "none"], default="auto")
    p.add_argument("--json", action="store_true", help="print a JSON report instead of the path")
    _add_common(p)
    p.set_defaults(handler=lambda a: asyncio.run(_pull(a)))

    p = sub.add_parser("status", help="what peers hold and fetch, or what a model folder holds")
    p.add_argument("urls", nargs="*", metavar="URL")
    p.add_argument("--dir", help="a local model folder")
    p.add_argument("--token", help="bearer token (default: $TIGHTWAD_TOKEN)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_status)

    p = sub.add_parser("manifest", help="print a file's piece manifest and this CPU's SHA-256 rate")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--piece-size", type=_size, default=DEFAULT_PIECE_SIZE)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_manifest)

    p = sub.add_parser("sidecar", help="keep this host's models present and serve them (from the manifest)")
    p.add_argument("manifest", metavar="CLUSTER_YAML")
    p.add_argument("--host", required=True, help="this host's name in the manifest")
    p.add_argument("--bind", help="listen here instead of the host's address")
    p.add_argument("--once", action="store_true", help="exit once every needed model is present")
    p.set_defaults(handler=_sidecar)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130
    except (TightwadError, OSError) as exc:
        err.print(f"[bold red]error:[/] {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
