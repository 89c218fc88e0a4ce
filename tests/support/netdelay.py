"""A user-space TCP proxy that adds a latency each way: a LAN between processes on one machine.

    python tests/support/netdelay.py --listen 127.0.0.1:50200 --to 127.0.0.1:50152 --delay-ms 2

Every chunk read on one side is written to the other side `delay` seconds after it arrived, in
order, so a request/response round trip costs 2 × delay more (bandwidth is not limited). With
--jitter-ms J each chunk's delay is drawn uniformly from delay ± J (a Wi-Fi link), still delivered
in order, as TCP would hand it to the application. There is no netem here, and this needs no
privileges. Used by the benchmarks to put the rpc workers of a
pool "behind a network" (run as a script), and by the proxy tests (`serve`). A test and bench tool,
so it lives here and not in the shipped package.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import socket
import sys
import time


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, jitter: float = 0.0
) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    delivery = asyncio.create_task(deliver())
    due = 0.0
    try:
        while True:
            data = await reader.read(1 << 20)
            # In order: a chunk never overtakes the one before it, whatever its own jitter.
            due = max(due, time.monotonic() + delay + random.uniform(-jitter, jitter))
            queue.put_nowait((due, data))
            if not data:
                break
        await delivery
    except (ConnectionError, OSError):
        delivery.cancel()


def _no_delay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def serve(
    listen: tuple[str, int], upstream: tuple[str, int], delay: float, jitter: float = 0.0
) -> None:
    if not 0 <= jitter <= delay:
        raise ValueError(f"jitter ({jitter * 1e3:g} ms) must be between 0 and the delay ({delay * 1e3:g} ms)")

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*upstream)
        except OSError:
            client_writer.close()
            return
        _no_delay(client_writer)
        _no_delay(up_writer)
        try:
            await asyncio.gather(
                _pipe(client_reader, up_writer, delay, jitter),
                _pipe(up_reader, client_writer, delay, jitter),
            )
        finally:
            for w in (client_writer, up_writer):
                with contextlib.suppress(OSError):
                    w.close()

    server = await asyncio.start_server(handle, *listen)
    spread = f" ± {jitter * 1e3:g}" if jitter else ""
    print(
        f"netdelay: {listen[0]}:{listen[1]} -> {upstream[0]}:{upstream[1]} "
        f"+{delay * 1e3:g}{spread} ms each way",
        flush=True,
    )
    async with server:
        await server.serve_forever()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netdelay.py", description=__doc__.splitlines()[0])
    p.add_argument("--listen", type=_address, required=True, help="host:port to accept connections on")
    p.add_argument("--to", type=_address, required=True, help="host:port to forward them to")
    p.add_argument("--delay-ms", type=float, default=2.0, help="added latency each way")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="each chunk's delay: delay ± this, uniform")
    args = p.parse_args(argv)
    if not 0 <= args.jitter_ms <= args.delay_ms:
        p.error(f"--jitter-ms {args.jitter_ms:g} must be between 0 and --delay-ms ({args.delay_ms:g})")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen, args.to, args.delay_ms / 1e3, args.jitter_ms / 1e3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
