"""`inspectd subscribe`: tail the results a daemon publishes, report sequence gaps, optionally save masks.

Also the Python-side subscriber (`Subscriber`, `GapTracker`) that the demo, bridges and tests use, so every consumer
decodes through inspectd.messages and counts gaps the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import zmq

from inspectd.errors import MessageError
from inspectd.messages import Result, decode


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

    def __init__(self, endpoint: str, topic: str = "inspect.", context: zmq.Context | None = None,
                 rcvhwm: int = 10000) -> None:
        self._context = context or zmq.Context.instance()
        self.socket = self._context.socket(zmq.SUB)
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
    line = (f"{result.camera} seq={result.seq} {result.verdict:<6} score={score} regions={len(result.regions)} "
            f"latency={result.latency_ms:.1f}ms frame={result.frame_id}")
    if result.error:
        line += f" error={result.error}"
    return line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", required=True, help="the daemon's publish endpoint, e.g. tcp://127.0.0.1:5555")
    parser.add_argument("--topic", default="inspect.", help="topic prefix to subscribe to [inspect.]")
    parser.add_argument("--count", type=int, default=None, help="exit after this many results")
    parser.add_argument("--json", action="store_true", help="print each message's raw JSON header")
    parser.add_argument("--status", action="store_true", help="also print status messages")
    parser.add_argument("--save-masks", type=Path, default=None, metavar="DIR",
                        help="write each result's mask to DIR/<camera>_<seq>.png")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="stop after S seconds; exit 1 if --count was not reached")


def run(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        print("inspectd subscribe: --count: expected an integer >= 1", file=sys.stderr)
        return 2
    if args.save_masks is not None:
        args.save_masks.mkdir(parents=True, exist_ok=True)
    gaps = GapTracker()
    received = 0
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    try:
        subscriber = Subscriber(args.endpoint, args.topic)
    except zmq.ZMQError as exc:
        print(f"inspectd subscribe: --endpoint {args.endpoint!r}: {exc}", file=sys.stderr)
        return 2
    with subscriber:
        try:
            while args.count is None or received < args.count:
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
                received += 1
                missed = gaps.see(message.camera, message.seq)
                if missed:
                    print(f"gap: {message.camera} missed seq {missed[0]}..{missed[1]} "
                          f"({missed[1] - missed[0] + 1} results)", file=sys.stderr, flush=True)
                if args.save_masks is not None and message.mask_png is not None:
                    (args.save_masks / f"{message.camera}_{message.seq}.png").write_bytes(message.mask_png)
                print(json.dumps(message.header(), separators=(",", ":")) if args.json else format_result(message),
                      flush=True)
        except KeyboardInterrupt:
            pass
    if gaps.missed:
        summary = ", ".join(f"{cam}: {n}" for cam, n in sorted(gaps.missed.items()))
        print(f"inspectd subscribe: {received} results, missed {summary}", file=sys.stderr)
    if args.count is not None and received < args.count:
        print(f"inspectd subscribe: {received} of {args.count} results before the timeout", file=sys.stderr)
        return 1
    return 0
