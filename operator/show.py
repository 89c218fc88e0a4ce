"""`tightwad status`: the status file as a table a person reads at a glance."""

from __future__ import annotations

import datetime as dt
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

_STYLE = {"running": "green", "starting": "yellow", "failing": "red", "exited": "red", "absent": "dim"}


def _age(iso: str | None, now: dt.datetime) -> str:
    if not iso:
        return "?"
    try:
        then = dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return "?"
    seconds = int((now - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def render(doc: dict[str, Any], now: dt.datetime | None = None) -> Group:
    now = now or dt.datetime.now(dt.UTC)
    head = Text()
    head.append(f"cluster {doc.get('cluster')}", style="bold")
    head.append(f"  generation {doc.get('generation')} (observed {doc.get('observedGeneration')})")
    head.append(f"  updated {_age(doc.get('updatedAt'), now)} ago")
    lines: list[Any] = [head]
    if doc.get("endpoint"):
        lines.append(Text(f"endpoint {doc['endpoint']}"))
    model = doc.get("model") or {}
    serving, desired = model.get("serving"), model.get("desired")
    text = f"model    {serving or '-'}"
    if desired and desired != serving:
        text += f" (desired: {desired})"
    lines.append(Text(text))
    if doc.get("swap"):
        lines.append(Text(f"swap     {doc['swap']}", style="yellow"))

    conditions = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
    for column in ("CONDITION", "STATUS", "REASON", "SINCE", "MESSAGE"):
        conditions.add_column(column, overflow="fold")
    for c in doc.get("conditions", []):
        bad = (c["type"] == "Degraded") == (c["status"] == "True")
        style = (
            "red" if bad and c["type"] != "Progressing" else ("yellow" if c["status"] == "True" else "green")
        )
        if c["type"] == "Progressing" and c["status"] == "False":
            style = "green"
        conditions.add_row(
            c["type"],
            Text(c["status"], style=style),
            c["reason"],
            _age(c.get("lastTransitionTime"), now),
            c["message"],
        )

    units = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
    for column in ("UNIT", "KIND", "HOST", "PORT", "DESIRED", "OBSERVED", "RESTARTS", "NOTE"):
        units.add_column(column, overflow="fold")
    for u in doc.get("units", []):
        observed = u.get("observed", "?")
        note = u.get("lastError") if observed in ("exited", "failing") else None
        note = note or u.get("waiting") or (f"model {u['model']}" if u.get("model") else "")
        if u.get("route"):
            note = f"-> {u['route']}"
        units.add_row(
            u["name"],
            u["kind"],
            u["host"],
            str(u.get("port") or "-"),
            u["desired"],
            Text(observed, style=_STYLE.get(observed, "")),
            str(u.get("restarts", 0)),
            note or "",
        )
    lines += [Text(""), conditions, Text(""), units]
    for note in doc.get("notes", []):
        lines.append(Text(f"note: {note}", style="dim"))
    return Group(*lines)


def print_status(doc: dict[str, Any], console: Console | None = None) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=160)  # a pipe or a log: do not fold unit names at 80 columns
    console.print(render(doc))
