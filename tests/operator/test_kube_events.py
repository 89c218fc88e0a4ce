"""The Events `kubectl describe tightwadcluster` shows, from one pass's outcome (pure): a worker's pod
crash-looping as a kubelet reports it, a refused edit, a swap starting and finishing, Ready.
Written for real, and read back as `kubectl describe` shows them, in test_kube_full.py."""

from __future__ import annotations

from typing import Any

from tightwad.operator.kubernetes.cr import ClusterRef
from tightwad.operator.kubernetes.events import Note, event_object, events_for
from tightwad.operator.kubernetes.workloads import pod_state
from tightwad.operator.observed import Observed
from tightwad.operator.units import Kind, Unit

WORKER = Unit(
    "worker-xeon-0", Kind.WORKER, "xeon", "kubernetes", "192.168.1.30", {"backend": "cpu", "port": 18052}
)


def crash_looping_pod() -> dict[str, Any]:
    """A worker's pod as the kubelet reports it after its container exited again and again."""
    return {
        "metadata": {"name": "homelab-worker-xeon-0", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"nodeName": "xeon"},
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [
                {
                    "name": "worker",
                    "restartCount": 5,
                    "state": {
                        "waiting": {
                            "reason": "CrashLoopBackOff",
                            "message": "back-off 2m40s restarting failed container=worker",
                        }
                    },
                    "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}},
                }
            ],
        },
    }


def status(serving: str, desired: str, *, ready: bool, swap: str | None = None) -> dict[str, Any]:
    document: dict[str, Any] = {
        "conditions": [{"type": "Ready", "status": str(ready), "message": f"{serving} at http://x/v1"}],
        "model": {"desired": desired, "serving": serving},
    }
    if swap:
        document["swap"] = swap
    return document


def test_a_crash_looping_worker_is_a_warning_naming_the_unit_and_the_reason() -> None:
    state = pod_state(WORKER, [crash_looping_pod()], None)
    notes = events_for(None, status("a", "a", ready=False), [], Observed(now=0.0, units={WORKER.name: state}))
    failing = [n for n in notes if n.reason == "UnitFailing"]
    assert len(failing) == 1 and failing[0].type == "Warning"
    assert "worker-xeon-0 on xeon" in failing[0].message and "CrashLoopBackOff" in failing[0].message
    # The next restart's back-off message differs, but it is the same crash loop: the same Event.
    later = crash_looping_pod()
    later["status"]["containerStatuses"][0]["state"]["waiting"]["message"] = "back-off 5m0s restarting"
    again = events_for(
        None,
        status("a", "a", ready=False),
        [],
        Observed(now=1.0, units={WORKER.name: pod_state(WORKER, [later], None)}),
    )
    assert {n.key for n in again if n.reason == "UnitFailing"} == {failing[0].key}


def test_a_refused_model_is_a_warning_with_the_reason_status_gives() -> None:
    problems = [("ModelRejected", "model big is not usable on rtx4070: sha256 mismatch")]
    notes = events_for(None, status("a", "a", ready=True), problems, None)
    assert Note("Warning", "ModelRejected", problems[0][1]) in notes


def test_a_swap_is_started_once_and_finished_once_then_ready_is_not_repeated() -> None:
    steady = status("qwen-32b", "qwen-32b", ready=True)
    loading = status("qwen-32b", "qwen-0.5b", ready=True, swap="loading qwen-0.5b beside qwen-32b")
    switching = status("qwen-32b", "qwen-0.5b", ready=True, swap="switching to qwen-0.5b")
    done = status("qwen-0.5b", "qwen-0.5b", ready=True)

    started = [n for n in events_for(steady, loading, [], None) if n.reason == "SwapStarted"]
    assert [n.message for n in started] == ["loading qwen-0.5b beside qwen-32b"]
    later = [n for n in events_for(loading, switching, [], None) if n.reason == "SwapStarted"]
    assert [n.key for n in later] == [started[0].key], "the same swap: one Event"
    finished = [n for n in events_for(switching, done, [], None) if n.reason.startswith("Swap")]
    assert [(n.reason, n.message) for n in finished] == [("SwapFinished", "serving qwen-0.5b (was qwen-32b)")]
    assert not [n for n in events_for(done, done, [], None) if n.reason in ("Ready", "SwapFinished")]
    # An announced switch: nothing serves in between; the swap still finishes once.
    gap = status("", "qwen-0.5b", ready=False, swap="switching from qwen-32b to qwen-0.5b")
    del gap["model"]["serving"]
    finished = events_for(gap, done, [], None, last_served="qwen-32b")
    assert [n.message for n in finished if n.reason == "SwapFinished"] == ["serving qwen-0.5b (was qwen-32b)"]
    became_ready = events_for(status("qwen-0.5b", "qwen-0.5b", ready=False), done, [], None)
    assert [n.reason for n in became_ready] == ["Ready"]


def test_the_event_is_about_the_tightwadcluster_and_keeps_within_the_api_limit() -> None:
    cluster = ClusterRef("default", "homelab", "6f1c9d1e-0000-4000-8000-000000000001")
    event = event_object(cluster, Note("Warning", "ManifestInvalid", "x" * 5000), "replica-a")
    assert event["involvedObject"] == {
        "apiVersion": "tightwad.dev/v1alpha1",
        "kind": "TightwadCluster",
        "name": "homelab",
        "namespace": "default",
        "uid": cluster.uid,
    }
    assert event["type"] == "Warning" and len(event["message"]) <= 1024
