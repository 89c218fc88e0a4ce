"""What a process's log says went wrong: the one line a status should show.

A server that fails usually says why a few lines before it exits and then prints more (llama.cpp's
rpc server prints `Failed to create server socket`, then `transport : TCP`), so the last line is
rarely the reason. The line chosen is the last one that reads like an error; failing that, the last
line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_ERROR = re.compile(
    r"\b(error|failed|failure|fatal|cannot|can't|could not|unable|exception|traceback|abort(ed)?|"
    r"denied|refused|in use|not found|no such|invalid|out of memory|panic)\b"
    r"|\w+(Error|Exception)\b",  # Python's and most languages' exception names
    re.IGNORECASE,
)
# Lines that mention errors without being one (counters, option echoes).
_NOT_AN_ERROR = re.compile(r"\b(0 errors?|no errors?|error[-_]?(rate|count|log))\b", re.IGNORECASE)
_MAX_CHARS = 300


def telling_line(lines: Sequence[str]) -> str | None:
    """The line of a log tail that says what went wrong (pure; blank lines and `=== ` markers the
    supervisor writes itself are skipped)."""
    kept = [line.strip() for line in lines if line.strip() and not line.startswith("=== ")]
    if not kept:
        return None
    for line in reversed(kept):
        if _ERROR.search(line) and not _NOT_AN_ERROR.search(line):
            return line[:_MAX_CHARS]
    return kept[-1][:_MAX_CHARS]
