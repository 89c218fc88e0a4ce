"""`--ctx auto` in a container: the engine sizes its KV cache from what the memory cgroup allows,
not from the host's /proc/meminfo (which a container sees whole). Run in a real cgroup (root)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

LIMIT = 512 << 20


def _make_cgroup() -> Path:
    """A fresh memory cgroup limited to LIMIT (v2's unified hierarchy, else v1's memory one)."""
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        root, limit_file = Path("/sys/fs/cgroup"), "memory.max"
    elif Path("/sys/fs/cgroup/memory/cgroup.procs").exists():
        root, limit_file = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"
    else:
        pytest.skip("no memory cgroup hierarchy here")
    group = root / f"tightwad-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / limit_file).write_text(str(LIMIT))
    except OSError as exc:
        if group.exists():
            group.rmdir()
        pytest.skip(f"cannot make a memory cgroup here: {exc}")
    return group


def test_free_memory_inside_a_limited_cgroup_is_bounded_by_its_limit() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a cgroup")
    group = _make_cgroup()
    try:
        # The shell moves itself into the cgroup, then becomes the Python that asks.
        code = "from tightwad.engine.cli import free_memory; print(free_memory([]))"
        script = f'echo $$ > {group}/cgroup.procs && exec "$0" -c "$1"'
        out = subprocess.run(
            ["sh", "-c", script, sys.executable, code],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        inside = int(out.stdout.strip())
        outside = int(
            subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        )
    finally:
        group.rmdir()
    assert 0 < inside <= LIMIT, (inside, out.stderr)
    assert outside > LIMIT  # this host has more than 512 MiB free: the limit made the difference
