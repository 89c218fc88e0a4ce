#!/usr/bin/env bash
# Run a command that downloads from the package index, trusting extra CA certificates when the
# EXTRA_CA_CERTS build argument holds some (PEM text: for a network behind a TLS-inspecting proxy).
# The bundle lives only while the command runs, so no image layer keeps it.
set -Eeuo pipefail
# Fail loudly: name the command and the line that failed, never just a bare non-zero exit.
trap 'echo "error: $0: line $LINENO: \`$BASH_COMMAND\` failed (exit $?)" >&2' ERR

if [[ -z "${EXTRA_CA_CERTS:-}" ]]; then
  exec "$@"
fi
bundle=$(mktemp)
trap 'rm -f "$bundle"' EXIT
cat /etc/ssl/certs/ca-certificates.crt >"$bundle" 2>/dev/null || true
printf '%s\n' "$EXTRA_CA_CERTS" >>"$bundle"
PIP_CERT="$bundle" SSL_CERT_FILE="$bundle" "$@"
