#!/usr/bin/env bash
# Build the ONE pinned llama.cpp that everything in Tightwad runs on: libllama/libggml for
# llama-cpp-python (the engine), ggml-rpc-server (pool workers) and llama-server (drafters,
# baselines). The RPC protocol is versioned, so coordinator and workers must share this build.
#
# The source is the llama.cpp tree vendored in the llama-cpp-python sdist from PyPI, whose ctypes
# bindings match that commit exactly. The result is cached outside the repo, keyed by version and
# flags; a warm cache makes this a no-op. Prints the install prefix on stdout as its last line.
#
#   scripts/build-llama.sh                 # build (or reuse) and print the prefix
#   scripts/build-llama.sh --print-prefix  # only print where the build lives (or would)
#   TIGHTWAD_CACHE=/somewhere scripts/build-llama.sh
set -Eeuo pipefail
# Fail loudly: name the command and the line that failed, never just a bare non-zero exit.
trap 'echo "error: $0: line $LINENO: \`$BASH_COMMAND\` failed (exit $?)" >&2' ERR

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
cache="${TIGHTWAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tightwad}"
jobs="${TIGHTWAD_BUILD_JOBS:-$(nproc)}"

# NATIVE=OFF with explicit instruction sets: NATIVE=ON picks up AMX on CPUs whose VMs fault on it.
flags=(
  -DCMAKE_BUILD_TYPE=Release
  -DBUILD_SHARED_LIBS=ON
  -DGGML_RPC=ON
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_OPENSSL=OFF
)
# Extra flags (for example -DGGML_CUDA=ON on a GPU host) change the cache key too.
read -r -a extra <<<"${TIGHTWAD_LLAMA_CMAKE_ARGS:-}"
flags+=("${extra[@]}")

# Exact mode (README, "Exactness, precisely"): a small patch to ggml's CPU backend so that a token's
# logits do not depend on how many tokens share its batch. It turns ggml's reference kernels
# (use_ref: no tiled K-quant matmul, no tiled or KV-split flash attention, no op fusion) on by
# default and extends them to llamafile's sgemm, the repacked-weight GEMM and the 2-row mmla dot;
# GGML_CPU_EXACT=0 in a process's environment turns it off. The patch (scripts/llama-exact.patch,
# which nix/worker.nix applies too) is part of the cache key.
exact_patch() {
  cat "$(dirname "${BASH_SOURCE[0]}")/llama-exact.patch"
}
patch_sha="$(exact_patch | sha256sum | cut -c1-64)"

key="$(printf '%s\n' "$version" "${flags[@]}" "patch:$patch_sha" | sha256sum | cut -c1-12)"
prefix="$cache/llama.cpp/$version-$key"

# Bump when the layout of the installed prefix changes; an older prefix is rebuilt incrementally.
layout=2
if [[ "${1:-}" == "--print-prefix" ]]; then
  echo "$prefix"
  exit 0
fi
if [[ "$(cat "$prefix/.complete" 2>/dev/null)" == "layout=$layout" ]]; then
  echo "llama.cpp $version is already built (cache hit)" >&2
  echo "$prefix"
  exit 0
fi

for tool in cmake gcc g++ patch; do
  command -v "$tool" >/dev/null || { echo "error: '$tool' is missing; install it (apt-get install cmake build-essential patch)" >&2; exit 1; }
done
generator=(-G "Unix Makefiles")
command -v ninja >/dev/null && generator=(-G Ninja)

work="$cache/llama.cpp/src-$version"
sdist_dir="$work/llama_cpp_python-$version"
if [[ ! -d "$sdist_dir/vendor/llama.cpp" ]]; then
  echo "fetching the llama-cpp-python $version sdist from the package index..." >&2
  mkdir -p "$work"
  python3 -m pip download --quiet --no-deps --no-binary :all: \
    "llama-cpp-python==$version" -d "$work" >&2
  tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
fi
build="$prefix/build"
mkdir -p "$build"
# The patched tree is a copy beside the unpacked sdist, which stays pristine for other keys (and
# outside the prefix, which container images copy whole).
src="$work/patched-$key"
if [[ "$(cat "$src/.patched" 2>/dev/null)" != "$patch_sha" ]]; then
  rm -rf "$src"
  cp -a "$sdist_dir/vendor/llama.cpp" "$src"
  exact_patch | patch -p1 --quiet -d "$src"
  echo "$patch_sha" >"$src/.patched"
fi

echo "configuring llama.cpp $version (${flags[*]})" >&2
# Every artefact finds its siblings through $ORIGIN, so lib/ and bin/ can be copied anywhere.
# shellcheck disable=SC2016 # $ORIGIN is for the dynamic loader, not the shell
cmake -S "$src" -B "$build" "${generator[@]}" "${flags[@]}" \
  -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$ORIGIN:$ORIGIN/../lib' \
  >"$prefix/configure.log" 2>&1 || { tail -n 40 "$prefix/configure.log" >&2; exit 1; }

echo "building llama, ggml-rpc-server, llama-server with $jobs jobs (log: $prefix/build.log)" >&2
# Show one live progress line; the full compiler output goes to the log.
if ! cmake --build "$build" -j "$jobs" --target llama ggml-rpc-server llama-server 2>&1 \
  | tee "$prefix/build.log" \
  | awk -v tty="$([[ -t 2 ]] && echo 1 || echo 0)" '
      /^\[ *[0-9]+\/[0-9]+\]/ { s = $0; sub(/^\[ */, "", s); split(s, n, /[\/\]]/); pct = int(100 * n[1] / n[2]) }
      /^\[ *[0-9]+%\]/ { s = $0; sub(/^\[ */, "", s); pct = int(s) }
      pct != shown {
        bar = substr("########################################", 1, int(pct * 40 / 100))
        if (tty) { printf "\r  [%-40s] %3d%%", bar, pct > "/dev/stderr"; shown = pct }
        else if (pct >= shown + 10) { printf "  [%-40s] %3d%%\n", bar, pct > "/dev/stderr"; shown = pct }
      }
      END { if (tty) printf "\n" > "/dev/stderr" }'
then
  grep -E "error|Error" "$prefix/build.log" | head -n 20 >&2
  echo "error: the llama.cpp build failed; see $prefix/build.log" >&2
  exit 1
fi

mkdir -p "$prefix/lib" "$prefix/bin"
cp -a "$build"/bin/*.so* "$prefix/lib/"
cp -a "$build/bin/ggml-rpc-server" "$build/bin/llama-server" "$prefix/bin/"
mkdir -p "$prefix/include"
cp -a "$src/include/llama.h" "$src/ggml/include/ggml-rpc.h" "$prefix/include/"
printf 'version=%s\ncommit=%s\nflags=%s\npatch=%s\n' "$version" \
  "$(grep -o 'LLAMA_COMMIT = "[^"]*"' "$build/common/build-info.cpp" | cut -d'"' -f2)" \
  "${flags[*]}" "$patch_sha" >"$prefix/BUILD-INFO"
echo "layout=$layout" >"$prefix/.complete"
echo "llama.cpp $version built into $prefix" >&2
echo "$prefix"
