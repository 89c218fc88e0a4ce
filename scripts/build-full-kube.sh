#!/usr/bin/env bash
# Build a FULL Kubernetes control plane for the end-to-end tests: kube-apiserver,
# kube-controller-manager, kube-scheduler and kubemark (whose "hollow node" is the real kubelet with
# a fake container runtime: pods are scheduled, get a fake IP and turn Running/Ready, but nothing
# runs in them). scripts/start-full-kube.sh starts them on loopback, with no container engine.
#
# The sources are Debian bookworm's `kubernetes` source package (the whole upstream tree, vendor/
# included) and Go is bookworm's golang-1.19, both fetched with apt-get through the machine's own
# apt sources into private apt state and unpacked in the build folder: nothing is installed
# system-wide and no Go module proxy is needed. The binaries are cached outside the repo, keyed by
# the package versions, the local patches and the build flags; a warm cache is a no-op.
# Prints the folder holding the four binaries on stdout as its last line.
#
#   scripts/build-full-kube.sh               # build (or reuse) and print the binaries' folder
#   scripts/build-full-kube.sh --print-path  # only print where they live (or would)
#
# Kubernetes 1.20 is old: it ignores CEL validation rules (x-kubernetes-validations) silently, so the
# CRD validation tests stay on scripts/build-crd-apiserver.sh's current apiextensions-apiserver.
set -Eeuo pipefail
# Fail loudly: name the command and the line that failed, never just a bare non-zero exit.
trap 'echo "error: $0: line $LINENO: \`$BASH_COMMAND\` failed (exit $?)" >&2' ERR

# Pinned to what bookworm ships; a mirror that has moved on stops the build with the version to pin.
suite=bookworm
k8s_version="${TIGHTWAD_KUBE_SOURCE_VERSION:-1.20.5+really1.20.2-1.1+deb12u1}"
go_version="${TIGHTWAD_KUBE_GO_VERSION:-1.19.8-2}"
reflect2_version="${TIGHTWAD_KUBE_REFLECT2_VERSION:-1.0.2-2}"
upstream=1.20.2
targets=(cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubemark)
cache="${TIGHTWAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tightwad}"
jobs="${TIGHTWAD_BUILD_JOBS:-$(nproc)}"

# Bump when the patches below or the layout of the cache folder change.
layout=2
key="$(printf '%s\n' "$k8s_version" "$go_version" "$reflect2_version" "${targets[*]}" "layout=$layout" |
  sha256sum | cut -c1-12)"
prefix="$cache/full-kube/$upstream-$key"
bin="$prefix/bin"

if [[ "${1:-}" == "--print-path" ]]; then
  echo "$bin"
  exit 0
fi
if [[ -f "$prefix/.complete" ]]; then
  echo "Kubernetes $upstream control plane is already built (cache hit)" >&2
  echo "$bin"
  exit 0
fi

for tool in apt-get apt-cache dpkg-source dpkg-deb make sha256sum; do
  command -v "$tool" >/dev/null || { echo "error: '$tool' is missing; this build needs a Debian-like system" >&2; exit 1; }
done
started=$SECONDS
work="$prefix/work"
rm -rf "$work" "$bin"
mkdir -p "$work"/{apt/lists/partial,apt/cache/archives/partial,debs,go,reflect2,shim,home} "$bin"

# The machine's own Debian mirror (deb822 .sources or one-line sources.list), suite bookworm, with
# deb-src, in private apt state so the system's package lists are untouched.
mirror="$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 || true)"
[[ -n "$mirror" ]] || mirror="$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
if [[ -z "$mirror" ]]; then
  echo "error: this machine has no Debian package source (/etc/apt/sources.list or" >&2
  echo "  /etc/apt/sources.list.d/*.sources); add the mirror you use, then rerun $0" >&2
  exit 1
fi
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
printf 'deb [signed-by=%s] %s %s main\ndeb-src [signed-by=%s] %s %s main\n' \
  "$keyring" "$mirror" "$suite" "$keyring" "$mirror" "$suite" >"$work/apt/sources.list"
apt_opts=(
  -o "Dir::Etc::SourceList=$work/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache"
  -o Dir::State::status=/var/lib/dpkg/status
)
# apt-get download drops privileges to _apt, who cannot write into root's cache: stay root there.
[[ $(id -u) -eq 0 ]] && apt_opts+=(-o APT::Sandbox::User=root)
echo "reading Debian $suite's package lists from $mirror" >&2
apt-get "${apt_opts[@]}" update -qq >&2

candidate="$(apt-cache "${apt_opts[@]}" showsrc kubernetes 2>/dev/null | awk '/^Version:/ {print $2; exit}')"
if [[ "$candidate" != "$k8s_version" ]]; then
  echo "error: Debian $suite has the kubernetes source package at '$candidate', not the pinned $k8s_version." >&2
  echo "  Rerun with TIGHTWAD_KUBE_SOURCE_VERSION=$candidate (and update the pin in $0)." >&2
  exit 1
fi

echo "downloading the kubernetes $k8s_version sources and Go $go_version from $suite" >&2
(
  cd "$work/debs"
  apt-get "${apt_opts[@]}" -qq source --download-only "kubernetes=$k8s_version" >&2
  apt-get "${apt_opts[@]}" -qq download "golang-1.19-go=$go_version" "golang-1.19-src=$go_version" \
    "golang-github-modern-go-reflect2-dev=$reflect2_version" >&2
)
for deb in "$work"/debs/golang-1.19-*.deb; do dpkg-deb -x "$deb" "$work/go"; done
dpkg-deb -x "$work"/debs/golang-github-modern-go-reflect2-dev_*.deb "$work/reflect2"
src="$work/kubernetes"
# (apt has checked the files' hashes against the signed Release; dpkg-source's own gpgv check has no
# Debian developer keys to hand and only warns.)
dpkg-source -q -x "$work"/debs/kubernetes_*.dsc "$src" >"$work/dpkg-source.log" 2>&1

# Six local patches, each checked, so a changed source fails here rather than at run time.
patch_file() { # patch_file FILE PERL-EXPRESSION MARKER: edit FILE in place, then require MARKER
  perl -0pi -e "$2" "$src/$1"
  grep -q -- "$3" "$src/$1" || { echo "error: patching $1 failed (no '$3' after it)" >&2; exit 1; }
}
# 1. The vendored reflect2 1.0.1 crashes under Go >= 1.18 (it reads runtime internals): use 1.0.2.
r2="vendor/github.com/modern-go/reflect2"
rm -f "$src/$r2"/*.go "$src/$r2"/*.s
cp "$work"/reflect2/usr/share/gocode/src/github.com/modern-go/reflect2/*.{go,s} "$src/$r2/"
# 2. The hollow kubelet listens on loopback only, on no fixed port (its healthz port, 10248 by
#    default, is off: several hollow nodes share one machine), and takes its node IP from
#    $HOLLOW_NODE_IP instead of resolving the node's made-up name (a DNS query that can hang where
#    there is no network).
# shellcheck disable=SC2016 # $1 is perl's, not the shell's
patch_file pkg/kubemark/hollow_kubelet.go \
  's|c\.Address = "0\.0\.0\.0" /\* bind address \*/|c.Address = "127.0.0.1" // loopback only\n\tc.HealthzPort = 0|;
   s|(\n\tf\.HostnameOverride = opt\.NodeName\n)|$1\tf.NodeIP = os.Getenv("HOLLOW_NODE_IP")\n|;
   s|\nimport \(\n|\nimport (\n\t"os"\n|' \
  'HOLLOW_NODE_IP'
# 3. Its fake container runtime's socket and root folder go under $TMPDIR, not a fixed /tmp path,
#    so two control planes (or two test sessions) never share one.
patch_file pkg/kubelet/cri/remote/fake/endpoint.go \
  's|return defaultUnixEndpoint, nil|return "unix://" + os.TempDir() + "/kubelet_remote.sock", nil|;
   s|\npackage fake\n|\npackage fake\n\nimport "os"\n|' \
  'os.TempDir()'
patch_file test/utils/tmpdir.go \
  's|baseDir = "/tmp"|baseDir = os.TempDir()|; s|\n\t"io/ioutil"\n|\n\t"io/ioutil"\n\t"os"\n|' \
  'os.TempDir()'

# 4. Nothing runs in a hollow node's containers, so none ever exits: the containers whose names match
#    the regular expression $HOLLOW_COMPLETED_CONTAINERS (init containers) complete at once instead.
# shellcheck disable=SC2016 # $1 is perl's, not the shell's
patch_file staging/src/k8s.io/cri-api/pkg/apis/testing/fake_runtime_service.go \
  's|(\tc\.StartedAt = time\.Now\(\)\.UnixNano\(\)\n)|$1\tif re := os.Getenv("HOLLOW_COMPLETED_CONTAINERS"); re != "" \&\& c.Metadata != nil \&\& regexp.MustCompile(re).MatchString(c.Metadata.Name) {\n\t\tc.State = runtimeapi.ContainerState_CONTAINER_EXITED\n\t\tc.FinishedAt = c.StartedAt\n\t\tc.Reason = "Completed"\n\t}\n|;
   s|\n\t"reflect"\n|\n\t"os"\n\t"reflect"\n\t"regexp"\n|' \
  'HOLLOW_COMPLETED_CONTAINERS'
# 5. ...and nothing answers a probe: with $HOLLOW_PROBES_SUCCEED set every probe succeeds (after its
#    initial delay and period, as the real kubelet times them).
# shellcheck disable=SC2016 # $1 is perl's, not the shell's
patch_file pkg/kubelet/prober/prober.go \
  's|(\n\tvar probeSpec \*v1\.Probe\n)|\n\tif os.Getenv("HOLLOW_PROBES_SUCCEED") != "" {\n\t\treturn results.Success, nil\n\t}$1|;
   s|\nimport \(\n|\nimport (\n\t"os"\n|' \
  'HOLLOW_PROBES_SUCCEED'
# 6. A hollow node is 1 CPU and 3.75 GiB by default: $HOLLOW_NODE_CPUS and $HOLLOW_NODE_MEMORY (bytes)
#    size it like the machine it stands for (the kubelet rewrites a node's cpu and memory capacity
#    from its machine info every few seconds, so patching the Node would not last).
# shellcheck disable=SC2016 # $1 is perl's, not the shell's
patch_file pkg/kubelet/cadvisor/testing/cadvisor_fake.go \
  's|NumCores:(\s+)([fF]akeNumCores),|NumCores:$1hollowSize("HOLLOW_NODE_CPUS", $2),|;
   s|MemoryCapacity:(\s+)([fF]akeMemoryCapacity),|MemoryCapacity:$1uint64(hollowSize("HOLLOW_NODE_MEMORY", $2)),|;
   s|\nimport \(\n|\nimport (\n\t"os"\n\t"strconv"\n|;
   s|\z|\n// hollowSize is a size from the environment, when it gives one.\nfunc hollowSize(name string, fallback int) int {\n\tif n, err := strconv.Atoi(os.Getenv(name)); err == nil \&\& n > 0 {\n\t\treturn n\n\t}\n\treturn fallback\n}\n|' \
  'HOLLOW_NODE_MEMORY'

# Kubernetes' build copies its binaries with `rsync -pc SRC DST`; cp does the same here.
printf '#!/bin/sh\nshift\nexec cp -p "$@"\n' >"$work/shim/rsync"
chmod +x "$work/shim/rsync"
export GOROOT="$work/go/usr/lib/go-1.19" GOPATH="$src/.go" GOCACHE="$work/gocache" HOME="$work/home"
# GOFLAGS stays empty: Kubernetes' build script reads build tags out of it and mangles anything else.
export PATH="$GOROOT/bin:$work/shim:$PATH" CGO_ENABLED=0 GOPROXY=off GOFLAGS="" GO111MODULE=off
# No git tree here: say which version the binaries are (helm and kubectl ask the server).
export KUBE_GIT_VERSION="v$upstream" KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR="${upstream#1.}" KUBE_GIT_TREE_STATE=clean
export KUBE_GIT_MINOR="${KUBE_GIT_MINOR%%.*}"
mkdir -p "$GOPATH/src/k8s.io"
ln -sfn ../../.. "$GOPATH/src/k8s.io/kubernetes"

# Kubernetes 1.20 builds in GOPATH mode, from k8s.io/kubernetes inside GOPATH.
cd "$GOPATH/src/k8s.io/kubernetes"
# A rough total for the progress line (the code generators come on top; the line stops at 100%).
total="$(go list -deps "${targets[@]/#/./}" 2>/dev/null | grep -c . || true)"
echo "compiling ~$total Go packages with $jobs jobs (log: $prefix/build.log)" >&2
# Words in WHAT that start with a dash go to `go install`: -v names each package as go compiles it,
# which the awk below turns into one live progress line.
if ! make WHAT="-v -p=$jobs ${targets[*]}" KUBE_BUILD_PLATFORMS=linux/amd64 2>&1 |
  tee "$prefix/build.log" |
  awk -v total="$total" -v tty="$([[ -t 2 ]] && echo 1 || echo 0)" '
      /^[a-z0-9._-]+(\/[A-Za-z0-9._~-]+)*$/ { done++ }
      { pct = total > 0 ? int(100 * done / total) : 0; if (pct > 100) pct = 100 }
      pct != shown {
        bar = substr("########################################", 1, int(pct * 40 / 100))
        if (tty) { printf "\r  [%-40s] %3d%%", bar, pct > "/dev/stderr"; shown = pct }
        else if (pct >= shown + 10) { printf "  [%-40s] %3d%%\n", bar, pct > "/dev/stderr"; shown = pct }
      }
      END { if (tty) printf "\n" > "/dev/stderr" }'; then
  grep -v '^[a-z0-9./_~-]*$' "$prefix/build.log" | tail -n 20 >&2 || true
  echo "error: the Kubernetes build failed; see $prefix/build.log" >&2
  exit 1
fi
for target in "${targets[@]}"; do
  name="${target#cmd/}"
  [[ -x "$src/_output/local/bin/linux/amd64/$name" ]] || {
    echo "error: the build made no $name; see $prefix/build.log" >&2
    exit 1
  }
  mv "$src/_output/local/bin/linux/amd64/$name" "$bin/$name"
done
printf 'kubernetes-source=%s\ngo=%s\nreflect2=%s\nbuilt-seconds=%s\n' \
  "$k8s_version" "$go_version" "$reflect2_version" "$((SECONDS - started))" >"$prefix/BUILD-INFO"
cd "$prefix"
rm -rf "$work" # ~4 GB of sources and compiler cache; the four binaries are all the tests need
echo "layout=$layout" >"$prefix/.complete"
echo "Kubernetes $upstream control plane built into $bin in $((SECONDS - started)) s" >&2
echo "$bin"
