"""The Helm chart with the real helm binary (scripts/fetch-helm.sh): lint, template with the default
and the example values, every rendered object valid against the real Kubernetes schemas, least
privilege, renders that never change by themselves (GitOps), the host folders a cluster may mount,
and the chart's CRD current with the manifest JSON Schema."""

from __future__ import annotations

import base64
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.kubeapi import ROOT, validate

from tightwad import crd

pytestmark = pytest.mark.system  # needs helm

CHART = ROOT / "charts" / "tightwad"
EXAMPLE_VALUES = CHART / "ci" / "example-values.yaml"
# The default values plus the one thing they cannot default: the token.
DEFAULT = ["--set", "token.value=0123456789abcdef0123456789abcdef"]


@cache
def helm() -> str:
    path = subprocess.run(
        [str(ROOT / "scripts" / "fetch-helm.sh"), "--print-path"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not Path(path).is_file():
        pytest.fail(f"no helm binary at {path}; fetch it with scripts/fetch-helm.sh", pytrace=False)
    return path


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=120)


def render(*values: str) -> subprocess.CompletedProcess[str]:
    return run_helm("template", "tw", str(CHART), "--namespace", "tightwad", "--include-crds", *values)


def template(*values: str) -> list[dict[str, Any]]:
    result = render(*values)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_the_charts_crd_is_current_with_the_schema() -> None:
    current = (CHART / "crds" / f"{crd.PLURAL}.yaml").read_text(encoding="utf-8")
    assert current == crd.render(), (
        "charts/tightwad/crds is stale: regenerate it with `python -m tightwad.crd`"
    )
    assert crd.main(["--check"]) == 0


@pytest.mark.parametrize("values", [DEFAULT, ["-f", str(EXAMPLE_VALUES)]], ids=["default", "example"])
def test_helm_lint(values: list[str]) -> None:
    result = run_helm("lint", "--strict", str(CHART), *values)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", [DEFAULT, ["-f", str(EXAMPLE_VALUES)]], ids=["default", "example"])
def test_helm_template_renders_valid_objects(values: list[str]) -> None:
    docs = template(*values)
    for doc in docs:
        validate(doc)
    assert by_kind(docs, "CustomResourceDefinition") == [crd.crd()]
    (deployment,) = by_kind(docs, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "tightwad.operator.kubernetes.controller"]
    assert "--namespace=tightwad" in container["args"]
    token = next(e for e in container["env"] if e["name"] == "TIGHTWAD_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["key"] == "token"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_default_values_least_privilege_and_leader_election() -> None:
    docs = template(*DEFAULT)
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    roles = {r["metadata"]["name"]: r for r in by_kind(docs, "Role")}
    assert set(roles) == {"tw-tightwad", "tw-tightwad-leader-election"}
    everything = [rule for role in roles.values() for rule in role["rules"]]
    assert not any("secrets" in rule["resources"] for rule in everything), (
        "the pods read the token, not the operator"
    )
    assert not any("*" in rule["verbs"] or "*" in rule["resources"] for rule in everything)
    lease = roles["tw-tightwad-leader-election"]["rules"]
    assert {"resourceNames": ["tightwad-operator"], "verbs": ["get", "update"]}.items() <= lease[1].items()
    (deployment,) = by_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--lease-name=tightwad-operator" in args and "--no-leader-election" not in args
    (secret,) = by_kind(docs, "Secret")
    assert secret["data"]["token"] == base64.b64encode(DEFAULT[1].split("=", 1)[1].encode()).decode()
    assert not by_kind(docs, "PersistentVolumeClaim") and not by_kind(docs, "Service")


def test_example_values_pvc_existing_secret_and_exposed_proxy() -> None:
    docs = template("-f", str(EXAMPLE_VALUES))
    assert not by_kind(docs, "Secret"), "token.existingSecret: the chart makes none"
    (claim,) = by_kind(docs, "PersistentVolumeClaim")
    assert (
        claim["spec"]["accessModes"] == ["ReadWriteMany"]
        and claim["spec"]["storageClassName"] == "nfs-client"
    )
    (deployment,) = by_kind(docs, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--model-claim={claim['metadata']['name']}" in args and "--no-leader-election" in args
    assert "--token-secret=homelab-token" in args
    (service,) = by_kind(docs, "Service")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["selector"] == {"tightwad.dev/cluster": "homelab", "tightwad.dev/unit": "proxy"}


def test_watching_every_namespace_takes_a_cluster_role() -> None:
    docs = template(*DEFAULT, "--set", "operator.watchAllNamespaces=true")
    assert [r["metadata"]["name"] for r in by_kind(docs, "ClusterRole")] == ["tw-tightwad"]
    (deployment,) = by_kind(docs, "Deployment")
    assert not any(
        a.startswith("--namespace=") for a in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    )


def test_two_replicas_without_leader_election_are_refused() -> None:
    result = run_helm(
        "template", "tw", str(CHART), *DEFAULT, "--set", "operator.leaderElection.enabled=false"
    )
    assert result.returncode != 0
    assert "two operators must never both act" in result.stderr


@pytest.mark.parametrize(
    "values", [[], DEFAULT, ["-f", str(EXAMPLE_VALUES)]], ids=["bare", "default", "example"]
)
def test_helm_template_twice_gives_the_same_objects(values: list[str]) -> None:
    # What a GitOps tool does on every sync: a render that changes by itself (a token made at render
    # time, which `lookup` cannot find there) rotates the token and restarts every pod.
    first, second = render(*values), render(*values)
    assert (first.returncode, first.stdout, first.stderr) == (second.returncode, second.stdout, second.stderr)


def test_without_a_token_the_chart_says_how_to_give_one() -> None:
    result = render()
    assert result.returncode != 0, "no token, no Secret: the chart must not invent one at render time"
    assert "token.value" in result.stderr and "token.existingSecret" in result.stderr


def test_the_operator_gets_the_allowed_host_paths() -> None:
    docs = template(*DEFAULT, "--set", "hostPaths.allowed={/var/lib/tightwad/models,/srv/gguf}")
    (deployment,) = by_kind(docs, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    allowed = [a for a in args if a.startswith("--allowed-host-path=")]
    assert allowed == ["--allowed-host-path=/var/lib/tightwad/models", "--allowed-host-path=/srv/gguf"]
    (deployment,) = by_kind(template(*DEFAULT), "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--allowed-host-path=")] == [
        "--allowed-host-path=/var/lib/tightwad/models"
    ]
    for bad in ("{/}", "{models}", "null"):
        result = render(*DEFAULT, "--set", f"hostPaths.allowed={bad}")
        assert result.returncode != 0 and "hostPaths.allowed" in result.stderr, bad
