"""A TightwadCluster custom resource as the rest of Tightwad sees it: a manifest in, a status out.

Pure: no API calls. The object the API server hands over carries server fields (uid,
resourceVersion, managedFields, status) that are not part of a manifest; they are dropped before the
full JSON Schema and the semantic checks run, so a CR is held to exactly the rules of a file. The
token never lives in the CR: `spec.auth.token: ${TIGHTWAD_TOKEN}` is filled from the Secret the
operator and every pod read.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tightwad.crd import GROUP, PLURAL, VERSION
from tightwad.manifest import Manifest, ManifestError, ManifestProblem, manifest_from_dict
from tightwad.operator.desired import Desired
from tightwad.operator.observed import Observed
from tightwad.operator.plan import ReconcilePlan
from tightwad.operator.status import conditions, unit_rows
from tightwad.operator.units import Kind

TOKEN_VARIABLE = "${TIGHTWAD_TOKEN}"
FINALIZER = f"{GROUP}/cleanup"
_MANIFEST_METADATA = ("name", "namespace", "labels", "annotations")


@dataclass(frozen=True)
class ClusterRef:
    """Which TightwadCluster object: enough to read, patch and own things."""

    namespace: str
    name: str
    uid: str = ""

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> ClusterRef:
        meta = obj["metadata"]
        return cls(meta.get("namespace", "default"), meta["name"], meta.get("uid", ""))

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def api_path(namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


def cluster_manifest(obj: Mapping[str, Any], token: str | None) -> Manifest:
    """The manifest a TightwadCluster object describes; ManifestError lists everything wrong."""
    meta = obj.get("metadata", {})
    source = f"TightwadCluster {meta.get('namespace', 'default')}/{meta.get('name', '?')}"
    data = {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": {k: copy.deepcopy(meta[k]) for k in _MANIFEST_METADATA if k in meta},
        "spec": copy.deepcopy(obj.get("spec", {})),
    }
    # Tools annotate objects freely (kubectl's last-applied configuration); a manifest's
    # annotations are strings for people, so only drop what is not one.
    annotations = data["metadata"].get("annotations")
    if isinstance(annotations, dict):
        data["metadata"]["annotations"] = {k: v for k, v in annotations.items() if isinstance(v, str)}
    auth = data["spec"].get("auth")
    written = auth.get("token") if isinstance(auth, dict) else None
    if written is not None:
        if written != TOKEN_VARIABLE:
            message = (
                "write `token: ${TIGHTWAD_TOKEN}` here: on Kubernetes the token lives in the chart's "
                "Secret (helm value token.value), which the operator and every pod read"
            )
            raise ManifestError(source, [ManifestProblem("spec.auth.token", message)])
        if not token:
            message = (
                "the operator has no token to fill ${TIGHTWAD_TOKEN} with; set the chart's token.value "
                "(or token.existingSecret) and restart the operator"
            )
            raise ManifestError(source, [ManifestProblem("spec.auth.token", message)])
        auth["token"] = token
    return manifest_from_dict(data, source)


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def workers_column(desired: Desired | None, observed: Observed) -> str:
    """`healthy/desired` rpc workers, for `kubectl get`."""
    if desired is None:
        return "0/0"
    names = [u.name for u in desired.units if u.kind is Kind.WORKER]
    healthy = sum(1 for n in names if (s := observed.units.get(n)) is not None and s.healthy)
    return f"{healthy}/{len(names)}"


def status_document(
    *,
    generation: int,
    previous: Mapping[str, Any] | None,
    desired: Desired | None,
    observed: Observed,
    plan: ReconcilePlan | None,
    manifest_error: str | None,
) -> dict[str, Any]:
    """The CR's status: conditions (each with observedGeneration, and lastTransitionTime kept while
    its status stays), the workers column, the endpoint, the model, and one row per unit."""
    now = _iso(observed.now)
    before = {c.get("type"): c for c in (previous or {}).get("conditions", []) if isinstance(c, dict)}
    rendered = []
    for c in conditions(desired, observed, plan, manifest_error):
        status = "True" if c.status else "False"
        old = before.get(c.type)
        since = old["lastTransitionTime"] if old and old.get("status") == status else now
        rendered.append(
            {
                "type": c.type,
                "status": status,
                "reason": c.reason,
                "message": c.message,
                "lastTransitionTime": since,
                "observedGeneration": generation,
            }
        )
    serving = plan.serving if plan else None
    rows = [
        {
            k: row[k]
            for k in (
                "name",
                "kind",
                "host",
                "runtime",
                "desired",
                "observed",
                "healthy",
                "waiting",
                "lastError",
            )
        }
        for row in unit_rows(desired, observed, plan)
    ]
    document = {
        "observedGeneration": generation,
        "conditions": rendered,
        "workers": workers_column(desired, observed),
        "endpoint": f"{desired.endpoint}/v1" if desired else None,
        "model": {
            "desired": desired.engine.spec["model"] if desired else None,
            "serving": observed.units[serving].unit.spec["model"] if serving in observed.units else None,
        },
        "swap": plan.swap if plan else None,
        "units": rows,
        "notes": list(desired.notes) if desired else [],
        "updatedAt": now,
    }
    return _without_nulls(document)


def _without_nulls(value: Any) -> Any:
    """`value` without null fields: in a merge patch a null deletes the field, so a status holding
    them would never read back equal to what was written (and be written again and again)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def same_status(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> bool:
    """Equal but for the time of writing: an unchanged status is not written again."""
    if a is None:
        return False
    strip = lambda d: {k: v for k, v in d.items() if k != "updatedAt"}  # noqa: E731
    return strip(a) == strip(b)
