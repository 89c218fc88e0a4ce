#!/usr/bin/env bash
# Install the Debian packages a group of targets needs, only those that are missing. Safe to re-run;
# does nothing on a machine that already has them.
#
#   scripts/install-system-deps.sh build   # compiling llama.cpp and the Python environment
#   scripts/install-system-deps.sh lint    # shellcheck (ruff and hadolint come from PyPI)
#   scripts/install-system-deps.sh test    # everything the whole test suite runs against
#   scripts/install-system-deps.sh         # all of the above
set -Eeuo pipefail
# Fail loudly: name the command and the line that failed, never just a bare non-zero exit.
trap 'echo "error: $0: line $LINENO: \`$BASH_COMMAND\` failed (exit $?)" >&2' ERR

groups=("$@")
((${#groups[@]})) || groups=(build lint test)

need=()
want() { # want COMMAND PACKAGE...: the packages, when COMMAND is missing
  local cmd="$1"
  shift
  command -v "$cmd" >/dev/null || need+=("$@")
}
for group in "${groups[@]}"; do
  case "$group" in
    build)
      want cmake cmake
      want g++ g++ build-essential
      want ninja ninja-build
      want patch patch
      want git git
      python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
      ;;
    lint)
      want shellcheck shellcheck
      ;;
    test)
      # The operator's docker driver runs against a real daemon (scripts/start-dockerd.sh), with
      # images imported from a local root filesystem that busybox fills.
      want dockerd docker.io
      want busybox busybox-static
      # The image tests build on a local Debian base image (scripts/local-base-image.sh).
      want debootstrap debootstrap
      # Evaluating the Nix flake (nixpkgs itself is stubbed in tests).
      want nix nix-bin
      # The swarm's test hosts: network namespaces, tc uplink caps, and plain-HTTP baselines.
      want ip iproute2
      want curl curl
      # The dashboard's browser test: Debian's chromium, driven by playwright-core.
      want chromium chromium
      want npm nodejs npm
      # The Kubernetes tests: etcd under the API server, openssl for its certificates.
      want etcd etcd-server
      want openssl openssl
      ;;
    *)
      echo "error: unknown group '$group'; use build, lint or test" >&2
      exit 2
      ;;
  esac
done

((${#need[@]})) || exit 0
if [[ $(id -u) -ne 0 ]]; then
  echo "error: missing packages: ${need[*]}; install them with: sudo apt-get install ${need[*]}" >&2
  exit 1
fi
echo "installing system packages: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
