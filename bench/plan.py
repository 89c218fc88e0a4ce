"""How long `plan()` takes on a big cluster: 1000 hosts with one CPU worker each. Goal: < 50 ms.

Three states, each planned several times (best time shown): the first pass (nothing runs yet),
converged (everything runs and is healthy: the steady state the loop sees every second), and a
changed target (every engine content changes: the hot-swap decision). States are built in memory
as a driver would report them; no process is started.

Usage: .venv/bin/python bench/plan.py [--hosts 1000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from typing import Any

from tightwad.manifest import manifest_from_dict
from tightwad.operator.desired import Desired, desired_state
from tightwad.operator.observed import Health, ModelCheck, ModelState, Observed, UnitState
from tightwad.operator.plan import plan
from tightwad.operator.units import ENGINE_ROUTER, Unit


def manifest(hosts: int) -> dict[str, Any]:
    return {
        "apiVersion": "tightwad.dev/v1alpha1",
        "kind": "TightwadCluster",
        "metadata": {"name": "bench"},
        "spec": {
            "auth": {"token": "bench-token"},
            "models": [
                {"name": "target", "source": "/models/target.gguf"},
                {"name": "draft", "source": "/models/draft.gguf"},
            ],
            "hosts": [
                {
                    "name": f"h{i}",
                    "address": f"10.{i // 65025}.{i // 255 % 255}.{i % 255 + 1}",
                    "gpus": [{"backend": "cpu", "port": 50052}],
                }
                for i in range(hosts)
            ],
            "target": {"model": "target", "host": "h0"},
            "drafters": [{"name": "d", "kind": "llama-server", "model": "draft", "host": "h0", "port": 8081}],
            "proxy": {"host": "h0"},
            "swarm": {"enabled": False},
        },
    }


def converged(desired: Desired) -> Observed:
    """Everything running and healthy, each unit read back as a driver would (fresh objects, so
    plan() pays for every spec hash as it does in the loop)."""
    now = time.time()
    stack = desired.stacks["a"]
    units = {
        u.name: UnitState(Unit.from_json(u.to_json()), True, Health.OK, started_at=now - 60, since=now - 60)
        for u in (*stack.units, *desired.services)
    }
    units[ENGINE_ROUTER] = units[ENGINE_ROUTER].with_(route=stack.engine.name)
    models = {
        (u.host, m): ModelCheck(ModelState.OK, size=10**9)
        for u in (*stack.units, *desired.services)
        for m in u.models
    }
    return Observed(now=now, units=units, models=models, free_bytes=None)


def best(desired: Desired, observe: Callable[[], Observed], repeat: int) -> tuple[float, int]:
    timings, actions = [], 0
    for _ in range(repeat):
        observed = observe()
        began = time.perf_counter()
        result = plan(desired, observed)
        timings.append(time.perf_counter() - began)
        actions = len(result.actions)
    return min(timings) * 1000, actions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    data = manifest(args.hosts)
    began = time.perf_counter()
    validated = manifest_from_dict(data)
    validating = (time.perf_counter() - began) * 1000
    began = time.perf_counter()
    desired = desired_state(validated)
    building = (time.perf_counter() - began) * 1000
    changed = copy.deepcopy(data)
    changed["spec"]["target"]["maxConversations"] = 4
    swapped = desired_state(manifest_from_dict(changed))
    rows = [
        ("first pass (nothing runs)", *best(desired, lambda: Observed(now=time.time()), args.repeat)),
        ("converged (steady state)", *best(desired, lambda: converged(desired), args.repeat)),
        ("target changed (swap decision)", *best(swapped, lambda: converged(desired), args.repeat)),
    ]
    units = len(desired.services) + len(desired.stacks["a"].units)
    print(
        f"plan() on {args.hosts} hosts, {units} units (per manifest edit: validation {validating:.0f} ms, "
        f"desired state {building:.0f} ms)"
    )
    for label, ms, actions in rows:
        print(f"  {label:<32} {ms:7.1f} ms   {actions} actions   goal < 50 ms: {'yes' if ms < 50 else 'NO'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
