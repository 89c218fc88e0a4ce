"""The images, really built and run: the CPU variant of the worker Dockerfile (same file as CUDA,
other base images) serving as an rpc worker for an engine outside the container, and the proxy
image answering a chat completion. Base images come from a local Debian root filesystem
(scripts/local-base-image.sh): no registry is reachable here. Cold, the worker build compiles the
pinned llama.cpp inside the image (~5-8 min on 2 cores); Docker's layer cache makes reruns quick."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support import ROOT
from support.engines import EngineProcess, start_engine
from support.procs import Processes

from tightwad import models
from tightwad.launch import free_port, wait_for_http
from tightwad.toolchain import Toolchain

pytestmark = [pytest.mark.integration, pytest.mark.system]  # needs a Docker daemon
BASE = "tightwad-local/debian:bookworm"
LOCAL_CAS = Path("/usr/local/share/ca-certificates")  # Debian's place for locally trusted CAs


def docker(endpoint: str, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", "-H", endpoint, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def build(endpoint: str, dockerfile: str, tag: str, *build_args: str) -> None:
    # A TLS-inspecting proxy on the way to the package index needs its CA inside the build.
    extra_cas = "".join(p.read_text() for p in sorted(LOCAL_CAS.glob("*.crt")))
    args = [f"--build-arg={a}" for a in build_args]
    if extra_cas:
        args.append(f"--build-arg=EXTRA_CA_CERTS={extra_cas}")
    out = docker(endpoint, "build", "--network", "host", "-f", dockerfile, "-t", tag, *args, ".")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.fixture(scope="module")
def endpoint(docker_endpoint: str) -> str:
    """The session's dockerd, with the local Debian base image the Dockerfiles build on."""
    endpoint = docker_endpoint
    base = subprocess.run(
        [str(ROOT / "scripts" / "local-base-image.sh"), BASE],
        capture_output=True, text=True, env={**os.environ, "DOCKER_HOST": endpoint},
    )  # fmt: skip
    assert base.returncode == 0, base.stderr
    return endpoint


@pytest.fixture
def container(endpoint: str) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        docker(endpoint, "rm", "-f", name, timeout=60)


@pytest.mark.timeout(2400)  # a cold build compiles llama.cpp inside the image
def test_cpu_worker_image_serves_an_engine_outside_it(
    endpoint: str, container: list[str], toolchain: Toolchain, processes: Processes
) -> None:
    build(
        endpoint, "Dockerfile.worker-cuda", "tightwad/worker-cpu:test",
        f"BUILD_IMAGE={BASE}", f"RUNTIME_IMAGE={BASE}", "LLAMA_CMAKE_ARGS=",
    )  # fmt: skip
    port = free_port()
    name = f"tw-image-worker-{port}"
    out = docker(
        endpoint, "run", "-d", "--name", name, "--network", "host", "-e", f"TIGHTWAD_PORT={port}",
        "tightwad/worker-cpu:test", "--host", "127.0.0.1", "--port", str(port), "--threads", "1",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    container.append(name)
    assert docker(endpoint, "exec", name, "id", "-u").stdout.strip() == "10001"  # not root

    engine: EngineProcess = start_engine(
        processes, models.resolve("smollm2-135m-q4_1"), rpc=[f"127.0.0.1:{port}"], ctx=512, name="outside"
    )
    health = engine.get("/health").json()
    assert health["status"] == "ok", health
    body = {"prompt": "The three primary colours are", "max_tokens": 12, "temperature": 0}
    reply = engine.post("/v1/completions", body).json()
    assert reply["usage"]["completion_tokens"] > 0 and reply["choices"][0]["text"].strip()

    deadline = time.monotonic() + 120
    while (state := docker(endpoint, "inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip()) != (
        "healthy"
    ):
        assert time.monotonic() < deadline, f"the worker's healthcheck says {state}"
        time.sleep(2)


@pytest.mark.timeout(1200)
def test_proxy_image_answers_a_chat_completion(
    endpoint: str, container: list[str], local_engine: EngineProcess
) -> None:
    build(endpoint, "Dockerfile.proxy", "tightwad/proxy:test", f"BASE_IMAGE={BASE}")
    port = free_port()
    name = f"tw-image-proxy-{port}"
    out = docker(
        endpoint, "run", "-d", "--name", name, "--network", "host", "-e", f"TIGHTWAD_PORT={port}",
        "tightwad/proxy:test", "proxy", "start", "--target", local_engine.url, "--draft-kind", "ngram",
        "--host", "127.0.0.1", "--port", str(port),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    container.append(name)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", timeout=120)
    body = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8, "temperature": 0}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
    expected = local_engine.post("/v1/chat/completions", body).json()
    assert reply["choices"][0]["message"] == expected["choices"][0]["message"]
