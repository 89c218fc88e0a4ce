"""Which addresses are loopback: the one rule every part of Tightwad decides it by.

A server on loopback may run without a token (only this machine can reach it); anywhere else it
needs one. Manifest validation (does this cluster need spec.auth.token?), the operator (which
address does a unit listen on?) and tightwad.http.check_bind (may this server start?) all ask
`is_loopback`, so an address cannot pass one check as loopback and then listen beyond it.

Decided conservatively, from the text alone: `localhost`, 127.0.0.0/8 and ::1 (also written
[::1] or as ::ffff:127.x.y.z). No other name is resolved: what a name points at can differ
between machines and change later, so any other name counts as beyond loopback.
"""

from __future__ import annotations

import ipaddress

__all__ = ["LOOPBACK_BIND", "is_loopback", "loopback_bind"]

LOOPBACK_BIND = "127.0.0.1"  # where a server for a loopback name listens


def is_loopback(address: str) -> bool:
    """True for addresses only this machine can reach: localhost, 127.x, ::1."""
    text = address.strip().strip("[]")
    if text.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def loopback_bind(address: str) -> str | None:
    """The address to listen on for a loopback `address` (the IP itself, 127.0.0.1 for
    `localhost`); None when `address` is not loopback."""
    if not is_loopback(address):
        return None
    text = address.strip().strip("[]")
    return LOOPBACK_BIND if text.lower() == "localhost" else text
