"""What every inspectd ZeroMQ socket does with the endpoint it binds or connects: the one rule, in one place."""

from __future__ import annotations

import zmq


def take_endpoint(sock: zmq.Socket, endpoint: str) -> None:
    """Set `sock` up for `endpoint` before its bind or connect: ZeroMQ takes an IPv6 address (tcp://[::1]:5556) only
    with its IPv6 option on, and with it on an IPv4 endpoint's wildcard port reads back as [::ffff:a.b.c.d]: so on
    for bracketed addresses alone."""
    sock.ipv6 = "[" in endpoint
