"""`inspectd subscribe`: tail the results a daemon publishes, report sequence gaps, optionally save masks.

With `--journal DIR` every hole in a camera's seq is filled from the daemon's on-disk journal before the result after
it is delivered, so results come out in order without a duplicate or a hole the journal can fill; `--since SEQ` also
replays everything journalled after SEQ first (a restarting PLC bridge loses nothing).

Also the Python side of subscribing that the demo, bridges, benches and tests use, so every consumer decodes through
inspectd.protocol.messages and counts gaps the same way: `Subscriber` (the socket), `GapTracker` (holes in seq),
`JournalCatchUp` (the journal fill-in, independent of how messages are received, so the asyncio bridge uses it too)
and `CatchUpSubscriber` (a Subscriber with the catch-up, what `inspectd subscribe --journal` runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import zmq

from inspectd.errors import InspectdError, MessageError
from inspectd.protocol.messages import Result, decode

SETTLE_S = 5.0  # longest wait for the subscription to take hold before the journal is read


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


class JournalCatchUp:
    """In-order delivery of a daemon's results, with every hole in a camera's seq filled from its journal.

    Hand it each message as it arrives (`take`); it returns what to deliver now: a result whose seq follows the last
    one delivered for its camera comes alone; one after a hole comes after the missed results read from the journal
    (the daemon journals every result before it publishes it, so a hole a subscriber sees is there unless rotated
    away); one already delivered (the journal and the live stream overlap at start) is dropped. `resume` first
    delivers what was journalled after a known seq. What neither the stream nor the journal had is counted in
    `gaps` (a GapTracker) and returned by `take` as `missed` ranges for the caller to report.

    It does no I/O on sockets, so the blocking `CatchUpSubscriber` and the asyncio PLC bridge share it. Only results
    of topics starting with `topic`, and of `cameras` when given, are read from the journal. Without a `directory`
    it only orders out duplicates and reports holes.
    """

    def __init__(
        self, directory: str | Path | None, topic: str = "inspect.", cameras: Iterable[str] | None = None
    ) -> None:
        self.directory = None if directory is None else Path(directory)
        self.topic = topic
        self.cameras = None if cameras is None else set(cameras)
        self.delivered: dict[str, int] = {}  # camera -> last seq delivered
        self.gaps = GapTracker()
        self.recovered = 0  # results fetched from the journal to fill holes in the live stream
        self.refused = 0  # journal records that did not decode (a result from a newer or broken writer)
        self.missed: list[tuple[str, int, int]] = []  # (camera, first, last) of holes the journal could not fill

    def resume(self, since: int | dict[str, int]) -> list[Result]:
        """Everything journalled after `since` (one seq for every camera, or a seq per camera), camera by camera;
        afterwards every camera counts as delivered up to there. InspectdError when the journal cannot be read."""
        from inspectd.protocol import journal

        if self.directory is None:
            raise InspectdError("resume: no journal directory to replay from")
        wanted = self.cameras if self.cameras is not None else set(journal.cameras(self.directory))
        if isinstance(since, dict):
            wanted = {camera for camera in since if self.cameras is None or camera in self.cameras}
        out: list[Result] = []
        for camera in sorted(wanted):
            last = since[camera] if isinstance(since, dict) else since
            self.delivered[camera] = max(self.delivered.get(camera, last), last)
            self.gaps.last.setdefault(camera, last)  # a hole right after `since` is a gap too
            out += self._deliver(self._journalled(camera, self.delivered[camera], None))
        return out

    def take(self, message: Result | dict[str, Any]) -> list[Result | dict[str, Any]]:
        """What to deliver now that `message` arrived, in order (status messages pass straight through)."""
        if not isinstance(message, Result):
            return [message]
        last = self.delivered.get(message.camera)
        if last is not None and message.seq <= last:
            return []  # delivered already, from the journal
        filled: list[Result] = []
        fills = self.directory is not None and (self.cameras is None or message.camera in self.cameras)
        if fills and last is not None and message.seq > last + 1:
            try:
                filled = self._journalled(message.camera, last, message.seq)
            except InspectdError:
                filled = []  # an unreadable journal leaves the hole a reported gap; the live stream goes on
            self.recovered += len(filled)
        return list(self._deliver([*filled, message]))

    def _journalled(self, camera: str, after: int, before: int | None) -> list[Result]:
        from inspectd.protocol import journal

        assert self.directory is not None, "only called with a journal"
        out = []
        for seq, frames in journal.read_since(self.directory, camera, after):
            if before is not None and seq >= before:
                break
            if not bytes(frames[0]).decode("ascii", "replace").startswith(self.topic):
                continue
            try:
                message = decode(frames)
            except MessageError:
                self.refused += 1
                continue
            if isinstance(message, Result):
                out.append(message)
        return out

    def _deliver(self, results: list[Result]) -> list[Result]:
        for result in results:
            self.delivered[result.camera] = result.seq
            hole = self.gaps.see(result.camera, result.seq)
            if hole is not None:
                self.missed.append((result.camera, *hole))
        return results


class CatchUpSubscriber:
    """A Subscriber whose results come through a JournalCatchUp: in order, holes filled from the journal.

    `start(since)` (optional) waits for the subscription to take hold (the first live message, at most `settle_s`)
    before it reads the journal, so everything journalled after that read is already queued on the socket and
    nothing falls between the journal and the live stream; then `recv` as on a Subscriber.
    """

    def __init__(self, subscriber: Subscriber, catch_up: JournalCatchUp) -> None:
        self.subscriber = subscriber
        self.catch_up = catch_up
        self._ready: deque = deque()

    def start(self, since: int | dict[str, int], settle_s: float = SETTLE_S) -> None:
        try:
            first = self.subscriber.recv(settle_s)
        except MessageError:
            first = None  # malformed, but the subscription is live: that is all this wait is for
        self._ready.extend(self.catch_up.resume(since))
        if first is not None:
            self._ready.extend(self.catch_up.take(first))

    def recv(self, timeout_s: float | None) -> Result | dict[str, Any] | None:
        """The next message to deliver; None when nothing arrives within `timeout_s`. MessageError as Subscriber."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._ready:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            message = self.subscriber.recv(left)
            if message is None:
                return None
            self._ready.extend(self.catch_up.take(message))
            if deadline is not None and time.monotonic() >= deadline and not self._ready:
                return None
        return self._ready.popleft()

    def close(self) -> None:
        self.subscriber.close()


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
        help="the daemon's journal directory (publish.journal.path): holes in seq are filled from it, and --since "
        "replays from it",
    )
    parser.add_argument(
        "--camera",
        action="append",
        default=None,
        metavar="ID",
        help="with --journal: fill in and replay only this camera (repeatable; default every journalled camera)",
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


def run(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        print("inspectd subscribe: --count: expected an integer >= 1", file=sys.stderr)
        return 2
    if args.since is not None and args.journal is None:
        print("inspectd subscribe: --since: expected --journal DIR too (the journal it replays from)", file=sys.stderr)
        return 2
    if args.since is not None and args.since < -1:
        print("inspectd subscribe: --since: expected a seq >= -1 (-1: everything the journal holds)", file=sys.stderr)
        return 2
    if (args.server_key is None) != (args.client_key is None):
        print("inspectd subscribe: --server-key and --client-key: expected both (CurveZMQ) or neither", file=sys.stderr)
        return 2
    if args.journal is not None and not args.journal.is_dir():
        print(f"inspectd subscribe: --journal {args.journal}: expected the daemon's journal directory", file=sys.stderr)
        return 2
    if args.save_masks is not None:
        args.save_masks.mkdir(parents=True, exist_ok=True)
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
    catch_up = JournalCatchUp(args.journal, args.topic, args.camera)
    source: Subscriber | CatchUpSubscriber = subscriber
    if args.journal is not None:
        source = CatchUpSubscriber(subscriber, catch_up)
        if args.since is not None:
            try:
                source.start(args.since, min(SETTLE_S, args.timeout or SETTLE_S))
            except InspectdError as exc:
                subscriber.close()
                print(f"inspectd subscribe: --journal {args.journal}: {exc}", file=sys.stderr)
                return 2
    received = 0
    with subscriber:
        try:
            while args.count is None or received < args.count:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                try:
                    message = source.recv(left)
                except MessageError as exc:
                    print(f"inspectd subscribe: skipped a malformed message: {exc}", file=sys.stderr)
                    continue
                if message is None:
                    continue
                if not isinstance(message, Result):
                    if args.status:
                        print(json.dumps(message, separators=(",", ":")), flush=True)
                    continue
                if source is subscriber:
                    catch_up.take(message)  # no journal: the gap count only
                received += 1
                for camera, first, last in catch_up.missed:
                    print(
                        f"gap: {camera} missed seq {first}..{last} ({last - first + 1} results)",
                        file=sys.stderr,
                        flush=True,
                    )
                catch_up.missed.clear()
                if args.save_masks is not None and message.mask_png is not None:
                    (args.save_masks / f"{message.camera}_{message.seq}.png").write_bytes(message.mask_png)
                print(
                    json.dumps(message.header(), separators=(",", ":")) if args.json else format_result(message),
                    flush=True,
                )
        except KeyboardInterrupt:
            pass
    if catch_up.gaps.missed:
        summary = ", ".join(f"{cam}: {n}" for cam, n in sorted(catch_up.gaps.missed.items()))
        print(f"inspectd subscribe: {received} results, missed {summary}", file=sys.stderr)
    if catch_up.recovered:
        print(
            f"inspectd subscribe: {catch_up.recovered} results missed live were fetched from the journal",
            file=sys.stderr,
        )
    if args.count is not None and received < args.count:
        print(f"inspectd subscribe: {received} of {args.count} results before the timeout", file=sys.stderr)
        return 1
    return 0
