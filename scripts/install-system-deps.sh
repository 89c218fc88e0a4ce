#!/usr/bin/env bash
# Install the Debian packages the build and the tests need, only those that are missing.
# Safe to re-run; does nothing on a machine that already has them.
set -euo pipefail

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++ build-essential)
command -v ninja >/dev/null || need+=(ninja-build)
command -v git >/dev/null || need+=(git)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
# The operator's docker driver is tested against a real daemon (scripts/start-dockerd.sh), with
# images imported from a local root filesystem that busybox fills.
command -v dockerd >/dev/null || need+=(docker.io)
command -v busybox >/dev/null || need+=(busybox-static)
# The image tests build on a local Debian base image (scripts/local-base-image.sh): no registry here.
command -v debootstrap >/dev/null || need+=(debootstrap)
# Linting scripts, and evaluating the Nix flake (nixpkgs itself is stubbed in tests).
command -v shellcheck >/dev/null || need+=(shellcheck)
command -v nix >/dev/null || need+=(nix-bin)
# The swarm's test hosts: network namespaces, tc uplink caps, and plain-HTTP baselines.
command -v ip >/dev/null || need+=(iproute2)
command -v curl >/dev/null || need+=(curl)
# The dashboard's browser test: Debian's chromium, driven by playwright-core (scripts/install-browser.sh).
command -v chromium >/dev/null || need+=(chromium)
command -v npm >/dev/null || need+=(nodejs npm)
# The Kubernetes tests: etcd under the CRD API server, openssl for its certificates.
command -v etcd >/dev/null || need+=(etcd-server)
command -v openssl >/dev/null || need+=(openssl)

if ((${#need[@]} == 0)); then
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "error: missing packages: ${need[*]}; install them with: sudo apt-get install ${need[*]}" >&2
  exit 1
fi
echo "installing system packages: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
