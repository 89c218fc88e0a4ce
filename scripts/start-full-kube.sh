#!/usr/bin/env bash
# Start a FULL Kubernetes control plane on loopback, with no container engine: etcd (Debian
# etcd-server), the kube-apiserver, kube-controller-manager and kube-scheduler that
# scripts/build-full-kube.sh built, and one kubemark "hollow node" per NODE (the real kubelet with a
# fake container runtime: pods are scheduled, get a fake IP and turn Running/Ready; nothing runs in
# them). Throwaway PKI, free ports, everything under DIR. Returns once every node is Ready and
# schedulable, leaving it all running in the background (pids in DIR/*.pid, logs in DIR/logs).
#
#   scripts/start-full-kube.sh DIR [NODE...]   # prints the kubeconfig path (an admin's)
#   scripts/start-full-kube.sh --stop DIR      # stops what DIR's pid files name
#
# NODE is NAME[:LABELS[:CPUS:MEMORY]]: a node name, optionally with labels to register it with
# (comma-separated, `radeon:tightwad.dev/gpu=rx6800`) and its size (`xeon::20:42949672960`, memory
# in bytes; default 1 CPU and 3.75 GiB). Default: one node, hollow-1. DIR/apiserver.url says where
# the API listens.
# TIGHTWAD_FULL_KUBE overrides the folder of the binaries.
#
# Nothing runs in a hollow node's containers, so nothing would ever exit or answer a probe: every
# probe succeeds (after its delay and period), and the containers whose names match
# TIGHTWAD_HOLLOW_COMPLETED (a regular expression; default: Tightwad's init containers, model-0,
# model-1, ..., model-folder) complete as soon as they start.
set -Eeuo pipefail
# Fail loudly: name the command and the line that failed, never just a bare non-zero exit.
trap 'echo "error: $0: line $LINENO: \`$BASH_COMMAND\` failed (exit $?)" >&2' ERR

here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck disable=SC1091 # (scripts/lib/kube-local.sh: shellcheck it on its own)
source "$here/lib/kube-local.sh"

# Stop in reverse order of start: the nodes (all at once: there may be a hundred) and the
# controllers before the API server, etcd last.
stop() {
  local dir="$1" group
  shopt -s nullglob
  kube_stop_group "$dir"/node-*.pid
  for group in scheduler controller-manager apiserver etcd; do kube_stop_group "$dir/$group.pid"; done
}

if [[ "${1:-}" == "--stop" ]]; then
  stop "${2:?usage: $0 --stop DIR}"
  exit 0
fi

dir="${1:?usage: $0 DIR [NODE...]}"
shift
nodes=("$@")
((${#nodes[@]})) || nodes=(hollow-1)
bin="${TIGHTWAD_FULL_KUBE:-$("$here/build-full-kube.sh" --print-path)}"
for binary in kube-apiserver kube-controller-manager kube-scheduler kubemark; do
  if [[ ! -x "$bin/$binary" ]]; then
    echo "error: no $binary in $bin; build it with scripts/build-full-kube.sh (~10 min)" >&2
    exit 1
  fi
done
for tool in etcd openssl curl python3; do
  command -v "$tool" >/dev/null || { echo "error: '$tool' is missing; run scripts/install-system-deps.sh" >&2; exit 1; }
done

# A kubelet refuses a loopback node IP: use this machine's first other address (looked up locally,
# nothing is sent). Pods on the host network report it as their IP.
node_ip="$(hostname -I 2>/dev/null | awk '{print $1}')"
if [[ -z "$node_ip" ]]; then
  echo "error: this machine has no address besides loopback, which a kubelet refuses as its node IP" >&2
  exit 1
fi

mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
stop "$dir" # a previous run in the same folder
rm -rf "$dir/etcd" "$dir/nodes"
mkdir -p "$dir/pki" "$dir/etcd" "$dir/logs" "$dir/nodes"
api_port="$(kube_free_port)"
etcd_port="$(kube_free_port)"

# A throwaway CA, the API server's serving certificate for 127.0.0.1, an admin client certificate
# and the service-account signing key pair.
kube_pki "$dir/pki" kube-apiserver IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc --service-account
kube_admin_kubeconfig "$dir" full-kube "$api_port"
echo "https://127.0.0.1:$api_port" >"$dir/apiserver.url"

fail() {
  echo "error: $1; the logs are in $dir/logs" >&2
  tail -n 15 "$dir/logs/$2.log" >&2 || true
  stop "$dir"
  exit 1
}

# --unsafe-no-fsync: the data is thrown away with DIR, and fsync on a shared disk is the slow part.
kube_start_etcd "$dir" full-kube "$etcd_port" "$dir/logs/etcd.log" --unsafe-no-fsync

# No insecure port, RBAC on, and no endpoint reconciler (it would publish the node's address as the
# `kubernetes` Service's endpoint; nothing here needs it).
"$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" --insecure-port 0 \
  --tls-cert-file "$dir/pki/server.crt" --tls-private-key-file "$dir/pki/server.key" \
  --client-ca-file "$dir/pki/ca.crt" --authorization-mode RBAC --allow-privileged \
  --service-cluster-ip-range 10.96.0.0/24 --endpoint-reconciler-type none \
  --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$dir/pki/sa.pub" \
  --service-account-signing-key-file "$dir/pki/sa.key" >"$dir/logs/apiserver.log" 2>&1 &
echo $! >"$dir/apiserver.pid"

api() { # api PATH: GET it as the admin
  curl -sf --max-time 5 --cacert "$dir/pki/ca.crt" --cert "$dir/pki/admin.crt" --key "$dir/pki/admin.key" \
    "https://127.0.0.1:$api_port$1"
}
for i in $(seq 1 240); do
  [[ "$(api /readyz 2>/dev/null || true)" == ok ]] && break
  kill -0 "$(cat "$dir/apiserver.pid")" 2>/dev/null || fail "the API server exited" apiserver
  ((i < 240)) || fail "the API server did not become ready" apiserver
  sleep 0.25
done

# The cloud, service (load balancer) and IPAM controllers have nothing to do without a cloud or a
# pod network; everything else runs (deployments, replica sets, daemon sets, endpoints, garbage
# collection, node lifecycle, service-account tokens).
"$bin/kube-controller-manager" --kubeconfig "$dir/kubeconfig" --port 0 --secure-port 0 --leader-elect=false \
  --service-account-private-key-file "$dir/pki/sa.key" --root-ca-file "$dir/pki/ca.crt" \
  --controllers '*,-cloud-node-lifecycle,-service,-route,-nodeipam' >"$dir/logs/controller-manager.log" 2>&1 &
echo $! >"$dir/controller-manager.pid"
"$bin/kube-scheduler" --kubeconfig "$dir/kubeconfig" --port 0 --secure-port 0 --leader-elect=false \
  >"$dir/logs/scheduler.log" 2>&1 &
echo $! >"$dir/scheduler.pid"

completed="${TIGHTWAD_HOLLOW_COMPLETED:-^model-}"
names=()
index=0
for spec in "${nodes[@]}"; do
  IFS=: read -r name labels cpus memory <<<"$spec"
  names+=("$name")
  index=$((index + 1))
  # Each node's fake runtime keeps its sockets and root folder under its own TMPDIR, a short path:
  # a unix socket's path has room for 107 bytes.
  mkdir -p "$dir/nodes/$index"
  echo "$name" >"$dir/nodes/$index/name"
  HOLLOW_NODE_IP="$node_ip" HOLLOW_PROBES_SUCCEED=1 HOLLOW_COMPLETED_CONTAINERS="$completed" \
    HOLLOW_NODE_CPUS="${cpus:-}" HOLLOW_NODE_MEMORY="${memory:-}" \
    TMPDIR="$dir/nodes/$index" "$bin/kubemark" --morph kubelet --name "$name" \
    --kubeconfig "$dir/kubeconfig" --kubelet-port "$(kube_free_port)" --kubelet-read-only-port 0 \
    --kube-api-content-type application/json ${labels:+--node-labels "$labels"} \
    >"$dir/logs/node-$name.log" 2>&1 &
  echo $! >"$dir/node-$name.pid"
done

# Schedulable: every node Ready, with no taint left (the node lifecycle controller lifts the
# not-ready one a moment after the kubelet reports Ready).
for i in $(seq 1 480); do
  if api /api/v1/nodes 2>/dev/null | python3 -c '
import json, sys
want = set(sys.argv[1:])
ready = {
    n["metadata"]["name"]
    for n in json.load(sys.stdin)["items"]
    if not n["spec"].get("taints")
    and any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
}
sys.exit(0 if want <= ready else 1)' "${names[@]}"; then
    echo "Kubernetes $("$bin/kube-apiserver" --version | awk '{print $2}') on https://127.0.0.1:$api_port," \
      "${#names[@]} hollow node(s) Ready (logs in $dir/logs)" >&2
    echo "$dir/kubeconfig"
    exit 0
  fi
  for pidfile in "$dir"/*.pid; do
    kill -0 "$(cat "$pidfile")" 2>/dev/null || fail "$(basename "$pidfile" .pid) exited" "$(basename "$pidfile" .pid)"
  done
  ((i < 480)) || fail "the nodes did not become Ready and schedulable" controller-manager
  sleep 0.25
done
