#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU: build the pinned llama.cpp with CUDA (through
# scripts/build-llama.sh, cached like the CPU build), then on that GPU run the golden exactness
# tests, measure batch invariance (bench/invariance.py against a ggml-rpc-server on the GPU) and
# run `bench/speculation.py --quick`; print one table. Aimed at under 10 minutes on 16 cores.
#
#   scripts/gpu-check.sh              # everything
#   TIGHTWAD_CUDA_ARCH=90 scripts/gpu-check.sh   # the architecture (default: read from nvidia-smi)
#   TIGHTWAD_NVCC=/opt/cuda/bin/nvcc scripts/gpu-check.sh  # which toolkit (default: found)
#
# Needs: nvidia-smi and a driver, a CUDA toolkit with cuBLAS (nvcc), the virtual environment
# (`make venv`) and the models (`make models`; add the Qwen pair for the headline speculation
# pair). Logs: $TIGHTWAD_GPU_CHECK_LOGS (default out/gpu-check/). Exit status 0 only when every
# step passed.
set -Eeuo pipefail
# Fail loudly: name the command and the line that failed, never just a bare non-zero exit.
trap 'echo "error: $0: line $LINENO: \`$BASH_COMMAND\` failed (exit $?)" >&2' ERR

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${VENV:-.venv}/bin/python"
logs="${TIGHTWAD_GPU_CHECK_LOGS:-out/gpu-check}"

# 1. A GPU, or a clear refusal: nothing below means anything without one.
if ! command -v nvidia-smi >/dev/null; then
  echo "error: no NVIDIA GPU here: nvidia-smi is not installed. scripts/gpu-check.sh needs a machine" >&2
  echo "       with an NVIDIA GPU and its driver; without one, scripts/gpu-compile-check.sh cuda only" >&2
  echo "       compile-checks the CUDA build" >&2
  exit 1
fi
if ! gpus="$(nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader 2>&1)" \
  || [[ -z "$gpus" ]]; then
  echo "error: no NVIDIA GPU here: nvidia-smi found none (${gpus:-no output}). scripts/gpu-check.sh" >&2
  echo "       needs a working GPU and driver; scripts/gpu-compile-check.sh cuda only compile-checks" >&2
  exit 1
fi
gpu="$(head -n 1 <<<"$gpus")"
arch="${TIGHTWAD_CUDA_ARCH:-$(cut -d, -f2 <<<"$gpu" | tr -d ' .')}"

# 2. A CUDA toolkit with cuBLAS (a bare nvcc, e.g. from a pip wheel, cannot build ggml-cuda).
nvcc="${TIGHTWAD_NVCC:-}"
if [[ -z "$nvcc" ]]; then
  for candidate in "$(command -v nvcc || true)" /usr/local/cuda/bin/nvcc /usr/bin/nvcc; do
    [[ -x "$candidate" ]] || continue
    base="$(dirname "$(dirname "$(readlink -f "$candidate")")")"
    if compgen -G "$base/include/cublas_v2.h" >/dev/null || compgen -G "$base/targets/*/include/cublas_v2.h" >/dev/null \
      || [[ "$base" == /usr && -e /usr/include/cublas_v2.h ]]; then
      nvcc="$(readlink -f "$candidate")"
      break
    fi
  done
fi
if [[ -z "$nvcc" || ! -x "$nvcc" ]]; then
  echo "error: no CUDA toolkit with cuBLAS found (nvcc and cublas_v2.h). Install one (on Debian:" >&2
  echo "       scripts/gpu-compile-check.sh cuda, which adds nvidia-cuda-toolkit), or name it with" >&2
  echo "       TIGHTWAD_NVCC=/path/to/bin/nvcc" >&2
  exit 1
fi
if [[ ! -x "$py" ]]; then
  echo "error: no virtual environment at ${py%/bin/python}; run \`make venv\` first" >&2
  exit 1
fi
cuda_version="$("$nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
cuda_root="$(dirname "$(dirname "$nvcc")")"
mkdir -p "$logs"
rows=()
failed=0
row() { rows+=("$(printf '| %-28s | %-6s | %5s s | %s |' "$1" "$2" "$3" "$4")"); }
echo "GPU: $gpu; CUDA $cuda_version ($nvcc), sm_$arch; logs in $logs/" >&2
row "GPU" "ok" 0 "$gpu"

# 3. The pinned llama.cpp with CUDA: the same flags scripts/gpu-compile-check.sh uses, this arch.
export TIGHTWAD_LLAMA_CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$arch -DGGML_CUDA_FA_ALL_QUANTS=OFF \
-DCMAKE_CUDA_COMPILER=$nvcc -DCUDAToolkit_ROOT=$cuda_root"
start=$SECONDS
# The toolkit's bin/ first: nvcc runs ptxas, fatbinary and nvlink from PATH, not another CUDA's.
if prefix="$(PATH="$(dirname "$nvcc"):$PATH" scripts/build-llama.sh 2>"$logs/build.log" | tail -n 1)" && [[ -n "$prefix" ]] \
  && compgen -G "$prefix/lib/libggml-cuda.so*" >/dev/null; then
  row "build (CUDA $cuda_version, sm_$arch)" "ok" $((SECONDS - start)) "$prefix"
else
  row "build (CUDA $cuda_version, sm_$arch)" "FAIL" $((SECONDS - start)) "see $logs/build.log"
  printf '%s\n' "${rows[@]}"
  exit 1
fi
# Every process below (tests, benches, the engine, rpc workers, llama-server) uses this build.
export TIGHTWAD_LLAMA_PREFIX="$prefix"

# run NAME SECONDS LOG COMMAND...: one step under a time limit; its exit status.
run() {
  local name="$1" limit="$2" log="$3"
  shift 3
  echo "== $name (up to $limit s; log: $log)" >&2
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
}

# 4. The engine's libllama sees the GPU (the engine puts the target on local GPUs by itself).
start=$SECONDS
if run "devices" 60 "$logs/devices.log" "$py" -c '
from tightwad.engine import libllama
devices = libllama.local_gpu_devices()
print("; ".join(f"{d.name} {d.description} {d.free_bytes / 2**30:.0f} GiB free" for d in devices))
raise SystemExit(0 if devices else "the CUDA build sees no GPU")'; then
  row "engine sees the GPU" "ok" $((SECONDS - start)) "$(tail -n 1 "$logs/devices.log")"
else
  row "engine sees the GPU" "FAIL" $((SECONDS - start)) "$(tail -n 1 "$logs/devices.log")"
  failed=1
fi

# 5. Golden exactness: engine greedy = llama-server greedy = speculative greedy through verify
# (target on the GPU), and strict exact mode through the real proxy. Failures here are findings:
# GPU kernels are not batch-invariant (README, "GPUs: not yet exact").
start=$SECONDS
status=ok
run "golden tests" 240 "$logs/golden.log" "$py" -m pytest -q -p no:cacheprovider \
  tests/engine/test_golden.py tests/proxy/test_exact_golden.py || status=FAIL
[[ $status == ok ]] || failed=1
row "golden tests, target on GPU" "$status" $((SECONDS - start)) "$(grep -E '(passed|failed|error)' "$logs/golden.log" | tail -n 1)"

# 6. Batch invariance on the GPU: block vs single-token logits, bit for bit, through an rpc worker
# on the GPU (stock GPU kernels in both modes; the exact patch is CPU-only).
start=$SECONDS
models="smollm2-135m-f32,gemma3-270m-q4_k_m"
"$py" -c 'from tightwad import models; models.resolve("qwen2.5-coder-1.5b-f16")' 2>/dev/null \
  && models+=",qwen2.5-coder-1.5b-f16"
if INVARIANCE_JSON="$logs/invariance.json" run "invariance" 180 "$logs/invariance.log" \
  "$py" bench/invariance.py --places rpc --modes default --models "$models"; then
  detail="$("$py" - "$logs/invariance.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
print("; ".join(f"{r['model']} fa {r['fa']} kv {r['kv']}: {r['differing']}/{r['compared']} rows differ, "
                f"{r['flips']} flips" for r in rows) or "no results")
PY
)"
  row "invariance (rpc worker on GPU)" "ok" $((SECONDS - start)) "$detail"
else
  row "invariance (rpc worker on GPU)" "FAIL" $((SECONDS - start)) "see $logs/invariance.log"
  failed=1
fi

# 7. Speculation on the GPU: the rpc workers, the engine and the llama-server drafter all see it.
start=$SECONDS
if run "speculation" 240 "$logs/speculation.log" "$py" bench/speculation.py --quick; then
  # The results table's rows: method, median tok/s, x target alone, per prompt, same tokens.
  detail="$(awk -F'│' 'NF > 6 && $4 ~ /x *$/ { gsub(/^ +| +$/, "", $2); gsub(/ /, "", $4); gsub(/^ +| +$/, "", $6);
    printf "%s%s %s (same: %s)", sep, $2, $4, $6; sep = "; " }' "$logs/speculation.log")"
  row "speculation --quick on GPU" "ok" $((SECONDS - start)) "${detail:-see $logs/speculation.log}"
else
  row "speculation --quick on GPU" "FAIL" $((SECONDS - start)) "see $logs/speculation.log"
  failed=1
fi

echo
printf '| %-28s | %-6s | %7s | %s |\n' "step" "result" "time" "detail"
printf '|%s|%s|%s|%s|\n' "------------------------------" "--------" "---------" "--------"
printf '%s\n' "${rows[@]}"
exit "$failed"
