"""`inspectd subscribe`: tail the results a daemon publishes, report sequence gaps, optionally save masks.

With `--since SEQ --journal DIR` it first fetches, from the daemon's on-disk journal, every result after SEQ that
it missed while away, then carries on live without a duplicate or a hole (a restarting PLC bridge loses nothing).

Also the Python-side subscriber (`Subscriber`, `GapTracker`) that the demo, bridges and tests use, so every consumer
decodes through inspectd.protocol.messages and counts gaps the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import zmq

from inspectd.errors import InspectdError, MessageError
from inspectd.protocol.messages import Result, decode


class GapTracker:
    """Per-camera sequence tracking: seq increases by one per frame, so a jump is a loss (slow subscriber, HWM)."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}
        self.missed: dict[str, int] = {}

    def see(self, camera: str, seq: int) -> tuple[int, int] | None:
        """Record `seq`; returns the missing range (first, last) when frames were skipped, else None."""
        last = self.last.get(camera)
        self.last[camera] = seq if last is None else max(last, seq)
        if last is not None and seq > last + 1:
            self.missed[camera] = self.missed.get(camera, 0) + seq - last - 1
            return last + 1, seq - 1
        return None


class Subscriber:
    """A SUB socket connected to a daemon's publish endpoint; `recv` returns decoded messages."""

    def __init__(
        self,
        endpoint: str,
        topic: str = "inspect.",
        context: zmq.Context | None = None,
        rcvhwm: int = 10000,
        curve: Callable[[zmq.Socket], None] | None = None,
    ) -> None:
        self._context = context or zmq.Context.instance()
        self.socket = self._context.socket(zmq.SUB)
        if curve is not None:
            curve(self.socket)  # CurveZMQ client keys (inspectd.protocol.keys.curve_client), before connect
        self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt_string(zmq.SUBSCRIBE, topic)
        self.socket.connect(endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self.socket, zmq.POLLIN)

    def recv(self, timeout_s: float | None) -> Result | dict[str, Any] | None:
        """The next result (Result) or status (dict); None when nothing arrives within `timeout_s`."""
        if not self._poller.poll(None if timeout_s is None else max(0, int(timeout_s * 1000))):
            return None
        return decode(self.socket.recv_multipart())

    def results(self, count: int, timeout_s: float) -> list[Result]:
        """Up to `count` results arriving within `timeout_s` (status messages skipped)."""
        deadline = time.monotonic() + timeout_s
        out: list[Result] = []
        while len(out) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            message = self.recv(left)
            if isinstance(message, Result):
                out.append(message)
        return out

    def close(self) -> None:
        self.socket.close(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_result(result: Result) -> str:
    score = "-" if result.score is None else f"{result.score:.4f}"
    line = (
        f"{result.camera} seq={result.seq} {result.verdict:<6} score={score} regions={len(result.regions)} "
        f"latency={result.latency_ms:.1f}ms frame={result.frame_id}"
    )
    if result.error:
        line += f" error={result.error}"
    return line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", required=True, help="the daemon's publish endpoint, e.g. tcp://127.0.0.1:5555")
    parser.add_argument("--topic", default="inspect.", help="topic prefix to subscribe to [inspect.]")
    parser.add_argument("--count", type=int, default=None, help="exit after this many results")
    parser.add_argument("--json", action="store_true", help="print each message's raw JSON header")
    parser.add_argument("--status", action="store_true", help="also print status messages")
    parser.add_argument(
        "--save-masks",
        type=Path,
        default=None,
        metavar="DIR",
        help="write each result's mask to DIR/<camera>_<seq>.png",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="stop after S seconds; exit 1 if --count was not reached",
    )
    parser.add_argument(
        "--since",
        type=int,
        default=None,
        metavar="SEQ",
        help="first replay every result after SEQ from the journal (--journal), then go live",
    )
    parser.add_argument(
        "--journal",
        type=Path,
        default=None,
        metavar="DIR",
        help="the daemon's journal directory (publish.journal.path), read for --since",
    )
    parser.add_argument(
        "--camera",
        action="append",
        default=None,
        metavar="ID",
        help="with --since: replay only this camera (repeatable; default every journalled camera)",
    )
    parser.add_argument(
        "--server-key",
        type=Path,
        default=None,
        metavar="PATH",
        help="CurveZMQ: the daemon's public key file (with --client-key)",
    )
    parser.add_argument(
        "--client-key",
        type=Path,
        default=None,
        metavar="PATH",
        help="CurveZMQ: this subscriber's .key_secret file, listed in the daemon's allow-list",
    )


SETTLE_S = 5.0  # longest wait for the subscription to take hold before the journal is read


def _replay(directory: Path, cameras: list[str] | None, since: int, topic: str) -> Iterator[Result | dict[str, Any]]:
    """Journalled results after `since`, camera by camera, decoded and checked like live ones."""
    from inspectd.protocol import journal

    for camera in cameras or journal.cameras(directory):
        for _, frames in journal.read_since(directory, camera, since):
            if bytes(frames[0]).decode("ascii", "replace").startswith(topic):
                yield decode(frames)


def run(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        print("inspectd subscribe: --count: expected an integer >= 1", file=sys.stderr)
        return 2
    if (args.since is None) != (args.journal is None):
        print(
            "inspectd subscribe: --since and --journal: expected both (replay from the journal) or neither",
            file=sys.stderr,
        )
        return 2
    if args.since is not None and args.since < -1:
        print("inspectd subscribe: --since: expected a seq >= -1 (-1: everything the journal holds)", file=sys.stderr)
        return 2
    if (args.server_key is None) != (args.client_key is None):
        print("inspectd subscribe: --server-key and --client-key: expected both (CurveZMQ) or neither", file=sys.stderr)
        return 2
    if args.save_masks is not None:
        args.save_masks.mkdir(parents=True, exist_ok=True)
    gaps = GapTracker()
    received = 0
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    try:
        curve = None
        if args.server_key is not None:
            from inspectd.protocol.keys import curve_client

            curve = curve_client(args.server_key, args.client_key)
        subscriber = Subscriber(args.endpoint, args.topic, curve=curve)
    except InspectdError as exc:
        print(f"inspectd subscribe: {exc}", file=sys.stderr)
        return 2
    except zmq.ZMQError as exc:
        print(f"inspectd subscribe: --endpoint {args.endpoint!r}: {exc}", file=sys.stderr)
        return 2
    backlog: list = []  # journalled results (and the first live message) to print before reading the socket again
    with subscriber:
        try:
            if args.since is not None:
                # Subscribe first and wait for the first live message, so every result journalled after the replay
                # below has already been queued for us: nothing falls between the journal and the live stream.
                try:
                    first = subscriber.recv(min(SETTLE_S, args.timeout or SETTLE_S))
                except MessageError:
                    first = None  # malformed, but the subscription is live: that is all this wait is for
                if first is not None:
                    backlog.append(first)
                try:
                    backlog.extend(_replay(args.journal, args.camera, args.since, args.topic))
                except InspectdError as exc:
                    print(f"inspectd subscribe: --journal {args.journal}: {exc}", file=sys.stderr)
                    return 2
                if first is not None:
                    backlog.append(backlog.pop(0))  # the live message goes after the replay
            while args.count is None or received < args.count:
                if backlog:
                    message = backlog.pop(0)
                else:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    try:
                        message = subscriber.recv(left)
                    except MessageError as exc:
                        print(f"inspectd subscribe: skipped a malformed message: {exc}", file=sys.stderr)
                        continue
                if message is None:
                    continue
                if not isinstance(message, Result):
                    if args.status:
                        print(json.dumps(message, separators=(",", ":")), flush=True)
                    continue
                if args.since is not None and message.seq <= gaps.last.get(message.camera, args.since):
                    continue  # printed from the journal already, or not after --since
                if args.since is not None:
                    gaps.last.setdefault(message.camera, args.since)  # a hole right after SEQ is a gap too
                received += 1
                missed = gaps.see(message.camera, message.seq)
                if missed:
                    print(
                        f"gap: {message.camera} missed seq {missed[0]}..{missed[1]} "
                        f"({missed[1] - missed[0] + 1} results)",
                        file=sys.stderr,
                        flush=True,
                    )
                if args.save_masks is not None and message.mask_png is not None:
                    (args.save_masks / f"{message.camera}_{message.seq}.png").write_bytes(message.mask_png)
                print(
                    json.dumps(message.header(), separators=(",", ":")) if args.json else format_result(message),
                    flush=True,
                )
        except KeyboardInterrupt:
            pass
    if gaps.missed:
        summary = ", ".join(f"{cam}: {n}" for cam, n in sorted(gaps.missed.items()))
        print(f"inspectd subscribe: {received} results, missed {summary}", file=sys.stderr)
    if args.count is not None and received < args.count:
        print(f"inspectd subscribe: {received} of {args.count} results before the timeout", file=sys.stderr)
        return 1
    return 0
