#!/usr/bin/env bash
# The runtime stage shared by all images: only what running needs, and an unprivileged user that
# owns the model volume.
set -Eeuo pipefail
# Fail loudly: name the command and the line that failed, never just a bare non-zero exit.
trap 'echo "error: $0: line $LINENO: \`$BASH_COMMAND\` failed (exit $?)" >&2' ERR

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends python3 libgomp1 ca-certificates "$@"
rm -rf /var/lib/apt/lists/*
groupadd --system --gid 10001 tightwad
useradd --system --uid 10001 --gid 10001 --create-home tightwad
mkdir -p /models
chown tightwad:tightwad /models
