"""How big it goes: the manifest path and the reconcile loop at 1000 hosts and beyond.

1. Whole processes: `tightwad plan FILE` and `tightwad validate FILE` on generated manifests of
   1000 / 4000 / 10000 hosts (mixed cuda/rocm/cpu/metal; docker, native and process runtimes:
   tests/support/fleet.py), with the interpreter's start and the imports measured apart.
2. A simulated fleet of 1000 hosts in one process: the REAL manifest loading, plan, reconcile loop
   and status file, with stand-ins only at the driver boundary (a fake Docker driver per docker
   host, fake agents for the others; `SimulatedFleet`). Cold converge, one failed worker noticed
   and restarted, a manifest edit touching 10% of hosts, and the CPU of an idle pass.

Medians of `--repeat` runs; whole processes are timed in CPU seconds (the machine may be shared).
Nothing is contacted: no daemon, no host.

Usage: .venv/bin/python bench/scale.py [--hosts 1000] [--big 10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from _common import ROOT, table
from rich.console import Console
from support.fleet import SimulatedFleet, edit_fraction, fleet_manifest, write_fleet


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
    args = parser.parse_args()
    sizes = sorted({args.hosts, *([4 * args.hosts, args.big] if args.big else [])})
    with tempfile.TemporaryDirectory(prefix="tightwad-bench-scale-") as tmp:
        folder = Path(tmp)
        os.environ["TIGHTWAD_STATE_DIR"] = str(folder / "state")
        rows = processes(folder, sizes, args.repeat)
        sim_folder = folder / "sim"
        sim_folder.mkdir()
        rows += fleet(sim_folder, args.hosts, args.repeat)
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
