"""CurveZMQ key material: `inspectd keys generate`, loading key files, checking who may read them, and `curve_client`,
the hook a client socket (ControlClient, Subscriber, the PLC bridge) authenticates with.

A key pair is two files written by zmq.auth.create_certificates: `<name>.key` (public, shareable) and
`<name>.key_secret` (public + secret). Secret key files must be owned by the user reading them and unreadable by
group and others (0600): a secret anyone on the station can read authenticates nobody. An allow-list is a directory
of client public key files (`*.key`); the directory and every key in it must be owned by the daemon's user or root
and writable by nobody else, and none of them may be a symlink, since whoever can drop or change a file there can
let themselves in.

    inspectd keys generate --out /etc/inspectd/keys --name server
    inspectd keys generate --out ./plc-bridge --name bridge1      # then copy bridge1.key into allowed_clients_dir
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import itertools
import os
import shutil
import stat
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from engines.durable import fsync_dir
from inspectd.errors import InspectdError


def is_local_endpoint(endpoint: str) -> bool:
    """IPC, inproc and loopback TCP endpoints: reachable from this host only (elsewhere the daemon requires
    CurveZMQ, and its clients must bring keys)."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://") :].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name or '*': a network address


# How long a connection to a CURVE server socket may take to finish its handshake before libzmq drops it (libzmq's
# default is 30 s). libzmq accepts every TCP connection and holds its descriptor until the handshake ends, with no cap
# per listener: anyone who can reach a tcp endpoint, with no key at all, could hold a thousand idle connections open and
# run the daemon out of descriptors (journal fsyncs and archive writes then fail). A CURVE handshake is a few round
# trips and one ZAP answer, well under a second on a plant network, and seconds over a slow VPN; a client dropped by a
# stall past this reconnects. The client's handshake message (HandshakeWatch) names it.
HANDSHAKE_IVL_S = 10  # set by inspectd.daemon.security on every CURVE server socket

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"


class KeysError(InspectdError):
    """Key material is missing, malformed or readable by more than its owner."""


def generate(out: str | Path, name: str) -> tuple[Path, Path]:
    """Write `<out>/<name>.key` (0644) and `<out>/<name>.key_secret` (0600); never overwrites an existing file or link
    of either name, and leaves both or neither: each is written whole under a temporary name, then linked to its own
    (which fails on a name taken meanwhile, by a concurrent run too). KeysError in one line on any failure, saying
    what, if anything, this run could not remove again."""
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise KeysError(f"--name {name!r}: expected letters, digits, '-' or '_'")
    out = Path(out)
    public, secret = out / f"{name}{PUBLIC_SUFFIX}", out / f"{name}{SECRET_SUFFIX}"
    for path in (public, secret):
        # lexists: a link to nothing is a name taken too, and writing through it would put the secret elsewhere.
        if os.path.lexists(path):
            raise KeysError(f"{path}: already exists, expected a new key name (keys are never overwritten)")
    _refuse_allow_list(out, name)
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        # exist_ok still raises for a file of that name: EEXIST, which read as the key pair existing.
        why = "Not a directory" if exc.errno == errno.EEXIST else exc.strerror or str(exc)
        if out.is_symlink() and not out.exists():
            why = f"a link to nothing, {os.readlink(out)}"
        raise KeysError(f"--out {out}: cannot create ({why}), expected a directory for the key pair") from exc
    # pyzmq writes the pair into a folder of this run's own (0700, not *.key: a reader scanning --out for *.key, a
    # client's key folder read by a script, must not find a half-written key), and each file is then linked to its
    # name.
    made: list[Path] = []
    private: Path | None = None
    try:
        private = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out))
        old = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
        try:
            written = [Path(p) for p in zmq.auth.create_certificates(str(private), name)]
        finally:
            os.umask(old)
        for path, mode in zip(written, (0o644, 0o600), strict=True):
            os.chmod(path, mode)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        for path, final in zip(written, (public, secret), strict=True):
            os.link(path, final)  # refuses a name that exists, as a link (dangling or not) or anything else
            made.append(final)
        shutil.rmtree(private)
        private = None
        fsync_dir(out)
    except BaseException as exc:
        left = _remove(made)
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
            if private.exists():
                left.append(private)
        if isinstance(exc, FileExistsError) and exc.filename2 is not None:
            what = f"{exc.filename2}: already exists, expected a new key name (keys are never overwritten)"
        elif isinstance(exc, OSError):
            what = f"--out {out}: cannot write the key pair ({exc.strerror or exc})"
        else:
            raise  # Ctrl-C: removed all the same
        them = "it" if len(left) == 1 else "them"
        where = f"left behind {', '.join(map(str, left))}, delete {them}" if left else "nothing was left behind"
        raise KeysError(f"{what}; {where}") from exc
    return public, secret


def _refuse_allow_list(out: Path, name: str) -> None:
    """Refuse an --out that holds several public keys and no secret key: what a daemon's allow-list holds, and
    read_allow_list refuses the whole list for the secret key written there (at the daemon's next start or reload,
    long after this run said nothing). One public key alone is a client's folder as often (the copy of the daemon's
    server.key a bridge connects with), and a folder without one (new, empty) cannot be told from a client's own:
    both are generated into."""
    try:
        with os.scandir(out) as entries:
            names = sorted(e.name for e in entries if e.name.endswith((PUBLIC_SUFFIX, SECRET_SUFFIX)))
    except OSError:
        return  # no folder yet, or not one: creating it says why
    public = [n for n in names if n.endswith(PUBLIC_SUFFIX)]
    if len(public) >= 2 and len(public) == len(names):
        shown = ", ".join(public[:3]) + (", ..." if len(public) > 3 else "")
        raise KeysError(
            f"--out {out}: holds public keys ({shown}) and no secret key, as a daemon's allow-list does, which a "
            f"{name}{SECRET_SUFFIX} there would make it refuse whole; expected a folder for the pair: generate into "
            f"another one and copy {name}{PUBLIC_SUFFIX} in"
        )


def _remove(paths: list[Path]) -> list[Path]:
    """Unlink what a failed run made; those that remain."""
    left = []
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            left.append(path)
    return left


def _lstat(path: Path, what: str, expected: str) -> os.stat_result:
    try:
        st = path.lstat()
    except OSError as exc:
        raise KeysError(f"{what} {path}: cannot read ({exc.strerror or exc}), expected {expected}") from None
    if stat.S_ISLNK(st.st_mode):
        # Whoever can repoint the link chooses the key: the checks below would judge the target, not the path.
        raise KeysError(f"{what} {path}: a symbolic link, expected {expected} itself")
    return st


def check_secret_file(path: str | Path, what: str, reader: str = "this user", owner_checked: bool = True) -> None:
    """Refuse a secret key file that is missing, a symlink, not a regular file, not owned by `reader` (the user this
    process runs as), or readable by group or others. `owner_checked` False leaves the owner out, for a check run
    as another user than the one that will read the file (`inspectd run --check` as root)."""
    path = Path(path)
    st = _regular_file(path, what, "a .key_secret file")
    if owner_checked:
        _check_owner(path, st, what, reader)
    if st.st_mode & 0o077:
        raise KeysError(
            f"{what} {path}: mode {stat.S_IMODE(st.st_mode):04o} lets group/others read it, expected "
            f"0600 (chmod 600 {path})"
        )


def _check_owner(path: Path, st: os.stat_result, what: str, reader: str) -> None:
    if st.st_uid != os.geteuid():
        raise KeysError(f"{what} {path}: owned by uid {st.st_uid}, expected {reader} (uid {os.geteuid()})")


def _regular_file(path: Path, what: str, expected: str) -> os.stat_result:
    st = _lstat(path, what, expected)
    if not stat.S_ISREG(st.st_mode):
        raise KeysError(f"{what} {path}: not a regular file, expected {expected}")
    return st


def check_trusted(path: Path, st: os.stat_result, what: str, owner_checked: bool = True) -> None:
    """Key material that decides who gets in (the allow-list directory, each public key in it) must be owned by the
    daemon's user or root and writable by nobody else: whoever can change it can let themselves in."""
    if owner_checked and st.st_uid not in (os.geteuid(), 0):
        raise KeysError(
            f"{what} {path}: owned by uid {st.st_uid}, expected the daemon's own user (uid {os.geteuid()}) or root"
        )
    if st.st_mode & 0o022:
        raise KeysError(
            f"{what} {path}: mode {stat.S_IMODE(st.st_mode):04o} lets group/others change it, expected at most "
            f"{'0755' if stat.S_ISDIR(st.st_mode) else '0644'}"
        )


def load_secret(
    path: str | Path, what: str = "secret key", reader: str = "this user", owner_checked: bool = True
) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a `.key_secret` file whose secret gives its public key, after the permission
    check (`check_secret_file`)."""
    path = Path(path)
    st = _regular_file(path, what, "a .key_secret file")
    # The owner before the content: another user's 0600 file cannot be read, and "cannot load" would send its owner to
    # generate keys again where chown is the fix. The content before the mode: a public key file given for a secret
    # one is 0644 by design, and advice to chmod it would send its owner the wrong way.
    if owner_checked:
        _check_owner(path, st, what, reader)
    public, secret = _load(path, what)
    if secret is None:
        raise KeysError(f"{what} {path}: holds a public key only, expected the .key_secret file of its pair")
    check_secret_file(path, what, reader, owner_checked)
    try:
        # libzmq's own derivation: a secret cut short or mistyped, or two halves of different pairs, are told here
        # with the file's name rather than as "Invalid argument" at the socket or a handshake that never succeeds.
        matches = zmq.curve_public(secret) == public
    except (ValueError, zmq.ZMQError):
        matches = False
    if not matches:
        raise KeysError(
            f"{what} {path}: its secret key is not the 40-character Z85 secret of its public key, expected a "
            ".key_secret file from `inspectd keys generate`, unedited"
        )
    return public, secret


def load_public(path: str | Path, what: str = "public key") -> bytes:
    """The z85 public key of a `.key` file; one holding a secret key is refused, since whoever holds the file would
    hold the secret (a station's secret copied to a client as its --server-key, a secret dropped in an allow-list)."""
    public, secret = _load(path, what)
    if secret is not None:
        raise KeysError(
            f"{what} {path}: holds a secret key, expected the public NAME.key of the pair (copy NAME.key, never "
            "NAME.key_secret)"
        )
    return public


def _is_z85_key(key: bytes) -> bool:
    try:
        return len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, KeyError, struct.error):  # a character outside Z85, a group past 2**32
        return False


def _load(path: str | Path, what: str) -> tuple[bytes, bytes | None]:
    try:
        # pyzmq says only "Invalid certificate file" for a missing one: the system's reason instead.
        if not stat.S_ISREG(os.stat(path).st_mode):
            # A named pipe would hold the read until something wrote to it; a device, a directory are no key.
            raise KeysError(f"{what} {path}: not a regular file, expected a key file from `inspectd keys generate`")
        public, secret = zmq.auth.load_certificate(str(path))
    except OSError as exc:
        raise KeysError(
            f"{what} {path}: cannot load ({exc.strerror or exc}), expected a key file from `inspectd keys generate`"
        ) from None
    except (ValueError, IndexError):  # no public-key line, or one without its '='
        public, secret = None, None
    if public is None or not _is_z85_key(public):
        raise KeysError(
            f"{what} {path}: no 40-character Z85 public key, expected a key file from `inspectd keys generate`"
        )
    return public, secret


def load_allow_list(directory: str | Path, what: str = "allowed_clients_dir") -> frozenset[bytes]:
    """The z85 public keys of every `*.key` file in `directory`; refuses a directory or key file that is a symlink,
    owned by someone else or writable by group or others, or that holds a secret key."""
    return frozenset(read_allow_list(directory, what))


def read_allow_list(
    directory: str | Path, what: str = "allowed_clients_dir", owner_checked: bool = True
) -> dict[bytes, list[str]]:
    """z85 public key -> the files it came from (sorted), for each `*.key` in `directory` (checked as load_allow_list
    says). An empty directory gives an empty list, which lets nobody in: how the last client is revoked. Every file of
    a key is kept, not the last one read: a key copied in under a second name stays allowed when one of its files is
    deleted to revoke it, and whoever revokes must be told which other file keeps it in (duplicate_keys)."""
    directory = Path(directory)
    st = _lstat(directory, what, "a directory of client public keys (*.key)")
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise KeysError(
            f"{what} {directory}: cannot read ({exc.strerror or exc}), expected a directory of client "
            f"public keys (*.key)"
        ) from None
    check_trusted(directory, st, what, owner_checked)
    keys: dict[bytes, list[str]] = {}
    for name in names:
        path = directory / name
        if name.endswith(SECRET_SUFFIX):
            raise KeysError(f"{what} {path}: a secret key in the allow-list, expected client public keys only")
        if name.endswith(PUBLIC_SUFFIX):
            key_st = _regular_file(path, what, "a client public key file")
            check_trusted(path, key_st, what, owner_checked)
            keys.setdefault(load_public(path, what), []).append(name)
    return keys


def duplicate_keys(allow_list: dict[bytes, list[str]]) -> dict[bytes, list[str]]:
    """The keys of a read_allow_list result that more than one file holds, with those files."""
    return {key: files for key, files in allow_list.items() if len(files) > 1}


def curve_client(server_public_key: str | Path, client_secret_key: str | Path) -> Callable[[zmq.Socket], None]:
    """Hook for a client socket: authenticate with our key pair and require the server's key."""
    server = load_public(server_public_key, "server public key")
    public, secret = load_secret(client_secret_key, "client secret key")

    def configure(sock: zmq.Socket) -> None:
        sock.curve_serverkey = server
        sock.curve_publickey = public
        sock.curve_secretkey = secret

    return configure


def curve_from_flags(
    server_key: str | Path | None, client_key: str | Path | None
) -> Callable[[zmq.Socket], None] | None:
    """The client hook a command's --server-key/--client-key ask for (None for neither); InspectdError in one line
    naming the flags for only one of them, or a key file curve_client refuses."""
    if (server_key is None) != (client_key is None):
        raise InspectdError("--server-key and --client-key: expected both (CurveZMQ) or neither")
    if server_key is None or client_key is None:
        return None
    return curve_client(server_key, client_key)


# A handshake ended without a reason this many times in a row, libzmq retrying every 100 ms: a wrong --server-key,
# told in about 0.3 s.
REFUSED_AFTER = 3
# A connection closed before its handshake ended is retried within libzmq's reconnect interval (100 ms) when the peer
# went away, and never when the peer is a socket of another kind (a protocol error: libzmq gives the endpoint up).
# Silence this long after such a close is that give-up.
GAVE_UP_AFTER_S = 1.0


# TCP keepalive on a subscriber's tcp connection. A SUB socket sends nothing after it subscribed, so a path that dies
# without a FIN or RST reaching it (the daemon's host losing power, a firewall or NAT dropping its state) leaves the
# connection open for good and libzmq never reconnects: the daemon, back up, is never heard again. The kernel probes a
# connection idle for KEEPALIVE_IDLE_S, every KEEPALIVE_INTVL_S after, and ends it after KEEPALIVE_CNT unanswered, so
# libzmq connects anew: a dead path is given up about 30 s after its last packet, and a stall shorter than that loses
# nothing. Not ZMTP heartbeats: a subscriber whose receive queue is full (behind) stops reading, so misses their
# answers and is dropped with what was on its way, and with libzmq 4.3.5 that drop then aborts the process
# (Assertion failed: _input_stopped, zeromq/libzmq#3937).
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTVL_S = 5
KEEPALIVE_CNT = 4


def open_watched_sub(context: zmq.Context, endpoint: str, curve, topics: list[bytes], **options: int) -> tuple:
    """A SUB socket on `endpoint`: TCP keepalive (KEEPALIVE_IDLE_S, KEEPALIVE_INTVL_S, KEEPALIVE_CNT), `options`
    (RCVHWM=..) and LINGER 0 set, the CurveZMQ client keys `curve` (a curve_client hook, or None) and the
    subscriptions before it connects, its handshakes watched from before the connect. (socket, HandshakeWatch); on
    any failure the socket is closed before the error goes on."""
    from inspectd.protocol.endpoints import take_endpoint

    sock = context.socket(zmq.SUB)
    watch = None
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_INTVL_S)
        sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_CNT)
        for name, value in options.items():
            sock.setsockopt(getattr(zmq, name), value)
        take_endpoint(sock, endpoint)
        if curve is not None:
            curve(sock)
        for topic in topics:
            sock.setsockopt(zmq.SUBSCRIBE, topic)
        watch = HandshakeWatch(sock, curve is not None)
        sock.connect(endpoint)
    except BaseException:
        if watch is not None:
            watch.close()
        sock.close(0)
        raise
    return sock, watch


class HandshakeWatch:
    """The security handshakes of one client socket, watched through a libzmq socket monitor, so a peer that ends
    them (another key than --server-key, this client's key not allowed, CurveZMQ on one side only, or no inspectd
    endpoint at all) is told apart from one that is silent.

    Attach it before the socket connects; `failure()` says in a phrase why the last handshake failed ("the daemon
    <phrase>"), None when none failed since the last that succeeded. Its events are read only by `failure()`, so the
    owner calls it regularly (each receive, each request): they queue without a limit meanwhile, because a bounded
    monitor queue that fills stops the whole context's I/O thread. Works on plain and asyncio sockets."""

    _addresses = itertools.count(1)
    _HANDSHAKES = (
        zmq.EVENT_HANDSHAKE_SUCCEEDED
        | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    )
    # The connections too: a peer of another socket kind ends the connection with no handshake event at all, and a
    # peer that is not there refuses each connection.
    _CONNECTIONS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
    # What each socket kind a client opens expects at the other end, for the one line when it meets another kind.
    _EXPECTED: dict[int, str] = {
        zmq.REQ: "control endpoint (control.endpoint)",
        zmq.SUB: "publish endpoint (publish.endpoint)",
    }

    def __init__(self, sock: zmq.Socket, curve: bool) -> None:
        address = f"inproc://inspectd-handshake-{os.getpid()}-{next(self._addresses)}"
        self.sock = sock
        self.curve = curve
        # Read through a plain socket of the same context (inproc needs it): the socket's own Context object where
        # it is a plain one, so that destroying that context closes this socket too.
        context = sock.context
        plain = context if type(context) is zmq.Context else zmq.Context.shadow(context.underlying)
        self._context = plain  # a shadow must outlive the socket made from it
        self.monitor = plain.socket(zmq.PAIR)
        self.monitor.rcvhwm = 0
        sock.monitor(address, self._HANDSHAKES | self._CONNECTIONS)
        self.monitor.connect(address)
        self._failure: str | None = None
        self._definitive = False  # the last failure one the peer gives every time (a key refused, no CurveZMQ)
        self._in_a_row = 0  # failures since the last handshake that succeeded
        self.admitted = False  # the last handshake succeeded
        # libzmq gave the connection up for good: it retries a connection lost, never one the peer ended with a
        # reason (an ERROR command: a key refused, an authenticator failing), with another mechanism, or as a socket
        # of another kind (Readmission).
        self.ended = False
        self.connected = False  # a connection was ever made
        self.linked = False  # a connection is up and its handshake succeeded
        # When a connection that was up was seen closed (monotonic, as read), None while one is up or none ever was:
        # a message received after it came on a connection made since, whose handshake may not be read yet.
        self.closed_at: float | None = None
        self.connects_refused = 0  # connections the peer refused (nothing listening), since the last one made
        self._shaken = False  # the current connection's handshake succeeded
        self._told = False  # the current connection's handshake ended in an event (succeeded or failed)
        self._closed_unshaken_at: float | None = None  # when a connection closed before its handshake ended
        self._expected = self._EXPECTED.get(int(sock.type), "endpoint")

    def failure(self) -> str | None:
        from zmq.utils.monitor import recv_monitor_message

        try:
            while self.monitor.poll(0):
                event = recv_monitor_message(self.monitor)
                kind, value = int(event["event"]), int(event["value"])
                if kind & self._CONNECTIONS:
                    self._connection(kind)
                    continue
                self._shaken = self.linked = kind == zmq.EVENT_HANDSHAKE_SUCCEEDED
                self._told = True
                if self.linked:
                    self.closed_at = None
                self._failure = self._describe(kind, value)
                self._in_a_row = 0 if self._failure is None else self._in_a_row + 1
                self._definitive = (kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH and value == 400) or (
                    value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
                )
                self.admitted = kind == zmq.EVENT_HANDSHAKE_SUCCEEDED
                self.ended = kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH or (
                    kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
                )
        except zmq.ZMQError:
            pass  # closed under us (its context destroyed): what was read stands
        closed = self._closed_unshaken_at
        if closed is not None and not self.ended and time.monotonic() - closed >= GAVE_UP_AFTER_S:
            self._failure = (
                "closed the connection during the handshake, as a socket of another kind does (libzmq then gives the "
                f"endpoint up), expected its {self._expected}, not another of its sockets or another program there"
            )
            self._definitive = self.ended = True
            self.admitted = False
        return self._failure

    def _connection(self, kind: int) -> None:
        if kind == zmq.EVENT_CONNECTED:
            self.connected, self._shaken, self._told, self.connects_refused = True, False, False, 0
            self._closed_unshaken_at = None
        elif kind == zmq.EVENT_CONNECT_RETRIED:
            self.connects_refused += 1
            self._closed_unshaken_at = None
        else:  # disconnected
            if not self._told:
                # A close this connection's handshake events have not explained (they come before it when there is
                # a reason). Not judged by the last failure: an earlier connection the peer cut mid-greeting (a
                # failure without detail, which libzmq retries) says nothing of why this one closed.
                self._closed_unshaken_at = time.monotonic()
            elif self._shaken:
                self.closed_at = time.monotonic()
            self.linked = self._shaken = False

    @property
    def definitive(self) -> bool:
        """Whether the last failure is one the peer gives every time (a key refused, CurveZMQ on one side only)."""
        return self._definitive

    def refused(self) -> bool:
        """Whether the peer refuses for good: a key refused or CurveZMQ on one side only at once, a handshake ended
        without a reason only once it has happened REFUSED_AFTER times in a row (one alone may be a daemon
        restarting mid-handshake, which libzmq's next try gets past)."""
        return self.failure() is not None and (self._definitive or self._in_a_row >= REFUSED_AFTER)

    def _describe(self, event: int, value: int) -> str | None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return None
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            if value == 400:
                return "refused this client's key, expected --client-key's public half in its allow-list"
            return f"could not check this client's key (its authenticator answered {value})"
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            if self.curve:
                return "does not use CurveZMQ there, expected no --server-key/--client-key"
            return "requires CurveZMQ there, expected --server-key and --client-key"
        # libzmq has no more to say: a CURVE server cannot open a message sealed for another key, and a server whose
        # authenticator is down, one that hangs, or any other peer that hangs up reads the same; so does a plain
        # server, which mostly sees the mismatch first and hangs up.
        if self.curve:
            return (
                "ended the CurveZMQ handshake without a reason: a --server-key that is not its public key, no CurveZMQ "
                "there (expected no --server-key/--client-key), its authenticator down or hung, a link too slow for "
                f"its handshake limit ({HANDSHAKE_IVL_S} s), or no inspectd endpoint there"
            )
        # A socket of another kind hangs up too when it reads this side's kind before this side reads its own.
        return (
            "ended the handshake without a reason, expected an inspectd endpoint there: its "
            f"{self._expected}, not another of its sockets (one of another kind hangs up so), with CurveZMQ the keys"
        )

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass  # the socket was closed first
        self.monitor.close(linger=0)


# A socket libzmq gave up on is replaced this long after the refusal at first, the wait doubling up to the most while
# the daemon keeps refusing: a key put back is heard within that, and a key still refused costs a handshake per wait.
READMIT_FIRST_S = 2.0
READMIT_MOST_S = 30.0


class Readmission:
    """When a long-lived client (a subscriber, the web view, a PLC bridge) replaces a socket the daemon refused.

    libzmq never retries a connection whose handshake the peer refused with a reason (HandshakeWatch.ended): a client
    whose key was revoked and later put back would hear nothing until restarted. The owner hands each look at its
    socket's watch to `look`; when it answers True, the owner opens a new socket (same options and subscriptions, a
    new watch, connected) in place of the old and calls `reopened`. The first replacement comes READMIT_FIRST_S after
    the refusal, each further one after twice the wait before (at most READMIT_MOST_S), and the wait starts again at
    the first once a handshake succeeds. `failure` is why the daemon shuts the client out, held across the sockets
    that replace each other until one is let in: one report per outage, not one per socket."""

    def __init__(self, first_s: float = READMIT_FIRST_S, most_s: float = READMIT_MOST_S) -> None:
        self.first_s, self.most_s = first_s, most_s
        self.failure: str | None = None
        self._definitive = False  # `failure` is one the peer gives every time (a key refused, no CurveZMQ)
        self._wait = first_s
        self._due: float | None = None  # when the refused socket is to be replaced; None while none is refused

    def look(self, watch: HandshakeWatch) -> bool:
        """Read `watch`'s events: whether its socket is to be replaced now."""
        failure = watch.failure()
        # A new socket's first failure is often one without a reason (the peer hung up mid-greeting) before the one
        # that says why: within an outage it does not replace a reason already known, or each reopen reports twice.
        if failure is not None and (watch.definitive or not self._definitive):
            self.failure, self._definitive = failure, watch.definitive
        elif failure is None and watch.admitted:
            self.failure, self._definitive = None, False
            self._wait = self.first_s
        if not watch.ended:
            return False
        now = time.monotonic()
        if self._due is None:
            self._due = now + self._wait
        return now >= self._due

    def reopened(self) -> None:
        """The socket `look` asked for was opened (or tried): the next refusal waits longer."""
        self._due = None
        self._wait = min(self._wait * 2, self.most_s)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION")
    gen = sub.add_parser("generate", help="write a new CurveZMQ key pair (NAME.key and NAME.key_secret)")
    gen.add_argument("--out", required=True, type=Path, help="directory to write the pair into")
    gen.add_argument("--name", required=True, help="file name stem, e.g. server or bridge1")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "keys_command", None) != "generate":
        print("inspectd keys: expected an action: generate --out DIR --name NAME", file=sys.stderr)
        return 2
    if not zmq.has("curve"):
        print("inspectd keys: this libzmq has no CURVE support, expected libzmq built with libsodium", file=sys.stderr)
        return 1
    try:
        public, secret = generate(args.out, args.name)
    except KeysError as exc:
        print(f"inspectd keys: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"inspectd keys: --out {args.out}: cannot write the key pair ({exc.strerror or exc})", file=sys.stderr)
        return 1
    print(f"public key  {public}  (give this to the other side / put it in an allow-list)")
    print(f"secret key  {secret}  (mode 0600, keep it on this machine)")
    return 0
