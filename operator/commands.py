"""Command lines for units: pure, shared by the process driver (paths of the pinned build on this
machine) and the docker driver (names on the image's PATH).

Secrets never appear on a command line (any user can read those in `ps`): the token travels in the
environment, as TIGHTWAD_TOKEN.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from tightwad.errors import TightwadError
from tightwad.operator.units import Kind, Unit

# llama.cpp's device names per backend (as `ggml-rpc-server --device` takes them).
DEVICE_PREFIX = {"cuda": "CUDA", "rocm": "ROCm", "metal": "MTL"}
# llama-server's `--api-key` from the environment (so the key never shows in `ps`); the pinned
# build's name for it, as `llama-server --help` lists it.
LLAMA_API_KEY_ENV = "LLAMA_API_KEY"
# The pinned build's switch for batch-invariant CPU kernels (scripts/build-llama.sh); the engine
# sets it for itself from `--exact`.
EXACT_ENV = "GGML_CPU_EXACT"


@dataclass(frozen=True)
class Binaries:
    """Where the programs a unit runs are found."""

    python: tuple[str, ...] = (sys.executable, "-m")  # runs `tightwad.cli ...`, `tightwad.operator.router`
    rpc_server: str = "ggml-rpc-server"
    llama_server: str = "llama-server"
    env: Mapping[str, str] = field(default_factory=dict)  # e.g. LLAMA_CPP_LIB_PATH for the pinned build


class CannotRun(TightwadError):
    """This unit cannot be run by this driver (a component that is not installed, say)."""


def device(spec: Mapping[str, object]) -> str:
    backend = str(spec["backend"])
    if backend == "cpu":
        return "CPU"
    return f"{DEVICE_PREFIX[backend]}{spec.get('index', 0)}"


def command(
    unit: Unit, binaries: Binaries, models: Mapping[str, str], manifest: str | None = None
) -> list[str]:
    """argv for `unit`; `models` maps model names to file paths where the unit runs, `manifest` is
    the manifest file's path there (the proxy and the swarm sidecar read it), if it has one."""
    spec = unit.spec
    tightwad = [*binaries.python, "tightwad.cli"]
    match unit.kind:
        case Kind.WORKER:
            cmd = [binaries.rpc_server, "--host", spec["bind"], "--port", str(spec["port"])]
            cmd += ["--device", device(spec)]
            if spec.get("threads"):
                cmd += ["--threads", str(spec["threads"])]
            return cmd
        case Kind.ENGINE:
            cmd = [*tightwad, "engine", "--model", models[spec["model"]], "--alias", spec["alias"]]
            for alias in spec.get("aliases", ()):  # more names a request's `model` may use
                cmd += ["--alias", alias]
            if spec["rpc"]:
                cmd += ["--rpc", ",".join(spec["rpc"]), "--tensor-split", spec["tensorSplit"]]
            cmd += ["--ctx", str(spec["ctx"]), "--parallel", str(spec["parallel"])]
            if spec.get("conversationCtx"):  # maxConversations auto: the KV cache from memory
                cmd += ["--conversation-ctx", str(spec["conversationCtx"])]
            if "queue" in spec:  # spec.target.queue: how many may wait for one, and how long
                cmd += ["--queue", str(spec["queue"]), "--queue-timeout", str(spec["queueTimeout"])]
            cmd += ["--exact", "on" if spec.get("exact") == "strict" else "off"]
            return [*cmd, "--host", spec["bind"], "--port", str(spec["port"])]
        case Kind.DRAFTER:
            cmd = [binaries.llama_server, "--model", models[spec["model"]], "--alias", spec["model"]]
            cmd += ["--host", spec["bind"], "--port", str(spec["port"]), "--ctx-size", str(spec["ctx"])]
            cmd += ["--parallel", "1", "--no-webui"]
            if spec.get("threads"):
                cmd += ["--threads", str(spec["threads"])]
            return cmd
        case Kind.ROUTER:
            return router_command(binaries, spec["bind"], spec["port"], None)
        case Kind.PROXY if spec.get("impl") == "router":
            # One line makes the proxy the front door once it is installed; see desired.py.
            return router_command(binaries, spec["bind"], spec["port"], spec["target"])
        case Kind.PROXY:
            cmd = [*tightwad, "proxy", "start", "--target", spec["target"]]
            if spec.get("manifest") and manifest:
                cmd += ["--manifest", manifest]  # drafters, mode and limits from there
            else:
                if spec["drafts"]:
                    cmd += ["--draft", spec["drafts"][0], "--draft-kind", "llama-server"]
                mode = spec["mode"] if spec["mode"] in ("speculate", "passthrough") else "speculate"
                cmd += ["--mode", mode if spec["drafts"] else "passthrough"]
            return [*cmd, "--host", spec["bind"], "--port", str(spec["port"])]
        case Kind.SWARM:
            if not spec.get("installed"):
                raise CannotRun("the swarm component is not installed; set spec.swarm.enabled: false")
            if not manifest:
                raise CannotRun(
                    "the swarm sidecar reads the manifest file, which this runtime cannot give it"
                )
            cmd = [*tightwad, "swarm", "sidecar", manifest, "--host", unit.host]
            return [*cmd, "--bind", spec["bind"]]
    raise CannotRun(f"no command for {unit.kind}")


def router_command(binaries: Binaries, bind: str, port: int, backend: str | None) -> list[str]:
    cmd = [*binaries.python, "tightwad.operator.router", "--host", bind, "--port", str(port)]
    return [*cmd, "--backend", backend] if backend else cmd


def exact_environment(unit: Unit) -> dict[str, str]:
    """GGML_CPU_EXACT for an rpc worker: the pinned build's ggml reads it when it creates a CPU
    backend and is exact when it is unset, so a worker always gets it said (`spec.target.exact`)."""
    if unit.kind is not Kind.WORKER:
        return {}
    return {EXACT_ENV: "1" if unit.spec.get("exact") == "strict" else "0"}


def environment(unit: Unit, binaries: Binaries) -> dict[str, str]:
    """Variables `unit` needs beyond the inherited ones: the build's, exact mode, and the token."""
    env = dict(binaries.env) | exact_environment(unit)
    token = unit.secrets.get("TIGHTWAD_TOKEN")
    if token:
        env["TIGHTWAD_TOKEN"] = token
        if unit.kind is Kind.DRAFTER:
            # A drafter beyond loopback is protected like every other server; the proxy sends the
            # same token (proxy/stack.py).
            env[LLAMA_API_KEY_ENV] = token
    return env
