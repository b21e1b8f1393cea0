"""TCP ports for the servers the tests start (not itself a test module).

Each pytest-xdist worker draws from a range of its own below Linux's ephemeral range (32768-60999), from which
bind(0), ZeroMQ's random ports and every outgoing connection's source port come: a port handed out here is not taken
by the other workers or the kernel in the seconds before a child binds it, nor when a test binds it again after a
restart. A port something else on the machine holds is passed over.
"""

from __future__ import annotations

import itertools
import os
import socket

RANGE = 1000
_worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_ports = itertools.cycle(range(20000 + RANGE * _worker, 20000 + RANGE * (_worker + 1)))


def free_port() -> int:
    for _ in range(RANGE):
        port = next(_ports)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in this worker's range of {RANGE}")
