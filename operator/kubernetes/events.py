"""Kubernetes Events on a TightwadCluster: what `kubectl describe tightwadcluster` shows people.

Status says how things are; Events say what happened, in order: a model or an edit refused, a unit
crash-looping, a swap started and finished, the cluster Ready. `events_for` (pure) turns one pass's
outcome into notes, `EventRecorder` writes them as core/v1 Events (the API `kubectl describe` reads
in every Kubernetes version), once per change: a note still true on the next pass is not written
again, so the resync never floods the namespace.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client

from tightwad.crd import GROUP, VERSION
from tightwad.manifest import KIND
from tightwad.operator.kubernetes.api import Rest, path_for
from tightwad.operator.kubernetes.cr import ClusterRef
from tightwad.operator.observed import Health, Observed

log = logging.getLogger("tightwad.operator.kubernetes")

COMPONENT = "tightwad-operator"
MESSAGE_LIMIT = 1024  # what the API server keeps of an Event's message


@dataclass(frozen=True)
class Note:
    """One Event to write. `subject` is what it is about (a unit, a swap): one Event per subject
    while it stays true (a crash loop's back-off message changes every restart); without a
    subject, one per message."""

    type: str  # Normal or Warning
    reason: str
    message: str
    subject: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.reason, self.subject or self.message)


def _condition(status: Mapping[str, Any] | None, kind: str) -> Mapping[str, Any]:
    for c in (status or {}).get("conditions", []) or []:
        if isinstance(c, Mapping) and c.get("type") == kind:
            return c
    return {}


def events_for(
    previous: Mapping[str, Any] | None,
    status: Mapping[str, Any],
    problems: Sequence[tuple[str, str]],
    observed: Observed | None,
    last_served: str | None = None,
) -> list[Note]:
    """What one pass has to say: every problem (the manifest refused, a model rejected, an object
    the API refused), every unit failing, and the swap and Ready transitions between the status
    before the pass and after it. `last_served`: the model the cluster served last (after an
    announced switch nothing serves in between, so the status before does not say)."""
    notes = [Note("Warning", reason, message) for reason, message in problems]
    for name, state in sorted((observed.units if observed else {}).items()):
        if state.health is Health.FAILING:
            why = state.error or "failing"
            notes.append(
                Note("Warning", "UnitFailing", f"{name} on {state.unit.host}: {why}", subject=f"unit {name}")
            )
    before = (previous or {}).get("model") or {}
    after = status.get("model") or {}
    swap = status.get("swap")
    if swap and after.get("serving") and after.get("desired") != after["serving"]:
        # Written once while the swap lasts (its message moves on: verifying, loading, switching).
        notes.append(Note("Normal", "SwapStarted", swap, subject=f"swap to {after.get('desired')}"))
    was = before.get("serving") or last_served
    if after.get("serving") and was and was != after["serving"]:
        message = f"serving {after['serving']}" + (f" (was {was})" if was else "")
        notes.append(Note("Normal", "SwapFinished", message, subject=f"swap to {after['serving']}"))
    ready = _condition(status, "Ready")
    if ready.get("status") == "True" and _condition(previous, "Ready").get("status") != "True":
        notes.append(Note("Normal", "Ready", str(ready.get("message", "serving")), subject="ready"))
    return notes


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def event_object(cluster: ClusterRef, note: Note, instance: str) -> dict[str, Any]:
    """A core/v1 Event about the TightwadCluster `cluster`."""
    now = _now()
    message = note.message if len(note.message) <= MESSAGE_LIMIT else note.message[: MESSAGE_LIMIT - 1] + "…"
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{cluster.name}.", "namespace": cluster.namespace},
        "involvedObject": {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "name": cluster.name,
            "namespace": cluster.namespace,
            "uid": cluster.uid,
        },
        "type": note.type,
        "reason": note.reason,
        "message": message,
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": instance,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


class EventRecorder:
    """Writes each cluster's notes once per change. An Event that cannot be written is logged and
    dropped: Events inform, they never stop a reconcile."""

    def __init__(self, rest: Rest, instance: str = COMPONENT) -> None:
        self.rest = rest
        self.instance = instance
        self.current: dict[str, set[tuple[str, str]]] = {}  # cluster key -> notes still true
        self.written = 0

    async def record(self, cluster: ClusterRef, notes: Sequence[Note]) -> None:
        before = self.current.get(cluster.key, set())
        self.current[cluster.key] = {n.key for n in notes}
        for note in notes:
            if note.key in before:
                continue
            try:
                await self.rest.call(
                    "POST",
                    path_for("Event", cluster.namespace),
                    body=event_object(cluster, note, self.instance),
                )
                self.written += 1
            except (client.ApiException, OSError) as exc:
                log.warning("could not write the %s event for %s: %s", note.reason, cluster.key, exc)

    def forget(self, key: str) -> None:
        self.current.pop(key, None)
