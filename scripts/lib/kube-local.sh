# shellcheck shell=bash
# Shared by scripts/start-crd-apiserver.sh and scripts/start-full-kube.sh (sourced, not run): what
# both do to run Kubernetes pieces on loopback for the tests: free ports, a throwaway PKI, an
# admin's kubeconfig, etcd, and stopping what pid files name.

# A free TCP port on loopback.
kube_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# kube_stop_group PIDFILE...: SIGTERM every process the pid files name at once, wait up to 5 s for
# all of them, SIGKILL what is left, remove the pid files. Missing files are skipped.
kube_stop_group() {
  local pidfile pids=() files=() _ pid alive
  for pidfile in "$@"; do
    [[ -f "$pidfile" ]] || continue
    files+=("$pidfile")
    pids+=("$(cat "$pidfile")")
  done
  ((${#pids[@]})) || return 0
  kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 1 50); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  kill -9 "${pids[@]}" 2>/dev/null || true # still there after 5 s
  rm -f "${files[@]}"
}

# kube_pki DIR SERVER_CN SUBJECT_ALT_NAMES [--service-account]: a throwaway CA in DIR, a serving
# certificate for the API server, an admin client certificate (system:masters), and with
# --service-account the key pair that signs service-account tokens.
kube_pki() {
  local dir="$1" cn="$2" sans="$3" service_account="${4:-}"
  (
    cd "$dir" || exit 1
    quiet() { "$@" >/dev/null 2>&1 || { echo "error: $* failed" >&2; exit 1; }; }
    quiet openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 -subj /CN=tightwad-test-ca
    quiet openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=$cn"
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$sans" >server.ext
    quiet openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 30 \
      -extfile server.ext
    quiet openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=admin"
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    quiet openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out admin.crt -days 30 \
      -extfile client.ext
    if [[ "$service_account" == --service-account ]]; then
      quiet openssl genrsa -out sa.key 2048
      quiet openssl rsa -in sa.key -pubout -out sa.pub
    fi
  )
}

# kube_admin_kubeconfig DIR NAME API_PORT: DIR/kubeconfig for the admin of DIR/pki, on loopback.
kube_admin_kubeconfig() {
  local dir="$1" name="$2" api_port="$3"
  cat >"$dir/kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
  - name: $name
    cluster: {server: "https://127.0.0.1:$api_port", certificate-authority: "$dir/pki/ca.crt"}
users:
  - name: admin
    user: {client-certificate: "$dir/pki/admin.crt", client-key: "$dir/pki/admin.key"}
contexts:
  - name: $name
    context: {cluster: $name, user: admin, namespace: default}
current-context: $name
KUBECONFIG
}

# kube_start_etcd DIR NAME CLIENT_PORT LOG [ETCD_FLAG...]: etcd (Debian etcd-server) on loopback
# with its data in DIR/etcd, in the background; its pid in DIR/etcd.pid.
kube_start_etcd() {
  local dir="$1" name="$2" port="$3" log="$4" peer
  shift 4
  peer="$(kube_free_port)"
  etcd --name "$name" --data-dir "$dir/etcd" "$@" \
    --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "$name=http://127.0.0.1:$peer" >"$log" 2>&1 &
  echo $! >"$dir/etcd.pid"
}
