"""The docker driver against a real Docker daemon (Debian's docker.io, started by the tests).

No registry is reachable, so the worker image is imported from a local root filesystem: the pinned
build's ggml-rpc-server and llama-server with their libraries, and busybox. The cluster mixes
runtimes the way a homelab does: a docker host lends two CPU workers and runs the drafter (its
model read from the host's model volume), this machine runs the engine and the proxy as processes.
The tests walk through create, drift, update by hash, adoption by a new operator, removal, and
Ctrl-C; and check the container settings for NVIDIA and AMD GPUs without needing either.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docker.types import DeviceRequest
from support.reconcile import ROOT, Operator, answers_again, chat, local_manifest, write_manifest

import docker
from tightwad import models
from tightwad.launch import free_port
from tightwad.manifest import manifest_from_dict
from tightwad.operator.desired import desired_state
from tightwad.operator.docker import LABEL, Images, container_config, container_name, model_file
from tightwad.toolchain import Toolchain

pytestmark = pytest.mark.system  # needs a Docker daemon

BUSYBOX_APPLETS = ("sh", "sha256sum", "stat", "head", "cut", "cat", "ls", "echo", "true", "test", "[")


# ------------------------------------------------------------------------------------------------
# Pure: what the containers are asked to be


def _docker_manifest(backends: list[dict[str, Any]]) -> dict[str, Any]:
    data = local_manifest("gpus", drafter=False)
    data["spec"]["hosts"][0] |= {"runtime": "docker", "docker": {"endpoint": "unix:///var/run/docker.sock"}}
    data["spec"]["hosts"][0]["modelDir"] = "/srv/models"
    data["spec"]["hosts"][0]["gpus"] = backends
    return data


def test_nvidia_workers_get_a_device_request_for_their_gpu() -> None:
    d = desired_state(manifest_from_dict(_docker_manifest([{"backend": "cuda", "index": 1, "port": 18052}])))
    worker = d.stacks["a"].workers[0]
    config = container_config(worker, "gpus", Images(), "/srv/models")
    assert config["device_requests"] == [DeviceRequest(device_ids=["1"], capabilities=[["gpu"]])]
    assert config["image"] == Images().worker_cuda and config["network_mode"] == "host"
    assert config["command"][:1] == ["ggml-rpc-server"] and "CUDA1" in config["command"]
    assert config["labels"][f"{LABEL}/spec-hash"] == worker.spec_hash
    assert config["restart_policy"] == {"Name": "unless-stopped"}


def test_amd_workers_get_kfd_dri_and_the_video_render_groups() -> None:
    d = desired_state(manifest_from_dict(_docker_manifest([{"backend": "rocm", "port": 18052}])))
    config = container_config(d.stacks["a"].workers[0], "gpus", Images(), "/srv/models")
    assert config["devices"] == ["/dev/kfd:/dev/kfd:rwm", "/dev/dri:/dev/dri:rwm"]
    assert config["group_add"] == ["video", "render"] and "device_requests" not in config
    assert "ROCm0" in config["command"]


def test_model_units_mount_the_hosts_model_volume_read_only() -> None:
    data = _docker_manifest([{"backend": "cpu", "port": 18052}])
    d = desired_state(manifest_from_dict(data))
    engine = d.stacks["a"].engine
    config = container_config(engine, "gpus", Images(), "/srv/models")
    assert config["volumes"] == {"/srv/models": {"bind": "/models", "mode": "ro"}}
    model = models.catalog_model("smollm2-135m-f32").filename
    assert f"/models/{model}" in config["command"] and config["image"] == Images().app
    assert model_file(engine.models[0]) == model
    assert config["name"] == container_name("gpus", engine.name)


def test_secrets_travel_in_the_environment_not_the_command_line() -> None:
    data = _docker_manifest([{"backend": "cpu", "port": 18052}])
    data["spec"]["auth"] = {"token": "s3cret"}
    d = desired_state(manifest_from_dict(data))
    config = container_config(d.stacks["a"].engine, "gpus", Images(), "/srv/models")
    assert "s3cret" not in " ".join(config["command"]) and "s3cret" not in str(config["labels"])
    assert config["environment"]["TIGHTWAD_TOKEN"] == "s3cret"


# ------------------------------------------------------------------------------------------------
# A real daemon


@pytest.fixture(scope="session")
def worker_image(docker_endpoint: str, toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> str:
    """tightwad-test/worker-cpu:<build key>, imported from a root filesystem built here (cached)."""
    client = docker.DockerClient(base_url=docker_endpoint)
    name = f"tightwad-test/worker-cpu:{toolchain.prefix.name}"  # one image per llama.cpp build
    try:
        client.images.get(name)
        return name
    except docker.errors.ImageNotFound:
        pass
    root = tmp_path_factory.mktemp("rootfs")
    for sub in ("opt/llama/bin", "opt/llama/lib", "bin", "lib64", "lib/x86_64-linux-gnu", "models", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    binaries = [toolchain.rpc_server, toolchain.llama_server]
    for binary in binaries:
        shutil.copy2(binary, root / "opt/llama/bin" / binary.name)
    for lib in toolchain.lib_dir.glob("*.so*"):
        shutil.copy2(lib, root / "opt/llama/lib" / lib.name, follow_symlinks=True)
    ldd = subprocess.run(["ldd", *map(str, binaries)], capture_output=True, text=True, check=True).stdout
    for path in {part for line in ldd.splitlines() for part in line.split() if part.startswith("/lib")}:
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target, follow_symlinks=True)
    busybox = shutil.which("busybox")
    assert busybox, "busybox is missing: run scripts/install-system-deps.sh (busybox-static)"
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    archive = root.parent / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname=".")
    repository, tag = name.split(":")
    client.api.import_image_from_file(
        str(archive), repository=repository, tag=tag, changes=["ENV PATH=/opt/llama/bin:/bin"]
    )
    return name


class DockerCluster:
    def __init__(self, op: Operator, data: dict[str, Any], client: docker.DockerClient) -> None:
        self.op, self.data, self.client = op, data, client

    def containers(self) -> dict[str, Any]:
        found = self.client.containers.list(
            all=True, filters={"label": f"{LABEL}/cluster={self.data['metadata']['name']}"}
        )
        return {c.labels[f"{LABEL}/unit"]: c for c in found if f"{LABEL}/unit" in c.labels}

    def ids(self) -> dict[str, str]:
        return {name: c.id for name, c in self.containers().items()}


@pytest.fixture(scope="module")
def cluster(
    docker_endpoint: str, worker_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DockerCluster]:
    folder = tmp_path_factory.mktemp("operator-docker")
    volume = folder / "models"
    volume.mkdir()
    q4 = models.resolve("smollm2-135m-q4_1")
    try:
        os.link(q4, volume / q4.name)  # the host's model volume, filled as the swarm would
    except OSError:
        shutil.copy2(q4, volume / q4.name)
    data = local_manifest("dkr")
    spec = data["spec"]
    spec["models"] = [{"name": "smollm2-135m-q4", "source": "catalog:smollm2-135m-q4_1", "contextSize": 512}]
    box = {
        "name": "box",
        "address": "127.0.0.1",
        "runtime": "docker",
        "docker": {"endpoint": docker_endpoint},
        "modelDir": str(volume),
        "gpus": [
            {"backend": "cpu", "port": free_port(), "threads": 1},
            {"backend": "cpu", "port": free_port(), "threads": 1},
        ],
    }
    spec["hosts"] = [box, {"name": "local", "address": "127.0.0.1", "runtime": "process"}]
    spec["target"]["model"] = "smollm2-135m-q4"
    spec["drafters"][0] |= {"host": "box", "model": "smollm2-135m-q4"}
    manifest = folder / "cluster.yaml"
    write_manifest(manifest, data)
    op = Operator(manifest, folder / "state", folder / "up.log")
    os.environ["TIGHTWAD_IMAGE_WORKER_CPU"] = worker_image
    client = docker.DockerClient(base_url=docker_endpoint)
    c = DockerCluster(op, data, client)
    op.start()
    try:
        yield c
    finally:
        if op.process is not None and op.process.poll() is None:
            assert op.interrupt() == 0, op.log()
        else:
            op.cli("down", str(manifest))
        assert c.containers() == {}, op.log()
        os.environ.pop("TIGHTWAD_IMAGE_WORKER_CPU", None)


def test_docker_workers_and_drafter_serve_with_a_process_engine(cluster: DockerCluster) -> None:
    op = cluster.op
    doc = op.wait_ready()
    assert chat(str(doc["endpoint"])).strip()
    containers = cluster.containers()
    assert sorted(containers) == ["drafter-smollm2-q4", "worker-box-0", "worker-box-1"]
    worker = containers["worker-box-0"]
    assert worker.attrs["HostConfig"]["NetworkMode"] == "host"
    assert worker.labels[f"{LABEL}/spec-hash"] == op.units(doc)["worker-box-0"]["specHash"]
    mounts = {m["Destination"]: m for m in containers["drafter-smollm2-q4"].attrs["Mounts"]}
    assert mounts["/models"]["RW"] is False
    assert "verify model smollm2-135m-q4 on box" in op.log()  # checked inside the volume, on the host


def test_a_container_removed_by_hand_is_recreated(cluster: DockerCluster) -> None:
    op = cluster.op
    op.wait_ready()
    before = cluster.ids()
    began = time.monotonic()
    cluster.containers()["worker-box-1"].remove(force=True)
    op.wait(
        "worker-box-1 recreated",
        lambda d: cluster.ids().get("worker-box-1") not in (None, before["worker-box-1"]),
    )
    doc = op.wait_ready(timeout=120)
    answers_again(str(doc["endpoint"]))
    print(f"\ndocker rm -f of a worker -> endpoint answering again: {time.monotonic() - began:.1f}s")
    assert cluster.ids()["worker-box-0"] == before["worker-box-0"]


def test_a_changed_spec_replaces_only_its_container(cluster: DockerCluster) -> None:
    op, data = cluster.op, cluster.data
    op.wait_ready()
    before = cluster.ids()
    changed = copy.deepcopy(data)
    changed["spec"]["hosts"][0]["gpus"][1]["threads"] = 2
    write_manifest(op.manifest, changed)
    op.wait(
        "worker-box-1 replaced",
        lambda d: cluster.ids().get("worker-box-1") not in (None, before["worker-box-1"]),
    )
    op.wait_ready(timeout=120)
    after = cluster.containers()
    assert "--threads" in after["worker-box-1"].attrs["Args"] and "2" in after["worker-box-1"].attrs["Args"]
    assert after["worker-box-0"].id == before["worker-box-0"]
    assert after["drafter-smollm2-q4"].id == before["drafter-smollm2-q4"]
    cluster.data = changed


def test_a_new_operator_adopts_the_containers_by_label(cluster: DockerCluster) -> None:
    op = cluster.op
    op.wait_ready()
    before = cluster.ids()
    op.kill9()
    op.start()
    new_pid = op.process.pid if op.process else None
    doc = op.wait("a pass of the new operator", lambda d: d.get("operator", {}).get("pid") == new_pid)
    doc = op.wait_ready()
    assert cluster.ids() == before
    assert all(op.units(doc)[name]["adopted"] for name in before)
    assert chat(str(doc["endpoint"])).strip()


def test_units_the_manifest_drops_are_removed(cluster: DockerCluster) -> None:
    op = cluster.op
    op.wait_ready()
    dropped = copy.deepcopy(cluster.data)
    dropped["spec"]["drafters"] = []
    dropped["spec"]["proxy"]["mode"] = "passthrough"
    write_manifest(op.manifest, dropped)
    op.wait("the drafter removed", lambda d: "drafter-smollm2-q4" not in cluster.containers())
    doc = op.wait_ready(timeout=120)
    answers_again(str(doc["endpoint"]))  # the proxy restarted without its drafter
    assert sorted(cluster.containers()) == ["worker-box-0", "worker-box-1"]
    cluster.data = dropped


def test_a_missing_image_is_reported_not_hidden(docker_endpoint: str, tmp_path: Path) -> None:
    from tightwad.operator.docker import DockerDriver
    from tightwad.operator.observed import Health

    data = _docker_manifest([{"backend": "cpu", "port": free_port()}])
    data["spec"]["hosts"][0]["docker"]["endpoint"] = docker_endpoint
    manifest = manifest_from_dict(data)
    worker = desired_state(manifest).stacks["a"].workers[0]
    driver = DockerDriver(
        docker.DockerClient(base_url=docker_endpoint), manifest.hosts[0], "missingimg",
        images=Images(worker_cpu="tightwad-test/no-such-image:0"),
    )  # fmt: skip
    driver.start(worker, "created")
    assert (
        driver.observe(0.0)[worker.name].error == "pulling image tightwad-test/no-such-image:0 on host local"
    )
    deadline = time.monotonic() + 60
    while "could not be pulled" not in (driver.pulls.get("tightwad-test/no-such-image:0") or ""):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    driver.start(worker, "restart", failed=True)
    state = driver.observe(0.0)[worker.name]
    assert not state.running and state.health is Health.DOWN and state.failures == 1
    assert state.error is not None and state.error.startswith(
        "image tightwad-test/no-such-image:0 is not on host local and could not be pulled ("
    )
    assert state.error.endswith("build or load it there")
    driver.close()


# ------------------------------------------------------------------------------------------------
# A second Docker host: its own daemon in a network namespace, reached over TCP


NETNS, VETH = "tw-op-dk2", "tw-op-dk2"
ROOT_IP, HOST_IP = "10.231.77.1", "10.231.77.2"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=60)


@pytest.fixture(scope="module")
def far_docker(worker_image: str, docker_endpoint: str) -> Iterator[str]:
    """dockerd in network namespace tw-op-dk2 at 10.231.77.2, joined to this namespace by one veth
    pair (traffic only between us and that address). Yields its tcp:// endpoint."""
    sh("ip", "link", "del", f"{VETH}-r", check=False)
    sh("ip", "netns", "del", NETNS, check=False)
    sh("ip", "netns", "add", NETNS)
    sh("ip", "link", "add", f"{VETH}-r", "type", "veth", "peer", "name", f"{VETH}-n")
    sh("ip", "link", "set", f"{VETH}-n", "netns", NETNS)
    sh("ip", "addr", "add", f"{ROOT_IP}/30", "dev", f"{VETH}-r")
    sh("ip", "link", "set", f"{VETH}-r", "up")
    for argv in (
        ["addr", "add", f"{HOST_IP}/30", "dev", f"{VETH}-n"],
        ["link", "set", f"{VETH}-n", "up"],
        ["link", "set", "lo", "up"],
    ):
        sh("ip", "netns", "exec", NETNS, "ip", *argv)
    root = Path(os.environ.get("TIGHTWAD_CACHE", Path.home() / ".cache" / "tightwad")) / "dockerd-far"
    env = {
        **os.environ,
        "TIGHTWAD_DOCKERD_ROOT": str(root),
        "TIGHTWAD_DOCKERD_NETNS": NETNS,
        "TIGHTWAD_DOCKERD_LISTEN": f"tcp://{HOST_IP}:2375",
    }
    script = str(ROOT / "scripts" / "start-dockerd.sh")
    try:
        out = subprocess.run([script], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        endpoint = out.stdout.strip().splitlines()[-1]
        far = docker.DockerClient(base_url=endpoint)
        try:
            far.images.get(worker_image)
        except docker.errors.ImageNotFound:  # no registry: carry the image over from the first daemon
            near = docker.DockerClient(base_url=docker_endpoint)
            far.images.load(b"".join(near.images.get(worker_image).save(named=True)))
        yield endpoint
    finally:
        subprocess.run([script, "stop"], env=env, timeout=120, check=False)
        sh("ip", "link", "del", f"{VETH}-r", check=False)
        sh("ip", "netns", "del", NETNS, check=False)


def test_a_remote_docker_host_over_tcp_create_adopt_drift_remove(
    far_docker: str, worker_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIGHTWAD_IMAGE_WORKER_CPU", worker_image)
    data = local_manifest("dkrfar", drafter=False)
    spec = data["spec"]
    spec["models"] = [{"name": "smollm2-135m-q4", "source": "catalog:smollm2-135m-q4_1", "contextSize": 512}]
    spec["target"]["model"] = "smollm2-135m-q4"
    spec["hosts"][0]["gpus"] = []
    far = {
        "name": "far",
        "address": HOST_IP,
        "runtime": "docker",
        "docker": {"endpoint": far_docker},
        "gpus": [{"backend": "cpu", "port": 18052, "threads": 1}],
    }
    spec["hosts"].append(far)
    manifest = tmp_path / "cluster.yaml"
    write_manifest(manifest, data)
    client = docker.DockerClient(base_url=far_docker)

    def containers() -> dict[str, str]:
        found = client.containers.list(all=True, filters={"label": f"{LABEL}/cluster=dkrfar"})
        return {c.labels[f"{LABEL}/unit"]: c.id for c in found}

    op = Operator(manifest, tmp_path / "state", tmp_path / "up.log")
    op.start()
    try:
        doc = op.wait_ready()
        answers_again(str(doc["endpoint"]))
        assert list(containers()) == ["worker-far-0"]
        engine = next(u for u in op.units(doc).values() if u["kind"] == "engine")
        assert engine["host"] == "local" and op.units(doc)["worker-far-0"]["host"] == "far"
        first = containers()["worker-far-0"]

        op.kill9()  # adopt: a new operator finds the container by its labels
        op.start()
        new_pid = op.process.pid if op.process else None
        op.wait("the new operator's pass", lambda d: d.get("operator", {}).get("pid") == new_pid)
        op.wait_ready()
        assert containers() == {"worker-far-0": first}

        client.containers.get(first).remove(force=True)  # drift on the far host
        op.wait("recreated on the far host", lambda d: containers().get("worker-far-0") not in (None, first))
        answers_again(str(op.wait_ready()["endpoint"]))

        data["spec"]["hosts"].pop()  # the host leaves the cluster: its container goes
        write_manifest(manifest, data)
        op.wait("the far host emptied", lambda d: containers() == {})
        answers_again(str(op.wait_ready(timeout=120)["endpoint"]))  # the engine now runs alone
    finally:
        if op.process is not None and op.process.poll() is None:
            assert op.interrupt() == 0, op.log()
    assert containers() == {}
