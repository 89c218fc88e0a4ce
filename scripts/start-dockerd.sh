#!/usr/bin/env bash
# Start a private Docker daemon for the tests (and for trying the docker runtime on one machine),
# unless it already runs. Prints its endpoint (unix://...) on stdout; everything else goes to stderr.
#
#   scripts/start-dockerd.sh            # start (or find) it
#   scripts/start-dockerd.sh stop       # stop it
#
# Its data root, exec root, socket, pidfile and log all live under $TIGHTWAD_CACHE/dockerd
# (default ~/.cache/tightwad/dockerd), so it never touches a system daemon. Containers use host
# networking (that is how Tightwad runs units), so the daemon needs no bridge and no iptables.
# Needs root and Debian's docker.io (scripts/install-system-deps.sh installs it).
#
# A second Docker host on this machine: give it its own folder and a network namespace, and it also
# listens on TCP inside that namespace (its containers then live on that namespace's address):
#   TIGHTWAD_DOCKERD_ROOT=DIR TIGHTWAD_DOCKERD_NETNS=NAME TIGHTWAD_DOCKERD_LISTEN=tcp://IP:2375 \
#     scripts/start-dockerd.sh          # prints the tcp:// endpoint
set -Eeuo pipefail
# Fail loudly: name the command and the line that failed, never just a bare non-zero exit.
trap 'echo "error: $0: line $LINENO: \`$BASH_COMMAND\` failed (exit $?)" >&2' ERR

cache=${TIGHTWAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tightwad}
root=${TIGHTWAD_DOCKERD_ROOT:-$cache/dockerd}
netns=${TIGHTWAD_DOCKERD_NETNS:-}
listen=${TIGHTWAD_DOCKERD_LISTEN:-}
sock=$root/docker.sock
pidfile=$root/dockerd.pid
log=$root/dockerd.log

running() {
  [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null && [[ -S $sock ]]
}

if [[ ${1:-start} == stop ]]; then
  if running; then
    pid=$(cat "$pidfile")
    # Remove the containers first (at once, not each after its stop timeout), then the daemon;
    # one that still hangs after 30 s is killed, with its containerd.
    mapfile -t containers < <(docker -H "unix://$sock" ps -aq 2>/dev/null || true)
    if ((${#containers[@]})); then
      docker -H "unix://$sock" rm -f "${containers[@]}" >/dev/null 2>&1 || true
    fi
    kill "$pid"
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "dockerd $pid did not stop in 30 s; killing it" >&2
      pkill -KILL -P "$pid" 2>/dev/null || true
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  exit 0
fi

if ! command -v dockerd >/dev/null; then
  echo "error: dockerd is not installed; run scripts/install-system-deps.sh (Debian package docker.io)" >&2
  exit 1
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "error: dockerd needs root; run this script as root" >&2
  exit 1
fi

mkdir -p "$root"
if ! running; then
  # A stale pidfile from a killed daemon would make dockerd refuse to start.
  rm -f "$pidfile" "$sock"
  # Lock so parallel test sessions start one daemon, not two.
  exec 9>"$root/.start.lock"
  flock 9
  if ! running; then
    echo "starting dockerd (data root $root/data, log $log${netns:+, network namespace $netns})" >&2
    hosts=(--host "unix://$sock")
    [[ -n $listen ]] && hosts+=(--host "$listen")
    # `ip netns exec` remounts /sys, which dockerd refuses; entering only the network works.
    launcher=()
    [[ -n $netns ]] && launcher=(nsenter "--net=/var/run/netns/$netns")
    setsid "${launcher[@]}" dockerd \
      "${hosts[@]}" \
      --data-root "$root/data" \
      --exec-root "$root/exec" \
      --pidfile "$pidfile" \
      --bridge none \
      --iptables=false \
      --ip6tables=false \
      --storage-driver overlay2 \
      >>"$log" 2>&1 </dev/null &
    for _ in $(seq 300); do
      if [[ -S $sock ]] && docker -H "unix://$sock" version >/dev/null 2>&1; then break; fi
      sleep 0.1
    done
  fi
fi
if ! docker -H "unix://$sock" version >/dev/null 2>&1; then
  echo "error: dockerd did not come up; last lines of $log:" >&2
  tail -n 20 "$log" >&2
  exit 1
fi
echo "${listen:-unix://$sock}"
