"""The images' recipes: hadolint-clean Dockerfiles, shellcheck-clean scripts, and the properties an
operator relies on (non-root, a healthcheck, the model volume, base images as build arguments)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

pytestmark = pytest.mark.system  # needs shellcheck

DOCKERFILES = sorted(ROOT.glob("Dockerfile.*"))
SCRIPTS = sorted([*ROOT.glob("scripts/*.sh"), *ROOT.glob("docker/*.sh"), ROOT / ".ci" / "run"])


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not path:
        pytest.fail(f"{name} is missing; `make test` installs it")
    return path


def test_the_three_dockerfiles_exist() -> None:
    names = {p.name for p in DOCKERFILES}
    assert {"Dockerfile.worker-cuda", "Dockerfile.worker-rocm", "Dockerfile.proxy"} <= names


def test_dockerfiles_are_hadolint_clean() -> None:
    out = subprocess.run([tool("hadolint"), *map(str, DOCKERFILES)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_scripts_are_shellcheck_clean() -> None:
    out = subprocess.run([tool("shellcheck"), *map(str, SCRIPTS)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_unprivileged_with_a_healthcheck_and_the_model_volume(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*healthcheck\.py", text, re.MULTILINE)
    assert re.search(r"^VOLUME /models$", text, re.MULTILINE)


@pytest.mark.parametrize("name", ["Dockerfile.worker-cuda", "Dockerfile.worker-rocm"])
def test_worker_images_build_the_pinned_llama_cpp_from_configurable_bases(name: str) -> None:
    text = (ROOT / name).read_text()
    assert "ARG BUILD_IMAGE=" in text and "ARG RUNTIME_IMAGE=" in text and "ARG LLAMA_CMAKE_ARGS=" in text
    # The one build script, so the image's llama.cpp is the same tree and flags as every other host's.
    assert "COPY scripts/build-llama.sh" in text and "docker/build-stage.sh" in text
    assert ("-DGGML_CUDA=ON" in text) != ("-DGGML_HIP=ON" in text)
