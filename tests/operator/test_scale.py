"""A thousand hosts: behaviour at scale, asserted (never timed: bench/scale.py prints the speeds).

The reconcile loop runs for real over a simulated fleet (tests/support/fleet.py: stand-ins only at
the driver boundary); the dry run and validation are checked to contact nothing.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.fleet import SimulatedFleet, edit_fraction, fleet_manifest, write_fleet

from tightwad.manifest import manifest_from_dict
from tightwad.operator.cli import main as operator_main
from tightwad.operator.status import render_json
from tightwad.validate import validate_files

HOSTS = 200  # big enough for every kind of host many times over, small enough for a unit test


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("TIGHTWAD_STATE_DIR", str(tmp_path / "state"))
    sim = SimulatedFleet(tmp_path, HOSTS)
    try:
        yield sim
    finally:
        sim.close()


def test_the_fleet_converges_and_reports_ready(fleet: SimulatedFleet) -> None:
    passes = fleet.converge()
    status = passes[-1].status
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True", ready
    assert len(status["units"]) == len(fleet.reconciler.desired.units) + 1  # and the engine
    on_disk = json.loads(fleet.reconciler.status.path.read_text())
    assert on_disk["units"] == status["units"]


def test_a_manifest_edit_touching_a_tenth_of_the_hosts_restarts_only_those(
    fleet: SimulatedFleet,
) -> None:
    fleet.converge()
    data = fleet_manifest(HOSTS)
    edited = set(edit_fraction(data))
    assert len(edited) == HOSTS // 10
    fleet.path.write_text(yaml.safe_dump(data, sort_keys=False))
    mark = len(fleet.journal)
    fleet.converge()
    restarted = {line.split()[1] for line in fleet.journal[mark:]}
    expected = {u.name for u in fleet.reconciler.desired.units if u.host in edited}
    assert restarted == expected
    assert {name.split("-")[1] for name in restarted} == edited  # docker hosts' and agents' alike


def test_one_failed_worker_among_many_is_noticed_and_restarted_alone(fleet: SimulatedFleet) -> None:
    fleet.converge()
    host = fleet.docker["h00005"]
    host.crash("worker-h00005-0")
    mark = len(fleet.journal)
    for _ in range(5):
        result = fleet.tick()
        if host.containers["worker-h00005-0"]["exit_code"] is None and not result.plan.actions:
            break
    assert fleet.journal[mark:] == ["start worker-h00005-0"]
    assert host.containers["worker-h00005-0"]["failures"] == 1


def test_plan_and_validate_contact_no_daemon_and_no_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tightwad.operator import docker as docker_driver

    monkeypatch.setenv("TIGHTWAD_STATE_DIR", str(tmp_path / "state"))
    path = write_fleet(tmp_path / "fleet.yaml", 40)
    contacted: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        contacted.append(args)
        raise AssertionError(f"contacted {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(docker_driver, "_client", refuse)
    assert validate_files([str(path)]) == 0
    assert operator_main(["plan", str(path)]) == 0
    assert contacted == []
    out = capsys.readouterr().out
    assert "unseen 30 docker host(s)" in out  # named, not guessed at


def test_docker_clients_are_made_on_first_use_once_per_endpoint(tmp_path: Path) -> None:
    from tightwad.operator.docker import DockerClients, DockerDriver

    manifest = manifest_from_dict(fleet_manifest(8))
    made: list[str] = []

    class Client:
        def __init__(self, host: Any) -> None:
            made.append(host.name)
            self.containers = self

        def list(self, **kwargs: Any) -> list[Any]:
            return []

        def close(self) -> None:
            pass

    clients = DockerClients(connect=Client)  # type: ignore[arg-type]
    docker_hosts = [h for h in manifest.hosts if h.runtime == "docker"]
    drivers = [DockerDriver.for_host(h, manifest, tmp_path, clients) for h in docker_hosts]
    assert made == []  # a driver alone contacts nothing
    for driver in drivers:
        driver.observe(0.0)
        driver.observe(1.0)
    # Hosts 0, 1, 4, 5 have their own endpoints; 2 and 6 share this machine's daemon.
    assert made == ["h00000", "h00001", "h00002", "h00004", "h00005"]
    assert clients.made() == 5
    for driver in drivers:
        driver.close()
    clients.close()


def test_a_daemon_that_cannot_be_reached_is_that_hosts_problem(tmp_path: Path) -> None:
    from docker.errors import DockerException

    from tightwad.operator.docker import DockerClients, DockerDriver
    from tightwad.operator.driver import DriverUnavailable

    manifest = manifest_from_dict(fleet_manifest(1))

    def unreachable(host: Any) -> Any:
        raise DockerException("connection refused")

    driver = DockerDriver.for_host(manifest.hosts[0], manifest, tmp_path, DockerClients(unreachable))
    with pytest.raises(DriverUnavailable, match="host h00000: cannot reach its Docker daemon"):
        driver.observe(0.0)
    driver.close()


def test_status_rows_one_per_line_are_the_same_json() -> None:
    doc = {"a": 1, "units": [{"name": '"units": []', "x": [1, None]}, {"name": "é"}], "b": {"c": []}}
    text = render_json(doc)
    assert json.loads(text) == doc
    assert text.count("\n") == 10 and '    {"name": "\\u00e9"}' in text
    assert json.loads(render_json({"units": []})) == {"units": []}
