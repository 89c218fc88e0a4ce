#!/usr/bin/env bash
# The builder stage shared by the worker images, in two steps so that editing Tightwad's sources
# does not rebuild llama.cpp (Docker caches the first step):
#   build-stage.sh llama    the pinned llama.cpp, with the backend flags in TIGHTWAD_LLAMA_CMAKE_ARGS,
#                           into /opt/llama
#   build-stage.sh python   Tightwad with llama-cpp-python (bindings only, pointed at /opt/llama)
#                           into the virtual environment /opt/venv
set -Eeuo pipefail
# Fail loudly: name the command and the line that failed, never just a bare non-zero exit.
trap 'echo "error: $0: line $LINENO: \`$BASH_COMMAND\` failed (exit $?)" >&2' ERR

export TIGHTWAD_CACHE=/tmp/cache
case "${1:-}" in
  llama)
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
      cmake ninja-build g++ patch python3 python3-pip python3-venv ca-certificates
    rm -rf /var/lib/apt/lists/*
    prefix=$(scripts/build-llama.sh)
    cp -a "$prefix" /opt/llama
    rm -rf /opt/llama/build
    ;;
  python)
    python3 -m venv /opt/venv
    CMAKE_ARGS=-DLLAMA_BUILD=OFF /opt/venv/bin/pip install --no-cache-dir -q \
      "$TIGHTWAD_CACHE"/llama.cpp/src-*/llama_cpp_python-*.tar.gz .
    ;;
  *)
    echo "usage: build-stage.sh llama|python" >&2
    exit 2
    ;;
esac
