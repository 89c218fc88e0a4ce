"""The GPU scripts refuse clearly where they cannot run, instead of building for minutes first.

scripts/gpu-check.sh needs an NVIDIA GPU and a CUDA toolkit with cuBLAS; scripts/gpu-compile-check.sh
needs a ROCm new enough for the pinned llama.cpp before it tries a HIP build. The GPU is taken away
(or faked as present) through PATH, so these run the same on a GPU machine. Each takes well under a
second: nothing here installs or builds anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from support import ROOT

GPU_CHECK = ROOT / "scripts" / "gpu-check.sh"
COMPILE_CHECK = ROOT / "scripts" / "gpu-compile-check.sh"
BASH = shutil.which("bash") or "/bin/bash"


def fake_nvidia_smi(folder: Path, body: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\n{body}\n")
    tool.chmod(0o755)


def run(script: Path, path: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BASH, str(script)],
        env={**os.environ, "PATH": path, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_gpu_check_refuses_without_nvidia_smi(tmp_path: Path) -> None:
    # A PATH with only what the script needs before its check: no nvidia-smi, whatever the machine.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname",):
        (bin_dir / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    out = run(GPU_CHECK, str(bin_dir))
    assert out.returncode == 1, out
    assert "no NVIDIA GPU here: nvidia-smi is not installed" in out.stderr
    assert "scripts/gpu-compile-check.sh cuda" in out.stderr
    assert "line " not in out.stderr, "a refusal, not a failed command"


def test_gpu_check_refuses_when_nvidia_smi_finds_no_gpu(tmp_path: Path) -> None:
    # What nvidia-smi says on a machine with the tools but no driver or device.
    fake_nvidia_smi(
        tmp_path / "bin",
        "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9",
    )
    out = run(GPU_CHECK, f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    assert out.returncode == 1, out
    assert "no NVIDIA GPU here: nvidia-smi found none (NVIDIA-SMI has failed" in out.stderr
    assert "line " not in out.stderr


def test_gpu_check_names_the_missing_toolkit(tmp_path: Path) -> None:
    fake_nvidia_smi(tmp_path / "bin", "echo 'NVIDIA H200, 9.0, 143771 MiB, 570.86.15'")
    out = run(GPU_CHECK, f"{tmp_path / 'bin'}:{os.environ['PATH']}", TIGHTWAD_NVCC=str(tmp_path / "no-nvcc"))
    assert out.returncode == 1, out
    assert "no CUDA toolkit with cuBLAS found" in out.stderr
    assert "TIGHTWAD_NVCC=" in out.stderr and "scripts/gpu-compile-check.sh cuda" in out.stderr


def test_compile_check_rejects_an_unknown_backend() -> None:
    out = subprocess.run([BASH, str(COMPILE_CHECK), "metal"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert "unknown backend 'metal'; use cuda or hip" in out.stderr


@pytest.mark.skipif(shutil.which("apt-cache") is None, reason="reports what apt offers: Debian only")
def test_compile_check_says_why_hip_cannot_be_built(tmp_path: Path) -> None:
    # No ROCm where ROCM_PATH points, so it reports instead of building, on any machine.
    out = subprocess.run(
        [BASH, str(COMPILE_CHECK), "hip"],
        env={**os.environ, "ROCM_PATH": str(tmp_path / "no-rocm")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out
    # The version the pinned llama.cpp demands, and what this distribution has instead.
    assert "hip: NOT CHECKED: the pinned llama.cpp's HIP backend needs HIP >= 6." in out.stderr
    assert "apt offers: hipcc " in out.stderr and "libhipblas-dev " in out.stderr
