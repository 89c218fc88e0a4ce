"""The cluster manifest: examples validate, each mistake gives one clear problem at the right line,
interpolation works, and `tightwad validate` never shows a traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from support import ROOT as REPO

from tightwad.errors import TightwadError
from tightwad.manifest import (
    Manifest,
    ManifestError,
    ManifestProblem,
    is_loopback,
    load_manifest,
    load_schema,
    manifest_from_dict,
    parse_manifest,
    parse_size,
)
from tightwad.manifest_views import GateReviewer, ProxyLimits, ProxySpec, QueueSettings, SwarmSpec

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
BROKEN = sorted((REPO / "tests" / "manifests" / "broken").glob("*.yaml"))
MARKER = "# <- the mistake"

# The smallest valid manifest; tests change one line of it.
MINIMAL = """\
apiVersion: tightwad.dev/v1alpha1
kind: TightwadCluster
metadata:
  name: tiny
spec:
  models:
    - name: tiny
      source: catalog:smollm2-135m-q4_1
  hosts:
    - name: local
      address: 127.0.0.1
      gpus:
        - backend: cpu
          port: 18152
  target:
    model: tiny
    host: local
"""


def problems_of(text: str, environ: Mapping[str, str] | None = None) -> list[ManifestProblem]:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text, "test.yaml", environ=environ or {})
    return caught.value.problems


def only_problem(text: str, environ: Mapping[str, str] | None = None) -> ManifestProblem:
    problems = problems_of(text, environ)
    assert len(problems) == 1, problems
    return problems[0]


# ----------------------------------------------------------------------------------------------
# Examples


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIGHTWAD_TOKEN", "test-token")
    manifest = load_manifest(path)
    assert manifest.target_model.name == manifest.target.model
    assert manifest.base_dir == path.parent


def test_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {"local.yaml", "homelab.yaml"}


def test_local_example_is_one_cpu_machine_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIGHTWAD_MODEL_DIR", raising=False)
    manifest = load_manifest(REPO / "examples" / "local.yaml")
    [host] = manifest.hosts
    assert host.address == "127.0.0.1" and host.runtime == "process"
    assert host.model_dir == "~/.cache/tightwad/models"
    assert [gpu.backend for gpu in host.gpus] == ["cpu", "cpu"]
    assert len({gpu.port for gpu in host.gpus}) == 2
    assert manifest.target_model.source == "catalog:smollm2-135m-f32"
    drafter_model = manifest.drafters[0].model
    assert drafter_model is not None and manifest.model(drafter_model).source == "catalog:smollm2-135m-q4_1"
    assert manifest.context_size == 2048
    assert manifest.proxy is not None and manifest.proxy.bind == "127.0.0.1"
    assert manifest.proxy.port == 8088
    assert manifest.swarm.enabled is False
    assert manifest.gate.enabled is False
    assert manifest.token is None


def test_homelab_example_needs_its_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIGHTWAD_TOKEN", raising=False)
    with pytest.raises(ManifestError) as caught:
        load_manifest(REPO / "examples" / "homelab.yaml")
    [problem] = caught.value.problems
    assert problem.path == "spec.auth.token"
    assert "TIGHTWAD_TOKEN is not set" in problem.message

    monkeypatch.setenv("TIGHTWAD_TOKEN", "s3cret")
    manifest = load_manifest(REPO / "examples" / "homelab.yaml")
    assert manifest.token == "s3cret"
    backends = {gpu.backend for host in manifest.hosts for gpu in host.gpus}
    assert backends == {"cuda", "rocm", "metal", "cpu"}
    assert manifest.host("macbook").runtime == "native"


# ----------------------------------------------------------------------------------------------
# Broken manifests: one file per mistake, `# expect:` on line 1, the mistake marked on its line


def expectation(path: Path) -> tuple[str, int]:
    lines = path.read_text().splitlines()
    first = re.fullmatch(r"# expect: (.+)", lines[0])
    assert first, f"{path.name}: line 1 must be `# expect: <message>`"
    marked = [number for number, line in enumerate(lines, start=1) if MARKER in line]
    assert len(marked) == 1, f"{path.name}: mark the offending line with {MARKER!r}"
    return first.group(1), marked[0]


def test_there_is_a_broken_file_for_each_kind_of_mistake() -> None:
    names = {p.stem for p in BROKEN}
    wanted = {"wrong-type", "unknown-key", "missing-target-model", "duplicate-host", "backend-typo"}
    wanted |= {"bad-yaml", "missing-env-var", "proxy-beyond-loopback"}
    assert wanted <= names


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.stem)
def test_broken_manifest_gives_exactly_its_problem(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIGHTWAD_TEST_UNSET_TOKEN", raising=False)
    expected, line = expectation(path)
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    [problem] = caught.value.problems
    text = f"{problem.path}: {problem.message}" if problem.path else problem.message
    assert expected in text
    assert problem.line == line, f"{problem} should point at line {line}"
    assert problem.column is not None and problem.column >= 1


# ----------------------------------------------------------------------------------------------
# Messages


def test_enum_message_lists_the_choices() -> None:
    problem = only_problem(MINIMAL.replace("backend: cpu", "backend: nvidia"))
    assert problem.path == "spec.hosts[0].gpus[0].backend"
    assert problem.message.startswith("'nvidia' is not one of cuda, rocm, metal, cpu")
    assert (problem.line, problem.column) == (13, 20)


def test_unknown_key_suggests_the_closest_key() -> None:
    text = MINIMAL.replace("      source:", "      contextsize: 2048\n      source:")
    problem = only_problem(text)
    assert problem.path == "spec.models[0].contextsize"
    assert "did you mean 'contextSize'?" in problem.message
    assert "allowed keys are name, source, sha256, contextSize" in problem.message
    assert (problem.line, problem.column) == (8, 7)


def test_unknown_key_without_a_close_match_only_lists_the_keys() -> None:
    problem = only_problem(MINIMAL.replace("  target:\n", "  target:\n    flavour: spicy\n"))
    allowed = "model, host, port, contextSize, tensorSplit, maxConversations, queue, aliases, exact"
    assert problem.message == f"unknown key; allowed keys are {allowed}"


def test_missing_required_key_points_at_the_parent_mapping() -> None:
    text = MINIMAL.replace("    model: tiny\n", "")
    problem = only_problem(text)
    assert problem.path == "spec.target"
    assert problem.message.startswith("missing required key 'model'")
    assert problem.line == MINIMAL.splitlines().index("  target:") + 1


def test_alternatives_explain_the_branch_that_was_meant() -> None:
    proxy = "  proxy:\n    host: local\n    mode: passthrough\n    maxDraftTokens: {}\n"
    assert only_problem(MINIMAL + proxy.format(100)).message == "expected at most 64, got 100"
    expected = "expected 'auto' or an integer from 1 to 64, got 'many'"
    assert only_problem(MINIMAL + proxy.format("many")).message == expected


def test_a_bare_yaml_boolean_is_told_to_be_quoted() -> None:
    problem = only_problem(MINIMAL.replace("  target:\n", "  target:\n    exact: off\n"))
    assert problem.path == "spec.target.exact"
    hint = 'YAML reads a bare off/on/yes/no as a boolean: quote the word, e.g. "off"'
    assert problem.message == f"expected a string, got false; {hint}"


def test_pattern_message_says_the_form() -> None:
    problem = only_problem(MINIMAL.replace("port: 18152", "port: 18152\n          memory: 8 gigs"))
    assert problem.message.startswith("'8 gigs' is not a valid size; write a number and a unit")


def test_every_problem_is_reported_in_file_order() -> None:
    text = MINIMAL.replace("  name: tiny\nspec:", "  name: Tiny\nspec:")
    text = text.replace("backend: cpu", "backend: gpu").replace("    host: local\n", "    host: lokal\n")
    problems = problems_of(text)
    paths = [p.path for p in problems]
    assert paths == ["metadata.name", "spec.hosts[0].gpus[0].backend", "spec.target.host"]
    assert [p.line for p in problems] == sorted(p.line or 0 for p in problems)
    assert "did you mean 'local'?" in problems[2].message


def test_duplicate_yaml_keys_are_reported() -> None:
    problem = only_problem(MINIMAL.replace("    host: local\n", "    host: local\n    host: local\n"))
    assert problem.path == "spec.target.host"
    assert problem.message.startswith("duplicate key 'host'")
    assert problem.line == 18


def test_empty_and_unreadable_files(tmp_path: Path) -> None:
    assert "empty" in only_problem("").message
    assert "no such file" in load_problem(tmp_path / "missing.yaml").message
    assert "folder" in load_problem(tmp_path).message
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    assert "UTF-8" in load_problem(binary).message


def load_problem(path: Path) -> ManifestProblem:
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    [problem] = caught.value.problems
    assert problem.line is None
    return problem


def test_manifest_error_is_a_tightwad_error_that_reads_as_lines() -> None:
    with pytest.raises(TightwadError) as caught:
        parse_manifest(MINIMAL.replace("backend: cpu", "backend: nvidia"), "cluster.yaml")
    assert str(caught.value).startswith("cluster.yaml:13:20: spec.hosts[0].gpus[0].backend: 'nvidia'")


# ----------------------------------------------------------------------------------------------
# Environment interpolation


def with_port(value: str) -> str:
    return MINIMAL.replace("port: 18152", f"port: {value}")


def rpc_port(value: str, environ: Mapping[str, str]) -> Any:
    return parse_manifest(with_port(value), environ=environ).hosts[0].gpus[0].port


def test_interpolation_uses_the_environment_then_the_default() -> None:
    # An unquoted value is typed after interpolation, so the port is an integer.
    assert rpc_port("${RPC_PORT:-18200}", {"RPC_PORT": "18300"}) == 18300
    assert rpc_port("${RPC_PORT:-18200}", {}) == 18200
    # Like the shell's `:-`, an empty variable also takes the default.
    assert rpc_port("${RPC_PORT:-18200}", {"RPC_PORT": ""}) == 18200


def test_interpolation_inside_a_longer_string_and_escaping() -> None:
    text = MINIMAL.replace("catalog:smollm2-135m-q4_1", "${MODELS}/tiny-$${NOT_A_VAR}.gguf")
    manifest = parse_manifest(text, environ={"MODELS": "/srv/models"})
    assert manifest.model("tiny").source == "/srv/models/tiny-${NOT_A_VAR}.gguf"


def test_quoted_values_stay_strings_after_interpolation() -> None:
    problem = only_problem(with_port('"${RPC_PORT}"'), environ={"RPC_PORT": "18300"})
    assert problem.message == "expected an integer, got '18300'"


def test_missing_variable_names_the_field_and_the_variable() -> None:
    problem = only_problem(with_port("${RPC_PORT}"))
    assert problem.path == "spec.hosts[0].gpus[0].port"
    fix = "export it or write ${RPC_PORT:-value}"
    assert problem.message == f"environment variable RPC_PORT is not set; {fix}"
    assert (problem.line, problem.column) == (14, 17)


def test_malformed_reference_is_a_problem() -> None:
    problem = only_problem(with_port("${9LIVES}"))
    assert "is not a variable reference" in problem.message


def test_keys_and_comments_are_not_interpolated() -> None:
    text = MINIMAL.replace("  target:", "  # ${NOT_SET} in a comment is fine\n  target:")
    assert parse_manifest(text, environ={}).name == "tiny"


# ----------------------------------------------------------------------------------------------
# Rules the schema cannot express


def test_defaults_are_filled_in() -> None:
    drafter_and_proxy = "  drafters:\n    - {name: lookup, kind: ngram}\n  proxy:\n    host: local\n"
    manifest = parse_manifest(MINIMAL + drafter_and_proxy)
    assert isinstance(manifest, Manifest)
    assert manifest.model("tiny").context_size == 4096
    assert manifest.host("local").runtime == "process"
    assert manifest.host("local").model_dir == "/var/lib/tightwad/models"
    assert manifest.target.port == 8080 and manifest.target.tensor_split == "auto"
    # Filled into the document itself (what the CRD and the pods' copy carry), and into the views.
    spec = manifest.data["spec"]
    assert spec["proxy"] == {
        "host": "local",
        "bind": "127.0.0.1",
        "port": 8088,
        "mode": "speculate",
        "maxDraftTokens": "auto",
        "limits": {"maxBodyBytes": 8388608},
    }
    assert spec["swarm"] == {"enabled": True, "port": 8089, "pieceSize": "64MiB", "peers": []}
    assert spec["gate"]["enabled"] is False and spec["gate"]["reviewer"] == {"url": "engine"}
    assert manifest.proxy == ProxySpec(host="local")
    assert manifest.proxy.limits == ProxyLimits(max_body_bytes=8388608, max_tokens=None)
    assert manifest.swarm == SwarmSpec(enabled=True, port=8089, piece_size="64MiB", peers=())
    assert manifest.gate.enabled is False and manifest.gate.reviewer == GateReviewer(url="engine")


def test_the_queue_defaults_to_the_engines_own_bounds() -> None:
    manifest = parse_manifest(MINIMAL)
    assert manifest.data["spec"]["target"]["queue"] == {"limit": "auto", "timeoutSeconds": 30}
    assert manifest.target.queue == QueueSettings(limit="auto", timeout_seconds=30)


def test_the_queue_takes_a_count_or_auto_and_whole_seconds() -> None:
    queue = parse_manifest(MINIMAL + "    queue: {limit: 0, timeoutSeconds: 5}\n").target.queue
    assert queue.limit == 0 and queue.timeout_seconds == 5  # 0: nobody waits, a busy engine says 503
    assert parse_manifest(MINIMAL + "    queue: {limit: 64}\n").target.queue == QueueSettings(64, 30)


@pytest.mark.parametrize(
    ("queue", "path", "message"),
    [
        ("{limit: lots}", "limit", "expected 'auto' or an integer of at least 0, got 'lots'"),
        ("{limit: -1}", "limit", "expected at least 0, got -1"),
        ("{timeoutSeconds: 0}", "timeoutSeconds", "expected at least 1, got 0"),
        ("{timeoutSeconds: 2.5}", "timeoutSeconds", "expected an integer, got 2.5"),
        ("{timeout: 10}", "timeout", "did you mean 'timeoutSeconds'?"),
    ],
)
def test_a_bad_queue_setting_names_the_field_and_what_it_takes(queue: str, path: str, message: str) -> None:
    text = MINIMAL + f"    queue: {queue}\n"
    problem = only_problem(text)
    assert problem.path == f"spec.target.queue.{path}"
    assert message in problem.message
    assert problem.line == len(text.splitlines())


def test_the_queue_is_rendered_into_the_engines_command_line() -> None:
    from support.plans import desired, manifest_data

    from tightwad.operator.commands import Binaries, command

    def engine_argv(data: dict[str, Any]) -> list[str]:
        return command(desired(data).engine, Binaries(python=("python", "-m")), {"big": "/m/big.gguf"})

    argv = engine_argv(manifest_data(target__queue={"limit": 3, "timeoutSeconds": 7}))
    assert argv[argv.index("--queue") + 1] == "3" and argv[argv.index("--queue-timeout") + 1] == "7"
    argv = engine_argv(manifest_data(target__queue={"timeoutSeconds": 90}))
    assert argv[argv.index("--queue") + 1] == "auto" and argv[argv.index("--queue-timeout") + 1] == "90"
    # Unset (or set to the defaults): the engine's own defaults, and the same engine as before, so
    # upgrading Tightwad does not replace a running engine.
    assert "--queue" not in engine_argv(manifest_data())
    defaults = manifest_data(target__queue={"limit": "auto", "timeoutSeconds": 30})
    assert desired(defaults).engine.name == desired(manifest_data()).engine.name
    # A changed queue is a new engine (the planner swaps to it like any other target change).
    assert desired(manifest_data(target__queue={"limit": 3})).engine.name != desired(defaults).engine.name


def test_proxy_speculating_without_drafters_is_a_problem() -> None:
    problem = only_problem(MINIMAL + "  proxy:\n    host: local\n")
    assert problem.path == "spec.proxy.mode"
    assert "passthrough" in problem.message


def test_swarm_on_a_lan_host_needs_the_token() -> None:
    text = MINIMAL.replace("address: 127.0.0.1", "address: 192.168.1.10")
    # Without a proxy in front, clients reach the engine on the LAN too.
    problems = problems_of(text)
    assert [p.path for p in problems] == ["spec.swarm.enabled", "spec.target.host"]
    assert all("spec.auth.token must be set" in p.message for p in problems)
    assert problems[0].message.endswith(", or set enabled: false")
    token = text.replace("spec:\n", "spec:\n  auth:\n    token: ${TOKEN}\n")
    assert parse_manifest(token, environ={"TOKEN": "t"}).token == "t"
    assert len(problems_of(token, environ={"TOKEN": ""})) == 2


def test_metal_inside_a_container_is_a_problem() -> None:
    text = MINIMAL.replace("address: 127.0.0.1", "address: 127.0.0.1\n      runtime: docker")
    problem = only_problem(text.replace("backend: cpu", "backend: metal"))
    assert problem.path == "spec.hosts[0].gpus[0].backend"
    assert "native" in problem.message


def test_manifest_from_dict_validates_parsed_objects() -> None:
    data = yaml.safe_load(MINIMAL)
    assert manifest_from_dict(data).target.port == 8080
    data["spec"]["target"]["model"] = "nope"
    with pytest.raises(ManifestError) as caught:
        manifest_from_dict(data, "cluster/tiny")
    [problem] = caught.value.problems
    assert problem.path == "spec.target.model" and problem.line is None


def test_helpers() -> None:
    assert parse_size("8GiB") == 8 * 2**30
    assert parse_size("12GB") == 12 * 10**9
    assert parse_size("1.5 MiB") == 3 * 2**19
    for bad in ("lots", "8GiB\n", "8 GiBs"):  # the whole text is a size, not a prefix of it
        with pytest.raises(ValueError):
            parse_size(bad)
    assert all(is_loopback(a) for a in ["127.0.0.1", "127.8.0.1", "::1", "localhost", "[::1]"])
    assert not any(is_loopback(a) for a in ["0.0.0.0", "::", "192.168.1.10", "gpu-box.lan"])


@pytest.mark.parametrize("address", ["localhost", "LocalHost", "127.0.0.1", "127.3.0.1", "::1"])
def test_a_loopback_host_without_a_token_binds_every_server_to_loopback(address: str) -> None:
    """The one loopback rule: a manifest that needs no token because its host is loopback must
    have every server on that host listen on loopback only (nothing there checks a token)."""
    from tightwad.operator.desired import bind_address, desired_state

    text = MINIMAL.replace("address: 127.0.0.1", f'address: "{address}"')
    text += "  drafters:\n    - { name: d, kind: llama-server, model: tiny, host: local, port: 18160 }\n"
    text += "  proxy: { host: local, bind: 127.0.0.1, port: 18161 }\n"
    manifest = parse_manifest(text, "test.yaml", environ={})
    assert manifest.token is None and is_loopback(address)
    assert is_loopback(bind_address(address))
    desired = desired_state(manifest, components=frozenset())
    binds = {u.name: u.spec.get("bind") for u in (*desired.units, desired.engine) if u.spec.get("bind")}
    assert binds and all(is_loopback(str(b)) for b in binds.values()), binds


@pytest.mark.parametrize("address", ["gpu-box.lan", "192.168.1.10", "localhost.evil.example", "127.1"])
def test_an_address_beyond_loopback_needs_the_token(address: str) -> None:
    """Names are never resolved to decide: only `localhost` itself counts as loopback."""
    from tightwad.operator.desired import bind_address

    assert not is_loopback(address)
    assert bind_address(address) in (address, "0.0.0.0")
    text = MINIMAL.replace("address: 127.0.0.1", f'address: "{address}"')
    assert all(
        "spec.auth.token must be set" in p.message for p in problems_of(text + "  swarm: { enabled: true }\n")
    )


def test_loopback_is_decided_in_one_place() -> None:
    import tightwad.http
    import tightwad.operator.desired
    from tightwad import netaddr

    assert tightwad.http.is_loopback is netaddr.is_loopback
    assert tightwad.operator.desired.loopback_bind is netaddr.loopback_bind
    assert is_loopback is netaddr.is_loopback
    assert netaddr.is_loopback("::ffff:127.0.0.1") and not netaddr.is_loopback("")


# ----------------------------------------------------------------------------------------------
# The schema itself: valid, documented everywhere, closed everywhere, no cycles


def subschemas(schema: Any, where: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(schema, dict):
        yield where, schema
        for key, value in schema.items():
            if key not in ("const", "default", "enum", "examples"):
                yield from subschemas(value, f"{where}/{key}")
    elif isinstance(schema, list):
        for index, value in enumerate(schema):
            yield from subschemas(value, f"{where}/{index}")


def test_schema_is_valid_documented_and_closed() -> None:
    schema = load_schema()
    Draft202012Validator.check_schema(schema)
    for where, sub in subschemas(schema):
        if "/if" in where:
            continue  # conditions, not documented keys
        for name, prop in sub.get("properties", {}).items():
            documented = "description" in prop or "description" in schema["$defs"].get(
                prop.get("$ref", "").removeprefix("#/$defs/"), {}
            )
            assert documented, f"{where}/properties/{name} has no description"
        if sub.get("type") == "object" and "properties" in sub:
            assert sub.get("additionalProperties") is False, f"{where} accepts unknown keys"


def test_every_schema_property_has_a_type() -> None:
    # Structural, as a Kubernetes CRD needs: a type, or an explicit int-or-string / unknown-field marker.
    markers = ("x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields")
    schema = load_schema()
    for where, sub in subschemas(schema):
        if "/if" in where:
            continue  # conditions, not keys
        for name, prop in sub.get("properties", {}).items():
            target = schema["$defs"].get(prop.get("$ref", "").removeprefix("#/$defs/"), {})
            typed = "type" in prop or "type" in target or any(prop.get(m) for m in markers)
            assert typed, f"{where}/properties/{name} has no type"


def test_schema_refs_have_no_cycles() -> None:
    defs = load_schema()["$defs"]

    def visit(name: str, stack: tuple[str, ...]) -> None:
        assert name not in stack, f"$ref cycle: {' -> '.join((*stack, name))}"
        for _, sub in subschemas(defs[name]):
            if "$ref" in sub:
                visit(sub["$ref"].removeprefix("#/$defs/"), (*stack, name))

    for name in defs:
        visit(name, ())


# ----------------------------------------------------------------------------------------------
# The command line


def run_validate(*files: Path, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, **(env or {})}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environ.get("PYTHONPATH")]))
    environ.pop("TIGHTWAD_TEST_UNSET_TOKEN", None)
    command = [sys.executable, "-m", "tightwad.cli", "validate", *map(str, files)]
    return subprocess.run(command, cwd=REPO, env=environ, capture_output=True, text=True, timeout=60)


def test_cli_reports_a_broken_file_with_its_place() -> None:
    path = REPO / "tests" / "manifests" / "broken" / "backend-typo.yaml"
    _, line = expectation(path)
    result = run_validate(path)
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    place = f"{path}:{line}:20: spec.hosts[0].gpus[0].backend"
    assert result.stderr.splitlines()[0].startswith(f"{place}: 'nvidia' is not one of cuda, rocm, metal, cpu")


def test_cli_reports_bad_yaml_and_missing_files_without_a_traceback(tmp_path: Path) -> None:
    result = run_validate(REPO / "tests" / "manifests" / "broken" / "bad-yaml.yaml", tmp_path / "nope.yaml")
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert re.search(r"bad-yaml\.yaml:\d+:\d+: invalid YAML", result.stderr)
    assert f"{tmp_path / 'nope.yaml'}: no such file; check the path" in result.stderr


def test_cli_accepts_the_examples() -> None:
    result = run_validate(*EXAMPLES, env={"TIGHTWAD_TOKEN": "test-token"})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    local = REPO / "examples" / "local.yaml"
    assert f"{local}: ok (1 host, 2 models, target smollm2-135m-f32)" in result.stderr.splitlines()


def test_cli_validates_without_the_secrets_and_names_them(tmp_path: Path) -> None:
    environ = {k: v for k, v in os.environ.items() if k != "TIGHTWAD_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "tightwad.cli", "validate", *map(str, EXAMPLES)],
        cwd=REPO, env=environ, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "homelab.yaml: note: set TIGHTWAD_TOKEN in the environment before running it" in result.stderr
    # An unset secret next to a real mistake: both are reported and the file is invalid.
    broken = (REPO / "tests" / "manifests" / "broken" / "missing-env-var.yaml").read_text()
    both = tmp_path / "both.yaml"
    both.write_text(broken.replace("backend: cpu", "backend: cpux"))
    result = run_validate(both)
    assert result.returncode == 2
    assert "TIGHTWAD_TEST_UNSET_TOKEN is not set" in result.stderr and "'cpux' is not one of" in result.stderr
