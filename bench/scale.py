"""How big it goes: the manifest path and the reconcile loop at 1000 hosts and beyond.

1. Whole processes: `tightwad plan FILE` and `tightwad validate FILE` on generated manifests of
   1000 / 4000 / 10000 hosts (mixed cuda/rocm/cpu/metal; docker, native and process runtimes:
   tests/support/fleet.py), with the interpreter's start and the imports measured apart.
2. A simulated fleet of 1000 hosts in one process: the REAL manifest loading, plan, reconcile loop
   and status file, with stand-ins only at the driver boundary (a fake Docker driver per docker
   host, fake agents for the others; `SimulatedFleet`). Cold converge, one failed worker noticed
   and restarted, a manifest edit touching 10% of hosts, and the CPU of an idle pass.
3. Opt-in (`--kube N`): the Kubernetes operator (`tightwad operator`'s Operator, the real
   kubernetes driver) against the full Kubernetes 1.20 control plane of the end-to-end tests
   (`make kube`) with N kubemark hollow nodes and a TightwadCluster of N CPU hosts: cold converge
   (create -> Ready and converged), an edit of 10% of the hosts (only their workers replaced), and
   the operator's CPU per idle pass (its list calls and the plan). Each hollow node is a real
   kubelet process (~75 MB, a little CPU): the machine bounds N, not the operator.

Medians of `--repeat` runs; whole processes are timed in CPU seconds (the machine may be shared).
Nothing is contacted: no daemon, no host.

Usage: .venv/bin/python bench/scale.py [--hosts 1000] [--big 10000] [--repeat 5] [--kube N [--kube-only]]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from _common import ROOT, table
from rich.console import Console
from support.fleet import SimulatedFleet, edit_fraction, fleet_manifest, host_name, write_fleet


def median_seconds(command: list[str], repeat: int, env: dict[str, str]) -> float:
    """The median CPU time (user + system) of the whole process: on a shared machine wall-clock
    time mostly measures the neighbours; alone on a machine the two agree to a few ms."""
    timings = []
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(command, env=env, cwd=ROOT, capture_output=True, check=False)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        timings.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(timings)


def median_of(run: Callable[[], float], repeat: int) -> float:
    return statistics.median(run() for _ in range(repeat))


def goal(value: float, limit: float) -> str:
    return f"<= {limit:g}: {'yes' if value <= limit else 'NO'}"


def processes(folder: Path, sizes: list[int], repeat: int) -> list[tuple[str, str, str]]:
    env = {**os.environ, "TIGHTWAD_STATE_DIR": str(folder / "state")}
    python = sys.executable
    rows = []
    start = median_seconds([python, "-c", "pass"], repeat, env)
    rows.append(("interpreter start (python -c pass)", f"{start:.3f} s", ""))
    imports = median_seconds(
        [python, "-c", "import tightwad.operator.cli, tightwad.operator.reconcile"], repeat, env
    )
    rows.append(("start + imports of `tightwad plan`", f"{imports:.3f} s", ""))
    plans: dict[int, float] = {}
    for hosts in sizes:
        path = write_fleet(folder / f"fleet-{hosts}.yaml", hosts)
        plans[hosts] = median_seconds([python, "-m", "tightwad.cli", "plan", str(path)], repeat, env)
        limits = {1000: 0.3, 10000: 3.0}  # the goals; other sizes are printed for the growth
        verdict = goal(plans[hosts], limits[hosts]) if hosts in limits else ""
        rows.append((f"tightwad plan, {hosts} hosts", f"{plans[hosts]:.3f} s", verdict))
        check = median_seconds([python, "-m", "tightwad.cli", "validate", str(path)], repeat, env)
        rows.append((f"tightwad validate, {hosts} hosts", f"{check:.3f} s", ""))
    if len(sizes) > 1:
        low, high = sizes[0], sizes[-1]
        ratio = (plans[high] - imports) / max(plans[low] - imports, 1e-9)
        rows.append(
            (
                f"growth, plan {high} / {low} hosts (less start+imports)",
                f"x{ratio:.1f}",
                f"linear: x{high / low:g}",
            )
        )
    return rows


def fleet(folder: Path, hosts: int, repeat: int) -> list[tuple[str, str, str]]:
    rows = []
    sim = SimulatedFleet(folder, hosts)
    try:
        began = time.perf_counter()
        passes = sim.converge()
        cold = time.perf_counter() - began
        starts = sum(1 for line in sim.journal if line.startswith("start"))
        rows.append(
            (
                f"cold converge, {hosts} hosts",
                f"{cold:.2f} s",
                f"{len(passes)} passes, {starts} units started",
            )
        )

        def idle() -> float:
            began = time.process_time()
            sim.reconciler.pass_once()
            return time.process_time() - began

        for agent in sim.agents.values():
            agent.report(sim.reconciler)
        cpu = median_of(idle, max(repeat, 5))
        rows.append(("idle pass (converged), CPU", f"{cpu * 1000:.0f} ms", goal(cpu * 1000, 50)))

        victim_host = next(iter(h for h in sim.docker if h != "h00000"))
        victim = next(name for name in sim.docker[victim_host].containers if name.startswith("worker-"))
        sim.docker[victim_host].crash(victim)
        mark, began, count = len(sim.journal), time.perf_counter(), 0
        while True:
            count += 1
            result = sim.tick()
            box = sim.docker[victim_host].containers[victim]
            if box["exit_code"] is None and result.plan is not None and not result.plan.actions:
                break
        restarted = sim.journal[mark:]
        rows.append(
            (
                "one failed worker: noticed and restarted",
                f"{(time.perf_counter() - began) * 1000:.0f} ms",
                f"{count} passes; restarted {', '.join(restarted)}",
            )
        )

        data = fleet_manifest(hosts)
        edited = edit_fraction(data)
        sim.path.write_text(yaml.safe_dump(data, sort_keys=False))
        mark, began = len(sim.journal), time.perf_counter()
        passes = sim.converge()
        took = time.perf_counter() - began
        touched = {line.split()[1] for line in sim.journal[mark:]}
        expected = {u.name for u in sim.reconciler.desired.units if u.host in set(edited)}
        verdict = "only those: yes" if touched == expected else f"NO: {len(touched ^ expected)} differ"
        rows.append(
            (
                f"manifest edit touching {len(edited)} hosts (10%)",
                f"{took:.2f} s",
                f"{len(passes)} passes, {len(touched)} units restarted; {verdict}",
            )
        )
    finally:
        sim.close()
    return rows


# -- the Kubernetes operator on a full control plane (opt-in) ---------------------------------------

KUBE_NS = "default"
KUBE_TOKEN = "bench-token"
KUBE_MODEL_SIZE = 400_000_000  # bytes, as the model check pods report it


def kube_cluster(hosts: int, router_port: int) -> dict[str, Any]:
    """A TightwadCluster of `hosts` CPU hosts, each a node lending 2 threads and 4 GiB; the engine,
    its router and nothing else on host 0 (no drafter, no proxy, no swarm: the workers are the
    part that grows with the fleet)."""
    return {
        "apiVersion": "tightwad.dev/v1alpha1",
        "kind": "TightwadCluster",
        "metadata": {"name": "fleet", "namespace": KUBE_NS},
        "spec": {
            "auth": {"token": "${TIGHTWAD_TOKEN}"},
            "models": [
                {
                    "name": "target",
                    "source": "https://example.invalid/models/target.gguf",
                    "sha256": "2" * 64,
                }
            ],
            "hosts": [
                {
                    "name": host_name(i),
                    "address": "127.0.0.1" if i == 0 else f"127.1.{i // 250}.{i % 250 + 1}",
                    "runtime": "kubernetes",
                    "gpus": [{"backend": "cpu", "threads": 2, "memory": "4GiB"}],
                }
                for i in range(hosts)
            ],
            "target": {"model": "target", "host": host_name(0), "port": router_port},
            "swarm": {"enabled": False},
        },
    }


def kube_fleet(folder: Path, hosts: int, repeat: int) -> list[tuple[str, str, str]]:
    from support import kubefull

    router_port = free_port()
    body = kube_cluster(hosts, router_port)
    began = time.perf_counter()
    kube = kubefull.start(folder, kubefull.nodes_of(body))
    rows = [(f"kube: control plane + {hosts} hollow nodes up", f"{time.perf_counter() - began:.1f} s", "")]
    print(*rows[-1], sep=" | ", flush=True)  # as measured: a run this long must not lose its figures
    router = subprocess.Popen(
        [sys.executable, "-m", "tightwad.operator.router", "--host", "127.0.0.1", "--port", str(router_port)],
        env={**os.environ, "TIGHTWAD_TOKEN": KUBE_TOKEN},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        kubefull.install_crd(kube)
        rows += asyncio.run(_kube_scenario(kube, body, hosts, repeat))
    finally:
        router.terminate()
        router.wait(timeout=10)
        kubefull.stop(folder)
    return rows


async def _kube_scenario(
    kube: Any, body: dict[str, Any], hosts: int, repeat: int
) -> list[tuple[str, str, str]]:
    from support.kubefull import model_check_stand_in

    from tightwad.crd import GROUP, PLURAL, VERSION
    from tightwad.operator.kubernetes.api import Rest, connect
    from tightwad.operator.kubernetes.controller import Operator, Options
    from tightwad.operator.kubernetes.render import LABEL_CLUSTER, LABEL_KIND, RenderSettings
    from tightwad.operator.kubernetes.workloads import KubernetesWorkloads
    from tightwad.operator.units import Kind

    path = f"/apis/{GROUP}/{VERSION}/namespaces/{KUBE_NS}/{PLURAL}"
    rows: list[tuple[str, str, str]] = []
    async with await connect(str(kube.kubeconfig)) as api:
        rest = Rest(api)
        operator = Operator(
            api,
            KubernetesWorkloads(rest, RenderSettings(), probe_native_hosts=False),
            token=KUBE_TOKEN,
            options=Options(namespace=KUBE_NS, resync=1.0),
        )

        async def converged(generation: int) -> dict[str, Any] | None:
            obj = await rest.get(f"{path}/fleet") or {}
            status = obj.get("status", {})
            conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
            done = conditions.get("Ready") == "True" and conditions.get("Progressing") == "False"
            return obj if done and status.get("observedGeneration") == generation else None

        async def until(generation: int, timeout: float = 900) -> dict[str, Any]:
            deadline = time.monotonic() + timeout
            while (obj := await converged(generation)) is None:
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"the cluster did not converge on generation {generation} in {timeout:.0f}s"
                    )
                await asyncio.sleep(0.2)
            return obj

        async def workers() -> dict[str, str]:
            pods = await rest.list("Pod", KUBE_NS, {LABEL_CLUSTER: "fleet", LABEL_KIND: Kind.WORKER.value})
            return {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods}

        stop = asyncio.Event()
        async with model_check_stand_in(kube, KUBE_NS, {"target": KUBE_MODEL_SIZE}):
            running = asyncio.create_task(operator.run(stop))
            began = time.perf_counter()
            cpu = time.process_time()
            await rest.call("POST", path, body=body)
            obj = await until(1)
            took, cpu = time.perf_counter() - began, time.process_time() - cpu
            before = await workers()
            rows.append(
                (
                    f"kube: cold converge, {hosts} hosts",
                    f"{took:.1f} s",
                    f"create -> Ready, {len(before)} worker pods; operator CPU {cpu:.1f} s, "
                    f"{operator.counters.passes} passes",
                )
            )
            print(*rows[-1], sep=" | ", flush=True)

            edited = [h["name"] for i, h in enumerate(body["spec"]["hosts"]) if i % 10 == 9]
            for host in obj["spec"]["hosts"]:
                if host["name"] in edited:
                    host["gpus"][0]["threads"] = 1
            began = time.perf_counter()
            await rest.call("PUT", f"{path}/fleet", body=obj)
            await until(2)
            took = time.perf_counter() - began
            after = await workers()
            replaced = sorted(name for name, uid in after.items() if before.get(name) != uid)
            expected = sorted(n for n in after if any(n.endswith(f"-{h}-0") for h in edited))
            verdict = "only those: yes" if replaced == expected else f"NO: {replaced[:5]}..."
            rows.append(
                (
                    f"kube: edit touching {len(edited)} hosts (10%)",
                    f"{took:.1f} s",
                    f"-> converged, {len(replaced)} worker pods replaced; {verdict}",
                )
            )
            print(*rows[-1], sep=" | ", flush=True)
            stop.set()
            await running

        fresh = await rest.get(f"{path}/fleet") or {}
        passes = []
        for _ in range(max(repeat, 5)):
            began = time.process_time()
            await operator.pass_once(fresh)
            passes.append(time.process_time() - began)
        idle = statistics.median(passes)
        rows.append(
            (
                f"kube: idle pass (converged), {hosts} hosts, CPU",
                f"{idle * 1000:.0f} ms",
                "the operator's side: 3 list calls parsed, plan, status compared",
            )
        )
        print(*rows[-1], sep=" | ", flush=True)
    return rows


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--big", type=int, default=10000, help="the largest manifest (0: skip)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--swarm",
        default="100,1000",
        help="host counts of the swarm simulation, bench/swarm_sim.py (default 100,1000; '': skip)",
    )
    parser.add_argument(
        "--kube",
        type=int,
        default=0,
        metavar="N",
        help="also the Kubernetes operator on the full control plane with N hollow nodes (make kube)",
    )
    parser.add_argument("--kube-only", action="store_true", help="only the --kube section")
    args = parser.parse_args()
    sizes = sorted({args.hosts, *([4 * args.hosts, args.big] if args.big else [])})
    with tempfile.TemporaryDirectory(prefix="tightwad-bench-scale-") as tmp:
        folder = Path(tmp)
        os.environ["TIGHTWAD_STATE_DIR"] = str(folder / "state")
        rows = []
        if not args.kube_only:
            rows += processes(folder, sizes, args.repeat)
            sim_folder = folder / "sim"
            sim_folder.mkdir()
            rows += fleet(sim_folder, args.hosts, args.repeat)
        if args.kube:
            rows += kube_fleet(folder / "kube", args.kube, args.repeat)
    console = Console(width=150)
    console.print(
        table(
            f"How big it goes (medians of {args.repeat} runs; processes in CPU seconds)",
            ["what", "figure", "goal / detail"],
            rows,
        )
    )
    if args.swarm:  # the swarm at scale, simulated: its own table (bench/swarm_sim.py)
        from swarm_sim import simulate_sizes, swarm_table

        console.print(swarm_table(simulate_sizes([int(n) for n in args.swarm.split(",")])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
