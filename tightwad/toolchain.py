"""The one pinned llama.cpp build that every Tightwad process runs on.

The coordinator (libllama through llama-cpp-python), the pool's `ggml-rpc-server` workers and the
`llama-server` drafters must share one build: the RPC protocol is versioned. The source is the
llama.cpp tree vendored in the llama-cpp-python sdist, whose ctypes bindings match it exactly.
The build lives in a cache outside the repo, keyed by version and CMake flags, so a warm cache is a
no-op. `scripts/build-llama.sh` does the building; this module finds its output and hands the
locations to everything else.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tightwad.errors import TightwadError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"

# Kept in the same order as scripts/build-llama.sh: the cache key is a hash of this list.
CMAKE_FLAGS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_RPC=ON",
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_OPENSSL=OFF",
)


# The sha256 of scripts/llama-exact.patch, which scripts/build-llama.sh applies to ggml's CPU
# backend; part of the cache key there and here, so a changed patch is a new build.
EXACT_PATCH_SHA256 = "b3cbfc8bf9cb443d89e3460bb384ae3c1fecad15be492222e0809e9cfeb74f07"

# Must match `layout=` in scripts/build-llama.sh: what a finished prefix holds.
PREFIX_LAYOUT = 2


class ToolchainMissing(TightwadError):
    """The pinned llama.cpp build is not in the cache yet."""


def cache_root() -> Path:
    """Where heavy, reusable artefacts live (llama.cpp builds, models): outside any checkout."""
    if explicit := os.environ.get("TIGHTWAD_CACHE"):
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "tightwad"


def build_flags() -> list[str]:
    extra = shlex.split(os.environ.get("TIGHTWAD_LLAMA_CMAKE_ARGS", ""))
    return [*CMAKE_FLAGS, *extra]


def build_key(version: str = LLAMA_CPP_PYTHON_VERSION, flags: list[str] | None = None) -> str:
    lines = [version, *(build_flags() if flags is None else flags), f"patch:{EXACT_PATCH_SHA256}"]
    text = "\n".join(lines) + "\n"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Toolchain:
    """Locations inside one finished build."""

    prefix: Path

    @property
    def lib_dir(self) -> Path:
        return self.prefix / "lib"

    @property
    def rpc_server(self) -> Path:
        return self.prefix / "bin" / "ggml-rpc-server"

    @property
    def llama_server(self) -> Path:
        return self.prefix / "bin" / "llama-server"

    @property
    def rpc_header(self) -> Path:
        return self.prefix / "include" / "ggml-rpc.h"

    @property
    def exact(self) -> bool:
        """Whether this build carries the exact-mode patch (BUILD-INFO names its sha256)."""
        info = self.prefix / "BUILD-INFO"
        return info.is_file() and f"patch={EXACT_PATCH_SHA256}" in info.read_text().splitlines()

    def env(self) -> dict[str, str]:
        """Variables that make llama-cpp-python load this build's libllama instead of its own."""
        return {"LLAMA_CPP_LIB_PATH": str(self.lib_dir)}


def expected_prefix() -> Path:
    return cache_root() / "llama.cpp" / f"{LLAMA_CPP_PYTHON_VERSION}-{build_key()}"


def find() -> Toolchain:
    """The finished build for the current version and flags, or a clear error saying how to get it.

    `TIGHTWAD_LLAMA_PREFIX` points at a build made elsewhere (a container image, a Nix store path).
    """
    explicit = os.environ.get("TIGHTWAD_LLAMA_PREFIX")
    prefix = Path(explicit) if explicit else expected_prefix()
    marker = prefix / ".complete"
    if not marker.exists() or marker.read_text().strip() != f"layout={PREFIX_LAYOUT}":
        raise ToolchainMissing(
            f"the pinned llama.cpp build is not at {prefix}; "
            "run `tightwad toolchain build` (or `make toolchain`) first"
        )
    return Toolchain(prefix)


def build(script: Path | None = None) -> Toolchain:
    """Run scripts/build-llama.sh (a no-op on a warm cache) and return the result."""
    script = script or Path(__file__).resolve().parent.parent / "scripts" / "build-llama.sh"
    if not script.exists():
        raise ToolchainMissing(f"build script not found at {script}; run this from a Tightwad checkout")
    out = subprocess.run(["bash", str(script)], check=True, stdout=subprocess.PIPE, text=True)
    return Toolchain(Path(out.stdout.strip().splitlines()[-1]))


def activate() -> Toolchain:
    """Point llama-cpp-python at the pinned build. Call before the first `import llama_cpp`."""
    toolchain = find()
    os.environ.update(toolchain.env())
    return toolchain
