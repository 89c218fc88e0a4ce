#!/usr/bin/env bash
# Test hosts as Linux network namespaces on one bridge, with optional upload caps and latency.
#
#   scripts/netns-hosts.sh up NAME COUNT [--rate RATE] [--delay TIME [--jitter TIME]] [--subnet A.B.C]
#   scripts/netns-hosts.sh down NAME
#   scripts/netns-hosts.sh list NAME
#   scripts/netns-hosts.sh link NAME --delay TIME [--jitter TIME]
#   scripts/netns-hosts.sh netem
#
# `up` creates the namespace NAME-sw holding a bridge, and NAME-1 .. NAME-COUNT, each with one
# interface eth0 (address A.B.C.i/24, default subnet 10.231.0) plugged into that bridge. Every veth
# pair is created inside NAME-sw and one end moved straight into its host, so nothing is ever
# created in, routed through or visible from the root namespace: the hosts reach only each other
# and their own loopback. With --rate (tc syntax: 100mbit, 20mbit, ...) each host's uplink (the
# egress of its eth0) is capped by a tbf qdisc. With --delay (tc syntax: 2ms, 10ms) each host's
# uplink holds every packet that long, with --jitter J drawn from delay ± J (tc netem `delay D J`),
# so a round trip between two hosts costs 2 × delay; `link` changes that delay on every host of NAME
# (made with --delay) in place. This needs the kernel's sch_netem, which `netem` checks (exit 0 and
# "netem: available", else exit 1 and why). `up` prints one line per host: "NAMESPACE ADDRESS". Run a command on a host with
# `ip netns exec NAME-1 COMMAND`. `down` deletes every namespace of NAME (their interfaces go with
# them) and is safe to repeat. Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2.
set -Eeuo pipefail
# Fail loudly: name the command and the line that failed, never just a bare non-zero exit.
trap 'echo "error: $0: line $LINENO: \`$BASH_COMMAND\` failed (exit $?)" >&2' ERR

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
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

netem_missing() {
  # Why tc netem cannot be used here (printed), or nothing (exit 0) when it can: tried on a probe.
  local probe="twnetem$$" why=""
  ip netns add "$probe" || { echo "cannot create a network namespace (needs root)"; return 0; }
  ip -n "$probe" link set lo up
  if ! why=$(ip netns exec "$probe" tc qdisc add dev lo root netem delay 1ms 2>&1); then
    echo "tc netem failed (${why//$'\n'/ }): this kernel lacks sch_netem (CONFIG_NET_SCH_NETEM)"
  fi
  ip netns del "$probe"
}

up() {
  local name=$1 count=$2 rate="" delay="" jitter="" subnet="10.231.0"
  shift 2
  while (($#)); do
    (($# >= 2)) || usage
    case $1 in
      --rate) rate=$2; shift 2 ;;
      --delay) delay=$2; shift 2 ;;
      --jitter) jitter=$2; shift 2 ;;
      --subnet) subnet=$2; shift 2 ;;
      *) usage ;;
    esac
  done
  if [[ -n $jitter && -z $delay ]]; then
    echo "error: --jitter needs --delay (jitter is spread around a delay: --delay 10ms --jitter 5ms)" >&2
    exit 2
  fi
  if [[ -n $delay ]]; then
    local missing
    missing=$(netem_missing)
    if [[ -n $missing ]]; then
      echo "error: --delay needs tc netem: $missing; add latency in user space instead (tests/support/netdelay.py)" >&2
      exit 1
    fi
  fi
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
    # burst must exceed one GSO super-packet (64 KiB) or tbf drops it; 256 KiB is negligible over a second.
    if [[ -n $delay ]]; then
      # netem at the root holds packets; a cap, if any, is tbf below it (netem has one child class).
      ip netns exec "$ns" tc qdisc replace dev eth0 root handle 1: netem delay "$delay" ${jitter:+"$jitter"}
      if [[ -n $rate ]]; then
        ip netns exec "$ns" tc qdisc replace dev eth0 parent 1: handle 2: tbf rate "$rate" burst 256kb latency 100ms
      fi
    elif [[ -n $rate ]]; then
      ip netns exec "$ns" tc qdisc replace dev eth0 root tbf rate "$rate" burst 256kb latency 100ms
    fi
  done
  trap - ERR
  for ((i = 1; i <= count; i++)); do
    echo "$name-$i $subnet.$i"
  done
}

link() {
  # Change the netem delay of every host of NAME in place (its qdiscs stay; a --rate cap below too).
  local name=$1 delay="" jitter="" ns
  shift
  while (($#)); do
    (($# >= 2)) || usage
    case $1 in
      --delay) delay=$2; shift 2 ;;
      --jitter) jitter=$2; shift 2 ;;
      *) usage ;;
    esac
  done
  [[ -n $delay ]] || { echo "error: link needs --delay TIME (e.g. --delay 10ms --jitter 5ms)" >&2; exit 2; }
  for ns in $(namespaces_of "$name"); do
    [[ $ns == "$name-sw" ]] && continue
    if ! ip netns exec "$ns" tc qdisc change dev eth0 root handle 1: netem delay "$delay" ${jitter:+"$jitter"}; then
      echo "error: $ns has no netem to change: make the hosts with \`up ... --delay TIME\`" >&2
      exit 1
    fi
  done
}

list() {
  local ns
  for ns in $(namespaces_of "$1" | sort -t- -k2 -n); do
    [[ $ns == "$1-sw" ]] && continue
    echo "$ns $(ip -n "$ns" -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)"
  done
}

(($# >= 1)) || usage
command -v ip >/dev/null || { echo "error: ip (iproute2) is missing; apt-get install iproute2" >&2; exit 1; }
if [[ $1 == netem ]]; then
  missing=$(netem_missing)
  [[ -z $missing ]] || { echo "netem: unavailable: $missing"; exit 1; }
  echo "netem: available"
  exit 0
fi
(($# >= 2)) || usage
case $1 in
  up) (($# >= 3)) || usage; up "${@:2}" ;;
  down) down "$2" ;;
  list) list "$2" ;;
  link) link "${@:2}" ;;
  *) usage ;;
esac
