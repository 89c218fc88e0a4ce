#!/usr/bin/env bash
# Create the project's virtual environment and install Tightwad into it (editable) with its test
# tools. llama-cpp-python is installed WITHOUT its own llama.cpp (-DLLAMA_BUILD=OFF): it loads the
# one pinned build from scripts/build-llama.sh, whose sdist it is built from.
set -Eeuo pipefail
# Fail loudly: name the command and the line that failed, never just a bare non-zero exit.
trap 'echo "error: $0: line $LINENO: \`$BASH_COMMAND\` failed (exit $?)" >&2' ERR

venv="${1:-.venv}"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
cache="${TIGHTWAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tightwad}"
sdist="$cache/llama.cpp/src-$version/llama_cpp_python-$version.tar.gz"
wheels="$cache/wheels"

[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

# The bindings-only wheel, built once from the same sdist as the libraries and cached.
# A glob, not `find | head`: on a new machine the folder does not exist yet, and a failing
# pipeline inside $(...) would end the script silently under `set -e`.
find_wheel() {
  local matches=("$wheels"/llama_cpp_python-"$version"-*.whl)
  if [[ -f "${matches[0]}" ]]; then echo "${matches[0]}"; fi
}
wheel=$(find_wheel)
if [[ -z "$wheel" ]]; then
  if [[ ! -f "$sdist" ]]; then
    echo "fetching the llama-cpp-python $version sdist from the package index..." >&2
    mkdir -p "$(dirname "$sdist")"
    "${pip[@]}" download --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$(dirname "$sdist")" >&2
  fi
  echo "building the llama-cpp-python $version bindings (no bundled llama.cpp)..." >&2
  mkdir -p "$wheels"
  CMAKE_ARGS="-DLLAMA_BUILD=OFF" "${pip[@]}" wheel --no-deps -w "$wheels" "$sdist" >&2
  wheel=$(find_wheel)
fi
"${pip[@]}" install "$wheel" >&2
"${pip[@]}" install -e ".[test]" >&2
echo "python environment ready in $venv" >&2
