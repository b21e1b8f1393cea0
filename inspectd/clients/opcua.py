"""The OPC UA protocol of `inspectd bridge`: the variables a PLC or MES sees per camera, in either direction.

Two modes (config `mode`):

    server   the bridge runs an OPC UA server (asyncua) at `endpoint`; the PLC/MES connects, reads each camera's
             variables and writes Ack / AlarmReset. The last inspection id whose hand-over ended (acked: recorded
             as soon as its Ack is read, before ResultValid drops; or its ack timed out) and the latched alarm of
             each camera are kept in `state_file`, so a restarted bridge applies the restart rule like the Modbus
             one;
             a write of it that fails (a full disk) is logged once and the bridge goes on, as with acked.json.
             The server's standard address space comes from a cache in `cache_dir` when there is one
             (inspectd.clients.opcua_cache; default $CACHE_DIRECTORY), else it is built at each start.
    client   the bridge connects to the PLC's own OPC UA server at `endpoint` and writes into variables the PLC
             program declares; their node ids come from `node_id` ("ns=3;s=\"DB_Inspect\".\"{camera}\".\"{name}\"").
             Values are written with each variable's own data type, read from the PLC when the bridge starts and
             refused there unless it fits what the variable holds (ROLE_KINDS: ids must be integers).

Each camera has the same variables (NAMES below; docs/PLC.md has the table): the result (InspectionId, ResultCode,
Verdict, Score, Threshold, RegionCount, ModelId, ThresholdsVersion), the counters (MissedAcks, SequenceGaps,
Heartbeat), the status flags as Booleans (TriggerReady, ResultValid, Pass, Fail, Defect, Alarm, Drift,
DaemonUnhealthy, FalseRejectWarning), and what the PLC writes (Ack: the inspection id it consumed; AlarmReset: true
to clear Alarm). In client mode a PLC program may lack FalseRejectWarning (added later); the bridge leaves it out.
A result is one Write request of its data followed by one of its flags, so ResultValid rises on complete data; within
the flags ResultValid is written last when it rises and first when it falls (`_expand`), so a client acting on its
data-change notifications never sees it valid next to the previous result's Pass/Fail/Defect. The handshake itself is
inspectd.clients.handshake's, shared with Modbus.

In server mode Ack and AlarmReset are the only variables a client may write: the server offers anonymous sessions
only (a user name is refused, never taken, so no one becomes asyncua's Admin, who may write any variable and delete
nodes), and with `security` those sessions come only over a channel whose certificate is trusted. A whole number of
another type that fits (an Ack written as a PLC's Int32, an AlarmReset written as 1) is taken as the variable's type;
anything else (an array: asyncua checks a write's type, not its rank; a fraction; a negative Ack) is refused with
BadTypeMismatch and a warning, and the bridge serves on. A write the bridge makes to its own variables that the
address space refuses ends the bridge (exit 1), as a refused write does in client mode.

Security (`security`): Basic256Sha256 with SignAndEncrypt, with this bridge's certificate and key; in server mode
only that endpoint is offered and a client's certificate must be in the `trusted` folder; in client mode `trusted`
is the PLC server's certificate. These files are read and parsed with the config: one missing or malformed is a
config error naming its key. Without `security` the connection is unsigned (a closed cell network only).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import re
import string
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import structlog
from pydantic import Field, Strict, field_validator, model_validator

from engines.schema import Int, Number, Text, declared, invalid
from inspectd.clients.handshake import STATUS_FLAGS, STOP_REQUEST_BUDGET_MS, HandshakeSettings, PlcError
from inspectd.clients.opcua_cache import init_server
from inspectd.configfile import CameraId, ConfigPath, WrittenPath, parse, read_yaml, written_path
from inspectd.durable import hold_lock, replace_file
from inspectd.errors import ConfigError, one_line

log = structlog.get_logger("inspectd.clients.opcua")

# The handshake's value names -> the variable names a PLC programmer sees, and their OPC UA built-in types.
NAMES = {
    "inspection_id": ("InspectionId", "UInt32"),
    "result_code": ("ResultCode", "UInt16"),
    "verdict": ("Verdict", "String"),
    "score": ("Score", "Double"),
    "threshold": ("Threshold", "Double"),
    "region_count": ("RegionCount", "UInt32"),
    "model_id": ("ModelId", "String"),
    "thresholds_version": ("ThresholdsVersion", "UInt32"),
    "missed_acks": ("MissedAcks", "UInt32"),
    "sequence_gaps": ("SequenceGaps", "UInt32"),
    "heartbeat": ("Heartbeat", "UInt32"),
    "ack": ("Ack", "UInt32"),
    "alarm_reset": ("AlarmReset", "Boolean"),
    **{flag: ("".join(part.title() for part in flag.split("_")), "Boolean") for flag in STATUS_FLAGS},
}
WRITTEN_BY_PLC = ("ack", "alarm_reset")
# Client mode: why the bridge writes a variable that the PLC program writes too (so a PLC may have made it read-only).
WRITE_REASONS = {
    "ack": " (the bridge resets an Ack left equal to the next InspectionId, so only the PLC's echo acks it)",
    "alarm_reset": " (the bridge writes it back to false after a reset)",
}
# Client mode: variables a PLC program written before they existed may lack; the bridge then leaves them out.
OPTIONAL_IN_PLC = ("false_reject_warning",)
DEFAULT_NAMESPACE = "urn:inspectd:bridge"
DEFAULT_NODE_ID = "ns=2;s={camera}.{name}"
U32 = 0xFFFFFFFF
FLOAT_MAX = 3.4028234e38  # the largest finite float32: a PLC's Real (an OPC UA Float)
# asyncua sends a request once (no retry): one that times out ends after one request_timeout_ms.
MAX_REQUEST_TIMEOUT_MS = STOP_REQUEST_BUDGET_MS
# Server mode: a client that keeps writing Ack or AlarmReset in a form the bridge refuses is told of at most this often
# per variable, with the count since, so a script in a loop cannot flood the log.
REFUSED_WRITE_LOG_S = 60.0


@declared
class Security:
    """Basic256Sha256 SignAndEncrypt: this bridge's certificate and key (PEM or DER), and whom it trusts."""

    # Read only: relative paths resolve against the config file's directory, as in the daemon's config.
    certificate: ConfigPath
    private_key: ConfigPath
    trusted: ConfigPath  # server mode: a folder of client certificates; client mode: the PLC server's certificate
    policy: Literal["Basic256Sha256"] = "Basic256Sha256"
    mode: Literal["SignAndEncrypt"] = "SignAndEncrypt"


@declared
class OpcUaConfig(HandshakeSettings):
    mode: Literal["server", "client"] = "server"
    # server: where to listen; client: the PLC's server
    endpoint: Text = "opc.tcp://0.0.0.0:4840/inspectd/"
    cameras: list[CameraId] = dataclasses.field(default_factory=list)
    namespace: Text = DEFAULT_NAMESPACE  # server mode: the namespace URI of the variables
    node_id: Text = DEFAULT_NODE_ID  # client mode: node id of each variable, from {camera} and {name}
    state_file: WrittenPath | None = None  # server mode: where the restart rule's inspection ids and alarms are kept
    # server mode: where the standard address space is cached between starts; null: $CACHE_DIRECTORY; "" (or null
    # with no $CACHE_DIRECTORY): no cache, built at each start
    cache_dir: Annotated[str, Strict()] | None = None
    application_uri: Text = "urn:inspectd:bridge"  # must match the URI in the certificate when security is on
    security: Security | None = None
    request_timeout_ms: Annotated[Number, Field(ge=10, le=MAX_REQUEST_TIMEOUT_MS)] = 2000.0
    score_when_none: Number = 0.0  # Score and Threshold of an error result (no score): a PLC reads Verdict first
    # At most an hour (servers commonly revise a longer one down to about that): how long the server keeps a session
    # whose bridge went away. A number past what a double holds made asyncua fail at connect, blaming the connection.
    session_timeout_ms: Annotated[Int, Field(ge=1000, le=3_600_000)] = 30_000

    @field_validator("cache_dir", mode="after")
    @classmethod
    def _cache_dir(cls, cache_dir: str | None) -> str | None:
        return str(written_path(cache_dir)) if cache_dir else cache_dir  # "" and null mean no directory

    @model_validator(mode="after")
    def _consistent(self) -> OpcUaConfig:
        if not _endpoint_ok(self.endpoint):
            # Without a port asyncua's server listens on a random one no PLC is set up for, and a port out of range
            # is a traceback in server mode and a restart loop in client mode: refused here, with the key.
            raise invalid(
                "endpoint: expected an opc.tcp:// URL with a host and a port 1..65535 (opc.tcp://HOST:4840/PATH), "
                f"got {self.endpoint!r}"
            )
        if len(set(self.cameras)) != len(self.cameras):
            raise invalid("cameras: expected each camera once")
        if self.mode == "server" and ROOT_NODE in self.cameras:
            raise invalid(f"cameras: {ROOT_CAMERA_REFUSED}")
        if self.mode == "client" and _template_fields(self.node_id) != {"camera", "name"}:
            # Checked here: str.format on any other field, or a stray brace, raises at connect and ends the bridge.
            raise invalid(
                "node_id: expected a template whose only fields are {camera} and {name}, each at least once (a "
                f"literal brace written {{{{ or }}}}), got {self.node_id!r}"
            )
        return self


# Server mode: the node id of the object that holds the cameras' objects, each of which has its camera id as node id
# (the variables' ids, `<camera>.<Name>`, are documented for PLC programs, so they stay as they are).
ROOT_NODE = "inspectd"
ROOT_CAMERA_REFUSED = (
    f"{ROOT_NODE!r} is the node id of the server's root object (Objects/{ROOT_NODE}), expected another camera id in "
    "server mode"
)


def _endpoint_ok(endpoint: str) -> bool:
    if not endpoint.startswith("opc.tcp://"):
        return False
    parts = urlsplit(endpoint)
    try:
        port = parts.port
    except ValueError:  # not a number, or past 65535
        return False
    return bool(parts.hostname) and port is not None and 1 <= port <= 65535


def _template_fields(template: str) -> set[str] | None:
    """The fields of a str.format template, None when it does not format with camera and name alone."""
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
        template.format(camera="c", name="n")  # a format spec or conversion str refuses
    except (ValueError, KeyError, IndexError, AttributeError):
        return None
    return fields


def parse_opcua_config(raw: Any, where: str = "bridge", base_dir: str | Path | None = None) -> OpcUaConfig:
    """Relative paths resolve against `base_dir`: the config file's directory (default: the working directory)."""
    return parse(OpcUaConfig, raw, where=where, base_dir=base_dir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode", choices=("server", "client"), default=None, help="serve the variables, or write into the PLC's server"
    )
    parser.add_argument(
        "--opcua",
        default=None,
        metavar="URL",
        help="opc.tcp:// endpoint: where to listen (server) or the PLC's server (client); overrides the config",
    )
    parser.add_argument(
        "--camera", action="append", default=None, metavar="ID", help="a camera to serve (repeatable; adds to config)"
    )
    parser.add_argument(
        "--state-file", default=None, metavar="PATH", help="server mode: where the restart rule's state is kept"
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="server mode: where the OPC UA standard address space is cached, so a start does not build it again "
        "(default: $CACHE_DIRECTORY, set by systemd's CacheDirectory=; '' or neither: built at each start)",
    )


def configure(args: argparse.Namespace) -> OpcUaConfig:
    raw = read_yaml(args.config, expected="a bridge config file") if args.config else {}
    base_dir = Path(args.config).resolve().parent if args.config else None
    config = parse_opcua_config(raw or {}, where=str(args.config) if args.config else "bridge", base_dir=base_dir)
    changes: dict[str, Any] = {}
    if args.mode is not None:
        changes["mode"] = args.mode
    if args.opcua is not None:
        changes["endpoint"] = args.opcua
    if args.camera:
        changes["cameras"] = [*config.cameras, *args.camera]
    # A path on the command line is the shell's: relative to the working directory, as every other tool takes it.
    if args.state_file is not None:
        changes["state_file"] = os.path.abspath(args.state_file) if args.state_file else args.state_file
    if args.cache_dir is not None:
        changes["cache_dir"] = os.path.abspath(args.cache_dir) if args.cache_dir else args.cache_dir
    if changes:
        merged = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)} | changes
        merged["security"] = None if config.security is None else dataclasses.asdict(config.security)
        config = parse_opcua_config(merged, where="options")
    if not config.cameras:
        from inspectd.clients.bridge import topic_camera

        camera = topic_camera(args.topic)
        if camera is None:
            raise ConfigError("cameras: expected at least one camera id (--camera, or a --topic naming one camera)")
        if config.mode == "server" and camera == ROOT_NODE:
            raise ConfigError(f"--topic {args.topic!r}: camera {ROOT_CAMERA_REFUSED}")
        config = dataclasses.replace(config, cameras=[camera])
    if config.cache_dir is None:
        # systemd joins several CacheDirectory= entries with ':'; the unit names one
        cache_dir = os.environ.get("CACHE_DIRECTORY", "").split(":")[0]
        config = dataclasses.replace(config, cache_dir=cache_dir)
    if config.mode == "server" and config.state_file is None:
        raise ConfigError(
            "state_file: expected a file path in server mode (--state-file): it keeps each camera's last inspection "
            "id, so a restarted bridge never hands a result over twice"
        )
    if config.mode == "server":
        state_file = Path(str(config.state_file))
        if not state_file.parent.is_dir():
            # Else no lock is taken and the first hand-over's write fails: every restart would be a fresh PLC.
            raise ConfigError(
                f"state_file {state_file}: expected a file in an existing folder, {state_file.parent} is no folder "
                "(under the unit: /var/lib/inspectd-bridge/<instance>, its StateDirectory=)"
            )
        if not os.access(state_file.parent, os.W_OK | os.X_OK):
            # As a missing folder: no lock could be made (hold_lock gives None) and the first write would fail.
            raise ConfigError(
                f"state_file {state_file}: expected a folder this user may write, {state_file.parent} is not "
                "(under the unit: /var/lib/inspectd-bridge/<instance>, its StateDirectory=)"
            )
        lock = state_file.with_name(state_file.name + ".lock")
        try:  # before the file is read: a second bridge never reads a state the first is rewriting
            hold_lock(lock)
        except BlockingIOError:
            raise ConfigError(
                f"state_file {state_file}: another bridge uses it (give each bridge a state file of its own)"
            ) from None
        except PermissionError as exc:
            raise ConfigError(
                f"state_file {state_file}: cannot open {lock} ({exc.strerror}), expected one this user may read: "
                "remove it (left by a run as another user)"
            ) from None
        load_state(state_file)  # a bad one stops the bridge here: a config error, not the PLC's
    if config.security is not None:
        check_security(config.security, config.mode, config.application_uri)
    return config


def check_security(security: Security, mode: str, application_uri: str) -> None:
    """Read and parse the security files as asyncua will when the PLC side opens; raises ConfigError naming the key.

    Here rather than at start so that a wrong file is a configuration error (exit 2) that the service manager does not
    retry, and not an asyncua traceback."""
    certificate = _security_file("certificate", str(security.certificate), "certificate")
    key = _security_file("private_key", str(security.private_key), "private key")
    if certificate is not None and key is not None and _numbers(certificate) != _numbers(key):
        raise ConfigError(
            f"security.private_key {security.private_key}: expected the private key of security.certificate "
            f"{security.certificate}, got another one"
        )
    if certificate is not None:
        # asyncua starts with a mismatch and says nothing; every peer that validates certificates then refuses each
        # session (BadCertificateUriInvalid), which in client mode is a restart loop rather than a config error.
        uris = _certificate_uris(certificate)
        if application_uri not in uris:
            raise ConfigError(
                f"security.certificate {security.certificate}: its subject alternative name carries "
                f"{', '.join(uris) or 'no URI'}, expected application_uri {application_uri}"
            )
    if mode == "client":
        _security_file("trusted", str(security.trusted), "certificate")  # the PLC server's certificate
        return
    folder = Path(security.trusted)
    if not folder.is_dir():
        raise ConfigError(
            f"security.trusted {folder}: expected a folder of the trusted client certificates (*.der, *.pem)"
        )
    # asyncua's TrustStore loads each file its pattern picks, and stops at the first it cannot parse.
    picked = sorted(p for p in folder.glob("*.*") if re.match(".*(der|pem)", p.name.lower()))
    for path in picked:
        _security_file("trusted", str(path), "certificate")
    if not picked:
        raise ConfigError(
            f"security.trusted {folder}: expected the trusted client certificates (*.der, *.pem), found none: "
            "no client could connect"
        )


def _security_file(key: str, path: str, what: str) -> Any:
    """The parsed certificate or private key at `path`, read as asyncua reads it (PEM when the name ends in .pem,
    else DER); None without the cryptography package (the PLC side then refuses to open for want of asyncua)."""
    try:
        content = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"security.{key} {path}: expected a {what} file, cannot read it ({exc.strerror or exc})"
        ) from None
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
    except ModuleNotFoundError:
        return None
    pem = Path(path).suffix.lower() == ".pem"
    form = "PEM" if pem else "DER"
    # asyncua picks the format by the name alone: a PEM file named .der or .crt fails as DER, and a DER one named .pem.
    named = ""
    if not pem and content.lstrip().startswith(b"-----BEGIN"):
        named = " (it holds PEM: name it *.pem)"
    elif pem and content.startswith(b"\x30"):  # an ASN.1 SEQUENCE: DER
        named = " (it holds DER: name it *.der)"
    parsed: Any
    try:
        if what == "certificate":
            parsed = (x509.load_pem_x509_certificate if pem else x509.load_der_x509_certificate)(content)
        else:
            load = serialization.load_pem_private_key if pem else serialization.load_der_private_key
            parsed = load(content, password=None)
    except TypeError:  # an encrypted key: the config has no password for it
        raise ConfigError(f"security.{key} {path}: expected an unencrypted private key, got an encrypted one") from None
    except ValueError:
        raise ConfigError(f"security.{key} {path}: expected a {form} {what}{named}, got something else") from None
    if not isinstance(parsed.public_key(), rsa.RSAPublicKey):
        raise ConfigError(f"security.{key} {path}: expected an RSA {what} (Basic256Sha256), got another kind of key")
    return parsed


def _certificate_uris(certificate: Any) -> list[str]:
    from cryptography import x509

    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(uri) for uri in names.get_values_for_type(x509.UniformResourceIdentifier)]


def _numbers(item: Any) -> Any:
    """The public numbers of a certificate or private key, to tell whether the two belong together."""
    return item.public_key().public_numbers()


def load_state(path: Path) -> dict[str, dict[str, int]]:
    """The server mode's state file: camera -> {inspection_id, alarm}; {} when there is none. Raises ConfigError."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"state_file {path}: unreadable ({exc}); remove it to start fresh") from exc
    if not isinstance(state, dict) or not all(isinstance(v, dict) for v in state.values()):
        raise ConfigError(f"state_file {path}: expected an object of camera -> state; remove it")
    for camera, values in state.items():
        for key, top in (("inspection_id", U32), ("alarm", 1), ("missed_acks", U32), ("sequence_gaps", U32)):
            value = values.get(key, 0)
            # bool is an int to Python, but not what the bridge writes
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
                raise ConfigError(
                    f"state_file {path}: camera {camera!r} {key}: expected an integer 0..{top}, got {value!r}; "
                    "remove it to start fresh"
                )
    return state


def describe(config: OpcUaConfig, args: argparse.Namespace) -> dict[str, Any]:
    return {"plc": config.endpoint, "mode": config.mode, "security": config.security is not None}


def _variant(ua, value: Any, kind: str, config: OpcUaConfig):
    if kind == "Double":
        number = config.score_when_none if value is None else float(value)
        return ua.Variant(number if math.isfinite(number) else config.score_when_none, ua.VariantType.Double)
    if kind == "String":
        return ua.Variant("" if value is None else str(value), ua.VariantType.String)
    if kind == "Boolean":
        return ua.Variant(bool(value), ua.VariantType.Boolean)
    number = 0 if value is None else int(value)
    width = {"UInt16": 0xFFFF, "UInt32": U32}.get(kind)
    if width is not None:
        number = min(number, width) if kind == "UInt16" else number & width
    return ua.Variant(number, getattr(ua.VariantType, kind))


def _expand(fields: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bool]]:
    """The handshake's values as (data variables, flag variables): `status` becomes one Boolean per flag, in the order
    they are to be written: ResultValid last when raised, first when dropped. Written one variable at a time (server
    mode), or ResultValid in a Write request of its own (client mode), each is a data change of its own: a client
    acting on ResultValid's rising edge must find Pass/Fail/Defect already this result's, and one reading the flags
    while they fall must not find the next part's verdict flags cleared under a ResultValid still up."""
    data = {name: value for name, value in fields.items() if name != "status"}
    if "status" not in fields:
        return data, {}
    flags = {flag: flag in fields["status"] for flag in STATUS_FLAGS if flag != "result_valid"}
    if "result_valid" in fields["status"]:
        return data, {**flags, "result_valid": True}
    return data, {"result_valid": False, **flags}


# Server mode: the values the state file keeps per camera, read from it rather than from the variables (which die with
# the process): the restart rule's id and alarm, and the counters, which a PLC or HMI may trend across restarts.
KEPT = ("inspection_id", "alarm", "missed_acks", "sequence_gaps")


class ServerTarget:
    """One camera's variables in the bridge's own server; the restart rule's values live in the state file."""

    reads_locally = True  # its variables live in this process: a read cannot end a link (Handshake.shutdown)
    heartbeat_modulus = U32 + 1  # the UInt32 Heartbeat: the handshake counts 1..2**32-1 in it, never 0

    def __init__(self, link: ServerLink, camera: str, nodes: dict[str, Any]) -> None:
        self.link = link
        self.camera = camera
        self.nodes = nodes
        self._on_display: int | None = None  # the id handed over whose falling edge has not been written yet
        self._counts_on_display: dict[str, int] = {}  # the counters handed over with it
        self._read: dict[str, int] = {}  # the last whole number read of each variable a client writes

    async def read(self, name: str) -> int:
        if name in KEPT:
            return int(self.link.state.get(self.camera, {}).get(name, 0))
        variant = self.link.server.read_attribute_value(self.nodes[name].nodeid).Value
        value = None if variant is None else variant.Value
        number = None if variant is not None and variant.is_array else _integer(value)
        if number is None:
            # Refused as it was written (ServerLink._screen): this is a value that came in some other way. The one read
            # before stands, as if the write had been refused: a client must not end the bridge.
            self.link.refused_write(self.camera, name, value)
            return self._read.get(name, 0)
        self._read[name] = number
        if name == "ack" and self._on_display is not None and number == self._on_display:
            await self._keep_acked(self._on_display)
        return number

    async def _keep_acked(self, acked: int) -> None:
        """The PLC acked the id on display: recorded in state_file now, before the handshake drops ResultValid, as
        the Modbus PLC keeps its own Ack. This Ack lives only in the process, so a bridge killed between the ack and
        the falling edge would resume before the id and hand that result over again (a --journal replays it)."""
        update = {"inspection_id": acked}
        remembered = self.link.state.get(self.camera, {})
        update |= {name: value for name, value in self._counts_on_display.items() if value != remembered.get(name, 0)}
        self._on_display, self._counts_on_display = None, {}
        await self._remember(update)

    async def _remember(self, update: dict[str, int]) -> None:
        """`update` into state_file, off the event loop: two fsyncs must not hold up the other cameras' handshakes."""
        try:
            await asyncio.to_thread(self.link.remember, self.camera, update)
        except OSError as exc:
            self.link.remember_failed(exc)

    async def write(self, fields: dict[str, Any], last: str | None = None) -> None:
        ua = self.link.ua
        data, flags = _expand(fields)
        for group in (data, flags):  # status (the flags) after the data: ResultValid rises on complete data
            for name, value in group.items():
                node = self.nodes[name]
                variant = _variant(ua, value, NAMES[name][1], self.link.config)
                # The address space's own write, for its status: Server.write_attribute_value drops it.
                status = await self.link.server.iserver.aspace.write_attribute_value(
                    node.nodeid, ua.AttributeIds.Value, ua.DataValue(variant)
                )
                if status is not None and not status.is_good():
                    # As a refused write in client mode: the bridge ends (exit 1) and its restart builds the variables
                    # anew, rather than the PLC reading a value that was never written.
                    raise PlcError(
                        f"OPC UA write of {self.camera} {NAMES[name][0]} ({node.nodeid.to_string()}): {status.name}"
                    )
        remembered = self.link.state.get(self.camera, {})
        update = {}
        counts = {name: int(data[name]) & U32 for name in ("missed_acks", "sequence_gaps") if name in data}
        if "inspection_id" in data:
            self._on_display = int(data["inspection_id"]) & U32
            # Kept with the id they were handed over with: a restart that hands that result over again counts its
            # gap again, so the count it resumes from must be the one before it.
            self._counts_on_display, counts = counts, {}
        # Kept when its Ack is read (_keep_acked), else at the falling edge (its ack timed out), never at the
        # hand-over: the variables die with the process, so a bridge killed while the id waited for its ack resumes
        # before it, and the restart replays it from the journal or counts it as a gap, where recording it would
        # lose it without a trace.
        if flags and not flags["result_valid"] and self._on_display is not None:
            update["inspection_id"] = self._on_display
            self._on_display = None
            counts = {**self._counts_on_display, **counts}
        if flags and flags["alarm"] != bool(remembered.get("alarm", 0)):
            update["alarm"] = int(flags["alarm"])
        # What the PLC sees goes on across a restart; a missed ack's count, written after the fall, at once.
        update |= {name: value for name, value in counts.items() if value != remembered.get(name, 0)}
        if update:
            await self._remember(update)


class ServerLink:
    """The bridge's own OPC UA server: an object per camera under Objects/inspectd, one variable per NAMES entry.

    The standard address space under them comes from inspectd.clients.opcua_cache (a shelf in `cache_dir`), or is
    built in memory without one."""

    def __init__(self, config: OpcUaConfig) -> None:
        from asyncua import ua

        self.ua = ua
        self.config = config
        self.server: Any = None  # made by start(), with the standard address space in place
        self.state_path = Path(str(config.state_file))
        try:
            self.state = load_state(self.state_path)
        except ConfigError as exc:  # changed since configure() read it
            raise PlcError(str(exc)) from exc
        self._state_lock = threading.Lock()
        self._state_failed: str | None = None  # the state_file write error last logged
        self.targets: dict[str, ServerTarget] = {}
        self.started = False
        self._written_by_plc: dict[Any, tuple[str, str]] = {}  # node id -> (camera, name) of Ack and AlarmReset
        self._refused: dict[tuple[str, str], tuple[int, float]] = {}  # -> (refused since told, when told)

    def refused_write(self, camera: str, name: str, value: Any) -> None:
        """A client's write of `camera`'s Ack or AlarmReset that the bridge does not take: one warning, then at most
        one per REFUSED_WRITE_LOG_S with the count since."""
        untold, told_at = self._refused.get((camera, name), (0, -REFUSED_WRITE_LOG_S))
        untold += 1
        now = time.monotonic()
        if now - told_at >= REFUSED_WRITE_LOG_S:
            shown = repr(value)
            log.warning(
                "plc_write_refused",
                camera=camera,
                variable=NAMES[name][0],
                value=shown if len(shown) <= 80 else shown[:77] + "...",
                refused=untold,
                expected=_written_form(NAMES[name][1]),
                effect="refused (BadTypeMismatch to the client); the bridge serves on; told at most every "
                f"{REFUSED_WRITE_LOG_S:.0f} s",
            )
            untold, told_at = 0, now
        self._refused[(camera, name)] = (untold, told_at)

    async def _screen(self, event: Any, _dispatcher: Any) -> None:
        """Before a client's Write is applied: a whole number of another integer type (a PLC's DINT is an Int32) that
        the variable's type holds is taken as that type, since asyncua would refuse it with BadTypeMismatch and the
        PLC's acks would all time out. Anything else (an array, which asyncua's own type check lets through, a
        fraction, a value out of range) is swapped for one of a type the variable does not hold, so that asyncua
        refuses that item and keeps the variable as it was."""
        ua = self.ua
        for item in event.request_params.NodesToWrite:
            where = self._written_by_plc.get(item.NodeId)
            if where is None or item.AttributeId != ua.AttributeIds.Value or item.Value is None:
                continue
            variant = item.Value.Value
            if variant is None or variant.Value is None:  # a null (or a bad status) reads as 0: no ack, no reset
                continue
            kind = NAMES[where[1]][1]
            if not variant.is_array and variant.Dimensions is None:
                if variant.VariantType == getattr(ua.VariantType, kind):
                    continue
                number = _integer(variant.Value) if variant.VariantType.name in _INTEGERS else None
                if number is not None and 0 <= number <= _written_top(kind):
                    value = bool(number) if kind == "Boolean" else number
                    item.Value = dataclasses.replace(item.Value, Value=ua.Variant(value, getattr(ua.VariantType, kind)))
                    continue
            item.Value = ua.DataValue(ua.Variant(f"refused: expected {_written_form(kind)}"))
            self.refused_write(*where, variant.Value)

    def remember(self, camera: str, update: dict[str, int]) -> None:
        """Record a camera's handed-over inspection id or alarm in state_file, durably (replace_file)."""
        with self._state_lock:
            # The update and the write under one lock: whichever write lands last holds every update made before it.
            self.state.setdefault(camera, {}).update(update)
            replace_file(self.state_path, json.dumps(self.state, separators=(",", ":")).encode("utf-8"))

    def remember_failed(self, exc: OSError) -> None:
        """A state_file write failed (disk full, a read-only remount): the bridge goes on, the state kept in memory.

        Stopping would cost the line every verdict for a bookkeeping file; what it costs instead is that a restart
        before a write succeeds again may hand over once more what came after the last id written. Said once per
        cause, as the Modbus bridge's acked.json does."""
        if str(exc) != self._state_failed:
            self._state_failed = str(exc)
            log.warning(
                "state_write_failed",
                path=str(self.state_path),
                error=str(exc),
                effect="kept in memory only: a restart may hand over again what came after the last id written",
            )

    async def start(self) -> None:
        ua = self.ua
        cache_dir = self.config.cache_dir
        server = self.server = await init_server(Path(cache_dir) if cache_dir else None)
        server.set_endpoint(self.config.endpoint)
        server.set_server_name("inspectd bridge")
        await server.set_application_uri(self.config.application_uri)
        # asyncua's default makes any session that logs in as "admin", whatever its password, an Admin that may write
        # every variable (a forged Pass) and delete nodes. The certificates are the access control: only anonymous
        # sessions are offered, so a user name is refused at activation rather than taken.
        server.allow_remote_admin(False)
        if hasattr(server, "set_identity_tokens"):
            server.set_identity_tokens([ua.AnonymousIdentityToken])
        else:  # asyncua before set_identity_tokens
            server.set_security_IDs(["Anonymous"])
        security = self.config.security
        if security is None:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        else:
            from asyncua.crypto.truststore import TrustStore
            from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions

            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            store = TrustStore([Path(security.trusted)], [])
            # configure() parsed these files: one that fails here was changed since, so it is said in one line too.
            for key, loading in (
                ("certificate", lambda: server.load_certificate(str(security.certificate))),
                ("private_key", lambda: server.load_private_key(str(security.private_key))),
                ("trusted", store.load),
            ):
                try:
                    await loading()
                except Exception as exc:  # asyncua and cryptography raise ValueError, OSError and their own types
                    path = getattr(security, key)
                    raise PlcError(f"security.{key} {path}: cannot load ({one_line(exc)})") from exc
            server.set_certificate_validator(
                CertificateValidator(
                    CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_CLIENT, store
                )
            )
        try:
            await self._add_cameras(server)
        except ua.UaStatusCodeError as exc:  # a node id taken twice: _consistent refuses the case it knows of
            raise PlcError(
                f"OPC UA server {self.config.endpoint}: cannot build the cameras' nodes ({one_line(exc)})"
            ) from exc
        from asyncua.common.callback import CallbackType

        server.subscribe_server_callback(CallbackType.PreWrite, self._screen)
        try:
            await server.start()
        except OSError as exc:
            raise PlcError(f"OPC UA server {self.config.endpoint}: cannot listen ({exc})") from exc
        self.started = True

    async def _add_cameras(self, server: Any) -> None:
        ua = self.ua
        index = await server.register_namespace(self.config.namespace)
        root = await server.nodes.objects.add_object(ua.NodeId(ROOT_NODE, index), f"{index}:{ROOT_NODE}")
        for camera in self.config.cameras:
            folder = await root.add_object(ua.NodeId(camera, index), f"{index}:{camera}")
            nodes = {}
            for name, (browse, kind) in NAMES.items():
                node = await folder.add_variable(
                    ua.NodeId(f"{camera}.{browse}", index),
                    f"{index}:{browse}",
                    _variant(ua, None, kind, self.config).Value,
                    varianttype=getattr(ua.VariantType, kind),
                )
                if name in WRITTEN_BY_PLC:
                    await node.set_writable()
                    self._written_by_plc[node.nodeid] = (camera, name)
                nodes[name] = node
            self.targets[camera] = ServerTarget(self, camera, nodes)
            remembered = self.state.get(camera, {})
            # The PLC sees the id it was last handed (so it, too, can tell a repeat), never a stale ResultValid; and
            # the counters an HMI trends go on from where they were, not from 0 until the next result.
            for name in ("inspection_id", "missed_acks", "sequence_gaps"):
                value = int(remembered.get(name, 0)) & U32
                await nodes[name].write_value(_variant(ua, value, NAMES[name][1], self.config))

    def slots(self) -> list[tuple[str | None, ServerTarget]]:
        return [(camera, target) for camera, target in self.targets.items()]

    async def close(self) -> None:
        if self.started:
            self.started = False
            await self.server.stop()


class ClientTarget:
    """One camera's variables in the PLC's server, written with the data types the PLC declared them with."""

    def __init__(self, link: ClientLink, camera: str) -> None:
        self.link = link
        self.camera = camera
        self.nodes: dict[str, Any] = {}
        self.kinds: dict[str, str] = {}

    async def resolve(self) -> None:
        for name in NAMES:
            text = self.link.config.node_id.format(camera=self.camera, name=NAMES[name][0])
            try:
                node = self.link.client.get_node(text)
                kind = await node.read_data_type_as_variant_type()
            except Exception as exc:  # asyncua raises its own types, ValueError on a malformed id
                if name in OPTIONAL_IN_PLC:
                    continue
                raise PlcError(f"PLC node {text} ({self.camera} {NAMES[name][0]}): {one_line(exc)}") from exc
            kinds, expected = ROLE_KINDS[name]
            if kind.name not in kinds:
                raise PlcError(
                    f"PLC node {text} ({self.camera} {NAMES[name][0]}): data type {kind.name}, expected {expected}"
                )
            await self._check_writable(node, text, name)
            self.nodes[name] = node
            self.kinds[name] = kind.name

    async def _check_writable(self, node: Any, text: str, name: str) -> None:
        """Refuse a variable this session may not write. The bridge writes every one of them, but some only now and
        then (Ack at a stale ack, AlarmReset after a reset, the data at the first result): a refusal then would end
        the bridge with that result unwritten, and the restart would not count it."""
        where = f"PLC node {text} ({self.camera} {NAMES[name][0]})"
        try:
            levels = await node.get_user_access_level()
        except Exception as exc:
            raise PlcError(f"{where}: user access level unreadable ({one_line(exc)})") from exc
        if self.link.ua.AccessLevel.CurrentWrite not in levels:
            shown = "|".join(sorted(level.name for level in levels)) or "none"
            raise PlcError(
                f"{where}: user access level {shown}, expected CurrentWrite for the bridge's session"
                f"{WRITE_REASONS.get(name, '')}"
            )

    @property
    def id_modulus(self) -> int:
        """What InspectionId and Ack hold of a seq: the seq modulo this (the narrower of the two integer types)."""
        moduli = [U32 + 1]
        for name in ("inspection_id", "ack"):
            kind = self.kinds.get(name)
            if kind in _INT_BITS:
                moduli.append(_top(kind) + 1)
        return min(moduli)

    @property
    def heartbeat_modulus(self) -> int:
        """Where the Heartbeat variable wraps: the handshake counts 1..this-1 in it, never 0 (next to an InspectionId of
        0, a Heartbeat of 0 at a restart says that the bridge never wrote to this PLC)."""
        kind = self.kinds.get("heartbeat")
        if kind in _INT_BITS:
            return _top(kind) + 1  # a signed type: its non-negative half, as _value writes it
        # Double: exact up to 2**53, so any wrap will do. It wraps where the server mode's UInt32 Heartbeat does
        # (136 years at a beat a second), so a PLC program that copies it into a UDINT never overflows.
        return U32 + 1

    async def read(self, name: str) -> int:
        node = self.nodes[name]
        try:
            value = await node.read_value()
        except Exception as exc:
            self.link.unanswered |= not isinstance(exc, self.link.ua.UaStatusCodeError)
            raise PlcError(f"PLC read of {node.nodeid.to_string()}: {one_line(exc)}") from exc
        number = _integer(value)
        if number is None:
            # resolve() checked the declared type; a PLC may still hold a value of another (a program changed since)
            shown = repr(value)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise PlcError(
                f"PLC read of {node.nodeid.to_string()} ({self.camera} {NAMES[name][0]}): expected an integer or "
                f"Boolean, got {shown}"
            )
        return number

    async def write(self, fields: dict[str, Any], last: str | None = None) -> None:
        data, flags = _expand(fields)
        flags = {name: value for name, value in flags.items() if name in self.nodes}  # an optional one may be absent
        # A server may apply the items of one Write request in any order (OPC UA Part 4, Write), so a ResultValid
        # that is up goes in a request of its own, after the data and the other flags. One that is down goes with the
        # flags: the PLC has taken that result, and one request is all a stop against a stalled server can send
        # (asyncua refuses every request after one timed out), so TriggerReady falls with it.
        valid = {"result_valid": flags.pop("result_valid")} if "result_valid" in flags else {}
        groups = (data, flags, valid) if valid.get("result_valid") else (data, {**valid, **flags})
        for group in groups:
            if not group:
                continue
            nodes = [self.nodes[name] for name in group]
            values = [self._value(name, value) for name, value in group.items()]
            try:
                await self.link.client.write_values(nodes, values)
            except Exception as exc:
                self.link.unanswered |= not isinstance(exc, self.link.ua.UaStatusCodeError)
                names = ", ".join(NAMES[n][0] for n in group)
                raise PlcError(f"PLC write of {self.camera} {names}: {one_line(exc)}") from exc

    def _value(self, name: str, value: Any):
        ua = self.link.ua
        kind = self.kinds[name]
        if kind in ("Float", "Double"):
            number = _variant(ua, value, "Double", self.link.config).Value
            if kind == "Float":  # a finite score past a Real's range cannot be packed: the PLC gets the largest
                number = min(max(number, -FLOAT_MAX), FLOAT_MAX)
            return ua.Variant(number, getattr(ua.VariantType, kind))
        if kind in ("String", "Boolean"):
            return _variant(ua, value, kind, self.link.config)
        if name == "verdict":  # a numeric Verdict variable gets the result code
            value = {"ok": 0, "defect": 1, "error": 2}.get(value, 2)
        number = 0 if value is None else int(value)
        top = _top(kind)
        number = min(number, top) if name in ("region_count", "result_code") else number & top
        return ua.Variant(number, getattr(ua.VariantType, kind))


_INT_BITS = {
    "SByte": 8,
    "Byte": 8,
    "Int16": 16,
    "UInt16": 16,
    "Int32": 32,
    "UInt32": 32,
    "Int64": 64,
    "UInt64": 64,
}
_INTEGERS = frozenset(_INT_BITS)
_IDS = (_INTEGERS, "an integer type (SByte, Byte, Int16..UInt64): a Float or Double id stops matching its ack")
_FLAGS = (_INTEGERS | {"Boolean"}, "Boolean or an integer type")
_COUNTS = (_INTEGERS | {"Double"}, "an integer type or Double")
# Client mode: the data types a PLC variable may have, by what the bridge writes into it or reads from it. Ids must be
# exact past 2**24 (a Float's limit, reached within days on a fast line); so must counters (a Float heartbeat stops
# moving after 2**24 beats); a Boolean id always reads 1.
ROLE_KINDS: dict[str, tuple[frozenset[str], str]] = {
    "inspection_id": _IDS,
    "ack": _IDS,
    "result_code": _COUNTS,
    "verdict": (_INTEGERS | {"String"}, "String or an integer type (which gets the result code)"),
    # No scale as the Modbus score register has: an integer would read 0 for every score below 1.
    "score": (frozenset({"Float", "Double"}), "Float or Double (an integer type would truncate scores below 1 to 0)"),
    "threshold": (frozenset({"Float", "Double"}), "Float or Double (an integer type would truncate it to 0)"),
    "region_count": _COUNTS,
    "model_id": (frozenset({"String"}), "String"),
    "thresholds_version": _COUNTS,
    "missed_acks": _COUNTS,
    "sequence_gaps": _COUNTS,
    "heartbeat": _COUNTS,
    "alarm_reset": _FLAGS,
    **{flag: _FLAGS for flag in STATUS_FLAGS},
}


def _integer(value: Any) -> int | None:
    """A value read from the PLC as the handshake takes it (ids, flags); None when it is no whole number."""
    if value is None:  # a variable the PLC never set
        return 0
    if isinstance(value, int):  # bool included
        return int(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _written_top(kind: str) -> int:
    """The largest whole number a client may write to a variable of this type (Ack, AlarmReset)."""
    return 1 if kind == "Boolean" else _top(kind)


def _written_form(kind: str) -> str:
    """What a client's write to a variable of this type must be, for the refusal's warning."""
    return f"a scalar {kind}, or a whole number 0..{_written_top(kind)} of an integer type"


def _top(kind: str) -> int:
    """The largest value an integer type holds that the bridge writes (signed ones: never negative)."""
    bits = _INT_BITS[kind]
    return (1 << (bits - 1)) - 1 if kind.startswith("Int") or kind == "SByte" else (1 << bits) - 1


class ClientLink:
    """A session on the PLC's OPC UA server."""

    def __init__(self, config: OpcUaConfig) -> None:
        from asyncua import Client, ua

        self.ua = ua
        self.config = config
        self.client = Client(config.endpoint, timeout=config.request_timeout_ms / 1000)
        self.client.session_timeout = config.session_timeout_ms
        self.client.application_uri = config.application_uri
        self.targets = {camera: ClientTarget(self, camera) for camera in config.cameras}
        self.connected = False
        # A request the server did not answer (a bad status is an answer): it may not answer the goodbye either.
        self.unanswered = False

    async def start(self) -> None:
        security = self.config.security
        try:
            if security is not None:
                from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

                await self.client.set_security(
                    SecurityPolicyBasic256Sha256,
                    str(security.certificate),
                    str(security.private_key),
                    server_certificate=str(security.trusted),
                    mode=self.ua.MessageSecurityMode.SignAndEncrypt,
                )
            await self.client.connect()
        except Exception as exc:
            raise PlcError(f"PLC {self.config.endpoint}: cannot connect ({one_line(exc)})") from exc
        self.connected = True
        for target in self.targets.values():
            await target.resolve()

    def slots(self) -> list[tuple[str | None, ClientTarget]]:
        return [(camera, target) for camera, target in self.targets.items()]

    async def close(self) -> None:
        if self.connected:
            self.connected = False
            if self.unanswered:
                # Closing the session is one more request, which a server that stopped answering makes the stop wait
                # out (past the unit's TimeoutStopSec at a stop's end): the socket is closed without it.
                self.client.disconnect_socket()
                return
            try:
                await self.client.disconnect()
            except Exception:  # the PLC's server is gone already: nothing to say goodbye to
                pass


async def connect(config: OpcUaConfig, args: argparse.Namespace) -> ServerLink | ClientLink:
    link: ServerLink | ClientLink = ServerLink(config) if config.mode == "server" else ClientLink(config)
    try:
        await link.start()
    except BaseException:
        await link.close()
        raise
    return link


def load_opcua_config(path: str | Path) -> OpcUaConfig:
    path = Path(path)
    raw = read_yaml(path, expected="a bridge config file")
    return parse_opcua_config(raw, where=str(path), base_dir=path.resolve().parent)
