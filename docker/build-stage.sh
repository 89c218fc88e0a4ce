#!/usr/bin/env bash
# The builder stage shared by the worker images: build the pinned llama.cpp with the backend flags
# given in TIGHTWAD_LLAMA_CMAKE_ARGS into /opt/llama, and Tightwad with llama-cpp-python
# (bindings only, pointed at /opt/llama) into the virtual environment /opt/venv.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  cmake ninja-build g++ python3 python3-pip python3-venv ca-certificates
rm -rf /var/lib/apt/lists/*

export TIGHTWAD_CACHE=/tmp/cache
prefix=$(scripts/build-llama.sh)
cp -a "$prefix" /opt/llama
rm -rf /opt/llama/build

python3 -m venv /opt/venv
CMAKE_ARGS=-DLLAMA_BUILD=OFF /opt/venv/bin/pip install --no-cache-dir -q \
  "$TIGHTWAD_CACHE"/llama.cpp/src-*/llama_cpp_python-*.tar.gz .
