#!/usr/bin/env bash
# playwright-core (the driver only, no browser download) into the cache, for the dashboard's
# headless-browser test; the browser is Debian's chromium (scripts/install-system-deps.sh).
set -Eeuo pipefail
# Fail loudly: name the command and the line that failed, never just a bare non-zero exit.
trap 'echo "error: $0: line $LINENO: \`$BASH_COMMAND\` failed (exit $?)" >&2' ERR

version=1.65.1
cache="${TIGHTWAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tightwad}"
dir="$cache/playwright"
if [[ -f "$dir/node_modules/playwright-core/package.json" ]] \
  && grep -q "\"version\": \"$version\"" "$dir/node_modules/playwright-core/package.json"; then
  exit 0
fi
mkdir -p "$dir"
echo "installing playwright-core $version for the browser test..." >&2
npm install --prefix "$dir" --no-audit --no-fund --silent "playwright-core@$version" >&2
