"""`inspectd subscribe`: tail the results a daemon publishes, report sequence gaps, optionally save masks.

With `--journal DIR` every hole in a camera's seq is filled from the daemon's on-disk journal before the result after
it is delivered, so results come out in order without a duplicate or a hole the journal can fill; `--since SEQ` also
replays everything journalled after SEQ first (a restarting PLC bridge loses nothing), streamed record by record. A
hole neither fills is reported on stderr as a gap with its reason: `gap: seq 120-340 on cam0 (221 results): rotated
out of the journal` (or: a corrupt record, never journalled, no journal to fill it from).

Also the Python side of subscribing that the demo, bridges, benches and tests use, so every consumer decodes through
inspectd.protocol.messages and counts gaps the same way: `Subscriber` (the socket), `GapTracker` (holes in seq),
`JournalCatchUp` (the journal fill-in, independent of how messages are received, so the asyncio bridge uses it too)
and `CatchUpSubscriber` (a Subscriber with the catch-up, what `inspectd subscribe --journal` runs).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeGuard

import zmq

from inspectd.errors import InspectdError, MessageError
from inspectd.protocol.alarms import status_line
from inspectd.protocol.control import connect_error, no_daemon_took
from inspectd.protocol.keys import HandshakeWatch, Readmission, curve_from_flags, open_watched_sub
from inspectd.protocol.messages import TOPIC_ROOT, Result, decode, printable, subscriptions

WAITING_MOST = 10000  # live messages held while a replay is pulled: Subscriber's default RCVHWM
SETTLE_S = 5.0  # longest wait for the subscription to take hold before the journal is read
WATCH_S = 1.0  # longest a Subscriber (and `inspectd subscribe` for a refused handshake) waits between looks
NOTHING_LISTENS_AFTER = 3  # connects refused in a row (libzmq retries every 100 ms) before the subscriber says so
# A journal found to hold another numbering's results is looked at again at a jump in the live stream at most this
# often: one that another daemon writes changes at every record, and each look may parse a segment.
RECHECK_S = 1.0
# Two status messages are of one daemon run while the start they imply (t - uptime_s) moves less than this: rounding
# and clock slew between two statuses stay far below it, and a restart moves it by the old run's whole uptime.
SAME_RUN_S = 0.5
# After the first malformed message (reported in full), `inspectd subscribe` reports how many more it skipped at most
# this often: a foreign publisher or a newer daemon on the endpoint sends one per result, which would flood stderr.
MALFORMED_EVERY_S = 10.0


class GapTracker:
    """Per-camera sequence tracking: seq increases by one per frame, so a jump is a loss (slow subscriber, HWM).

    A seq at or below the last one seen means the daemon's numbering went back (restarted without its journal, or
    with it wiped): counting restarts at it, so holes in the new numbering are found at once, and the step is listed
    in `backwards` as (camera, previous seq, the lower seq) for the caller to report."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}
        self.missed: dict[str, int] = {}
        self.backwards: list[tuple[str, int, int]] = []

    def see(self, camera: str, seq: int) -> tuple[int, int] | None:
        """Record `seq`; returns the missing range (first, last) when frames were skipped, else None (also where
        the numbering went back: listed in `backwards`)."""
        last = self.last.get(camera)
        self.last[camera] = seq
        if last is not None and seq <= last:
            self.backwards.append((camera, last, seq))
            return None
        if last is not None and seq > last + 1:
            self.missed[camera] = self.missed.get(camera, 0) + seq - last - 1
            return last + 1, seq - 1
        return None

    def lost(self, camera: str, through: int) -> tuple[int, int] | None:
        """Every seq of `camera` up to `through` was published (a status said so), and what did not come is lost:
        the missing range, as `see` returns it, None when nothing is missing or no result of `camera` came yet."""
        last = self.last.get(camera)
        if last is None or through <= last:
            return None
        self.last[camera] = through
        self.missed[camera] = self.missed.get(camera, 0) + through - last
        return last + 1, through


class Subscriber:
    """A SUB socket connected to a daemon's publish endpoint; `recv` returns decoded messages.

    A daemon that refuses its key (revoked, the allow-list emptied) ends the connection for good (keys.Readmission):
    the subscriber then opens a new socket by itself, with backoff, so it hears the daemon again once the key is put
    back. What was published meanwhile never reached it: a hole in seq, as any loss (GapTracker, a journal)."""

    def __init__(
        self,
        endpoint: str,
        topic: str = "inspect.",
        context: zmq.Context | None = None,
        rcvhwm: int = 10000,
        curve: Callable[[zmq.Socket], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._topic, self._rcvhwm, self._curve = topic, rcvhwm, curve
        self._context = context or zmq.Context.instance()
        self._readmission = Readmission()
        self.reopened = 0  # sockets opened in place of one the daemon refused
        self.socket, self._watch = self._open()
        self._watched = time.monotonic()  # when its events were last read
        self._poller = zmq.Poller()
        self._poller.register(self.socket, zmq.POLLIN)

    def _open(self) -> tuple[zmq.Socket, HandshakeWatch]:
        """A SUB socket with this subscriber's options and subscription, watched from before it connects."""
        return open_watched_sub(
            self._context, self.endpoint, self._curve, subscriptions(self._topic), RCVHWM=self._rcvhwm
        )

    def _look(self) -> None:
        """Read the handshake events (which must not pile up); replace a socket the daemon refused when it is due."""
        # What the refused socket still holds (published before the refusal) is read before it is let go.
        if not self._readmission.look(self._watch) or self.socket.poll(0):
            return
        self._readmission.reopened()
        try:
            sock, watch = self._open()
        except zmq.ZMQError:
            return  # the endpoint took a connect before: kept, and tried again at the next wait's end
        self._poller.unregister(self.socket)
        self._watch.close()
        self.socket.close(0)
        self.socket, self._watch = sock, watch
        self._poller.register(sock, zmq.POLLIN)
        self.reopened += 1

    def handshake_failure(self) -> str | None:
        """Why the daemon shuts this subscriber out (a phrase after "the daemon"), None when it lets it in or no
        handshake ended yet: a subscriber it shuts out otherwise just hears nothing. The same phrase through the
        sockets opened in its place, until one is let in."""
        self._look()
        return self._readmission.failure

    def nothing_listens(self) -> bool:
        """Whether the endpoint refused every connection since the last one made (no daemon started there yet, or
        it stopped): libzmq retries in silence, so a subscriber started first would only hear nothing. Three retries
        in a row: libzmq also retries once after a connection it made was closed (a handshake the daemon ended), and
        connects again at once where something listens."""
        self._look()
        return self._watch.connects_refused >= NOTHING_LISTENS_AFTER

    def recv(self, timeout_s: float | None) -> Result | dict[str, Any] | None:
        """The next result (Result) or status (dict); None when nothing arrives within `timeout_s`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            # Waits in slices, looking at the handshake at least once a slice.
            left = WATCH_S if deadline is None else min(WATCH_S, max(0.0, deadline - time.monotonic()))
            ready = self._poller.poll(int(left * 1000))
            now = time.monotonic()
            if not ready or now - self._watched >= WATCH_S:
                self._watched = now
                self._look()
            if ready:
                return decode(self.socket.recv_multipart())
            if deadline is not None and now >= deadline:
                return None

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
        self._watch.close()
        self.socket.close(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Why a hole in a camera's seq could not be filled: what `inspectd subscribe` and the bridge report with the gap.
ROTATED = "rotated out of the journal"
CORRUPT = "corrupt record"
NOT_JOURNALLED = (
    "not in the journal (never journalled: dropped by a full drop_oldest queue, in flight at a daemon crash, or the "
    "journal was off)"
)
NO_JOURNAL = "lost on the way (no journal to fill it from)"
# The same two, where the camera's status said its drop_oldest queue dropped frames lately (a count follows).
QUEUE_DROPPED = (
    "not in the journal (dropped at the daemon's full drop_oldest queue: cameras.{camera}.dropped rose by {n})"
)
NO_JOURNAL_DROPPING = (
    "lost on the way (no journal to fill it from), or dropped at the daemon's full drop_oldest queue "
    "(cameras.{camera}.dropped rose by {n})"
)
# Where the daemon's status said its journal could not write results lately (a count follows): the journal's count is
# of all its cameras, so it names the likely cause without proving it for this camera's hole.
JOURNAL_FAILED = (
    "not in the journal (the daemon's journal could not write results: journal.lost rose by {n}; see journal.error "
    "in its status)"
)
UNDECODABLE = "a journal record that does not decode"
OTHER_NUMBERING = "lost on the way (the journal holds another numbering's results, not filled from it)"
NEW_NUMBERING_UNCHECKED = (
    "lost on the way (a new numbering, shown by a status: not filled from the journal before a live result of it is "
    "checked against it)"
)


@dataclass(frozen=True, kw_only=True)
class _Run:
    """What a station's last status said of one camera: the daemon run, and how many results it had published.
    Keyword-only: eleven fields of like types, which a positional call could swap without a word."""

    station: str
    start: float  # t - uptime_s: the same in every status of one run
    uptime: float
    published: int
    dropped: int  # frames its drop_oldest queue dropped: each took a seq and gets no result
    recent_drops: int  # how many of them in the last two status windows: a hole found now may hold them
    lately: int  # how many of them in the last status window
    clean_from: int | None  # no seq from this one on was dropped by then; None: not known
    journal_lost: int | None  # results its journal could not write (published without a record); None: no journal
    journal_failed: int  # how much that count rose in the last two status windows (the first from the run's start)
    journal_lately: int  # how much it rose in the last status window


class _Window:
    """What came of one camera since its station's last status: results heard live, and how many of the results
    published meanwhile the holes in the stream account for (filled from the journal, or reported)."""

    __slots__ = ("heard", "filled", "unjournalled", "doubtful")

    def __init__(self) -> None:
        self.heard = 0
        self.filled = 0  # journal records delivered: each a published result
        self.unjournalled = 0  # seqs the journal lacks: published only where its writes failed, else never
        self.doubtful = 0  # seqs reported or passed over that may have been published (or dropped at the queue)

    def accounted(self, journal_complete: bool) -> int:
        return self.filled + self.doubtful + (0 if journal_complete else self.unjournalled)


class Gap(NamedTuple):
    """A hole in a camera's seq that neither the live stream nor the journal filled, and why."""

    camera: str
    first: int
    last: int
    reason: str
    # False: only the count (last - first + 1) is known, not the seqs: frames dropped at the daemon's queue took seqs
    # among them. `first` - 1 is the last seq delivered before them.
    exact: bool = True

    def describe(self) -> str:
        count = self.last - self.first + 1
        if not self.exact:
            return (
                f"gap: {count} results after seq {self.first - 1} on {self.camera} never came (their seqs unknown: "
                f"the daemon's queue dropped frames meanwhile): {self.reason}"
            )
        return f"gap: seq {self.first}-{self.last} on {self.camera} ({count} results): {self.reason}"


class JournalCatchUp:
    """In-order delivery of a daemon's results, with every hole in a camera's seq filled from its journal.

    Hand it each message as it arrives (`take`); it yields what to deliver now: a result whose seq follows the last
    one delivered for its camera comes alone; one after a hole comes after the missed results read from the journal
    (the daemon journals every result before it publishes it, so a hole a subscriber sees is there unless rotated
    away); one already delivered (the journal and the live stream overlap at start) is dropped. `resume` first
    yields what was journalled after a known seq. Both read the journal one record at a time as the caller pulls
    (a replay of any length costs one record of memory); a caller pulls one iterator dry before it starts the next.

    What neither the stream nor the journal had is counted in `gaps` (a GapTracker) and listed in `missed` as a Gap
    with its reason (rotated out of the journal, a corrupt record, never journalled) for the caller to report. A live
    seq at or below the previous live seq of its camera means the daemon's numbering went back (restarted without its
    journal, or with it wiped): it is delivered, not dropped as a duplicate, and listed in `backwards`; so is a run's
    first seq where the first status heard of the run shows the last seq delivered to be an earlier run's, above
    every seq this run gave out (`_first_status`).

    A hole after the last result heard (the tail of a burst before the line goes quiet) has no result after it:
    `status` finds it from the daemon's status messages and fills or reports it as `take` does.

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
        self.live: dict[str, int] = {}  # camera -> last seq that came on the live stream
        self.gaps = GapTracker()
        self.recovered = 0  # results fetched from the journal to fill holes in the live stream
        self.refused = 0  # journal records that did not decode (a result from a newer or broken writer)
        self.missed: list[Gap] = []  # holes the journal could not fill, with why
        # (camera, previous seq, the lower seq it went back to: one that came live, or a run's first seq a status shows)
        self.backwards: list[tuple[str, int, int]] = []
        self._why: dict[str, list[str]] = {}  # camera -> what the journal read met since its last delivery
        self._disowned: dict[str, str] = {}  # camera -> why its journal is not read (see `disown`)
        self._runs: dict[str, _Run] = {}  # camera -> what its station's last status said of it
        self._window: dict[str, _Window] = {}  # camera -> what came since its station's last status
        self._counted: dict[str, int] = {}  # camera -> results reported by count only, inside the next hole found
        self._station: dict[str, str] = {}  # camera -> the station of its last live result
        # resume(SEQ) for every camera: one the listing lacked had journalled nothing then, so its stream starts at
        # seq 0, and what it journalled since, before its first live result (a reload added it, the subscription not
        # yet joined), is filled from the journal.
        self._from_zero = False

    def resume(self, since: int | dict[str, int], before: dict[str, int] | None = None) -> Iterator[Result]:
        """Everything journalled after `since` (one seq for every camera, or a seq per camera), camera by camera, read
        as it is pulled, up to the seq in `before` of the cameras it names (a result already heard live, taken after
        the replay: a hole before it is filled then, and one it is the only copy of is not passed over; the caller
        may add to `before` while it pulls); every
        camera counts as delivered up to `since` at once. A camera the listing lacks has journalled nothing yet
        (new since, or added by a reload): its stream starts at seq 0, whatever `since` says. InspectdError
        when there is no journal or its directory cannot be listed."""
        from inspectd.protocol import journal

        if self.directory is None:
            raise InspectdError("resume: no journal directory to replay from")
        listed = set(journal.cameras(self.directory))
        # A named camera the listing lacks has journalled nothing yet, as any other: it starts at seq 0 (take).
        wanted = listed & self.cameras if self.cameras is not None else listed
        if isinstance(since, dict):
            wanted = {camera for camera in since if self.cameras is None or camera in self.cameras}
        else:
            self._from_zero = True
        for camera in wanted:
            last = since[camera] if isinstance(since, dict) else since
            self.delivered[camera] = max(self.delivered.get(camera, last), last)
            self.gaps.last.setdefault(camera, last)  # a hole right after `since` is a gap too
        return self._resume(sorted(wanted), {} if before is None else before)

    def _resume(self, cameras: list[str], before: dict[str, int]) -> Iterator[Result]:
        for camera in cameras:
            for result in self._journalled(camera, self.delivered[camera], before.get(camera)):
                # Looked up again each record: a caller may learn of a live result waiting only as the replay goes.
                if result.seq >= before.get(camera, result.seq + 1):
                    break
                yield self._deliver(result, journalled=True)

    def take(self, message: Result | dict[str, Any]) -> Iterator[Result | dict[str, Any]]:
        """What to deliver now that `message` arrived, in order (status messages pass straight through)."""
        if not isinstance(message, Result):
            yield message
            return
        camera = message.camera
        if self._from_zero and camera not in self.delivered and (self.cameras is None or camera in self.cameras):
            self.delivered[camera] = -1
            self.gaps.last.setdefault(camera, -1)
        previous = self.live.get(camera)
        self.live[camera] = message.seq
        went_back = False
        if previous is not None and message.seq <= previous:
            went_back = True
            self.backwards.append((camera, previous, message.seq))
            self.delivered[camera] = self.gaps.last[camera] = message.seq - 1  # a new numbering starts here
        window = self._window.get(camera)
        if went_back or self._station.get(camera, message.station) != message.station:
            # Another numbering, or another station's camera of that name: what its statuses said tells nothing here.
            self._runs.pop(camera, None)
            window = None
        self._station[camera] = message.station
        last = self.delivered.get(camera)
        if window is not None:
            window.heard += 1
            if previous is not None and last is not None and last > previous and message.seq > previous + 1:
                # Passed over live, delivered from the journal before (a replay ahead of the stream): accounted for.
                window.doubtful += min(message.seq - 1, last) - previous
        if last is not None and message.seq <= last:
            return  # delivered already, from the journal
        if last is not None and message.seq > last + 1:
            yield from self._fill(camera, last, message.seq)
        yield self._deliver(message)

    def status(self, status: dict[str, Any]) -> Iterator[Result]:
        """What a status message lets through: the results it shows were published before it and never came, from
        the journal where it holds them; the rest is a gap in `missed`, as `take` reports one.

        The daemon sends its status on the results' socket, behind every result published before it, with each
        camera's count of results published in this run (`cameras.<id>.published`), and a camera's results go out
        in seq order. So between two statuses of one run heard here, every result the count grew by either came, or
        was lost on the way: lost = the count's growth - the results heard. The holes found between the results
        heard account for some (each hole seq a result filled from the journal, or reported); the rest were
        published after the last result delivered, a tail no later result has shown yet. The journal gives them in
        publish order; without one they are a gap of seqs right after the last one delivered, or of a count only
        where the daemon's queue dropped frames (`cameras.<id>.dropped`), which take seqs and get no result. Where a
        hole's seqs may be either a drop or a loss, they are taken as losses, so the tail is never overstated: no
        gap is reported that a result could still fill. No count is inferred from a status of a run before this
        subscriber heard one, after another station's result under the camera's id, or across a restart (t -
        uptime_s moved, or the count or uptime went back): the first status heard of a run counts from the run's
        own first seq instead, and finds a numbering started anew there (`_first_status`)."""
        station: str = status["station"]
        t, uptime = status.get("t"), status.get("uptime_s")
        if not (_finite(t) and _finite(uptime)):
            return
        start = t - uptime
        journal_status = status.get("journal")
        journal_lost = journal_status.get("lost") if isinstance(journal_status, dict) else None
        if not _count(journal_lost):
            journal_lost = None
        for camera, counters in status["cameras"].items():
            if self._station.get(camera, station) != station:
                continue  # another station's camera of that name: its results are the ones heard
            if self.cameras is not None and camera not in self.cameras:
                continue
            window = self._window.pop(camera, None)
            before = self._runs.pop(camera, None)
            if not isinstance(counters, dict):
                continue
            published, dropped, next_seq = (
                counters.get("published"),
                counters.get("dropped", 0),
                counters.get("next_seq"),
            )
            if not (_count(published) and _count(dropped)):
                continue  # a daemon that does not count them: nothing to go by
            same_run = (
                before is not None
                and before.station == station
                and abs(start - before.start) < SAME_RUN_S
                and uptime >= before.uptime
                and published >= before.published
                and dropped >= before.dropped
            )
            # Every seq the queue dropped by now lies below the next_seq of the status its count last rose at.
            marker = next_seq if _count(next_seq) else None
            if before is None or not same_run:
                recent_drops, lately, clean_from = 0, 0, (0 if dropped == 0 else marker)
                # The journal's count starts at the run's start, as its first window does.
                journal_lately = journal_failed = journal_lost or 0
            else:
                lately = dropped - before.dropped
                recent_drops = lately + before.lately
                clean_from = before.clean_from if dropped == before.dropped else marker
                journal_lately = max(0, (journal_lost or 0) - (before.journal_lost or 0))
                journal_failed = journal_lately + before.journal_lately
            self._runs[camera] = _Run(
                station=station,
                start=start,
                uptime=uptime,
                published=published,
                dropped=dropped,
                recent_drops=recent_drops,
                lately=lately,
                clean_from=clean_from,
                journal_lost=journal_lost,
                journal_failed=journal_failed,
                journal_lately=journal_lately,
            )
            self._window[camera] = _Window()
            if before is None or not same_run:
                first_seq = counters.get("first_seq")
                if camera in self.delivered and _count(first_seq):
                    yield from self._first_status(camera, first_seq, published, dropped, marker)
                continue
            last = self.delivered.get(camera)
            if window is None or last is None:
                continue
            # Results delivered from the journal ahead of the live stream may be among those lost: accounted for.
            ahead = max(0, last - self.live.get(camera, last))
            complete = journal_lost is not None and journal_lost == before.journal_lost and self.fills(camera)
            tail = published - before.published - window.heard - window.accounted(complete) - ahead
            if tail > 0:
                clean = clean_from is not None and last + 1 >= clean_from
                yield from self._lost(camera, tail, clean, marker)

    def _first_status(
        self, camera: str, first_seq: int, published: int, dropped: int, next_seq: int | None
    ) -> Iterator[Result]:
        """The tail lost before the first status heard of a run, which has no earlier status to count from. A run
        numbers its frames from `first_seq` up and, with no frame dropped at its queue, publishes them in that order:
        its last result published is first_seq + published - 1, and every seq after the last one delivered up to
        there went out before this status and did not come. (A result whose publish failed took a seq without
        counting as published: the tail is then understated, never overstated.) Seqs below first_seq are an earlier
        run's: what came of them the next result shows.

        A last seq heard live at or above the run's `next_seq` is no seq of this run either (one replayed from the
        journal by --since may be ahead of a status queued before it, and says nothing): the run has not given it
        out (a daemon restarted without its journal numbers from 0 again). Between first_seq + published - 1 and
        next_seq it could be (a failed publish takes a seq), so that alone does not decide. Then no result of this
        run came (the first would have gone back), and each of the `published` went out and did not come: a new
        numbering, its results reported lost at once, by count where its queue dropped frames."""
        last = self.delivered[camera]
        heard = self.live.get(camera)  # a seq heard live came before this status; one from the journal may not have
        if next_seq is not None and heard is not None and heard >= next_seq:
            yield from self._numbered_anew(camera, first_seq, published, dropped == 0, next_seq)
            return
        if dropped or last + 1 < first_seq:
            return
        tail = first_seq + published - 1 - last
        if tail > 0:
            yield from self._lost(camera, tail, True, next_seq)

    def _numbered_anew(
        self, camera: str, first_seq: int, published: int, clean: bool, next_seq: int | None
    ) -> Iterator[Result]:
        """A status shows `camera` numbering anew from `first_seq`, with none of its `published` results heard: the
        numbering moves to it as at a live seq that goes back, and the results are lost (`_lost`)."""
        self.backwards.append((camera, self.delivered[camera], first_seq))
        self.renumbered(camera, first_seq)
        # The next live result is measured against this numbering; the old one's results reported by count lie in
        # no hole it will find.
        self.live.pop(camera, None)
        self._counted.pop(camera, None)
        if self.fills(camera) or self.disowned(camera):
            # Nothing says whose its records are (a journal the daemon no longer writes holds the old numbering's
            # under the same seqs), and no live result of this numbering came to check it against: not read for it
            # until one does (CatchUpSubscriber).
            self.disown(camera, NEW_NUMBERING_UNCHECKED)
        if published:
            yield from self._lost(camera, published, clean, next_seq)

    def _lost(self, camera: str, count: int, clean: bool, next_seq: int | None) -> Iterator[Result]:
        """`count` results of `camera` published after the last one delivered never came: the first `count` the
        journal holds after it and within the status's seqs where it can give them, the rest a gap (of seqs where
        `clean`: no seq after the last delivered was dropped at the queue).

        A journal that could not write some of them holds results published after the status next: taken here,
        such a one would be delivered again when it comes live, as a seq gone back. So only seqs the status
        covers are read: where `clean`, the tail is exactly the `count` seqs after the last delivered; otherwise
        those below the status's `next_seq`, where it gives one (a frame still queued at the status is below it
        too, and may be taken: its seq is unknown among the drops)."""
        last = self.delivered[camera]
        if self.fills(camera):
            bound = last + count + 1 if clean else next_seq
            for result in self._journalled(camera, last, bound):
                previous = self.delivered[camera]
                self.recovered += 1
                yield self._deliver(result, journalled=True, window=False)
                count -= 1
                if clean:
                    count -= result.seq - previous - 1  # published without a record: lost, among those counted
                if count <= 0:
                    break
            if count > 0 and not clean:
                # Which of the seqs it lacks were drops and which were published without a record, it cannot tell.
                self._why.pop(camera, None)
                count = 0
        else:
            yield from self._fill(camera, last, last + 1)  # nothing to fill from: notes why the gap stays
        last = self.delivered[camera]
        why = self._why.pop(camera, [])
        if count > 0 and clean:
            hole = self.gaps.lost(camera, last + count)
            if hole is not None:
                self.missed.append(Gap(camera, *hole, self._reason(camera, why)))
            self.delivered[camera] = last + count
        elif count > 0:
            self.gaps.missed[camera] = self.gaps.missed.get(camera, 0) + count
            self._counted[camera] = self._counted.get(camera, 0) + count
            self.missed.append(Gap(camera, last + 1, last + count, self._reason(camera, why), exact=False))
        # A later result at or below what was delivered is a new numbering (`take` says so), not a duplicate.
        self.live[camera] = max(self.live.get(camera, self.delivered[camera]), self.delivered[camera])

    def _fill(self, camera: str, after: int, before: int) -> Iterator[Result]:
        """The journalled results of `camera` after `after` and before `before`, where its holes are filled from the
        journal; otherwise why the hole stays."""
        if camera in self._disowned:
            self._why.setdefault(camera, []).append(self._disowned[camera])
        elif self.directory is not None and (self.cameras is None or camera in self.cameras):
            for result in self._journalled(camera, after, before):
                self.recovered += 1
                yield self._deliver(result, journalled=True)
        else:
            self._why.setdefault(camera, []).append(NO_JOURNAL)

    def renumbered(self, camera: str, seq: int) -> None:
        """`camera`'s numbering starts again at `seq`, at or below what counts as delivered (a reader that resumed
        after a seq this numbering never reached): deliver from `seq` on, as after a live seq that went back."""
        self.delivered[camera] = self.gaps.last[camera] = seq - 1
        self._why.pop(camera, None)

    def fills(self, camera: str) -> bool:
        """Whether holes of `camera` are filled from a journal (there is one, for this camera, not disowned)."""
        return (
            self.directory is not None
            and (self.cameras is None or camera in self.cameras)
            and camera not in self._disowned
        )

    def disowned(self, camera: str) -> bool:
        return camera in self._disowned

    def unchecked(self, camera: str) -> bool:
        """Whether `camera`'s journal is not read only because a status showed a new numbering that no live result
        has checked it against yet."""
        return self._disowned.get(camera) == NEW_NUMBERING_UNCHECKED

    def reads(self, message: Result | dict[str, Any]) -> bool:
        """Whether pulling `take(message)` may read the journal (a hole before it to fill): a caller that must not
        block pulls it elsewhere. Never False where it reads."""
        if not isinstance(message, Result) or not self.fills(message.camera):
            return False
        last = self.delivered.get(message.camera)
        return last is not None and message.seq > last + 1

    def disown(self, camera: str, reason: str | None) -> None:
        """Fill no hole of `camera` from the journal, each one a gap for `reason` (its records are not this
        numbering's: the caller found another result under a live seq); None reads it again."""
        if reason is None:
            self._disowned.pop(camera, None)
        else:
            self._disowned[camera] = reason

    def held(self, camera: str, seq: int) -> tuple[str, float] | None:
        """(frame id, capture time) of the result the journal holds for `camera` under `seq`, read even where disowned:
        what a live result is checked against. None where it holds none, or it cannot be read."""
        from inspectd.protocol import journal

        if self.directory is None:
            return None
        try:
            journal.check_camera(camera)
            for found, frames in journal.read_since(self.directory, camera, seq - 1, on_corrupt=lambda *_: None):
                message = decode(frames) if found == seq else None
                if isinstance(message, Result):
                    return message.frame_id, message.t_capture
                break
        except (InspectdError, OSError):  # MessageError among them: a record that does not decode tells nothing
            pass
        return None

    def oldest(self, camera: str) -> int | None:
        """The first seq the journal holds for `camera`, None without a record of it or where it cannot be read."""
        return self._end(camera, newest=False)

    def newest(self, camera: str) -> int | None:
        """The last seq the journal holds for `camera`, None without a record of it or where it cannot be read."""
        return self._end(camera, newest=True)

    def _end(self, camera: str, newest: bool) -> int | None:
        from inspectd.protocol import journal

        if self.directory is None:
            return None
        try:
            journal.check_camera(camera)
            return (journal.newest_seq if newest else journal.oldest_seq)(self.directory, camera)
        except (InspectdError, OSError):
            return None

    def signature(self, camera: str) -> tuple[str, int, int] | None:
        """(name, size, change time) of `camera`'s newest journal segment: what changes whenever a record is appended.
        None without one."""
        from inspectd.protocol import journal

        if self.directory is None:
            return None
        try:
            journal.check_camera(camera)
            segments = journal.segment_files(self.directory / camera)
            if not segments:
                return None
            stat = segments[-1][1].stat()
        except (InspectdError, OSError):
            return None
        return segments[-1][1].name, stat.st_size, stat.st_mtime_ns

    def journalled(self, camera: str, after: int, most: int) -> list[int]:
        """The first `most` seqs of `camera` the journal holds after `after` ([] without a journal, or one disowned
        for this camera)."""
        from inspectd.protocol import journal

        seqs: list[int] = []
        if self.directory is None or camera in self._disowned:
            return seqs
        try:
            for seq, _ in journal.read_since(self.directory, camera, after, on_corrupt=lambda *_: None):
                seqs.append(seq)
                if len(seqs) >= most:
                    break
        except (InspectdError, OSError):
            pass
        return seqs

    def skip(self, camera: str, before: int) -> None:
        """Give up on what lies between the last delivered result of `camera` and seq `before` (a reader too far
        behind): no hole to fill or report there; whoever skips says so."""
        self.delivered[camera] = max(self.delivered.get(camera, before - 1), before - 1)
        self.gaps.last[camera] = max(self.gaps.last.get(camera, before - 1), before - 1)
        self._why.pop(camera, None)

    def _journalled(self, camera: str, after: int, before: int | None) -> Iterator[Result]:
        """The journalled results of `camera` after `after` (and before `before`), one record read at a time; what
        the read meets on the way (a rotated segment, a corrupt stretch, an unreadable journal) is noted as the
        reason for the hole it leaves."""
        from inspectd.protocol import journal

        assert self.directory is not None, "only called with a journal"

        def why(reason: str) -> None:  # looked up each time: a delivery hands the camera's list over and starts anew
            self._why.setdefault(camera, []).append(reason)

        def undecodable(cause: str) -> None:
            # Once per hole: a newer writer's records all fail alike, and a reason per record would flood the line.
            if not any(reason.startswith(UNDECODABLE) for reason in self._why.get(camera, ())):
                why(f"{UNDECODABLE} ({cause})")

        try:
            records = journal.read_since(
                self.directory,
                camera,
                after,
                on_corrupt=lambda *_: why(CORRUPT),
                on_rotated=lambda _: why(ROTATED),
            )
            for seq, frames in records:
                if before is not None and seq >= before:
                    return
                if camera in self._disowned:  # disowned while this read went on (a caller that keeps pulling)
                    why(self._disowned[camera])
                    return
                if not frames:  # no message at all (the reader refuses such records; one must not end a replay)
                    self.refused += 1
                    undecodable("an empty record")
                    continue
                if not bytes(frames[0]).decode("ascii", "replace").startswith(self.topic):
                    continue
                try:
                    message = decode(frames)
                except MessageError as exc:
                    self.refused += 1
                    undecodable(str(exc))
                    continue
                if isinstance(message, Result):
                    yield message
        except (InspectdError, OSError) as exc:
            # The hole stays a reported gap with this reason; the live stream goes on.
            why(f"journal unreadable ({exc})")

    def _deliver(self, result: Result, journalled: bool = False, window: bool = True) -> Result:
        """Hand `result` on, counting it and the hole before it in the window of its station's last status where
        `window` (not for the tail a status shows: that is counted already)."""
        camera = result.camera
        self.delivered[camera] = result.seq
        hole = self.gaps.see(camera, result.seq)
        why = self._why.pop(camera, [])
        counts = self._window.get(camera) if window else None
        if counts is not None and journalled:
            counts.filled += 1
        if hole is not None:
            size = hole[1] - hole[0] + 1
            if counts is not None:
                if why or not self.fills(camera):
                    counts.doubtful += size
                else:
                    counts.unjournalled += size
            reason = self._reason(camera, why)
            counted = min(self._counted.pop(camera, 0), size)
            if counted:
                # Reported by count at a status already: only their seqs are new.
                self.gaps.missed[camera] -= counted
                reason += f" ({counted} of them reported before by count)"
            self.missed.append(Gap(camera, *hole, reason))
        return result

    def _reason(self, camera: str, why: list[str]) -> str:
        """Why a hole stays: what the journal read met, else what the camera's last statuses say of its queue and of
        the daemon's journal."""
        run = self._runs.get(camera)
        drops = 0 if run is None else run.recent_drops
        if self.directory is not None and not why:
            failed = 0 if run is None else run.journal_failed
            causes = [QUEUE_DROPPED.format(camera=camera, n=drops)] if drops else []
            causes += [JOURNAL_FAILED.format(n=failed)] if failed else []
            return "; ".join(causes) or NOT_JOURNALLED
        if drops and why in ([], [NO_JOURNAL]):
            return NO_JOURNAL_DROPPING.format(camera=camera, n=drops)
        return "; ".join(dict.fromkeys(why)) or NO_JOURNAL


def _count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class CatchUpSubscriber:
    """A Subscriber whose results come through a JournalCatchUp: in order, holes filled from the journal.

    `start(since)` (optional) waits for the subscription to take hold (the first live message, at most `settle_s`)
    before it reads the journal, so everything journalled after that read is already queued on the socket and
    nothing falls between the journal and the live stream; then `recv` as on a Subscriber. The replay is pulled one
    result per `recv`: live messages are read off the socket meanwhile (up to WAITING_MOST held, then they wait on
    it), each camera's replay stops below its first of them, and any the socket's limit drops are a hole the
    journal fills when the replay is done.

    The daemon journals each result before it publishes it, so each camera's first live result (and its first after
    the numbering goes back, or after a status showed it start anew) is looked up in the journal: one that holds
    another result under its seq, or starts past it (for a camera's first live result: started past it when `start`
    began, as that result may have waited behind the replay while rotation took it from the daemon's own journal),
    or (after such a status) lacks it, is a journal of another numbering (a daemon that restarted
    without it; a copy), whose records are other parts' verdicts. No hole of that camera is filled from it (each is a
    gap), a replay of it not yet pulled stops, and what the replay delivered counts for nothing: the live stream is
    delivered from that result on. (After such a status the journal is not read for the camera until that check.)
    While disowned, it is looked at again at a jump in the live stream (where something was journalled since, at most
    every RECHECK_S), and filled from again once it holds a live result. A first live seq at or below `since` is a
    numbering started anew too, and delivered. `start` waits up to `settle_s` for a first result, so that its camera
    is checked before its replay; the other cameras' replays come before their first results, unchecked until then.
    What the checks find is listed in `notices`, one line each, for the caller to report.

    Only results of the catch-up's `cameras`, when it names some, are delivered or counted; each status message
    comes after what it shows was published and never came (JournalCatchUp.status). Without a journal directory it
    orders out nothing and reports the holes: what `inspectd subscribe` runs without --journal.
    """

    def __init__(self, subscriber: Subscriber, catch_up: JournalCatchUp) -> None:
        self.subscriber = subscriber
        self.catch_up = catch_up
        self.notices: list[str] = []
        self._pending: Iterator[Result | dict[str, Any]] = iter(())
        self._since: int | dict[str, int] | None = None
        self._checked: set[str] = set()  # cameras whose journal was checked against a live result
        self._signature: dict[str, tuple[str, int, int] | None] = {}  # camera -> its disowned journal, last looked at
        self._looked: dict[str, float] = {}  # camera -> when its disowned journal was last looked at
        # camera -> the first seq its journal held when `start` began (None: no record of it then), before any live
        # result could wait behind the replay: what its first live result is checked against (`_check`).
        self._started: dict[str, int | None] = {}
        self._listed = False  # `start` listed the journal: a camera it did not list had no record then
        self._first_checked: set[str] = set()  # cameras checked since `start`
        # Live messages read off the socket while the replay is pulled (a malformed one as its MessageError), taken
        # after it; each camera's replay stops below its first result among them (`_replaying`).
        self._waiting: collections.deque[Result | dict[str, Any] | MessageError] = collections.deque()
        self._bounds: dict[str, int] = {}

    def start(
        self, since: int | dict[str, int], settle_s: float = SETTLE_S, on_malformed: Callable[[str], None] | None = None
    ) -> None:
        # Any message says the subscription took hold; a result, within settle_s, lets its camera's journal be
        # checked before anything of it is replayed (status comes every second, before a quiet line's next part).
        # A malformed one is skipped, handed to `on_malformed` (its one-line error) to be counted.
        self._started = self._journal_starts()
        self._listed = True
        deadline = time.monotonic() + settle_s
        heard: list[Result | dict[str, Any]] = []
        while not heard or not isinstance(heard[-1], Result):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                message = self.subscriber.recv(left)
            except MessageError as exc:
                if on_malformed is not None:
                    on_malformed(str(exc))
                continue  # malformed, but the subscription is live
            if message is None:
                break
            heard.append(message)
        self._since = since
        first = heard[-1] if heard and isinstance(heard[-1], Result) else None
        # Its camera's replay stops below it: what the journal holds from it on comes live, behind it.
        self._bounds = {} if first is None else {first.camera: first.seq}
        replay = self.catch_up.resume(since, self._bounds)
        # Checked now, before the replay is pulled: a journal of another numbering replays nothing of this camera.
        self._pending = itertools.chain(self._replaying(replay), *(self._take(message) for message in heard))

    def _replaying(self, replay: Iterator[Result]) -> Iterator[Result]:
        """The replay, with what waits on the socket read off before each record. A camera's replay that starts late
        may find the journal rotated past the live results waiting for it: bounded below the first of them, it
        leaves them to be delivered after it (the hole before them filled or reported then), not passed over as
        delivered already."""
        while True:
            self._read_waiting()
            result = next(replay, None)
            if result is None:
                return
            yield result

    def _read_waiting(self) -> None:
        # At most the socket's own limit is held here: past it the socket holds (or drops) the rest, as without.
        while len(self._waiting) < WAITING_MOST:
            try:
                message = self.subscriber.recv(0)
            except MessageError as exc:
                self._waiting.append(exc)
                continue
            if message is None:
                return
            self._waiting.append(message)
            if isinstance(message, Result):
                self._bounds.setdefault(message.camera, message.seq)

    def _journal_starts(self) -> dict[str, int | None]:
        """The first seq the journal holds now for each of the catch-up's cameras it has ({} where it cannot be
        listed: `resume` says why)."""
        from inspectd.protocol import journal

        catch_up = self.catch_up
        if catch_up.directory is None:
            return {}
        try:
            listed = journal.cameras(catch_up.directory)
        except (InspectdError, OSError):
            return {}
        return {c: catch_up.oldest(c) for c in listed if catch_up.cameras is None or c in catch_up.cameras}

    def recv(self, timeout_s: float | None) -> Result | dict[str, Any] | None:
        """The next message to deliver; None when nothing arrives within `timeout_s`. MessageError as Subscriber."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            ready = next(self._pending, None)
            if ready is not None:
                return ready
            if self._waiting:
                waiting = self._waiting.popleft()
                if isinstance(waiting, MessageError):
                    raise waiting
                message: Result | dict[str, Any] | None = waiting
            else:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                message = self.subscriber.recv(left)
            if message is None:
                return None
            self._pending = self._take(message)
            if deadline is not None and time.monotonic() >= deadline:
                return next(self._pending, None)

    def _take(self, message: Result | dict[str, Any]) -> Iterator[Result | dict[str, Any]]:
        """What the catch-up delivers for `message`, its journal checked first where due."""
        if not isinstance(message, Result):
            return self._status(message)
        cameras = self.catch_up.cameras
        if cameras is not None and message.camera not in cameras:
            return iter(())
        return self._taking(message, self._check(message))

    def _status(self, status: dict[str, Any]) -> Iterator[Result | dict[str, Any]]:
        yield from self.catch_up.status(status)
        yield status

    def _taking(self, message: Result | dict[str, Any], again: bool) -> Iterator[Result | dict[str, Any]]:
        yield from self.catch_up.take(message)
        if again and isinstance(message, Result):
            # Only now: the hole before this result lay in the other numbering's records, a gap, not filled from them.
            self.catch_up.disown(message.camera, None)

    def _check(self, result: Result) -> bool:
        """Look `result` up in the journal where due; True where the journal, disowned, holds it again."""
        catch_up = self.catch_up
        camera, seq = result.camera, result.seq
        if not catch_up.fills(camera) and not catch_up.disowned(camera):
            return False
        previous = catch_up.live.get(camera)
        unchecked = catch_up.unchecked(camera)
        if (previous is not None and seq <= previous) or unchecked:
            # The daemon numbers anew (take() tells it, or a status did): its journal is checked again.
            self._checked.discard(camera)
        if camera in self._checked:
            now = time.monotonic()
            jump = seq > catch_up.delivered.get(camera, seq) + 1
            if not (jump and catch_up.disowned(camera)) or now < self._looked.get(camera, 0.0) + RECHECK_S:
                return False
            self._looked[camera] = now
            signature = catch_up.signature(camera)
            if signature == self._signature.get(camera):
                return False  # nothing journalled since the last look
            self._signature[camera] = signature
        self._checked.add(camera)
        journal = catch_up.directory
        held = catch_up.held(camera, seq)
        # At the first check since `start`, the result may have waited on the socket behind the whole replay while
        # the line went on and rotation took it from this numbering's own journal: a journal that starts past it now
        # proves nothing, one that started past it before it could have waited does.
        # A camera with no journal when `start` listed it has had only this numbering's records written since (its
        # first live result may have waited behind the replay all the same): where its journal starts tells nothing.
        # -1: not listed then.
        unknown = self._listed and camera not in self._first_checked
        self._first_checked.add(camera)
        started = self._started.pop(camera, None if unknown else -1)
        oldest = (lambda: catch_up.oldest(camera)) if started == -1 else (lambda: started)
        other = None
        if held is not None and held != (result.frame_id, result.t_capture):
            other = f"frame {printable(held[0])} there, {printable(result.frame_id)} live"
        elif held is None and unchecked:
            # The daemon journals each result before it publishes it: a journal of this numbering holds this one.
            other = "not there"
        elif held is None and (start := oldest()) is not None and start > seq:
            # The current numbering's journal holds this result (journalled before it was published), and rotation
            # takes the oldest first: one that starts past it is an old numbering whose low seqs were rotated away.
            # (A hole of its own, a record lost while its disk failed, lies above its start.)
            other = f"not there, the journal starts at {start}"
        if other is not None:
            if not catch_up.disowned(camera) or unchecked:
                self._signature[camera] = catch_up.signature(camera)
                catch_up.disown(camera, OTHER_NUMBERING)
                if seq <= catch_up.delivered.get(camera, seq):
                    catch_up.renumbered(camera, seq)  # what counted as delivered came from that journal
                self.notices.append(
                    f"journal {journal} holds another numbering's results for {camera} (seq {seq}: {other}): "
                    f"nothing more of {camera} is read from it (any replay of this camera from it was another "
                    "numbering's; holes are gaps) until it holds a live result again"
                )
            return False
        if unchecked:
            catch_up.disown(camera, None)  # this numbering's: a hole before this result is filled from it
            return False
        if held is not None and catch_up.disowned(camera):
            self.notices.append(f"journal {journal} holds {camera}'s live results again from seq {seq}")
            return True
        since = self._since.get(camera) if isinstance(self._since, dict) else self._since
        if previous is None and since is not None and seq <= since:
            # The daemon publishes each seq once, this one after the subscription took hold: either `since` lies past
            # this numbering's end or it was taken from another numbering. Dropped as delivered otherwise, every
            # result up to `since`.
            catch_up.renumbered(camera, seq)
            if held is not None:
                # The journal holds this live result, so it is this numbering's: `since` lies past it, whether
                # mistyped or taken from a numbering since wiped; a restart is not what the journal shows.
                newest = catch_up.newest(camera)
                self.notices.append(
                    f"--since {since} is past {camera}'s numbering (journal newest "
                    f"{seq if newest is None else newest}): delivered from seq {seq}"
                )
            else:
                self.notices.append(
                    f"seq {seq} on {camera} is at or below --since {since}: the daemon numbers anew (restarted "
                    "without its journal, or it was wiped); delivered from here on"
                )
        return False

    def close(self) -> None:
        self.subscriber.close()


def format_result(result: Result) -> str:
    # The producer names the frame (a file name, any JSON string): one with a newline would forge a result line, one
    # with escape codes steer the terminal, a lone surrogate (a Python producer's undecodable file name) fail the
    # UTF-8 write. Imported at the first call: a client has no other use for the daemon's ingest package.

    score = "-" if result.score is None else f"{result.score:.4f}"
    line = (
        f"{result.camera} seq={result.seq} {result.verdict:<6} score={score} regions={len(result.regions)} "
        f"latency={result.latency_ms:.1f}ms frame={printable(result.frame_id)}"
    )
    if result.error:
        line += f" error={printable(result.error)}"
    return line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", required=True, help="the daemon's publish endpoint, e.g. tcp://127.0.0.1:5556")
    parser.add_argument("--topic", default="inspect.", help="topic prefix to subscribe to [inspect.]")
    parser.add_argument("--count", type=int, default=None, help="exit after this many results")
    parser.add_argument("--json", action="store_true", help="print each message's raw JSON header")
    parser.add_argument(
        "--status", action="store_true", help="also print each status message (one line; its raw JSON with --json)"
    )
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
        help="only this camera's results: printed, counted and checked for gaps, and with --journal filled in and "
        "replayed (repeatable; default every camera)",
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


class MalformedCount:
    """The malformed messages `inspectd subscribe` skipped: the first reported in full, then how many more came,
    at most once every `every_s`, each time with the last one's error, and what is left of the count at the end.
    Each method returns the line to write, None when none is due."""

    def __init__(self, every_s: float = MALFORMED_EVERY_S) -> None:
        self.every_s = every_s
        self.total = 0
        self._unreported = 0
        self._last_error = ""
        self._reported_at = 0.0

    def skipped(self, error: str, now: float) -> str | None:
        self.total += 1
        if self.total == 1:
            self._reported_at = now
            return f"inspectd subscribe: skipped a malformed message: {error}"
        self._unreported += 1
        self._last_error = error
        return self.due(now)

    def due(self, now: float) -> str | None:
        """The count, where some are unreported and the last line is `every_s` old."""
        return self.rest(now) if now - self._reported_at >= self.every_s else None

    def rest(self, now: float) -> str | None:
        if not self._unreported:
            return None
        line = (
            f"inspectd subscribe: skipped {self._unreported} more malformed messages ({self.total} in all; the last: "
            f"{self._last_error})"
        )
        self._unreported, self._reported_at = 0, now
        return line


def _save_mask(path: Path, png: bytes, reported: set[str]) -> None:
    """Write one mask picture; a failure is reported once per cause and never stops the results, which matter more."""
    try:
        path.write_bytes(png)
    except OSError as exc:
        cause = exc.strerror or type(exc).__name__
        if cause not in reported:
            reported.add(cause)
            print(
                f"inspectd subscribe: --save-masks: cannot write {path} ({cause}); masks with this error are not saved,"
                " results still printed",
                file=sys.stderr,
                flush=True,
            )


def run(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        print("inspectd subscribe: --count: expected an integer >= 1", file=sys.stderr)
        return 2
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        print(f"inspectd subscribe: --timeout {args.timeout}: expected a number of seconds > 0", file=sys.stderr)
        return 2
    if args.since is not None and args.journal is None:
        print("inspectd subscribe: --since: expected --journal DIR too (the journal it replays from)", file=sys.stderr)
        return 2
    from engines.schema import show
    from inspectd.protocol.archive import camera_id_problem
    from inspectd.protocol.endpoints import connect_endpoint_problem

    # As the daemon's config checks them: what it could not be configured with would only be waited on in silence
    # (a tcp port above 65535 libzmq cuts to 16 bits, and connects to whatever listens there).
    problem = connect_endpoint_problem(args.endpoint, show)
    if problem is not None:
        print(f"inspectd subscribe: --endpoint: {problem}", file=sys.stderr)
        return 2
    for camera in args.camera or ():
        problem = camera_id_problem(camera, show(camera))
        if problem is not None:
            print(f"inspectd subscribe: --camera: {problem}", file=sys.stderr)
            return 2
    problem = topic_problem(args.topic, args.camera or ())
    if problem is not None:
        print(f"inspectd subscribe: {problem}", file=sys.stderr)
        return 2
    if args.since is not None and args.since < -1:
        print("inspectd subscribe: --since: expected a seq >= -1 (-1: everything the journal holds)", file=sys.stderr)
        return 2
    if args.journal is not None:
        from inspectd.protocol import journal

        try:
            # Up front: otherwise every hole would only be reported as unfillable, one gap line at a time.
            journal.check_readable(args.journal, args.camera)
        except InspectdError as exc:
            print(f"inspectd subscribe: {exc}", file=sys.stderr)
            return 2
    if args.save_masks is not None:
        try:
            args.save_masks.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(
                f"inspectd subscribe: --save-masks {args.save_masks}: cannot create it ({exc.strerror}), "
                "expected a directory it may write to",
                file=sys.stderr,
            )
            return 2
    mask_failures: set[str] = set()  # the causes already reported, so a full disk prints one line, not one per result
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    try:
        curve = curve_from_flags(args.server_key, args.client_key)
        subscriber = Subscriber(args.endpoint, args.topic, curve=curve)
    except InspectdError as exc:
        print(f"inspectd subscribe: {exc}", file=sys.stderr)
        return 2
    except zmq.ZMQError as exc:
        print(f"inspectd subscribe: {connect_error('--endpoint', args.endpoint, exc)}", file=sys.stderr)
        return 2
    catch_up = JournalCatchUp(args.journal, args.topic, args.camera)
    # Without a journal the catch-up fills nothing: it filters the cameras and finds the holes, as with one.
    source = CatchUpSubscriber(subscriber, catch_up)
    malformed = MalformedCount()
    if args.since is not None:
        try:
            # At most half of --timeout: the wait for a first result must not use up the replay it is for.
            source.start(
                args.since,
                SETTLE_S if args.timeout is None else min(SETTLE_S, args.timeout / 2),
                lambda error: _say(malformed.skipped(error, time.monotonic())),
            )
        except InspectdError as exc:
            subscriber.close()
            print(f"inspectd subscribe: --journal {args.journal}: {exc}", file=sys.stderr)
            return 2
        except BaseException:  # Ctrl-C, SIGTERM: what it skipped meanwhile is counted at exit, as in the loop below
            subscriber.close()
            _say(malformed.rest(time.monotonic()))
            raise
    received = 0
    refused: str | None = None  # the handshake failure reported, until a message comes: once per outage
    absent = False  # nothing listening reported, until a message comes: once per outage
    try:
        with subscriber:
            while args.count is None or received < args.count:
                # Looked at each pass (at least every WATCH_S): a flood that stops is counted without a next one.
                _say(malformed.due(time.monotonic()))
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                try:
                    message = source.recv(WATCH_S if left is None else min(left, WATCH_S))
                except MessageError as exc:
                    _say(malformed.skipped(str(exc), time.monotonic()))
                    continue
                if message is None:
                    failure = subscriber.handshake_failure()
                    if failure is not None and failure != refused:
                        print(f"inspectd subscribe: --endpoint {args.endpoint}: the daemon {failure}", file=sys.stderr)
                        refused, absent = failure, False  # nothing listening after it is said again
                    if not absent and subscriber.nothing_listens():
                        # What the socket file says too: libzmq retries a connect the file's mode refuses as it
                        # retries one nothing listens to, and the two want different remedies.
                        print(
                            f"inspectd subscribe: --endpoint {args.endpoint}"
                            f"{no_daemon_took(args.endpoint, refused=True)}; waiting for it",
                            file=sys.stderr,
                            flush=True,
                        )
                        absent, refused = True, None  # a refusal after it is said again
                    continue
                if refused is not None:
                    print(f"inspectd subscribe: --endpoint {args.endpoint}: let in again, receiving", file=sys.stderr)
                    refused = None
                if absent:
                    print(f"inspectd subscribe: --endpoint {args.endpoint}: connected, receiving", file=sys.stderr)
                    absent = False
                _report(catch_up, source)  # a status, too, may show results that never came
                if not isinstance(message, Result):
                    if args.status:
                        print(
                            json.dumps(message, separators=(",", ":")) if args.json else status_line(message),
                            flush=True,
                        )
                    continue
                received += 1
                if args.save_masks is not None and message.mask_png is not None:
                    _save_mask(args.save_masks / f"{message.camera}_{message.seq}.png", message.mask_png, mask_failures)
                print(
                    json.dumps(message.header(), separators=(",", ":")) if args.json else format_result(message),
                    flush=True,
                )
    finally:
        # Also on Ctrl-C, SIGTERM (a supervisor's stop) and a closed stdout: what was missed matters most then.
        _say(malformed.rest(time.monotonic()))
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


def topic_problem(topic: str, cameras: Iterable[str]) -> str | None:
    """Why a subscriber to `topic` would never hear a result (of `cameras`, where given), None where it may: every
    topic a daemon publishes under starts with inspect., so any other prefix (the station's name alone, a slip for
    inspect.<station>.) only waits in silence, as does a camera the topic's camera part leaves out."""
    root = TOPIC_ROOT + "."
    if not (topic.startswith(root) or root.startswith(topic)):
        return (
            f"--topic {topic!r}: expected a prefix of {root}<station>.<camera>.result, as {root}line1. "
            f"(every topic the daemon publishes starts with {root})"
        )
    parts = topic.split(".")
    for camera in cameras:
        # inspect.<station>.<part: a camera id's start> or inspect.<station>.<camera>.<...>: the camera named so far.
        if (len(parts) >= 4 and camera != parts[2]) or (len(parts) == 3 and not camera.startswith(parts[2])):
            return (
                f"--camera {camera}: --topic {topic!r} leaves out its results "
                f"({root}<station>.{camera}.result), expected a topic that takes them"
            )
    return None


def _say(line: str | None) -> None:
    if line is not None:
        print(line, file=sys.stderr, flush=True)


def _report(catch_up: JournalCatchUp, source: CatchUpSubscriber) -> None:
    """What the catch-up found since the last message, on stderr: a numbering that went back (before the gap a
    status shows at its start), gaps, journal notices."""
    for camera, previous, seq in catch_up.backwards:
        print(
            f"seq went back on {camera}: {seq} after {previous} (the daemon restarted without its "
            "journal, or reused seqs after a power cut)",
            file=sys.stderr,
            flush=True,
        )
    catch_up.backwards.clear()
    for gap in catch_up.missed:
        print(gap.describe(), file=sys.stderr, flush=True)
    catch_up.missed.clear()
    for notice in source.notices:
        print(f"inspectd subscribe: {notice}", file=sys.stderr, flush=True)
    source.notices.clear()
