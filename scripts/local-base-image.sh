#!/usr/bin/env bash
# Make a Debian base image without a registry (none is reachable here): debootstrap a minimal
# bookworm root filesystem once into the cache, then `docker import` it under the given tag.
# The Dockerfiles take their base images as build arguments, so this tag builds their CPU variants.
#
#   DOCKER_HOST=unix://... scripts/local-base-image.sh [TAG]    # default tag: tightwad-local/debian:bookworm
set -Eeuo pipefail
# Fail loudly: name the command and the line that failed, never just a bare non-zero exit.
trap 'echo "error: $0: line $LINENO: \`$BASH_COMMAND\` failed (exit $?)" >&2' ERR

tag="${1:-tightwad-local/debian:bookworm}"
cache="${TIGHTWAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tightwad}"
rootfs_tar="$cache/base-images/debian-bookworm-minbase.tar"

if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag"
  exit 0
fi
if [[ ! -f "$rootfs_tar" ]]; then
  command -v debootstrap >/dev/null || { echo "error: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  echo "debootstrapping a minimal Debian bookworm (a few minutes, once)..." >&2
  debootstrap --variant=minbase bookworm "$work/rootfs" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; exit 1; }
  rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
  mkdir -p "$(dirname "$rootfs_tar")"
  tar -C "$work/rootfs" -cf "$rootfs_tar.partial" .
  mv "$rootfs_tar.partial" "$rootfs_tar"
fi
docker import "$rootfs_tar" "$tag" >/dev/null
echo "$tag"
