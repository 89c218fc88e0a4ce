"""The Nix flake for Macs and Linux hosts: it parses and `nix flake check --no-build` evaluates every
output, with nixpkgs replaced by the local stand-in in tests/nix/stub-nixpkgs (nixpkgs itself cannot
be fetched here)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from support import ROOT

pytestmark = pytest.mark.system  # needs nix

STUB = ROOT / "tests" / "nix" / "stub-nixpkgs"
NIX_ENV = {**os.environ, "NIX_CONFIG": "build-users-group =\nexperimental-features = nix-command flakes"}


def nix(*args: str) -> subprocess.CompletedProcess[str]:
    if not shutil.which("nix"):
        pytest.fail("nix is missing; `scripts/install-system-deps.sh test` installs Debian's nix-bin")
    return subprocess.run(["nix", *args], env=NIX_ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture
def flake_copy(tmp_path: Path) -> Path:
    # Only what the flake reads: a path flake copies its whole folder into the store.
    for name in ("flake.nix", "nix", "pyproject.toml", "scripts/llama-exact.patch"):
        source, target = ROOT / name, tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    return tmp_path


def flake_check(flake: Path) -> subprocess.CompletedProcess[str]:
    return nix(
        "flake", "check", "--no-build", "--no-write-lock-file",
        "--override-input", "nixpkgs", f"path:{STUB}", f"path:{flake}",
    )  # fmt: skip


def test_every_nix_file_parses() -> None:
    for path in [ROOT / "flake.nix", *sorted((ROOT / "nix").glob("*.nix"))]:
        out = subprocess.run(["nix-instantiate", "--parse", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, f"{path}: {out.stderr}"


def test_flake_check_evaluates_every_output(flake_copy: Path) -> None:
    out = flake_check(flake_copy)
    assert out.returncode == 0, out.stderr
    shown = nix(
        "flake", "show", "--json", "--no-write-lock-file",
        "--override-input", "nixpkgs", f"path:{STUB}", f"path:{flake_copy}",
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    import json

    outputs = json.loads(shown.stdout)
    for system in ("x86_64-linux", "aarch64-darwin"):
        assert {"worker", "proxy", "operator"} <= set(outputs["apps"][system])
        assert {"worker", "tightwad", "worker-cuda", "worker-rocm"} <= set(outputs["packages"][system])
        assert "default" in outputs["devShells"][system]


def test_flake_check_catches_a_broken_reference(flake_copy: Path) -> None:
    # The check is real: a package the flake asks nixpkgs for that does not exist fails evaluation.
    recipe = flake_copy / "nix" / "tightwad.nix"
    recipe.write_text(recipe.read_text().replace("py.starlette", "py.starlettee"))
    out = flake_check(flake_copy)
    assert out.returncode != 0
    assert "starlettee" in out.stderr
