"""`spec.target.exact`: stock kernels unless the manifest says `strict`, and then everywhere the
target is computed: the engine gets `--exact on|off` and every rpc worker GGML_CPU_EXACT=1 or 0
(the pinned build is exact when the variable is unset, so a worker is always told), on every runtime:
the process driver's command and environment, the docker driver's container config, and the
Kubernetes pods. Drafters are left alone (their output is only a proposal). A changed value restarts
the engine and the workers, nothing else; a manifest without the key keeps its units' hashes. And
on real processes: `tightwad up` with strict, read back from the running workers' environment and
the engine's command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from support.kubeapi import ROOT
from support.plans import Sim, desired, manifest_data, names
from support.reconcile import Operator, local_manifest, pids_alive, write_manifest

from tightwad.engine.cli import build_parser
from tightwad.manifest import ManifestError, manifest_from_dict
from tightwad.operator.commands import Binaries, command, environment
from tightwad.operator.desired import Desired, desired_state
from tightwad.operator.docker import IN_IMAGE, Images, container_config
from tightwad.operator.kubernetes.controller import MANIFEST_IN_POD
from tightwad.operator.kubernetes.render import Owner, RenderSettings, render_all
from tightwad.operator.kubernetes.workloads import kubernetes_hosts
from tightwad.operator.plan import Start, Stop, plan
from tightwad.operator.units import Kind, Unit
from tightwad.toolchain import Toolchain

PATHS = {"big": "/models/big.gguf", "small": "/models/small.gguf"}


def strict() -> Desired:
    return desired(manifest_data(target__exact="strict"))


def engine_argv(d: Desired) -> list[str]:
    return command(d.engine, Binaries(), PATHS)


def exact_value(argv: list[str]) -> str:
    return argv[argv.index("--exact") + 1]


def test_the_engine_defaults_to_stock_kernels() -> None:
    assert build_parser().parse_args(["--model", "m.gguf"]).exact == "off"


def test_without_the_key_stock_kernels_are_said_to_every_part_of_the_target() -> None:
    d = desired()
    assert exact_value(engine_argv(d)) == "off"
    for slot in d.stacks.values():
        for worker in slot.workers:
            assert environment(worker, Binaries())["GGML_CPU_EXACT"] == "0"
    drafter = next(u for u in d.units if u.kind is Kind.DRAFTER)
    assert "GGML_CPU_EXACT" not in environment(drafter, Binaries())


def test_strict_reaches_the_engine_and_every_worker_of_both_slots() -> None:
    d = strict()
    for slot in d.stacks.values():
        assert exact_value(command(slot.engine, Binaries(), PATHS)) == "on"
        assert [environment(w, Binaries())["GGML_CPU_EXACT"] for w in slot.workers] == ["1", "1"]
    drafter = next(u for u in d.units if u.kind is Kind.DRAFTER)
    assert "GGML_CPU_EXACT" not in environment(drafter, Binaries())
    assert "--exact" not in command(drafter, Binaries(), PATHS)


def test_a_manifest_without_the_key_keeps_its_units_hashes() -> None:
    # `off` is the default: written or not, the specs (and so the running units) are the same.
    plain, written = desired(), desired(manifest_data(target__exact="off"))
    assert [u.spec_hash for u in plain.units] == [u.spec_hash for u in written.units]
    assert plain.engine.spec_hash == written.engine.spec_hash
    assert "exact" not in plain.engine.spec


def test_changing_it_restarts_the_engine_and_the_workers_only() -> None:
    sim = Sim()
    sim.converge(desired())
    before = {name for name in sim.units}
    p = plan(strict(), sim.observed())
    stopped, started = set(names(p.actions, Stop)), set(names(p.actions, Start))
    workers = {n for n in before if n.startswith("worker-")}
    assert workers and workers <= stopped and workers <= started
    assert "drafter-d1" not in stopped and "proxy" not in stopped
    sim.converge(strict())
    engines = {n for n in sim.units if n.startswith("engine-") and n != "engine-router"}
    assert engines == {strict().engine.name} and strict().engine.name not in before


def test_a_wrong_value_is_refused_naming_the_field() -> None:
    with pytest.raises(ManifestError) as raised:
        manifest_from_dict(manifest_data(target__exact="on"))
    assert "spec.target.exact" in str(raised.value) and "strict" in str(raised.value)


def _docker_desired(exact: str) -> Desired:
    data = manifest_data(target__exact=exact)
    host = data["spec"]["hosts"][0]
    host |= {"runtime": "docker", "docker": {"endpoint": "unix:///var/run/docker.sock"}}
    host["modelDir"] = "/srv/models"
    return desired(data)


@pytest.mark.parametrize(("exact", "flag", "env"), [("off", "off", "0"), ("strict", "on", "1")])
def test_docker_containers_carry_it(exact: str, flag: str, env: str) -> None:
    d = _docker_desired(exact)
    engine = container_config(d.engine, "c", Images(), "/srv/models")
    assert exact_value(engine["command"]) == flag and "GGML_CPU_EXACT" not in engine["environment"]
    for worker in d.stacks["a"].workers:
        config = container_config(worker, "c", Images(), "/srv/models")
        assert config["environment"]["GGML_CPU_EXACT"] == env
        assert config["command"][0] == IN_IMAGE.rpc_server


def _kube_objects(exact: str) -> list[dict[str, Any]]:
    data = yaml.safe_load((ROOT / "examples" / "cluster-cr.yaml").read_text())
    data["spec"]["auth"]["token"] = "s3cret-token-for-tests"
    if exact != "off":
        data["spec"]["target"]["exact"] = exact
    m = manifest_from_dict(data)
    d = desired_state(m, manifest_path=MANIFEST_IN_POD)
    units: list[Unit] = [u for u in (*d.units, d.engine) if u.host in kubernetes_hosts(m)]
    owner = Owner("homelab", "default", "6f1c9d1e-0000-4000-8000-000000000001", {})
    return render_all(units, m, owner, RenderSettings(token_secret="tightwad-token"))


def _containers(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    found = []
    for o in objects:
        spec = o.get("spec", {})
        pod = spec["template"]["spec"] if "template" in spec else spec
        found += [c for c in pod.get("containers", []) if c["name"] == kind]
    return found


@pytest.mark.parametrize(("exact", "flag", "env"), [("off", "off", "0"), ("strict", "on", "1")])
def test_kubernetes_pods_carry_it(exact: str, flag: str, env: str) -> None:
    objects = _kube_objects(exact)
    workers = _containers(objects, Kind.WORKER.value)
    assert workers, "the example has in-cluster workers"
    for worker in workers:
        assert {"name": "GGML_CPU_EXACT", "value": env} in worker["env"]
    (engine,) = _containers(objects, Kind.ENGINE.value)
    assert exact_value(engine["args"]) == flag
    assert all(e["name"] != "GGML_CPU_EXACT" for e in engine["env"])
    for drafter in _containers(objects, Kind.DRAFTER.value):
        assert all(e["name"] != "GGML_CPU_EXACT" for e in drafter["env"])


# Real processes: `tightwad up` with strict, then what the running workers and engine were given ----


def _proc(pid: int, name: str) -> list[str]:
    return Path(f"/proc/{pid}/{name}").read_bytes().decode().split("\0")


@pytest.mark.integration
def test_tightwad_up_gives_strict_to_the_running_workers_and_engine(
    toolchain: Toolchain, tmp_path: Path
) -> None:
    data = local_manifest("exactop", drafter=False, proxy=False)
    data["spec"]["target"]["exact"] = "strict"
    manifest = tmp_path / "cluster.yaml"
    write_manifest(manifest, data)
    op = Operator(manifest, tmp_path / "state", tmp_path / "up.log")
    op.start()
    pids: list[int] = []
    try:
        units = op.units(op.wait_ready())
        pids = [u["pid"] for u in units.values() if u.get("pid")]
        workers = [u for u in units.values() if u["kind"] == Kind.WORKER.value]
        (engine,) = [u for u in units.values() if u["kind"] == Kind.ENGINE.value]
        assert len(workers) == 2
        for worker in workers:
            assert "GGML_CPU_EXACT=1" in _proc(worker["pid"], "environ")
        argv = _proc(engine["pid"], "cmdline")
        assert exact_value(argv) == "on", argv
    finally:
        assert op.interrupt() == 0, op.log()
    assert pids_alive(pids) == [], op.log()
