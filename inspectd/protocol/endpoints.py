"""What every inspectd ZeroMQ socket does with the endpoint it binds or connects, and which endpoints it takes: the
one rule for each, in one place (the daemon's config and every client check endpoints here)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import zmq


def take_endpoint(sock: zmq.Socket, endpoint: str) -> None:
    """Set `sock` up for `endpoint` before its bind or connect: ZeroMQ takes an IPv6 address (tcp://[::1]:5556) only
    with its IPv6 option on, and with it on an IPv4 endpoint's wildcard port reads back as [::ffff:a.b.c.d]: so on
    for bracketed addresses alone."""
    sock.ipv6 = "[" in endpoint


ENDPOINT_FORMS = "tcp://HOST:PORT or ipc://PATH"


def endpoint_problem(value: Any, show: Callable[[Any], str] = repr) -> str | None:
    """Why `value` is not a ZeroMQ endpoint another process can reach, checked as far as a bind would check it, None
    when it is: the daemon's config's rule (so `run --check` refuses what `run` could not bind), and through
    connect_endpoint_problem every client's. inproc:// reaches nothing outside one process. An ipc:// path is absolute
    or abstract (ipc://@name): clients are given the endpoint as a string on their own command line, so only a path
    that means the same file from any working directory lets both ends meet, and a relative one would land in the
    working directory or the config file's folder, neither of which is sure to be writable. `show` writes a value
    into the message."""
    return _problem(value, show, connect=False)


def _problem(value: Any, show: Callable[[Any], str], connect: bool) -> str | None:
    if not isinstance(value, str) or not value.startswith(("tcp://", "ipc://")) or value.endswith("://"):
        return f"expected a ZeroMQ endpoint ({ENDPOINT_FORMS}), got {show(value)}"
    if "\0" in value:  # ZeroMQ binds an ipc path cut at the NUL: past the check that no address is bound twice
        return f"{show(value)} holds a NUL byte, expected a ZeroMQ endpoint ({ENDPOINT_FORMS})"
    if value.startswith("tcp://"):
        host, sep, port = value[len("tcp://") :].rpartition(":")
        if connect and sep and not host:  # tcp://:5556: the port is there, the host is what is missing
            return f"expected tcp://HOST:PORT, HOST the daemon's address (none given), got {show(value)}"
        if connect and (not sep or not host or not _connect_port(port)):
            # A wildcard only tells a bind to pick: libzmq refuses * for a connect ("Invalid argument") and connects
            # to port 0, where it waits in silence.
            return (
                f"expected tcp://HOST:PORT, PORT the daemon's port, a number from 1 to 65535 (* and 0 are only for a "
                f"bind), got {show(value)}"
            )
        if not sep or not host or not _port(port):
            return f"expected tcp://HOST:PORT, PORT a number up to 65535 or *, got {show(value)}"
        if connect and host == "*":
            return f"expected tcp://HOST:PORT, HOST the daemon's address (* is only for a bind), got {show(value)}"
        if ":" in host and not (host.startswith("[") and host.endswith("]")):
            # As in a URL: without brackets, where the address ends and the port begins is a guess.
            return f"expected an IPv6 host in brackets, as tcp://[::1]:5556, got {show(value)}"
        return None
    if not value.startswith(("ipc:///", "ipc://@")):
        return (
            f"expected an absolute socket path, as ipc:///var/lib/inspectd/NAME.sock (or an abstract ipc://@NAME), "
            f"got {show(value)}"
        )
    return ipc_path_problem(value, show)


def connect_endpoint_problem(value: Any, show: Callable[[Any], str] = repr) -> str | None:
    """endpoint_problem for an endpoint a client connects to, which names what a daemon was configured with: a typo
    is refused in the config's words rather than connected to (libzmq takes a tcp port above 65535 cut to 16 bits,
    another daemon's or nobody's, and an inproc:// that nothing outside its own process can reach). A connect's tcp
    endpoint may also name the address it leaves from, as libzmq takes it (tcp://SOURCE;HOST:PORT, split at the last
    ';', as tcp://eth1:0;192.168.1.1:5556 on a station with two networks): its destination is checked as a daemon's
    endpoint, the source only for its port: without one libzmq never connects, in silence; the host (an interface
    name, an address) is libzmq's to resolve. The destination names the daemon's host and port, never a wildcard (*,
    port 0), which only a bind can take."""
    if not (isinstance(value, str) and value.startswith("tcp://") and ";" in value):
        return _problem(value, show, connect=True)
    source, _, destination = value[len("tcp://") :].rpartition(";")
    host, sep, port = source.rpartition(":")
    if not sep or not host or not _port(port):
        return (
            f"expected SOURCE:PORT before ';' (PORT up to 65535, 0 for any), as tcp://eth1:0;192.168.1.1:5556, "
            f"got {show(value)}"
        )
    problem = _problem(f"tcp://{destination}", show, connect=True)
    return None if problem is None else f"{problem} (the destination of {show(value)}, after its ';')"


def ipc_path_problem(endpoint: str, show: Callable[[Any], str] = repr) -> str | None:
    """Why a bind or connect could not take the ipc `endpoint`, as far as its length says; None when it fits. A socket
    address holds the path in sun_path (108 bytes with its NUL), as bytes: an abstract name's @ counts as one."""
    path = endpoint.removeprefix("ipc://")
    if path == "@":
        return f"{show(endpoint)}: an abstract socket with no name, expected ipc://@NAME"
    size = len(path.encode("utf-8", "surrogateescape"))
    if size <= zmq.IPC_PATH_MAX_LEN:
        return None
    limit = zmq.IPC_PATH_MAX_LEN
    return f"{show(endpoint)}: its path is {size} bytes, expected at most {limit} (all a socket address holds)"


def _port(port: str) -> bool:
    return port == "*" or _port_number(port) is not None


def _connect_port(port: str) -> bool:
    return bool(_port_number(port))


def _port_number(port: str) -> int | None:
    # Length first: int() refuses a string of thousands of digits with a ValueError, not a refusal in words.
    if not (port.isascii() and port.isdigit() and len(port.lstrip("0")) <= 5):
        return None
    number = int(port)
    return number if number <= 65535 else None
