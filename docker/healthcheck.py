"""Container health: an HTTP component's /health (with the bearer token when one is set), or for an
rpc worker that its port accepts connections (a worker serves one client at a time, so a protocol
HELLO would time out while the engine is attached)."""

import os
import socket
import sys
import urllib.request

role = os.environ.get("TIGHTWAD_ROLE", "rpc-worker")
port = int(os.environ.get("TIGHTWAD_PORT", "50052"))
try:
    if role == "rpc-worker":
        socket.create_connection(("127.0.0.1", port), timeout=3).close()
    else:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/health")
        if token := os.environ.get("TIGHTWAD_TOKEN"):
            request.add_header("Authorization", f"Bearer {token}")
        urllib.request.urlopen(request, timeout=5).close()
except OSError as exc:
    print(f"unhealthy: {role} on port {port}: {exc}", file=sys.stderr)
    sys.exit(1)
