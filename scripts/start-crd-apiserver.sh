#!/usr/bin/env bash
# Start a REAL Kubernetes API server for custom resources on loopback: etcd (Debian etcd-server) and
# the apiextensions-apiserver that scripts/build-crd-apiserver.sh built, with client-certificate
# auth (an admin in system:masters). Writes DIR/kubeconfig, returns once /livez answers ok, and
# leaves both running in the background (their pids in DIR/*.pid). Free ports are picked unless given.
#
#   scripts/start-crd-apiserver.sh DIR [API_PORT [ETCD_PORT]]   # prints the kubeconfig path
#   scripts/start-crd-apiserver.sh --stop DIR                   # stops what DIR's pid files name
#
# This server serves CRDs and their objects (watch, resourceVersion, generation, schema validation,
# 409/410) but no core API (no Pods, no Deployments) and no /readyz: drive it with an API client,
# not kubectl. TIGHTWAD_CRD_APISERVER overrides the binary; TIGHTWAD_CRD_APISERVER_ARGS adds flags
# (the tests pass --watch-cache=false so that a compacted etcd revision expires watches at once).
# DIR/etcd.url and DIR/apiserver.url say where each listens.
set -Eeuo pipefail
# Fail loudly: name the command and the line that failed, never just a bare non-zero exit.
trap 'echo "error: $0: line $LINENO: \`$BASH_COMMAND\` failed (exit $?)" >&2' ERR

here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck disable=SC1091 # (scripts/lib/kube-local.sh: shellcheck it on its own)
source "$here/lib/kube-local.sh"

stop() {
  kube_stop_group "$1/apiserver.pid"
  kube_stop_group "$1/etcd.pid"
}

if [[ "${1:-}" == "--stop" ]]; then
  stop "${2:?usage: $0 --stop DIR}"
  exit 0
fi

dir="${1:?usage: $0 DIR [API_PORT [ETCD_PORT]]}"
binary="${TIGHTWAD_CRD_APISERVER:-$("$here/build-crd-apiserver.sh" --print-path)}"
if [[ ! -x "$binary" ]]; then
  echo "error: no API server binary at $binary; build it with scripts/build-crd-apiserver.sh (~5 min)" >&2
  exit 1
fi
for tool in etcd openssl curl; do
  command -v "$tool" >/dev/null || { echo "error: '$tool' is missing; run scripts/install-system-deps.sh" >&2; exit 1; }
done

api_port="${2:-$(kube_free_port)}"
etcd_port="${3:-$(kube_free_port)}"

mkdir -p "$dir/pki" "$dir/etcd"
dir="$(cd "$dir" && pwd)"
stop "$dir" # a previous run in the same folder

# A throwaway CA, a serving certificate for 127.0.0.1 and an admin client certificate.
kube_pki "$dir/pki" localhost IP:127.0.0.1,DNS:localhost
kube_admin_kubeconfig "$dir" crd-apiserver "$api_port"
kube_start_etcd "$dir" tightwad-test "$etcd_port" "$dir/etcd.log"

read -r -a extra_args <<<"${TIGHTWAD_CRD_APISERVER_ARGS:-}"
# Admission plugins that need the core API (namespaces, webhooks, policies) are off: there is none.
"$binary" --etcd-servers "http://127.0.0.1:$etcd_port" \
  --bind-address 127.0.0.1 --secure-port "$api_port" \
  --tls-cert-file "$dir/pki/server.crt" --tls-private-key-file "$dir/pki/server.key" \
  --client-ca-file "$dir/pki/ca.crt" \
  --kubeconfig "$dir/kubeconfig" --authentication-kubeconfig "$dir/kubeconfig" --authentication-skip-lookup \
  --authorization-kubeconfig "$dir/kubeconfig" --enable-priority-and-fairness=false \
  --disable-admission-plugins NamespaceLifecycle,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy,MutatingAdmissionPolicy \
  "${extra_args[@]}" >"$dir/apiserver.log" 2>&1 &
echo $! >"$dir/apiserver.pid"
echo "http://127.0.0.1:$etcd_port" >"$dir/etcd.url"
echo "https://127.0.0.1:$api_port" >"$dir/apiserver.url"

for _ in $(seq 1 240); do
  if curl -sf --cacert "$dir/pki/ca.crt" --cert "$dir/pki/admin.crt" --key "$dir/pki/admin.key" \
    "https://127.0.0.1:$api_port/livez" 2>/dev/null | grep -q '^ok'; then
    echo "CRD API server live on https://127.0.0.1:$api_port (logs in $dir)" >&2
    echo "$dir/kubeconfig"
    exit 0
  fi
  if ! kill -0 "$(cat "$dir/apiserver.pid")" 2>/dev/null; then
    tail -n 15 "$dir/apiserver.log" >&2
    break
  fi
  sleep 0.25
done
echo "error: the API server did not become live; see $dir/apiserver.log and $dir/etcd.log" >&2
stop "$dir"
exit 1
