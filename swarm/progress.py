"""How a pull reports itself: a rich progress bar (rate, ETA) for people, plain lines for logs, and a
JSON-lines event file for tests, benchmarks and the sidecar's status."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class ProgressView(Protocol):
    def start(self, name: str, total: int, done: int) -> None: ...
    def update(self, done: int, peers: int) -> None: ...
    def finish(self, message: str) -> None: ...


class NoProgress:
    def start(self, name: str, total: int, done: int) -> None:
        pass

    def update(self, done: int, peers: int) -> None:
        pass

    def finish(self, message: str) -> None:
        pass


class BarProgress:
    """A rich bar on stderr: bytes done, rate, time left, peers in use."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, highlight=False)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[peers]} peers"),
            console=self.console,
            transient=False,
        )
        self.task: TaskID | None = None

    def start(self, name: str, total: int, done: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task(name, total=total, completed=done, peers=0)

    def update(self, done: int, peers: int) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=done, peers=peers)

    def finish(self, message: str) -> None:
        self.progress.stop()
        self.console.print(message)


class LogProgress:
    """One line every `every` seconds: for logs and terminals that are not terminals."""

    def __init__(self, stream: IO[str] | None = None, every: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.every = every
        self.name = ""
        self.total = 0
        self._t0 = 0.0
        self._d0 = 0
        self._next = 0.0

    def start(self, name: str, total: int, done: int) -> None:
        self.name, self.total, self._d0 = name, total, done
        self._t0 = time.monotonic()
        self._next = self._t0 + min(1.0, self.every)  # the first line soon, once there is a rate to show

    def update(self, done: int, peers: int) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every
        rate = (done - self._d0) / max(now - self._t0, 1e-6)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        pct = 100 * done / self.total if self.total else 100.0
        eta_text = f"{eta:.0f}s" if eta != float("inf") else "?"
        print(
            f"{self.name}: {pct:5.1f}% {done / 1e6:.1f}/{self.total / 1e6:.1f} MB "
            f"{rate / 1e6:.1f} MB/s ETA {eta_text} from {peers} peers",
            file=self.stream,
            flush=True,
        )

    def finish(self, message: str) -> None:
        print(message, file=self.stream, flush=True)


def choose_progress(mode: str) -> ProgressView:
    if mode == "none":
        return NoProgress()
    if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
        return BarProgress()
    return LogProgress()


class EventLog:
    """JSON lines, one per event, flushed at once so a killed process loses none of them."""

    def __init__(self, path: Path | None) -> None:
        self._file: IO[str] | None = path.open("a", encoding="utf-8", buffering=1) if path else None
        self._t0 = time.monotonic()

    def emit(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        # `t`: seconds since this log opened; `wall`: epoch seconds, to line up several processes' logs.
        record = {
            "t": round(time.monotonic() - self._t0, 4),
            "wall": round(time.time(), 4),
            "pid": os.getpid(),
            "event": event,
            **fields,
        }
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
