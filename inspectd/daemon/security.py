"""Who gets in: CurveZMQ on the control and publish sockets, the allow-list of client keys, and the never-root rule.

`CurveServer` is the socket hook that ControlServer (`curve=`) and Publisher (`socket_options=`) call before bind: it
makes the socket a CURVE server with the daemon's secret key and a ZAP domain whose only accepted clients are the
public keys in an allow-list directory. One ZAP authenticator thread serves every domain of the process. Each refused
attempt (unknown key, or a client that does not speak CURVE at all) is counted and logged as `auth_refused` with the
reason; repeats of the same refusal from the same key are summarised once a minute, because a refused REQ client
reconnects every 100 ms and would otherwise flood the log, while a key not seen before is logged, up to
NEW_LOGGED_PER_INTERVAL of them a minute per domain (past that, one line a minute counts the keys not named and
names the few of them refused most, so that a client retrying through a flood of made-up keys is named too). A
handshake that fails before any key is seen (no CURVE, another server key) names no client: libzmq's socket monitor
gives only the daemon's own endpoint for it (`socket`) and no peer address, so those are summarised per reason and
socket, and the count of the repeats covers every client that failed that way meanwhile.

An empty allow-list directory lets nobody in, with a warning: at start (a station whose last client was revoked must
still start after a power cut) and at reload (how the last client is revoked).

CURVE checks a key only at the handshake, so a key removed by `reload` would keep a connection made before it. The
sockets that receive check each message's ZAP User-Id (the client's key) against the list in force (`admits`): the
control server answers a removed key's request with a refusal, a zmq camera drops its frames. A PUB socket cannot
tell its peers apart, so the publisher re-binds its endpoint after a reload that removed a key: every subscriber
reconnects and handshakes again, and a removed key's handshake is refused.

The daemon's own key pair is read once, at start: a reload reads the allow-list again, not the pair, and logs
`server_key_changed` when the secret key file no longer holds the key in use (rotated on disk: a restart serves with
the new one).

The matching hook for clients (ControlClient, Subscriber) is inspectd.protocol.keys.curve_client: the server's public
key and the client's own key pair.

A control socket on a network address without CURVE is refused by the config (`control.curve`); loopback and IPC
are left to the host's own access control: every IPC socket file the daemon binds (control, publish, a zmq camera) is
made mode 0660 (`open_ipc_to_group`), so the service's group may connect and nobody else; and none is bound over a
socket file another live process serves (`refuse_served_ipc`), which ZeroMQ alone would take over without a word.
"""

from __future__ import annotations

import collections
import errno
import heapq
import itertools
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import structlog
import zmq
from pydantic import BeforeValidator
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from engines.schema import declared, invalid, show
from inspectd.configfile import ConfigPath
from inspectd.errors import InspectdError
from inspectd.protocol import keys

log = structlog.get_logger("inspectd.daemon.security")

# Tests and throwaway containers run everything as root; a station never should. Set only where root is the sandbox.
ALLOW_ROOT_ENV = "INSPECTD_ALLOW_ROOT"
REPEAT_LOG_S = 60.0
REFUSALS_TRACKED = 1024  # (reason, key or socket) pairs refused more than once or logged, whose repeats are summarised
# Pairs refused once and never logged (a flood's made-up keys), kept apart and dropped first: a client that retries only
# every few seconds (an operator re-running ctl) must still be told from them by its second refusal. A few MB at most.
ONCE_TRACKED = 16384
NEW_LOGGED_PER_INTERVAL = 20  # pairs logged for the first time per REPEAT_LOG_S and domain; the rest are summed
SUMMARY_NAMED = 3  # pairs past that budget that the interval's summary names: those refused most
REMOVED = "client key removed from the allow-list"
# Keyed by plain int: the monitor hands event numbers over as ints.
_REFUSALS: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "client key not in the allow-list",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake failed: the client does not speak CURVE with our key",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed: the client broke it off (no CURVE, or not our key)",
}
# libzmq's handshake timer ending it (EAGAIN), not the client.
TIMED_OUT = "handshake failed: not finished within the handshake limit (a client that sent nothing, or a link too slow)"


@declared
class CurveConfig:
    """CurveZMQ for a server socket: the daemon's key pair and the directory of client public keys let in."""

    server_secret_key: ConfigPath
    allowed_clients_dir: ConfigPath


def _both_keys(raw: Any) -> Any:
    if raw is not None and (not isinstance(raw, dict) or set(raw) != {"server_secret_key", "allowed_clients_dir"}):
        raise invalid(
            f"expected null or a mapping with exactly server_secret_key and allowed_clients_dir, got {show(raw)}"
        )
    return raw


# The config type of every `curve:` key (publish, control, a zmq camera's source): null or both key paths.
Curve = Annotated[CurveConfig | None, BeforeValidator(_both_keys)]


class SecurityError(InspectdError):
    """A security rule refuses to start (running as root, CURVE without keys)."""


def refuse_root() -> None:
    """The daemon never runs as root: a compromised decoder or model file would own the station."""
    if os.geteuid() == 0 and os.environ.get(ALLOW_ROOT_ENV) != "1":
        raise SecurityError(
            "refusing to run as root (uid 0): a bug in image decoding or a hostile model file "
            "would own the whole station; run as the inspectd service user (User=inspectd in the "
            f"systemd unit), or set {ALLOW_ROOT_ENV}=1 in a throwaway test container only"
        )


IPC_SOCKET_MODE = 0o660


def open_ipc_to_group(sock: zmq.Socket) -> None:
    """Give the socket file of the ipc:// endpoint `sock` was just bound to mode 0660: owner and group may connect.
    Every ipc socket the daemon binds goes through here, because the units run it with UMask=0077, which leaves the
    file 0700, and the service's group (`inspectd web`, `subscribe`, frame producers, operators) is who connects; a
    connect refused by the file mode is retried by ZeroMQ without a word, so a wrong mode reads as a silent daemon.
    Call it in the thread that bound, right after bind: LAST_ENDPOINT is the file libzmq made (also for `ipc://*`).
    Endpoints without a file (tcp, inproc, Linux's abstract `ipc://@name`) are left alone."""
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
        return
    try:
        os.chmod(endpoint[len("ipc://") :], IPC_SOCKET_MODE)
    except OSError as exc:
        raise OSError(f"{endpoint}: cannot give the socket file mode 0660 ({exc.strerror or exc})") from None


_PEERCRED_SIZE = struct.calcsize("3i")  # struct ucred: pid, uid, gid


def refuse_served_ipc(endpoint: str) -> None:
    """Raise zmq.ZMQError EADDRINUSE, what a bind to a tcp port another process holds raises, when `endpoint` is an
    ipc:// socket file that another live process serves (a plain connect to it is answered): each caller then treats the
    path as it treats a taken port. Call it right before every ipc bind the daemon makes.

    ZeroMQ's ipc bind unlinks whatever file is at the path and binds anew, so without this a second daemon (another
    config) naming the same path takes the socket from the first without an error, and whoever connects next follows
    the newcomer. A file nobody listens on (ECONNREFUSED: left by a daemon that crashed) or no file at all is left to
    the bind, as before. Abstract names (`ipc://@name`) are not probed: the kernel refuses their second bind
    (EADDRINUSE) by itself; nor is `ipc://*`, for which libzmq makes a fresh path."""
    if not endpoint.startswith("ipc://"):
        return
    path = endpoint[len("ipc://") :]
    if not path or path.startswith("@") or path == "*":
        return
    # Probe, then bind: two daemons starting in the same instant can both find the path free, and the later bind then
    # wins as before. Acceptable: a start-up race is the rare case, while a second daemon started any time later is
    # the common one; closing the gap would take a lock file beside each socket that every binder honours.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)  # a listener whose backlog is full answers EAGAIN at once instead of blocking
        try:
            probe.connect(path)
        except BlockingIOError:
            pass  # listening, its queue full: served all the same
        except PermissionError:
            # A socket file whose mode shuts this user out (another user's daemon in a shared folder): the kernel's
            # table of bound sockets says whether anyone listens on it.
            if not _listening_unix_socket(path):
                return
        except OSError:
            return
        else:
            pid = struct.unpack("3i", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED_SIZE))[0]
            if pid == os.getpid():
                # One of our own listeners that libzmq's I/O thread has yet to close (a camera reopened, the
                # publisher rebinding): bound over as before. Two binds of one path within a config are refused at
                # load.
                return
    raise zmq.ZMQError(
        zmq.EADDRINUSE,
        f"another process serves ipc socket {path} (it takes connections), expected a path no running process binds",
    )


_SO_ACCEPTCON = 0x10000  # /proc/net/unix's Flags bit of a listening socket


def _listening_unix_socket(path: str) -> bool:
    """Whether a socket of this network namespace listens on the file `path` (/proc/net/unix; False if unreadable)."""
    target = os.path.realpath(path)
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as table:
            next(table, None)  # the header
            for line in table:
                fields = line.split(None, 7)
                try:
                    listening = len(fields) == 8 and int(fields[3], 16) & _SO_ACCEPTCON
                except ValueError:
                    continue  # a line that does not parse (a socket named with a newline): not this one
                if not listening:
                    continue
                bound = fields[7].rstrip("\n")
                if bound.startswith("/"):
                    same = os.path.realpath(bound) == target
                else:
                    # Bound relative to its binder's working directory, which cannot be resolved from here: the same
                    # file name counts, so that the doubt ends in a refusal rather than in a takeover.
                    same = os.path.basename(bound) == os.path.basename(target)
                if same:
                    return True
    except OSError:
        return False
    return False


def _shown_name(name: str) -> str:
    """A file name as text that any terminal, log or client can take: its bytes that are not UTF-8 (a key file copied
    from a machine with another encoding, held by Python as lone surrogates that no UTF-8 output can write) as \\xNN,
    as the folder camera writes such names in frame ids."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _shown_entry(key: bytes, files: list[str]) -> str:
    """An allow-list key as a reload reports it: its file names, then the key."""
    return f"{', '.join(map(_shown_name, files))} ({key.decode()})"


class _Refusals:
    """Counts refused attempts and logs each (reason, client key, or the socket where no key was seen) once per
    REPEAT_LOG_S.

    Grouped by who as well as why: a revoked client retrying every 100 ms must not hide the first refusal of
    another key. At most REFUSALS_TRACKED pairs refused again or logged, and ONCE_TRACKED refused once, are
    remembered (the least recently refused of each goes first; the once-refused before the others), so keys made up
    by the thousand cannot grow the table, nor push out a client seen twice. Nor the log: the server's public key
    goes to every client, so
    anyone holding it can make up a key per connection, and a line for each would have journald's rate limit drop
    the daemon's other lines. So at most NEW_LOGGED_PER_INTERVAL pairs never logged before are logged per
    REPEAT_LOG_S; the ones past that are counted, and once the interval ends one `auth_refused` line says how many
    (`new_keys_not_logged`) and names the SUMMARY_NAMED of them refused most (`most_refused_not_logged`), which are
    logged as any other pair from then on. A made-up key is refused once and a real client retries, so a flood
    that spends every interval's budget cannot keep a retrying key out of the log for more than an interval. The
    count of refusals takes every one."""

    def __init__(self, domain: str) -> None:
        self.domain = domain
        self.count = 0
        # (reason, field, who) -> (when last logged or first seen; for a pair never logged, the start of the interval
        # it was last refused in, so that it may take the next interval's budget from that interval's start on,
        # refusals since, whether its who was ever logged), by when last refused, in two tables: the pairs refused
        # once and never logged, and the others.
        self._once: collections.OrderedDict[tuple[str, str, str], tuple[float, int, bool]] = collections.OrderedDict()
        self._again: collections.OrderedDict[tuple[str, str, str], tuple[float, int, bool]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._interval_start = -REPEAT_LOG_S
        self._new_logged = 0  # pairs logged for the first time in this interval
        self._new_unlogged = 0  # pairs past the budget in this interval
        self._unlogged_refusals = 0  # refusals of pairs never logged, since the last summary

    def refused(self, reason: str, **fields) -> None:
        field = "client_key" if "client_key" in fields else "socket"
        slot = (reason, field, str(fields.get(field, "")))
        now = time.monotonic()
        with self._lock:
            self.count += 1
            summary = self._roll(now)
            known = self._once.pop(slot, None) or self._again.pop(slot, None)
            when, repeats, logged = known or (-REPEAT_LOG_S, 0, False)
            if now - when < REPEAT_LOG_S:
                line = False
                state = (when, repeats + 1, logged)
            elif logged or self._new_logged < NEW_LOGGED_PER_INTERVAL:
                # Repeats of a logged pair come once per interval each, at most REFUSALS_TRACKED of them: not budgeted.
                line = True
                self._new_logged += not logged
                state = (now, 0, True)
            else:
                line = False
                self._new_unlogged += 1
                state = (self._interval_start, repeats + 1, False)
            if not line and not logged:
                self._unlogged_refusals += 1
            (self._again if known or line or logged else self._once)[slot] = state
            while len(self._once) > ONCE_TRACKED:
                self._once.popitem(last=False)
            while len(self._again) > REFUSALS_TRACKED:
                self._again.popitem(last=False)
        if summary is not None:
            self._log_summary(*summary)
        if line:
            log.warning("auth_refused", domain=self.domain, reason=reason, repeats_since_last_log=repeats, **fields)

    def flush(self) -> None:
        """Log the summary of an interval that ended with keys past the budget, when no refusal came since to do it."""
        with self._lock:
            summary = self._roll(time.monotonic())
        if summary is not None:
            self._log_summary(*summary)

    def _roll(self, now: float) -> tuple[int, int, list[dict[str, object]]] | None:
        """Start a new interval when the last one has ended: (keys not logged, their refusals, the most refused of
        them, now counted as logged) when it had any."""
        if now - self._interval_start < REPEAT_LOG_S:
            return None
        summary = None
        if self._unlogged_refusals:
            # Once an interval, over the pairs remembered: the ones refused in the interval that ends.
            ended = self._interval_start
            pairs = itertools.chain(self._once.items(), self._again.items())
            unlogged = (item for item in pairs if not item[1][2] and item[1][0] >= ended)
            most = heapq.nlargest(SUMMARY_NAMED, unlogged, key=lambda item: item[1][1])
            named: list[dict[str, object]] = []
            for slot, (_, repeats, _) in most:
                reason, field, who = slot
                named.append({field: who, "reason": reason, "refusals": repeats})
                self._once.pop(slot, None)
                self._again[slot] = (now, 0, True)
            summary = (self._new_unlogged, self._unlogged_refusals, named)
        self._interval_start, self._new_logged, self._new_unlogged, self._unlogged_refusals = now, 0, 0, 0
        return summary

    def _log_summary(self, keys_not_logged: int, refusals: int, named: list[dict[str, object]]) -> None:
        log.warning(
            "auth_refused",
            domain=self.domain,
            reason=f"more than {NEW_LOGGED_PER_INTERVAL} keys or sockets not seen before in {REPEAT_LOG_S:g} s",
            new_keys_not_logged=keys_not_logged,
            refusals_not_logged=refusals,
            most_refused_not_logged=named,
        )


class _AllowList:
    """ZAP credentials provider: a client is let in exactly when its public key is listed."""

    def __init__(self, allowed: frozenset[bytes], refusals: _Refusals) -> None:
        self.allowed = allowed
        self.refusals = refusals

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.allowed:
            return True
        self.refusals.refused("client key not in the allow-list", client_key=key.decode("ascii", "replace"))
        return False


_auth_lock = threading.Lock()
# pyzmq names a monitor's inproc endpoint after its socket's fd, which the OS hands to the next socket as soon as the
# first is closed, while libzmq's reaper may not yet have unbound that endpoint: the next monitor's bind then fails
# with "Address already in use" (a zmq camera reopened, a server restarted in the same process). Names never reused.
_monitor_names = itertools.count()
# One ZAP handler per context: libzmq sends a socket's handshakes to the handler bound in that socket's own context.
_authenticators: dict[zmq.Context, ThreadAuthenticator] = {}


def _zap(context: zmq.Context) -> ThreadAuthenticator:
    """The ZAP handler of `context` (ZeroMQ sends every CURVE handshake of the context's sockets to it)."""
    with _auth_lock:
        authenticator = _authenticators.get(context)
        if authenticator is None or not authenticator.is_alive():
            authenticator = _authenticators[context] = ThreadAuthenticator(context)
            authenticator.start()
        return authenticator


def load_keys(
    secret_key: str | Path, allowed_clients_dir: str | Path, where: str, owner_checked: bool = True
) -> tuple[bytes, bytes, dict[bytes, list[str]]]:
    """The key pair and the allow-list (z85 key -> its file names) of one `curve:` of the config at `where` (`control`,
    `publish`, `cameras[N].source`), checked as `inspectd run` checks them at start and `run --check` beforehand.
    KeysError names the config key and the file. `owner_checked` False: the owners are left out, for a check run as
    another user than the daemon's."""
    public, secret = keys.load_secret(
        secret_key, f"{where}.curve.server_secret_key", "the daemon's own user", owner_checked
    )
    names = keys.read_allow_list(allowed_clients_dir, f"{where}.curve.allowed_clients_dir", owner_checked)
    return public, secret, names


class CurveServer:
    """The hook for one server socket role ("control", "publish"): CURVE keys, ZAP domain, allow-list, refusal log.

    Keys are loaded (and their permissions checked) here, so a bad key fails the daemon's start with its path."""

    def __init__(
        self,
        domain: str,
        secret_key: str | Path,
        allowed_clients_dir: str | Path,
        context: zmq.Context | None = None,
        where: str | None = None,
    ) -> None:
        where = where or domain
        self.domain = domain
        self.context = context or zmq.Context.instance()
        self.public, self.secret, self._names = load_keys(secret_key, allowed_clients_dir, where)
        self.secret_key_file = Path(secret_key)
        self._key_where = f"{where}.curve.server_secret_key"
        self.allowed_clients_dir = Path(allowed_clients_dir)
        self._where = f"{where}.curve.allowed_clients_dir"
        self.allowed = frozenset(self._names)
        if not self._names:
            self._warn_empty()
        self._warn_duplicates(self._names)
        self.refusals = _Refusals(domain)
        self._allow_list = _AllowList(self.allowed, self.refusals)
        self._authenticators = [_zap(self.context)]
        self._foreign: list[zmq.Context] = []  # contexts whose ZAP handler this server started (see stop)
        self._authenticators[0].configure_curve_callback(domain, self._allow_list)
        self._monitors: list[threading.Thread] = []
        self._stop = threading.Event()

    @property
    def refused(self) -> int:
        return self.refusals.count

    def admits(self, message: zmq.Frame) -> bool:
        """The key that sent `message` (received with copy=False) is in the allow-list in force now; a key removed
        since its handshake is counted and logged as refused. Call it on the thread that owns the socket."""
        try:
            user = message.get("User-Id")
        except zmq.ZMQError:
            user = None
        key = user.encode("ascii", "replace") if isinstance(user, str) else b""
        if key in self._allow_list.allowed:
            return True
        self.refusals.refused(REMOVED, client_key=user or "unknown")
        return False

    def __call__(self, sock: zmq.Socket) -> None:
        if sock.context is not self.context:
            # A socket of another context has its own ZAP handler: without this one there the enforced domain
            # would refuse every client (before, libzmq let every client in).
            authenticator = _zap(sock.context)
            authenticator.configure_curve_callback(self.domain, self._allow_list)
            self._authenticators.append(authenticator)
            self._foreign.append(sock.context)
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        sock.zap_domain = self.domain.encode()
        # Without this libzmq lets every client in when no ZAP handler answers (its backwards-compatible default):
        # with it, a stopped or missing authenticator refuses every handshake instead. Fail closed.
        sock.zap_enforce_domain = True
        sock.handshake_ivl = keys.HANDSHAKE_IVL_S * 1000
        # libzmq tells the monitor that its socket closed only when MONITOR_STOPPED is in the mask: without it the
        # watcher, and its PAIR socket's fd, would outlive the socket, one more at every reopen of a zmq camera.
        events = zmq.EVENT_MONITOR_STOPPED
        for event in _REFUSALS:
            events |= event
        monitor = sock.get_monitor_socket(events, addr=f"inproc://inspectd-monitor-{next(_monitor_names)}")
        thread = threading.Thread(target=self._watch, args=(monitor,), name=f"auth-{self.domain}", daemon=True)
        # Watchers of sockets closed since end on their own; only those still watching are kept for stop().
        self._monitors = [watcher for watcher in self._monitors if watcher.is_alive()]
        self._monitors.append(thread)
        thread.start()

    def _watch(self, monitor: zmq.Socket) -> None:
        """Handshake failures on the socket: the refusals a ZAP callback never sees. libzmq gives the bound endpoint
        with them, not the peer's (nor anything that ties the failure to the connection it accepted).

        The watcher ends only when its socket has closed (MONITOR_STOPPED) or the context is terminating: libzmq
        sends MONITOR_STOPPED from the closing socket's destructor on its one reaper thread, and a monitor end closed
        before that blocks the reaper for good, after which no socket of the process is ever freed (each reopen of a
        zmq camera then keeps its descriptors and its watcher until the daemon runs out of them). So a stopped
        server's watchers, and one whose reporting failed, keep draining until their sockets close."""
        failed = False
        try:
            while True:
                try:
                    if not monitor.poll(200):
                        if not self._stop.is_set():
                            self.refusals.flush()  # a flood that stopped still gets its summary line
                        continue
                    event = recv_monitor_message(monitor)
                    if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                        return
                    if self._stop.is_set():
                        continue  # drained unreported until the socket closes
                    if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                        continue  # the allow-list callback already counted and logged it, with the key
                    timed_out = (
                        event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and event["value"] == errno.EAGAIN
                    )
                    self.refusals.refused(
                        TIMED_OUT if timed_out else _REFUSALS.get(event["event"], "handshake failed"),
                        socket=event["endpoint"].decode(errors="replace"),
                        detail=int(event["value"]),
                    )
                except zmq.ContextTerminated:
                    return
                except Exception as exc:  # ending here would leak every later socket (see the docstring)
                    if monitor.closed:  # closed by another (Context.destroy): nothing is left to watch or to close
                        return
                    if not failed:
                        log.warning("refusal_monitor_failed", domain=self.domain, error=f"{type(exc).__name__}: {exc}")
                        failed = True
                    time.sleep(0.2)
        finally:
            monitor.close(linger=0)

    def reload(self) -> dict[str, Any]:
        """Read the allow-list directory again (SIGHUP, control `reload`); the next handshake and the next message
        checked with `admits` use the new list.

        A directory that fails its checks now raises KeysError and the list in force stays as it was; an empty one
        is taken (every client refused), with a warning. Who was added and who removed is logged
        (`allow_list_reloaded`) and returned, by key file (a byte of its name that is not UTF-8 as \\xNN) and key;
        `kept` too, when there is one: a key whose file was deleted and that another file still lets in. A key that
        several files hold is logged as `allow_list_duplicate_key`, here and at start.

        The server's own key pair is not reloaded: when its file no longer holds the key in use, the fields of the
        `server_key_changed` warning are returned too, as `server_key` (see _warn_server_key_changed), so that the
        one who reloaded is told, not only the journal."""
        server_key = self._warn_server_key_changed()
        names = keys.read_allow_list(self.allowed_clients_dir, self._where)
        added = [_shown_entry(k, names[k]) for k in names.keys() - self._names.keys()]
        removed = [_shown_entry(k, self._names[k]) for k in self._names.keys() - names.keys()]
        # A file deleted to revoke its key revokes nothing while another file holds the same key: said, naming it.
        kept = [
            f"{_shown_entry(k, gone)}: still allowed, the same key is in {', '.join(map(_shown_name, names[k]))}"
            for k in self._names.keys() & names.keys()
            if (gone := sorted(set(self._names[k]) - set(names[k])))
        ]
        self._names = names
        self.allowed = frozenset(names)
        self._allow_list.allowed = self.allowed  # one attribute swap: the ZAP thread sees the old set or the new
        log.info(
            "allow_list_reloaded",
            domain=self.domain,
            keys=len(names),
            added=sorted(added),
            removed=sorted(removed),
            **({"kept": sorted(kept)} if kept else {}),
        )
        if not names:
            self._warn_empty()
        self._warn_duplicates(names)
        changes: dict[str, Any] = {"added": sorted(added), "removed": sorted(removed)}
        if kept:
            changes["kept"] = sorted(kept)
        if server_key is not None:
            changes["server_key"] = server_key
        return changes

    def _warn_duplicates(self, names: dict[bytes, list[str]]) -> None:
        for key, files in sorted(keys.duplicate_keys(names).items()):
            log.warning(
                "allow_list_duplicate_key",
                domain=self.domain,
                directory=str(self.allowed_clients_dir),
                client_key=key.decode(),
                files=[_shown_name(name) for name in files],
                effect="the key stays allowed until every one of these files is deleted",
            )

    def _warn_server_key_changed(self) -> dict[str, str] | None:
        """Log `server_key_changed` when the secret key file no longer holds the key this socket serves with (a key
        pair rotated on disk, or the file now refused), and return what it logged (key_file, public_key_in_use, then
        public_key_on_disk or error, and effect); None when the file holds the key in use. The socket keeps the key it
        was bound with: switched at a reload, it would shut out at once every client not yet given the new public key,
        and need binding again. An operator who rotated the pair and reloaded learns here that only a restart serves
        with the new one."""
        kept = "still serving with the key loaded at start"
        try:
            public, secret = keys.load_secret(self.secret_key_file, self._key_where, "the daemon's own user")
        except keys.KeysError as exc:
            restart = "a restart would load the file as it is now, and refuse to start while it is refused"
            fields = {"error": str(exc), "effect": f"{kept}; {restart}"}
        else:
            if secret == self.secret:
                return None
            restart = "restart the daemon to serve with the new key (a reload does not change it)"
            fields = {"public_key_on_disk": public.decode(), "effect": f"{kept}; {restart}"}
        fields = {"key_file": str(self.secret_key_file), "public_key_in_use": self.public.decode(), **fields}
        log.warning("server_key_changed", domain=self.domain, **fields)
        return fields

    def _warn_empty(self) -> None:
        log.warning(
            "allow_list_empty",
            domain=self.domain,
            directory=str(self.allowed_clients_dir),
            effect="every client is refused until a key file is added there and the list reloaded",
        )

    def alive(self) -> bool:
        """The process's ZAP authenticator is answering handshakes. When it is not, the enforced ZAP domain makes
        libzmq refuse every client (fail closed), and the daemon reports itself unhealthy."""
        return all(authenticator.is_alive() for authenticator in self._authenticators)

    def stop(self) -> None:
        """Stop reporting refusals, and stop the ZAP handlers started for other contexts than the process's own: a
        handler's socket left open would keep that context's term() waiting forever. Each refusal watcher ends when
        its socket closes (see _watch); those already closed are waited for briefly here."""
        self._stop.set()
        deadline = time.monotonic() + 1.0
        for thread in self._monitors:
            thread.join(max(0.0, deadline - time.monotonic()))
        with _auth_lock:
            for context in self._foreign:
                authenticator = _authenticators.pop(context, None)
                if authenticator is not None:
                    authenticator.stop()
            self._foreign.clear()
