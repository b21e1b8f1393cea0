"""inspectd.protocol.endpoints: the one endpoint rule, for a daemon's binds and every client's connects."""

from __future__ import annotations

import pytest
import zmq

from inspectd.protocol.endpoints import connect_endpoint_problem, endpoint_problem

WILDCARDS = ["tcp://127.0.0.1:*", "tcp://127.0.0.1:0", "tcp://*:5556", "tcp://lo:0;127.0.0.1:*", "tcp://lo:0;*:5556"]


@pytest.mark.parametrize("endpoint", WILDCARDS)
def test_a_connect_names_the_daemons_host_and_port_never_a_wildcard(endpoint):
    """A bind's wildcards passed the connect rule, in a message that offered * as a port: libzmq then refused * as
    an "Invalid argument", and connected to port 0 and waited there in silence."""
    problem = connect_endpoint_problem(endpoint)
    assert problem is not None and "only for a bind" in problem and "or *" not in problem, problem


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:*", "tcp://127.0.0.1:0", "tcp://*:5556"])
def test_a_bind_still_takes_the_wildcards(endpoint):
    assert endpoint_problem(endpoint) is None
    sock = zmq.Context.instance().socket(zmq.PUB)
    try:
        sock.bind(endpoint.replace(":5556", ":*"))  # the port a free one, so the test never meets a busy 5556
    finally:
        sock.close(0)


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:1", "tcp://127.0.0.1:65535", "tcp://127.0.0.1:*;127.0.0.1:5556"])
def test_a_connect_takes_every_port_a_daemon_can_bind_and_a_wildcard_source(endpoint):
    assert connect_endpoint_problem(endpoint) is None
    sock = zmq.Context.instance().socket(zmq.SUB)
    try:
        sock.connect(endpoint)
    finally:
        sock.close(0)


@pytest.mark.parametrize("check", [endpoint_problem, connect_endpoint_problem])
def test_a_port_of_thousands_of_digits_is_refused_in_words(check):
    """int() refused it with a ValueError (over Python's 4300-digit limit): a traceback from run --check and every
    client instead of one line."""
    endpoint = "tcp://127.0.0.1:" + "9" * 5000
    problem = check(endpoint)
    assert problem is not None and problem.startswith("expected tcp://HOST:PORT, PORT "), problem
    assert check("tcp://127.0.0.1:005556") is None  # leading zeros, as before: the number is what counts


@pytest.mark.parametrize("endpoint", ["tcp://:5556", "tcp://:0", "tcp://:*"])
def test_a_connect_with_no_host_is_refused_in_words_about_the_host(endpoint):
    """The port was fine and the host missing, yet the refusal spoke of the port."""
    problem = connect_endpoint_problem(endpoint)
    assert problem == f"expected tcp://HOST:PORT, HOST the daemon's address (none given), got {endpoint!r}", problem
    # A bind's refusal of the same is unchanged (tests/test_config.py quotes it); so is a connect with no port.
    assert endpoint_problem(endpoint) == f"expected tcp://HOST:PORT, PORT a number up to 65535 or *, got {endpoint!r}"
    assert connect_endpoint_problem("tcp://127.0.0.1") == (
        "expected tcp://HOST:PORT, PORT the daemon's port, a number from 1 to 65535 (* and 0 are only for a bind), "
        "got 'tcp://127.0.0.1'"
    )
