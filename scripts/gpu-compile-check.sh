#!/usr/bin/env bash
# Compile-check the GPU builds of the pinned llama.cpp on a machine WITHOUT a GPU: install the
# distribution's toolkit and build scripts/build-llama.sh with the GPU backend for one architecture.
# Nothing runs on a GPU; this only proves the pinned tree compiles and links against that toolkit.
# The result is cached like the CPU build (keyed by version and flags), so a rerun is a no-op.
#
#   scripts/gpu-compile-check.sh cuda   # Debian's nvidia-cuda-toolkit (non-free), sm_86
#   scripts/gpu-compile-check.sh hip    # Debian's ROCm (hipcc, rocBLAS, hipBLAS), gfx1100
#   scripts/gpu-compile-check.sh        # both
#
# Long (tens of minutes on a few cores): it runs the compiler under `nice` so other work goes on.
set -Eeuo pipefail
# Fail loudly: name the command and the line that failed, never just a bare non-zero exit.
trap 'echo "error: $0: line $LINENO: \`$BASH_COMMAND\` failed (exit $?)" >&2' ERR

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cuda_arch="${TIGHTWAD_CUDA_ARCH:-86}"
hip_target="${TIGHTWAD_HIP_TARGET:-gfx1100}"
codename="$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release)"

as_root() {
  if [[ $(id -u) -ne 0 ]]; then
    echo "error: installing $1 needs root; run this script with sudo, or install $1 yourself" >&2
    return 1
  fi
}

# The URIs and keyring of the Debian mirror this machine already uses for "$codename", read from
# its apt sources (deb822 .sources files or one-line .list entries), so no host name is hard-coded.
debian_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -e "$f" ]] || continue
    awk -v suite="$codename" '
      function flush() { if (uris != "" && has && !done) { print uris "\t" key; done = 1 } uris = ""; key = ""; has = 0 }
      /^[[:space:]]*$/ { flush(); next }
      /^URIs:/ { uris = $0; sub(/^URIs:[[:space:]]*/, "", uris) }
      /^Signed-By:/ { key = $0; sub(/^Signed-By:[[:space:]]*/, "", key) }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) has = 1 }
      END { flush() }' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -e "$f" ]] || continue
    awk -v suite="$codename" '$1 == "deb" && $0 !~ /^#/ {
        uri = ""; for (i = 2; i <= NF; i++) { if ($i ~ /^\[/) continue; if (uri == "") { uri = $i; continue }; if ($i == suite) print uri "\t"; break }
      }' "$f"
  done
}

# add_components COMPONENT...: an apt source for those components of the same Debian mirror.
add_components() {
  local list="/etc/apt/sources.list.d/tightwad-debian-${1}.sources" line uris key
  [[ -e "$list" ]] && return 0
  line="$(debian_mirror | head -n 1)"
  if [[ -z "$line" ]]; then
    echo "error: no apt source for Debian '$codename' found in /etc/apt/sources.list*; add one for the" >&2
    echo "       '$*' components of your Debian mirror yourself, then rerun" >&2
    return 1
  fi
  uris="${line%%$'\t'*}"
  key="${line#*$'\t'}"
  echo "adding the '$*' components of $uris ($codename) to apt: $list" >&2
  {
    echo "Types: deb"
    echo "URIs: $uris"
    echo "Suites: $codename"
    echo "Components: $*"
    [[ -n "$key" ]] && echo "Signed-By: $key"
  } >"$list"
  apt-get update -qq >&2
}

# Debian's toolkit, by explicit path: another nvcc earlier in PATH (a partial pip-installed CUDA,
# say, without cuBLAS) must not be picked up instead.
nvcc_bin="${TIGHTWAD_NVCC:-/usr/bin/nvcc}"

check_cuda() {
  if [[ ! -x "$nvcc_bin" ]]; then
    as_root nvidia-cuda-toolkit || return 1
    # nvidia-cuda-toolkit is in non-free; its driver-library dependencies need nvidia-support (contrib).
    add_components non-free contrib || return 1
    echo "installing nvidia-cuda-toolkit (about 5 GB installed)..." >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nvidia-cuda-toolkit >&2 || return 1
  fi
  local version root prefix start=$SECONDS
  version="$("$nvcc_bin" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
  root="$(dirname "$(dirname "$nvcc_bin")")"
  echo "nvcc $version ($nvcc_bin); building llama.cpp with CUDA for sm_$cuda_arch" >&2
  # The toolkit's own bin/ first: nvcc runs ptxas, fatbinary and nvlink from PATH, and another
  # CUDA's (newer, without sm_52, which CMake's compiler probe uses) must not answer instead.
  if ! prefix="$(PATH="$(dirname "$nvcc_bin"):$PATH" TIGHTWAD_LLAMA_CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$cuda_arch \
-DGGML_CUDA_FA_ALL_QUANTS=OFF -DCMAKE_CUDA_COMPILER=$nvcc_bin -DCUDAToolkit_ROOT=$root" \
    nice -n 19 "$here/build-llama.sh")"; then
    echo "cuda: FAILED after $((SECONDS - start)) s (CUDA $version, sm_$cuda_arch)" >&2
    return 1
  fi
  if ! compgen -G "$prefix/lib/libggml-cuda.so*" >/dev/null; then
    echo "cuda: FAILED: the build has no libggml-cuda in $prefix/lib" >&2
    return 1
  fi
  echo "cuda: OK in $((SECONDS - start)) s (CUDA $version, sm_$cuda_arch): $prefix" >&2
}

# The HIP version the pinned llama.cpp's HIP backend demands (its ggml-hip/CMakeLists.txt), read
# from the unpacked source when it is there.
hip_needed() {
  local prefix version cmake
  prefix="$("$here/build-llama.sh" --print-prefix)" # .../llama.cpp/VERSION-KEY
  version="$(basename "$prefix")"
  version="${version%-*}"
  cmake="$(dirname "$prefix")/src-$version/llama_cpp_python-$version/vendor/llama.cpp/ggml/src/ggml-hip/CMakeLists.txt"
  sed -n 's/.*hip_version} VERSION_LESS \([0-9.]*\)).*/\1/p' "$cmake" 2>/dev/null | head -n 1 | grep . || echo 6.1
}

# version_of PACKAGE: its installed version, else the candidate apt offers, else "none".
version_of() {
  local v
  v="$(dpkg-query -W -f '${Version}' "$1" 2>/dev/null || true)"
  [[ -n "$v" ]] || v="$(apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p')"
  [[ -n "$v" && "$v" != "(none)" ]] && echo "$v" || echo none
}

check_hip() {
  local needed rocm hip have start=$SECONDS prefix
  needed="$(hip_needed)"
  # A ROCm new enough may already be installed (AMD's packages live under /opt/rocm).
  rocm="${ROCM_PATH:-/opt/rocm}"
  hip="$("$rocm/bin/hipconfig" --version 2>/dev/null || true)"
  if [[ -z "$hip" ]] || ! dpkg --compare-versions "${hip%%-*}" ge "$needed" \
    || ! compgen -G "$rocm/lib/cmake/hipblas/*.cmake" >/dev/null; then
    # What this distribution offers instead: hipcc/libamdhip64 and the BLAS libraries ggml-hip links.
    have="hipcc $(version_of hipcc), libamdhip64-dev $(version_of libamdhip64-dev), librocblas-dev"
    have+=" $(version_of librocblas-dev), libhipblas-dev $(version_of libhipblas-dev)"
    echo "hip: NOT CHECKED: the pinned llama.cpp's HIP backend needs HIP >= $needed with hipBLAS and" >&2
    echo "     rocBLAS; no such ROCm at $rocm (hipconfig: ${hip:-none}), and apt offers: $have" >&2
    return 0
  fi
  echo "HIP $hip ($rocm); building llama.cpp with HIP for $hip_target" >&2
  if ! prefix="$(HIPCXX="$rocm/llvm/bin/clang" HIP_PATH="$rocm" \
    TIGHTWAD_LLAMA_CMAKE_ARGS="-DGGML_HIP=ON -DAMDGPU_TARGETS=$hip_target" nice -n 19 "$here/build-llama.sh")"; then
    echo "hip: FAILED after $((SECONDS - start)) s (HIP $hip, $hip_target)" >&2
    return 1
  fi
  if ! compgen -G "$prefix/lib/libggml-hip.so*" >/dev/null; then
    echo "hip: FAILED: the build has no libggml-hip in $prefix/lib" >&2
    return 1
  fi
  echo "hip: OK in $((SECONDS - start)) s (HIP $hip, $hip_target): $prefix" >&2
}

what=("$@")
((${#what[@]})) || what=(cuda hip)
status=0
for w in "${what[@]}"; do
  case "$w" in
    cuda) check_cuda || status=1 ;;
    hip) check_hip || status=1 ;;
    *)
      echo "error: unknown backend '$w'; use cuda or hip" >&2
      exit 2
      ;;
  esac
done
exit "$status"
