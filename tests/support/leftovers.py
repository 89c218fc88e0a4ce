"""The session-wide check that no process a test started outlives the suite.

At the start the test runner becomes a child subreaper (Linux `prctl(PR_SET_CHILD_SUBREAPER)`), so
a process orphaned by its parent (a unit left behind by an operator that exited, a container shim
that daemonized) is re-parented to the runner instead of to init, and stays findable: every
process the suite started is then a descendant of the runner. At the end, after every fixture has
been torn down, any descendant still running is a leak: it is reported, ended, and fails the run.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Adopt orphaned descendants; False where the kernel does not allow it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True)
class Leftover:
    pid: int
    command: str

    def __str__(self) -> str:
        return f"pid {self.pid}: {self.command}"


def descendants(root: int) -> list[Leftover]:
    """Every live (non-zombie) process below `root`, read from /proc."""
    children: dict[int, list[int]] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: the fields after the last ')' are fixed.
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state == "Z":
            continue
        pid = int(entry.name)
        children.setdefault(int(ppid), []).append(pid)
        commands[pid] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip() or stat.split()[1]
    found: list[Leftover] = []
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        found.append(Leftover(pid, commands[pid]))
        stack.extend(children.get(pid, []))
    return sorted(found, key=lambda leftover: leftover.pid)


def reap_zombies() -> None:
    """Collect exited children (as a subreaper the runner inherits them)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def end(leftovers: list[Leftover]) -> None:
    for leftover in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(leftover.pid, signal.SIGKILL)
    time.sleep(0.2)
    reap_zombies()


def leftovers_after(grace: float) -> list[Leftover]:
    """Descendants still running after `grace` seconds (processes that are just exiting get time)."""
    deadline = time.monotonic() + grace
    while True:
        reap_zombies()
        found = descendants(os.getpid())
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.2)
