#!/usr/bin/env bash
# Test hosts as Linux network namespaces on one bridge, with optional upload caps.
#
#   scripts/netns-hosts.sh up NAME COUNT [--rate RATE] [--subnet A.B.C]
#   scripts/netns-hosts.sh down NAME
#   scripts/netns-hosts.sh list NAME
#
# `up` creates the namespace NAME-sw holding a bridge, and NAME-1 .. NAME-COUNT, each with one
# interface eth0 (address A.B.C.i/24, default subnet 10.231.0) plugged into that bridge. Every veth
# pair is created inside NAME-sw and one end moved straight into its host, so nothing is ever
# created in, routed through or visible from the root namespace: the hosts reach only each other
# and their own loopback. With --rate (tc syntax: 100mbit, 20mbit, ...) each host's uplink (the
# egress of its eth0) is capped by a tbf qdisc. There is no netem here, so no latency or loss.
# It prints one line per host: "NAMESPACE ADDRESS". Run a command on a host with
# `ip netns exec NAME-1 COMMAND`. `down` deletes every namespace of NAME (their interfaces go with
# them) and is safe to repeat. Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2.
set -Eeuo pipefail
# Fail loudly: name the command and the line that failed, never just a bare non-zero exit.
trap 'echo "error: $0: line $LINENO: \`$BASH_COMMAND\` failed (exit $?)" >&2' ERR

usage() {
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

namespaces_of() {
  # Every namespace named NAME-sw or NAME-<number>, one per line.
  ip netns list | awk '{print $1}' | grep -E "^${1}-(sw|[0-9]+)$" || true
}

down() {
  local name=$1 ns
  for ns in $(namespaces_of "$name"); do
    ip netns del "$ns" 2>/dev/null || true
  done
}

up() {
  local name=$1 count=$2 rate="" subnet="10.231.0"
  shift 2
  while (($#)); do
    case $1 in
      --rate) rate=$2; shift 2 ;;
      --subnet) subnet=$2; shift 2 ;;
      *) usage ;;
    esac
  done
  [[ $name =~ ^[A-Za-z0-9_]{1,10}$ ]] || { echo "error: NAME must be 1-10 letters, digits or _" >&2; exit 2; }
  if ! [[ $count =~ ^[0-9]+$ ]] || ((count < 1 || count > 200)); then
    echo "error: COUNT must be 1..200" >&2
    exit 2
  fi
  if [[ -n $(namespaces_of "$name") ]]; then
    echo "error: namespaces named $name-* already exist; run: $0 down $name" >&2
    exit 1
  fi
  # Leave nothing half-built behind if any step fails.
  trap 'down "$name"' ERR
  local sw="$name-sw"
  ip netns add "$sw"
  ip -n "$sw" link set lo up
  ip -n "$sw" link add br0 type bridge
  ip -n "$sw" link set br0 up
  local i ns
  for ((i = 1; i <= count; i++)); do
    ns="$name-$i"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$sw" link add "port$i" type veth peer name eth0 netns "$ns"
    ip -n "$sw" link set "port$i" master br0 up
    ip -n "$ns" addr add "$subnet.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    if [[ -n $rate ]]; then
      # burst must exceed one GSO super-packet (64 KiB) or tbf drops it; 256 KiB is negligible over a second.
      ip netns exec "$ns" tc qdisc replace dev eth0 root tbf rate "$rate" burst 256kb latency 100ms
    fi
  done
  trap - ERR
  for ((i = 1; i <= count; i++)); do
    echo "$name-$i $subnet.$i"
  done
}

list() {
  local ns
  for ns in $(namespaces_of "$1" | sort -t- -k2 -n); do
    [[ $ns == "$1-sw" ]] && continue
    echo "$ns $(ip -n "$ns" -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)"
  done
}

(($# >= 2)) || usage
command -v ip >/dev/null || { echo "error: ip (iproute2) is missing; apt-get install iproute2" >&2; exit 1; }
case $1 in
  up) (($# >= 3)) || usage; up "${@:2}" ;;
  down) down "$2" ;;
  list) list "$2" ;;
  *) usage ;;
esac
