"""`inspectd ctl`: steer a running daemon over its control socket: status, pause/resume a camera, reload the model,
set thresholds from a file, roll thresholds back to an earlier version.

Speaks inspectd.protocol.control only (nothing of the daemon is imported), with CurveZMQ keys when the control socket
is on a network address. Human output by default; `--json` prints the daemon's reply as one JSON object on stdout.

Exit codes, for scripts: 0 the daemon did it; 1 the daemon refused (its one-line reason on stderr), or did part of
it (a `reload` whose allow-list reload failed: the model is reloaded, the old list stays in force; a `reload` that
finds a server key file holding another key, or refused, since start: the daemon still serves with the key it
started with until restarted), or answered a set-thresholds or rollback in a reply ctl cannot read (the line says
it may have been applied: check status); 2 bad arguments (an endpoint the daemon's config would refuse: a tcp port
above 65535, inproc://, a relative ipc:// path; a timeout that is not a positive number) or an unreadable file; 3 no
daemon answered within --timeout (the line says whether one took the request: a reload, and every request behind it,
is answered only once the reload ends), or the peer there ended the security handshake (the line says why: a key it
does not let in, ...).
"""

from __future__ import annotations

import argparse
import codecs
import datetime
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from inspectd.errors import InspectdError, MessageError
from inspectd.protocol import wirejson
from inspectd.protocol.alarms import status_alarms
from inspectd.protocol.control import (
    MAX_REQUEST_BYTES,
    WRITES,
    ControlTimeout,
    HandshakeFailed,
    allow_list_errors,
    client_for,
    encode_request,
)

DEFAULT_ENDPOINT = "ipc:///var/lib/inspectd/control.sock"
ENDPOINT_ENV = "INSPECTD_CONTROL"
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _options(parser, default=True)
    # The same options after the action too (`ctl status --json`, as `archive list --json` takes them): refused
    # there, they read as unknown to inspectd altogether. Given twice, the one after the action wins.
    after = argparse.ArgumentParser(add_help=False)
    _options(after, default=False)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("status", parents=[after], help="health, model, thresholds, cameras, alarms")
    for verb in ("pause", "resume"):
        sub = actions.add_parser(verb, parents=[after], help=f"{verb} a camera's ingest")
        sub.add_argument("camera", metavar="CAMERA")
    actions.add_parser("reload", parents=[after], help="reload the model bundle from disk, swapped in between batches")
    sub = actions.add_parser(
        "set-thresholds", parents=[after], help="judge with a thresholds document (JSON file) from now on"
    )
    sub.add_argument("file", type=Path, metavar="FILE", help="a thresholds.json whose version is above the current")
    sub.add_argument(
        "--force",
        action="store_true",
        help="skip the checks that the document fits this daemon: accept values outside the calibrated score range, "
        "thresholds set on another model (provenance.model_id) and overrides for cameras it does not run; the version "
        "must still be above the current, and a reduced-precision engine still refuses thresholds its score shift "
        "is too large for",
    )
    sub = actions.add_parser(
        "rollback", parents=[after], help="a new thresholds version with an earlier version's values"
    )
    sub.add_argument("version", type=int, metavar="VERSION", help="the earlier version (ctl status shows the current)")


def _options(parser: argparse.ArgumentParser, default: bool) -> None:
    """ctl's own options; without `default`, one left out sets nothing (argparse.SUPPRESS), so that it does not
    undo the same option given before the action."""

    def value(given: Any) -> Any:
        return given if default else argparse.SUPPRESS

    # Set but empty (`INSPECTD_CONTROL= inspectd ctl ...`) is unset, as for most tools, not the endpoint ''.
    endpoint = os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT
    parser.add_argument(
        "--endpoint",
        default=value(endpoint),
        metavar="EP",
        help=f"the daemon's control.endpoint (default ${ENDPOINT_ENV}, else {DEFAULT_ENDPOINT})",
    )
    parser.add_argument(
        "--server-key",
        type=Path,
        default=value(None),
        metavar="PATH",
        help="CurveZMQ: the daemon's control public key file",
    )
    parser.add_argument(
        "--client-key",
        type=Path,
        default=value(None),
        metavar="PATH",
        help="CurveZMQ: this operator's .key_secret, in the allow-list",
    )
    parser.add_argument(
        "--timeout", type=float, default=value(10.0), metavar="S", help="seconds to wait for the daemon"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=value(False),
        help="machine-readable output on stdout (one JSON document)",
    )


def _request(args: argparse.Namespace) -> dict[str, Any]:
    if args.action in ("pause", "resume"):
        return {"cmd": args.action, "camera": args.camera}
    if args.action == "set-thresholds":
        data = _read_thresholds_file(args.file)
        # Windows editors (Notepad before 2019, and others on request) save UTF-8 with a byte-order mark, which JSON
        # gives no meaning (RFC 8259 lets a parser ignore it): refused, the file read as "not JSON (Expecting value)"
        # with no syntax error in it to find. Dropped here; the daemon's parser never sees one.
        data = data.removeprefix(codecs.BOM_UTF8)
        # The daemon's own parser: one MessageError line for what json.loads would raise anything for (deep nesting,
        # a 5000-digit integer), and NaN refused here rather than by the daemon.
        doc = wirejson.loads(data, str(args.file), "a thresholds document", unique_keys=True)
        request: dict[str, Any] = {"cmd": "set_thresholds", "thresholds": doc}
        if args.force:
            request["force"] = True
        encode_request(request)  # one over the daemon's limit is this file's fault (exit 2), not a refusal
        return request
    if args.action == "rollback":
        # The daemon's parser takes no longer integer (wirejson): refused there as a request that is not JSON, which
        # reads as the daemon's refusal (exit 1) for what is a typo here.
        digits = len(str(abs(args.version)))
        if digits > wirejson.MAX_INT_DIGITS:
            raise InspectdError(
                f"rollback VERSION: an integer of {digits} digits, expected an earlier thresholds version "
                f"(at most {wirejson.MAX_INT_DIGITS} digits)"
            )
        return {"cmd": "rollback", "version": args.version}
    return {"cmd": args.action}


def _read_thresholds_file(path: Path) -> bytes:
    """The bytes of a thresholds document, at most MAX_REQUEST_BYTES: a FIFO would block the open or the read past
    --timeout, and a device or a huge file by mistake would be read whole into memory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # no effect on a regular file; a FIFO's open returns at once
    except OSError as exc:
        raise InspectdError(f"{path}: cannot read a thresholds document ({exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InspectdError(f"{path}: {_kind(mode)}, expected a thresholds document (a regular file)")
        with open(fd, "rb", closefd=False) as file:
            data = file.read(MAX_REQUEST_BYTES + 1)
    except OSError as exc:
        raise InspectdError(f"{path}: cannot read a thresholds document ({exc})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_REQUEST_BYTES:
        raise InspectdError(
            f"{path}: a thresholds document of over {MAX_REQUEST_BYTES} bytes, expected at most "
            f"{MAX_REQUEST_BYTES / (1 << 20):g} MiB"
        )
    return data


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def run(args: argparse.Namespace) -> int:
    try:
        request = _request(args)
        flag = f"--endpoint (or ${ENDPOINT_ENV})"
        client = client_for(args.endpoint, args.timeout, args.server_key, args.client_key, endpoint_flag=flag)
    except InspectdError as exc:
        print(f"inspectd ctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with client:
            reply = client.request(request)
    except (ControlTimeout, HandshakeFailed) as exc:  # no answer: not done, or (a slow reload) not done yet
        # Asked at the default, the daemon may be one whose state_dir is elsewhere: say how to name it.
        other = f" (another daemon: --endpoint EP or ${ENDPOINT_ENV})" if args.endpoint == DEFAULT_ENDPOINT else ""
        print(f"inspectd ctl: {exc}{other}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except MessageError as exc:
        if request["cmd"] not in WRITES:
            print(f"inspectd ctl: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        # A reply came, so the daemon took the request and may well have done it: told as refused, the operator
        # would send it again (refused then as a stale version) or believe the old thresholds still judge.
        print(
            f"inspectd ctl: {exc}: the daemon answered the {args.action} in a reply ctl cannot read, so it may have "
            "been applied: check `inspectd ctl status` (its thresholds version) before sending it again",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    except InspectdError as exc:
        print(f"inspectd ctl: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if args.json:
        json.dump(reply, sys.stdout)
        print()
    if not reply.get("ok"):
        if args.action == "reload" and not args.json:
            # The bundle was refused, but the allow-lists were reloaded before it: a revoked key is out all the same.
            for line in _allow_list_lines(reply) + _server_key_lines(reply):
                print(f"inspectd ctl: reload: {line}", file=sys.stderr)
        print(f"inspectd ctl: {args.action}: {reply.get('error', 'refused')}", file=sys.stderr)
        return EXIT_REFUSED
    if not args.json:
        print(_printable(describe(args.action, reply)))
    failed = allow_list_errors(reply) if args.action == "reload" else []
    for role, error in failed:
        # The model was reloaded but this list was not: a key meant to be revoked may still get in.
        print(f"inspectd ctl: reload: allow-list {role} not reloaded, the previous one stays: {error}", file=sys.stderr)
    # A server key pair rotated on disk (a leaked one, say) is not served until a restart: a reload that said nothing
    # of it, exit 0, would leave the operator believing the old key retired.
    server_key = _server_key_lines(reply) if args.action == "reload" else []
    for line in server_key:
        print(f"inspectd ctl: reload: {line}", file=sys.stderr)
    return EXIT_REFUSED if failed or server_key else EXIT_OK


def _printable(text: str) -> str:
    """`text` as stdout can write it: a character its encoding cannot hold as a backslash escape. A reply's text may
    hold one (a file name that is not UTF-8, which Python keeps as a lone surrogate, in a key file error; any
    non-ASCII character under an ASCII locale), and an encoding error here would report a reload the daemon has
    already done as a crash, exit 1. stderr escapes such characters by itself."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    return text.encode(encoding, "backslashreplace").decode(encoding)


def describe(action: str, reply: dict[str, Any]) -> str:
    """The reply as a person reads it."""
    if action in ("pause", "resume"):
        return f"camera {reply.get('camera')}: {'paused' if reply.get('paused') else 'running'}"
    if action == "reload":
        lines = [f"reloaded: model {reply.get('model_id')}, thresholds version {reply.get('thresholds_version')}"]
        return "\n".join(lines + _numbering_lines(reply) + _allow_list_lines(reply))
    if action in ("set-thresholds", "rollback"):
        return f"thresholds version {reply.get('thresholds_version')} in use"
    return _status(reply)


def _numbering_lines(reply: dict[str, Any]) -> list[str]:
    """What a reload of the running model's bundle under a version not above the running one did to the number: the
    operator copied a bundle whose thresholds.json says another."""
    renumbered, went_back = reply.get("thresholds_renumbered"), reply.get("thresholds_version_went_back")
    if isinstance(renumbered, dict):
        return [
            f"thresholds: the bundle's version {renumbered.get('loaded_version')} judged as version "
            f"{renumbered.get('version')} (the running one was {renumbered.get('previous_version')}, and a number "
            "never names two documents); ctl rollback reaches the earlier versions"
        ]
    if isinstance(went_back, dict):
        return [
            f"thresholds: version {went_back.get('version')} again after {went_back.get('previous_version')}: the "
            f"bundle could not be renumbered ({went_back.get('error')}); results name that number again, with this "
            f"bundle's values, until a reload that can write the bundle numbers it above "
            f"{went_back.get('previous_version')} (ctl rollback reaches the earlier versions again then)"
        ]
    return []


def _allow_list_lines(reply: dict[str, Any]) -> list[str]:
    """What a reload did to each allow-list, one line each."""
    lines = []
    lists = reply.get("allow_lists")
    for role, part in (lists if isinstance(lists, dict) else {}).items():
        if not isinstance(part, dict):
            continue
        if "error" in part:
            lines.append(f"allow-list {role}: NOT reloaded, the previous one stays: {part['error']}")
            continue
        changes = [f"added {key}" for key in part.get("added") or []]
        changes += [f"removed {key}" for key in part.get("removed") or []]
        # A deleted file whose key another file still holds: the operator believes it revoked.
        changes += [f"deleted {entry}" for entry in part.get("kept") or []]
        lines.append(f"allow-list {role}: {', '.join(changes) if changes else 'unchanged'}")
    return lines


def _server_key_lines(reply: dict[str, Any]) -> list[str]:
    """One line per role whose server secret key file no longer holds the key the daemon serves with (`server_key`
    of a reload's allow-list part): another key there, or the file now refused."""
    lines = []
    lists = reply.get("allow_lists")
    for role, part in (lists if isinstance(lists, dict) else {}).items():
        changed = part.get("server_key") if isinstance(part, dict) else None
        if not isinstance(changed, dict):
            continue
        kept = f"still serving with the key loaded at start ({changed.get('public_key_in_use')})"
        if "error" in changed:
            lines.append(
                f"{role}: the server key file is now refused: {changed['error']}; {kept}, and a restart would "
                "refuse to start until the file is fixed"
            )
        else:
            lines.append(
                f"{role}: the server key file {changed.get('key_file')} now holds another key "
                f"({changed.get('public_key_on_disk')}); {kept}, restart the daemon to serve the new one"
            )
    return lines


def _drift_off(drift: Any) -> list[str]:
    """What of a camera's drift watch is switched off, one line each: a camera whose PLC drift bit can never rise
    must not look like one that is watched. Nothing for a daemon that sends no drift status. The brightness test
    alone off is left out: a bundle without a brightness reference is common, and the score test still watches."""
    if not isinstance(drift, dict) or drift.get("active") is not False:
        if isinstance(drift, dict) and drift.get("false_reject_warning_active") is False:
            return [f"false-reject warning off: {drift.get('false_reject_warning_inactive_reason')}"]
        return []
    reason = drift.get("inactive_reason")
    if drift.get("brightness_active"):
        return [f"drift score test off (the brightness test still watches): {reason}"]
    return [f"drift alarm off: {reason}" if reason else "drift alarm off"]


def _status(s: dict[str, Any]) -> str:
    up = datetime.timedelta(seconds=int(s.get("uptime_s") or 0))
    lines = [
        f"station {s.get('station')}: {'healthy' if s.get('healthy') else 'UNHEALTHY'}, up {up}, "
        f"{s.get('throughput_fps', 0):.1f} frames/s, {s.get('published', 0)} published",
        f"model {s.get('model_id')}, thresholds version {s.get('thresholds_version')}",
    ]
    if s.get("last_error"):
        lines.append(f"last engine error: {s['last_error']}")
    for camera, c in (s.get("cameras") or {}).items():
        lines.append(
            f"  {camera:12} {str(c.get('state', '?')):10} in {c.get('frames_in', 0)}  published "
            f"{c.get('published', 0)}  defects {c.get('defects', 0)}  errors {c.get('errors', 0)}  "
            f"dropped {c.get('dropped', 0)}  queued {c.get('queued', 0)}"
        )
        if c.get("replaced_unread") or c.get("disposal_backlog"):
            lines.append(
                f"  {'':12} folder: {c.get('replaced_unread', 0)} parts replaced under their name unread (lost), "
                f"{c.get('disposal_backlog', 0)} files waiting to be deleted or moved"
            )
        if c.get("last_error"):
            lines.append(f"  {'':12} last error: {c['last_error']}")
        lines += [f"  {'':12} {line}" for line in _drift_off(c.get("drift"))]
    refused = s.get("auth_refused")
    counts = [f"{role} {n}" for role, n in (refused if isinstance(refused, dict) else {}).items() if n]
    if counts:
        lines.append(f"CurveZMQ attempts refused since start: {', '.join(counts)}")
    lines += [f"ALARM {alarm}" for alarm in status_alarms(s)]
    return "\n".join(lines)
