"""`inspectd web`: the live web view of a station, a process of its own beside the daemon (whose hot path never
serves HTTP). Read-only, on loopback by default.

It subscribes to the daemon's result and status stream (inspectd.clients.subscribe.Subscriber, on its own thread) and
reads frames and overlays from the image archive directory (inspectd.protocol.archive). Per camera the page shows the
last frame, the last defects with their overlays, counts (the daemon's, from its status messages), throughput,
latency and a histogram of the scores this view received since it started, against the threshold; for the station,
the daemon's health, model, thresholds and alarms, and its own: an archive it cannot read, or one that is not the
archive the daemon's status names (a wrong --archive), or a daemon that archives nothing (its status names no
archive: no live frame is then served, as what live/ holds is from an earlier run). The page asks for the state
(`/api/state`) every half second with a plain request: a stream held open per page would take one of the browser's six
connections to this host for good, and six open tabs would leave none for the frames, the overlays or a seventh tab.
Nothing is lost between two asks: the state is cumulative (counts, histogram, the newest defects). A daemon that
restarts is picked up again by the SUB socket's own reconnect; while no status arrives the page says so.

Routes: `/` the page (inspectd.clients.web_page, no build step), `/api/state` the state as JSON,
`/archive/<id>/frame|overlay` an archived image, `/live/<camera>.jpg` a camera's latest frame. An archived image is
cached for a day (its id never names another image), an error reply never; a request for one is held up to
ARCHIVE_WAIT_S only when that can help (an id of the last seconds the index does not name yet), else answered at once:
each held request takes one of the browser's six connections to this host.

Host names: a request whose Host is not an IP address, localhost, the --listen host or a name given with --allow-host
is answered 421. Read-only does not keep the images private: a page from elsewhere in a browser that can reach the
view (an SSH tunnel puts it on the operator's own localhost) could rebind its own name to the view's address and read
the state and every image as its own origin's; the Host it sends is that name.

Connections: at most MAX_CONNECTIONS at once (one more closes the one quiet longest, never one whose response is still
being written while another is idle), and one without a request for IDLE_TIMEOUT_S is closed, as for the daemon's
/metrics: whoever can connect cannot hold every file descriptor.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import errno
import functools
import ipaddress
import json
import logging
import os
import re
import stat
import statistics
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import idna
import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from inspectd.errors import InspectdError, MessageError
from inspectd.logs import configure_logging
from inspectd.protocol.alarms import status_alarms
from inspectd.protocol.archive import (
    DEFAULT_ARCHIVE,
    ID_RE,
    INDEX_NAME,
    LIVE_DIR,
    ArchiveError,
    ArchiveReader,
    NoArchive,
    NotArchived,
    id_time,
    live_frame,
    unreadable,
)
from inspectd.protocol.messages import Result, status_interval

if TYPE_CHECKING:
    from inspectd.clients.subscribe import Subscriber

log = structlog.get_logger("inspectd.web")

DEFAULT_LISTEN = "127.0.0.1:8088"
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5556"
ARCHIVE_CHECK_S = 1.0  # how often the archive's readability is checked, pages open or not
# No status for this long (or for STALE_GAPS times the usual gap between status messages, when that is longer: the
# daemon's publish.status_interval_s may be anything up to an hour): the page says the daemon is not reporting.
STATUS_STALE_S = 3.0
STALE_GAPS = 3
GAPS_KEPT = 5  # the usual gap is the median of this many, so one long gap (a daemon restart) does not set it
ARCHIVE_WAIT_S = 2.0  # an image named by a result may still be on its way to disk: wait this long before 404
# ... but only for an id that names a time this close to now: an older one not in the index is not coming (expired,
# never written, another archive), and each wait holds one of the browser's six connections to this host.
ARCHIVE_FRESH_S = 5.0
# Sent with an archived image (200, 206, 304) only: its id never names another image. An error reply must not be
# kept (a 403 would outlast the chmod that fixes it, a 404 the write that was late).
IMMUTABLE = "max-age=86400, immutable"
HIST_BINS = 20  # score / threshold from 0 to 2 in HIST_BINS bins, and one bin above
RATE_WINDOW_S = 5.0
# The daemon's /metrics policy (inspectd.daemon.metrics, which the clients may not import): a connection silent this
# long is closed, one sending its request too slowly to finish in it too (aiohttp's keep-alive timer starts with the
# connection from aiohttp 3.14.4 on, pyproject's floor, and is not put off by bytes that make no whole request).
IDLE_TIMEOUT_S = 10.0
# Connections at once; one more closes the one quiet longest (ConnectionCap). Four times /metrics' 16: a browser opens
# up to six per host, and several browsers may watch one station.
MAX_CONNECTIONS = 64
# A message that cannot be read (a schema mismatch is every one), a request that is no HTTP, a connection closed to
# make room: each logged at most this often, with the count since.
REFUSED_LOG_S = 60.0
# --defects at most: each camera's defects go out with every state reply (twice a second per open page), and a
# deque's maxlen must fit a C ssize_t.
MAX_DEFECTS = 1000
REFUSED_ALARM_S = 60.0  # the page shows refused messages for this long after the last one
# ... and an image it could not read for this long after the last: the page asks for each live frame once a second,
# so a folder still closed keeps the alarm up, and one opened again (chmod g+rX) lets it go.
UNREADABLE_ALARM_S = 60.0
# The daemon's status says it archives nothing (archive.enabled false): live/ holds only an earlier run's frames.
ARCHIVE_OFF = "the daemon archives nothing (its archive is off): no live frames or defect overlays are shown"
# An --allow-host name: a host name, no port or scheme. Underscores too: DNS refuses them in host names, but a name
# from /etc/hosts, NetBIOS or mDNS may hold one, and browsers send it as typed.
_HOST_NAME_RE = re.compile(
    r"(?=.{1,253}\.?\Z)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*\.?", re.I
)


class CameraView:
    def __init__(self, defects_kept: int) -> None:
        self.counts = {"ok": 0, "defect": 0, "error": 0}
        self.last: dict[str, Any] | None = None
        self.defects: collections.deque[dict[str, Any]] = collections.deque(maxlen=defects_kept)
        self.latencies: collections.deque[float] = collections.deque(maxlen=1000)
        self.arrivals: collections.deque[float] = collections.deque(maxlen=10000)
        self.histogram = [0] * (HIST_BINS + 1)
        self.threshold: float | None = None
        self.result_since_status = False  # a result of it came after the last status message

    def add(self, r: Result, now: float) -> None:
        self.result_since_status = True
        self.counts[r.verdict] = self.counts.get(r.verdict, 0) + 1
        self.last = {
            "seq": r.seq,
            "frame_id": r.frame_id,
            "verdict": r.verdict,
            "score": r.score,
            "threshold": r.threshold,
            "t_publish": r.t_publish,
            "archive_id": r.archive_id,
            "error": r.error,
            "model_id": r.model_id,
            "thresholds_version": r.thresholds_version,
        }
        self.latencies.append(r.latency_ms)
        self.arrivals.append(now)
        if r.score is not None and r.threshold:
            self.threshold = r.threshold
            ratio = r.score / r.threshold
            self.histogram[min(HIST_BINS, max(0, int(ratio * HIST_BINS / 2)))] += 1
        if r.verdict == "defect":
            self.defects.appendleft(
                {
                    "seq": r.seq,
                    "frame_id": r.frame_id,
                    "score": r.score,
                    "threshold": r.threshold,
                    "t_capture": r.t_capture,
                    "t_publish": r.t_publish,
                    "regions": len(r.regions),
                    "archive_id": r.archive_id,
                }
            )

    def view(self, now: float, daemon: Any = None) -> dict[str, Any]:
        """`daemon`: the camera's entry in the last status message, whose counters cover the daemon's whole run."""
        recent = [t for t in self.arrivals if now - t <= RATE_WINDOW_S]
        ordered = sorted(self.latencies)
        return {
            "counts": self.counts,
            "daemon_counts": _daemon_counts(daemon),
            "last": self.last,
            "defects": list(self.defects),
            "throughput_fps": len(recent) / RATE_WINDOW_S,
            "latency_ms": {"p50": _quantile(ordered, 0.5), "p99": _quantile(ordered, 0.99)},
            "histogram": {"bins": self.histogram, "ratio_max": 2.0, "threshold": self.threshold},
        }


def _daemon_counts(stats: Any) -> dict[str, int] | None:
    """ok / defect / error as the daemon counted them since it started (None when the status has no counters): the
    view's own counts start with the view and miss what its SUB socket dropped."""
    if not isinstance(stats, dict):
        return None
    counts: list[int] = []
    for key in ("published", "defects", "errors"):
        value = stats.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return None
        counts.append(value)
    published, defects, errors = counts
    return {"ok": max(0, published - defects - errors), "defect": defects, "error": errors}


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class LineState:
    """What the page shows, built from the stream; touched only on the event loop."""

    def __init__(self, defects_kept: int = 12) -> None:
        self.defects_kept = defects_kept
        self.started = time.time()  # the view's own counts and histogram cover the results since then
        self.cameras: dict[str, CameraView] = {}
        self.status: dict[str, Any] | None = None
        self.status_at: float | None = None
        self.status_gaps: collections.deque[float] = collections.deque(maxlen=GAPS_KEPT)
        self.refused = 0  # messages that did not decode
        self.last_refused: tuple[str, float] | None = None  # (why, time.monotonic()) of the last one
        self.archive_error: str | None = None  # why the archive cannot be read (not: there is none yet)
        # (why, time.monotonic()) of the last image (a live frame, an archived frame or overlay) that could not be
        # read though the index could: a folder in the archive this user may not enter
        self.image_unreadable: tuple[str, float] | None = None
        self.archive_elsewhere: str | None = None  # the daemon's archive is not this view's --archive: why we think so

    def archives_nothing(self) -> bool:
        """The daemon's last status names no archive (`"archive": null`): what live/ holds is an earlier run's. A
        status without the field (another publisher) says nothing either way, and before the first status the page
        says there is none yet."""
        return self.status is not None and "archive" in self.status and self.status["archive"] is None

    def on_message(self, message: Result | dict[str, Any] | MessageError) -> None:
        now = time.monotonic()
        if isinstance(message, MessageError):
            self.refused += 1
            self.last_refused = (str(message), now)
        elif isinstance(message, Result):
            camera = self.cameras.get(message.camera)
            if camera is None:
                camera = self.cameras[message.camera] = CameraView(self.defects_kept)
            camera.add(message, now)
        else:
            if self.status_at is not None:
                self.status_gaps.append(now - self.status_at)
            self.status, self.status_at = message, now
            for view in self.cameras.values():
                view.result_since_status = False
            for name in message.get("cameras") or {}:
                self.cameras.setdefault(name, CameraView(self.defects_kept))

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        silent = None if self.status_at is None else round(now - self.status_at, 1)
        status_cameras = (self.status or {}).get("cameras")
        listed = status_cameras if isinstance(status_cameras, dict) else None
        return {
            "t": time.time(),
            "status": self.status,
            "status_age_s": silent,
            "daemon_reporting": silent is not None and silent < self.stale_after(),
            "alarms": self.alarms(silent),
            # gone: the daemon's last status lists its cameras, and not this one (taken out of its config), and no
            # result of it came after that status: the page must not show its last defect and counts as the
            # station's present. A camera just added sends results before the restarted daemon's first status (up to
            # publish.status_interval_s later), while the last status is still the old daemon's.
            "cameras": {
                name: {
                    **view.view(now, (listed or {}).get(name)),
                    "gone": listed is not None and name not in listed and not view.result_since_status,
                }
                for name, view in sorted(self.cameras.items())
            },
            "refused_messages": self.refused,
            "view_started": self.started,
        }

    def alarms(self, silent: float | None) -> list[str]:
        out = [f"archive unreadable: {self.archive_error}"] if self.archive_error else []
        if self.image_unreadable is not None and time.monotonic() - self.image_unreadable[1] < UNREADABLE_ALARM_S:
            out.append(f"archive unreadable: {self.image_unreadable[0]}")
        if self.archive_elsewhere:
            out.append(self.archive_elsewhere)
        if silent is None:
            out += self._refused_alarm()
            return out + ["no status from the daemon yet"]
        if silent >= self.stale_after():
            out.append(f"no status from the daemon for {silent:.0f} s")
        if self.archives_nothing():
            out.append(ARCHIVE_OFF)
        return out + self._refused_alarm() + status_alarms(self.status or {})

    def stale_after(self) -> float:
        """Seconds without a status message after which the daemon counts as not reporting: STALE_GAPS times the
        interval the daemon says it publishes at, or (a daemon that does not say) the usual gap seen."""
        usual = status_interval(self.status or {})
        if usual is None:
            usual = statistics.median_low(self.status_gaps) if self.status_gaps else 0.0
        return max(STATUS_STALE_S, STALE_GAPS * usual)

    def _refused_alarm(self) -> list[str]:
        """Messages this view could not read: a web client out of step with the daemon (another schema) must not
        look like a daemon that is down."""
        if self.last_refused is None:
            return []
        error, at = self.last_refused
        age = time.monotonic() - at
        if age >= REFUSED_ALARM_S:
            return []
        return [f"{self.refused} messages from the daemon could not be read, the last {age:.0f} s ago: {error[:200]}"]


class Feed(threading.Thread):
    """The SUB socket (connected by the caller, so a bad endpoint fails the start) on its own thread, handing each
    decoded message to the event loop. A message that cannot be read is logged (the first, then at most once per
    REFUSED_LOG_S with the count) and shown as an alarm; nothing a message does ends the thread."""

    def __init__(self, sub: Subscriber, loop: asyncio.AbstractEventLoop, state: LineState) -> None:
        super().__init__(name="web-feed", daemon=True)
        self.sub, self.loop, self.state = sub, loop, state
        self.stopping = threading.Event()
        self._logged_at: float | None = None
        self._unlogged = 0
        self._refused: str | None = None  # the handshake failure logged, until a message comes

    def run(self) -> None:
        with self.sub:
            while not self.stopping.is_set():
                message: Result | dict[str, Any] | MessageError | None
                try:
                    message = self.sub.recv(0.2)
                except MessageError as exc:
                    message = exc
                except Exception as exc:  # a decoder bug or a socket error: one message, never the whole view
                    message = MessageError(f"{type(exc).__name__}: {exc}".splitlines()[0])
                    self.stopping.wait(0.2)  # a socket that keeps failing must not spin
                if isinstance(message, MessageError):
                    self._log_refused(message)
                if message is not None:
                    if self._refused is not None and not isinstance(message, MessageError):
                        log.info("readmitted", endpoint=self.sub.endpoint, reopened=self.sub.reopened)
                        self._refused = None
                    self.loop.call_soon_threadsafe(self.state.on_message, message)
                    continue
                failure = self.sub.handshake_failure()  # a daemon that shuts the view out says why, once per outage
                if failure is not None and failure != self._refused:
                    log.warning("handshake_failed", error=f"the daemon {failure}")
                    self._refused = failure

    def _log_refused(self, error: MessageError) -> None:
        now = time.monotonic()
        if self._logged_at is not None and now - self._logged_at < REFUSED_LOG_S:
            self._unlogged += 1
            return
        log.warning("message_refused", error=str(error)[:300], refused_since_last_log=self._unlogged)
        self._logged_at, self._unlogged = now, 0


class WebView:
    def __init__(self, state: LineState, archive: Path, hosts: Iterable[str] = ()) -> None:
        """`hosts`: the names besides IP addresses and localhost that a request's Host may give (--listen's host,
        --allow-host's names)."""
        self.state = state
        self.archive = archive
        self.hosts = frozenset({"localhost", *(_host_key(name) for name in hosts)})
        self._reader: ArchiveReader | None = None
        self._reader_file: tuple[int, int] | None = None  # (st_dev, st_ino) of the index the reader has open
        self._failed_at: dict[str, float] = {}  # event -> when last logged

    def app(self, cap: ConnectionCap) -> web.Application:
        app = web.Application(middlewares=[cap.middleware, self._check_host])
        app.router.add_get("/", self.page)
        app.router.add_get("/api/state", self.api_state)
        app.router.add_get("/archive/{entry_id}/{kind}", self.archived)
        app.router.add_get("/live/{camera}.jpg", self.live)
        app.on_startup.append(self._start_watch)
        app.on_response_prepare.append(_no_caching_errors)
        app.on_cleanup.append(self._stop_watch)
        return app

    @web.middleware
    async def _check_host(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """421 for a Host that is no name of this view's: a page elsewhere that rebound its own name to this address
        sends that name. No Host at all (HTTP/1.0, not a browser) passes."""
        for value in request.headers.getall("Host", ()):
            if not self._host_allowed(value):
                shown = repr(value[:100])
                self._log_failure("host_refused", InspectdError(f"Host {shown}"), traceback=False)
                raise web.HTTPMisdirectedRequest(
                    text=f"Host {shown} is not a name of this view: expected an IP address, localhost, the --listen "
                    "host or a name given with --allow-host\n",
                    headers={"Cache-Control": "no-store"},
                )
        return await handler(request)

    def _host_allowed(self, value: str) -> bool:
        host = value.strip()
        if host.startswith("["):  # an IPv6 literal, its port after the bracket
            end = host.find("]")
            rest = host[end + 1 :] if end > 0 else ":x"
            if rest and not (rest[0] == ":" and rest[1:].isdigit()):
                return False
            return _is_ip(host[1:end])
        name, colon, port = host.rpartition(":")
        if colon:
            if port and not port.isdigit():
                return False
            host = name
        return _is_ip(host) or _host_key(host) in self.hosts

    async def page(self, request: web.Request) -> web.Response:
        from inspectd.clients.web_page import PAGE

        return web.Response(text=PAGE, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def api_state(self, request: web.Request) -> web.Response:
        # Built anew for each ask: a state that cannot be built (a bug, a status nothing foresaw) fails that one
        # reply, logged, and the page's next ask is answered as usual.
        try:
            snapshot = self.state.snapshot()
            for name, camera in snapshot["cameras"].items():
                camera["live_age_s"] = self.live_age(name)
            body = _json(snapshot)
        except Exception as exc:
            self._log_failure("state_failed", exc)
            raise web.HTTPInternalServerError(text="the web view could not build its state (see its log)") from None
        return web.Response(body=body, content_type="application/json", headers={"Cache-Control": "no-store"})

    async def _start_watch(self, app: web.Application) -> None:
        self._watch = asyncio.create_task(self._watch_archive())

    async def _stop_watch(self, app: web.Application) -> None:
        self._watch.cancel()

    async def _watch_archive(self) -> None:
        """An archive that cannot be read is an alarm, images asked for or not; so is a daemon archiving elsewhere."""
        while True:
            await asyncio.sleep(ARCHIVE_CHECK_S)
            try:
                self._archive_reader()
                self.state.archive_elsewhere = self.archive_elsewhere()
            except Exception as exc:  # asked again next time; the task must outlive it
                self._log_failure("archive_check_failed", exc)

    def archive_elsewhere(self) -> str | None:
        """The alarm when the daemon's status names an archive (archive.path) that is not this view's --archive: a
        typo, or another instance's state_dir, would otherwise look like a healthy archive with nothing in it yet.
        The same directory when both are there and are one file (device and inode: a bind mount or a symlink seen
        under two names); else when their resolved paths are one."""
        archive = (self.state.status or {}).get("archive")
        theirs = archive.get("path") if isinstance(archive, dict) else None
        if not isinstance(theirs, str) or not theirs or "\0" in theirs or not Path(theirs).is_absolute():
            return None  # no archive, or a path that cannot be compared from here
        daemons, ours = Path(theirs), self.archive
        try:
            a, b = os.stat(daemons), os.stat(ours)
        except OSError:
            if _resolved(daemons) == _resolved(ours):
                return None
            # os.path.exists, not Path.exists: that raises for a path under a folder this user may not enter (the
            # installed 0750 state_dir seen from outside its group), the very case the hint is for.
            hint = "" if os.path.exists(daemons) else " (not there yet, or not seen from here)"
        else:
            if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
                return None
            hint = ""
        return (
            f"archive elsewhere: the daemon archives to {theirs}{hint}, this view reads --archive {ours}: its "
            "overlays and live frames are not shown here"
        )

    def _log_failure(self, event: str, exc: Exception, traceback: bool = True) -> None:
        now = time.monotonic()
        if now - self._failed_at.get(event, -REFUSED_LOG_S) >= REFUSED_LOG_S:
            error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            if traceback:
                log.exception(event, error=error)
            else:
                log.warning(event, error=error)
            self._failed_at[event] = now

    def _unreadable(self, event: str, error: Exception) -> web.HTTPForbidden:
        """The reply for an image this user may not read (a folder on its way closed to it): an alarm on the page and
        a log line at most once per REFUSED_LOG_S, where aiohttp would log a traceback for each of the page's asks."""
        why = str(error).splitlines()[0][:300]
        self.state.image_unreadable = (why, time.monotonic())
        self._log_failure(event, error, traceback=False)
        return web.HTTPForbidden(text=why, headers={"Cache-Control": "no-store"})

    def _archive_reader(self) -> ArchiveReader | None:
        """The reader of the archive's index, opened anew when the index was replaced (the directory cleared, moved
        to another disk, restored) or is gone: an open reader would go on reading the deleted file."""
        try:
            st = os.stat(self.archive / INDEX_NAME)
            now_file: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            now_file = None
        if self._reader is not None and now_file != self._reader_file:
            self._reader.close()
            self._reader = None
        if self._reader is None:
            try:
                self._reader = ArchiveReader(self.archive)
            except ArchiveError as exc:  # asked again next time
                self.state.archive_error = None if isinstance(exc, NoArchive) else str(exc)
                return None
            self._reader_file = now_file  # stat before the open: an index replaced in between is reopened next time
            self.state.archive_error = None
        return self._reader

    async def archived(self, request: web.Request) -> web.StreamResponse:
        entry_id, kind = request.match_info["entry_id"], request.match_info["kind"]
        if kind not in ("frame", "overlay"):
            raise web.HTTPNotFound(text="expected /archive/<id>/frame or /archive/<id>/overlay")
        if not ID_RE.fullmatch(entry_id):  # never a path: refused before any wait or lookup
            raise web.HTTPNotFound(text=f"archive id {entry_id[:80]!r}: expected <camera>-<YYYYmmddTHHMMSSmmm>-<seq>")
        # Waited for only where waiting can help: an archive open whose index does not name the id yet, the id's time
        # near now (its writer may be a moment behind). No archive, an unreadable one, a file gone, an old id: at once.
        named = id_time(entry_id)
        deadline = time.monotonic() + ARCHIVE_WAIT_S
        while True:
            reader = self._archive_reader()
            coming = False
            try:
                if reader is None:
                    raise ArchiveError(self.state.archive_error or f"{self.archive}: no archive yet")
                try:
                    entry = reader.get(entry_id)
                except NotArchived:
                    coming = named is not None and abs(time.time() - named) <= ARCHIVE_FRESH_S
                    raise
                path = reader.file(entry, kind)
                try:
                    found = path.is_file()
                except OSError as exc:  # not "not there" (is_file() says False to that): e.g. a day folder closed
                    raise self._unreadable("image_unreadable", unreadable(path, f"{kind} image", exc)) from None
                if found:
                    failure = _open_failure(path)
                    if failure is None:
                        return web.FileResponse(path, headers={"Cache-Control": IMMUTABLE})
                    if not isinstance(failure, FileNotFoundError):  # gone since: missing, as below
                        why = unreadable(path, f"{kind} image", failure)
                        raise self._unreadable("image_unreadable", why) from None
                error = f"archive id {entry_id!r}: {kind} file missing"
            except ArchiveError as exc:
                error = str(exc)
            if not coming or time.monotonic() >= deadline:
                raise web.HTTPNotFound(text=error, headers={"Cache-Control": "no-store"})
            await asyncio.sleep(0.05)

    async def live(self, request: web.Request) -> web.StreamResponse:
        if self.state.archives_nothing():  # live/ holds an earlier run's frames, which are no camera's present
            raise web.HTTPNotFound(
                text="the daemon archives nothing (its archive is off): no live frames",
                headers={"Cache-Control": "no-store"},
            )
        if self.state.archive_elsewhere:  # another station's line under this daemon's camera names and verdicts
            raise web.HTTPNotFound(
                text="this view reads another archive than the daemon's (--archive): its live frames are not shown",
                headers={"Cache-Control": "no-store"},
            )
        try:
            path = live_frame(self.archive, request.match_info["camera"])
        except ArchiveError as exc:  # e.g. a live/ folder this user may not enter
            raise self._unreadable("live_frame_unreadable", exc) from None
        if path is None:
            raise web.HTTPNotFound(text="no live frame for this camera (yet)", headers={"Cache-Control": "no-store"})
        try:
            self._check_live(path)
        except FileNotFoundError:
            raise web.HTTPNotFound(
                text="no live frame for this camera (yet)", headers={"Cache-Control": "no-store"}
            ) from None
        except _NotInArchive as exc:
            self._log_failure("live_frame_refused", exc, traceback=False)
            raise web.HTTPNotFound(text=str(exc), headers={"Cache-Control": "no-store"}) from None
        except OSError as exc:
            raise self._unreadable("live_frame_unreadable", unreadable(path, "live frame", exc)) from None
        # FileResponse, not the bytes read here: it sends a large frame as the link takes it, its request in flight
        # meanwhile (ConnectionCap), and holds no copy of it in memory.
        return web.FileResponse(path, headers={"Cache-Control": "no-store"})

    def _check_live(self, path: Path) -> None:
        """Refuses (_NotInArchive) a live frame that is a link, or not a regular file, or under a live/ that is not the
        archive's own: the writer only ever renames a regular file into live/, and a link planted there would serve
        any file this user may read as a camera's frame. OSError when it cannot be opened for reading (an unreadable
        file passes is_file(), and aiohttp would answer it with an empty 403 that neither the page nor the log hears
        of)."""
        if _resolved(path.parent) != _resolved(self.archive) / LIVE_DIR:
            raise _NotInArchive(f"{path.parent}: not the archive's own live folder (a link?): live frames not served")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _NotInArchive(f"{path}: a link, not a frame the daemon wrote: not served") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _NotInArchive(f"{path}: not a regular file: not served")
        finally:
            os.close(fd)

    def live_age(self, camera: str) -> float | None:
        """Seconds since the camera's live frame was written (its mtime), None while none is served: the frame is
        sampled (at most one per LIVE_INTERVAL_S), so it is not the result the page prints beside it, and a camera
        that stopped sending keeps its last one."""
        if self.state.archives_nothing() or self.state.archive_elsewhere:
            return None
        try:
            path = live_frame(self.archive, camera)
            st = None if path is None else os.lstat(path)
        except (ArchiveError, OSError):
            return None
        if st is None or not stat.S_ISREG(st.st_mode):
            return None
        return round(max(0.0, time.time() - st.st_mtime), 1)


class _NotInArchive(Exception):
    """A live frame path that is not a regular file inside the archive's live folder."""


_json = functools.partial(json.dumps, separators=(",", ":"), default=str)


def _open_failure(path: Path) -> OSError | None:
    """Why this user cannot open the file `path` for reading, None when it can. A file it may not read (mode 0600 in a
    folder it may enter) passes is_file(), and aiohttp would answer it with an empty 403 that neither the page nor the
    log hears of. Opened rather than asked of os.access(), which answers for the real user, not the effective one."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
    except OSError as exc:
        return exc
    return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _host_key(name: str) -> str:
    """A host name as compared: case and a trailing dot make no other host."""
    return name.lower().removesuffix(".")


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: compared as given
        return path


async def _no_caching_errors(request: web.Request, response: web.StreamResponse) -> None:
    """An archived image's reply that is no image (FileResponse answers 403 or 404 itself when the file is pruned or
    unreadable by the time it opens it) loses the image's cache header: no-store instead."""
    if response.status not in (200, 206, 304) and response.headers.get("Cache-Control") == IMMUTABLE:
        response.headers["Cache-Control"] = "no-store"


class ConnectionCap:
    """At most MAX_CONNECTIONS connections to the view at once. One more closes, of the connections with no request in
    flight, the one quiet longest (since it was accepted, or since its last response was written): a page asks twice a
    second and its images once a second, so that one is a peer holding its place, or a browser's spare connection it
    reopens at need. Refusing the newcomer instead would let MAX_CONNECTIONS such peers lock every operator out.

    A connection whose response is still being written (a large frame on a slow link) or prepared (an archived image
    waited for) is not quiet, however long ago its request came: closing it would cut the image off half-way. Only
    when every connection has a request in flight is one of them closed, the one whose request began first: refusing
    the newcomer would let MAX_CONNECTIONS peers that read their responses slowly, or never, lock every operator out,
    while a browser opens at most six connections, so that many requests in flight at once are most likely such
    peers."""

    def __init__(self) -> None:
        self._server: web.Server | None = None
        self._connection_made: Any = None
        self._active: dict[Any, float] = {}  # connection (aiohttp's RequestHandler) -> accepted, or last response done
        # connection -> (when the request it serves began, the task serving it). aiohttp serves a connection's
        # requests one after another (pipelined ones wait their turn), so a connection has one request in flight or
        # none.
        self._busy: dict[Any, tuple[float, asyncio.Task | None]] = {}
        self.evicted = 0
        self._logged_at = -REFUSED_LOG_S

    def install(self, server: web.Server) -> None:
        """Into the runner's server, before it accepts: aiohttp keeps the connections but has no hook for a new one."""
        self._server, self._connection_made = server, server.connection_made
        server.connection_made = self._made  # type: ignore[method-assign]

    def response_written(self) -> type[AbstractAccessLogger]:
        """The runner's access logger, which logs nothing: aiohttp calls it once a response has been written to the
        end (or the client went away), the end of the request in flight. The middleware cannot see that end: a
        file's bytes are written after the handler has returned it."""
        cap = self

        class ResponseWritten(AbstractAccessLogger):
            def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
                cap._done(request.protocol)

        return ResponseWritten

    def _made(self, handler: Any, transport: asyncio.Transport) -> None:
        assert self._server is not None
        now = time.monotonic()
        # Rebuilt from the server's own list, so a connection gone is forgotten here with it (at most the cap's worth).
        live = [h for h in self._server.connections if h.connected]
        self._active = {h: self._active.get(h, now) for h in live}
        self._busy = {h: self._busy[h] for h in live if h in self._busy}
        if len(live) >= MAX_CONNECTIONS:
            idle = [h for h in live if h not in self._busy]
            quiet = min(idle, key=self._active.__getitem__) if idle else min(live, key=lambda h: self._busy[h][0])
            del self._active[quiet]
            _, serving = self._busy.pop(quiet, (0.0, None))
            if serving is not None:
                # Closed under a response being written, the task writing it would wait on the transport for good,
                # holding the file it sends: ended first, it closes the file.
                serving.cancel()
            quiet.force_close()
            self.evicted += 1
            if now - self._logged_at >= REFUSED_LOG_S:
                self._logged_at = now
                peer = transport.get_extra_info("peername")
                log.warning(
                    "web_connection_evicted",
                    client=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer),
                    evicted=self.evicted,
                    limit=MAX_CONNECTIONS,
                )
        self._active[handler] = now
        self._connection_made(handler, transport)

    def _done(self, connection: Any) -> None:
        self._busy.pop(connection, None)
        if connection in self._active:
            self._active[connection] = time.monotonic()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.protocol in self._active:
            self._busy[request.protocol] = (time.monotonic(), asyncio.current_task())
        return await handler(request)


class _MalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse (a header line past its limit, not HTTP at all) as an error with its
    traceback, or at debug (no HTTP from the first byte), and answers it 400. That is the client's fault, and anyone
    who can connect can send any number: one warning line without a traceback, at most once per REFUSED_LOG_S with
    the count since the last."""

    def __init__(self) -> None:
        super().__init__()
        self._logged_at = -REFUSED_LOG_S
        self._unlogged = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return record.levelno >= logging.INFO  # the logger is open to debug for not-HTTP requests only (run)
        now = time.monotonic()
        if now - self._logged_at < REFUSED_LOG_S:
            self._unlogged += 1
            return False
        client = record.args[0] if isinstance(record.args, tuple) and record.args else None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args, record.exc_info, record.exc_text = "bad_request", (), None, None
        record.client = str(client)
        record.error = f"{type(exc).__name__}: {exc.message}".splitlines()[0][:200]
        record.refused_since_last_log = self._unlogged
        self._logged_at, self._unlogged = now, 0
        return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint", default=DEFAULT_ENDPOINT, metavar="EP", help=f"the daemon's publish.endpoint ({DEFAULT_ENDPOINT})"
    )
    parser.add_argument(
        "--archive",
        type=Path,
        default=DEFAULT_ARCHIVE,
        metavar="DIR",
        help=f"the daemon's archive directory (archive.path; default {DEFAULT_ARCHIVE})",
    )
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"where to serve the page (default {DEFAULT_LISTEN}: this machine only; port 0 picks a free one)",
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name the page may be opened by, besides IP addresses, localhost and the --listen host "
        "(repeatable): a request for any other Host is refused (421), as a page elsewhere that rebinds its own name "
        "to this view's address would send",
    )
    parser.add_argument(
        "--defects",
        type=int,
        default=12,
        metavar="N",
        help=f"defects shown per camera, 1 to {MAX_DEFECTS} (default 12)",
    )
    parser.add_argument("--server-key", type=Path, metavar="PATH", help="CurveZMQ: the daemon's publish public key")
    parser.add_argument("--client-key", type=Path, metavar="PATH", help="CurveZMQ: this client's .key_secret")
    parser.add_argument("--log-format", choices=("json", "console"), default="console")


def run(args: argparse.Namespace) -> int:
    host, _, port = args.listen.rpartition(":")
    # ASCII digits only: str.isdigit() also takes '²' (which int() refuses) and other scripts' digits.
    if not host or not (port.isascii() and port.isdigit()) or len(port) > 5 or int(port) > 65535:
        print(f"inspectd web: --listen {args.listen!r}, expected HOST:PORT (e.g. {DEFAULT_LISTEN})", file=sys.stderr)
        return 2
    if not 1 <= args.defects <= MAX_DEFECTS:
        print(f"inspectd web: --defects {args.defects}, expected 1 to {MAX_DEFECTS}", file=sys.stderr)
        return 2
    allowed = []
    for name in args.allow_host:
        try:
            # A browser sends a name of other letters (prüfstand.local) in its ASCII form (xn--prfstand-...), by
            # IDNA 2008 as UTS 46 maps it: Python's own codec is IDNA 2003's, which makes straße strasse.
            ascii_name = name if name.isascii() else idna.encode(name, uts46=True, transitional=False).decode("ascii")
        except (UnicodeError, idna.IDNAError):
            ascii_name = ""
        if not (_HOST_NAME_RE.fullmatch(ascii_name) or _is_ip(ascii_name)):
            print(
                f"inspectd web: --allow-host {name!r}, expected a host name without a port (e.g. station.example.com)",
                file=sys.stderr,
            )
            return 2
        allowed.append(ascii_name)
    args.allow_host = allowed
    # aiohttp's and asyncio's own records (a request it could not parse, an accept() that failed) as log lines
    configure_logging("info", args.log_format, stdlib=("aiohttp", "asyncio"))
    server_log = logging.getLogger("aiohttp.server")
    # aiohttp logs a connection whose first bytes are no HTTP at all (a TLS hello, a scanner) at debug, not as the
    # error it logs for the other malformed requests: opened to debug so that both are the one bad_request warning.
    server_log.setLevel(logging.DEBUG)
    server_log.addFilter(_MalformedRequests())
    try:
        from inspectd.protocol.keys import curve_from_flags

        curve = curve_from_flags(args.server_key, args.client_key)
        sub = _subscribe(args.endpoint, curve)
        asyncio.run(_serve(args, host.strip("[]"), int(port), sub))
    except InspectdError as exc:
        print(f"inspectd web: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"inspectd web: --listen {args.listen}: cannot listen ({exc.strerror or exc})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _subscribe(endpoint: str, curve):
    """The SUB socket, connected here so that an endpoint no daemon could be configured with (in the words of
    subscribe and ctl), or one ZeroMQ refuses, is a one-line error at start: the view would otherwise show a daemon
    that never speaks for a tcp port above 65535 (libzmq cuts it to 16 bits, another daemon's or nobody's) or 0."""
    import zmq

    from engines.schema import show
    from inspectd.clients.subscribe import Subscriber
    from inspectd.protocol.control import connect_error
    from inspectd.protocol.endpoints import connect_endpoint_problem

    problem = connect_endpoint_problem(endpoint, show)
    if problem is not None:
        raise InspectdError(f"--endpoint: {problem}")
    try:
        return Subscriber(endpoint, curve=curve)
    except zmq.ZMQError as exc:
        raise connect_error("--endpoint", endpoint, exc) from None


async def view_runner(view: WebView) -> web.AppRunner:
    """The runner serving `view` behind a ConnectionCap, set up: a TCPSite on it listens, cleanup() ends it."""
    cap = ConnectionCap()
    runner = web.AppRunner(
        view.app(cap),
        access_log_class=cap.response_written(),
        shutdown_timeout=1.0,
        keepalive_timeout=IDLE_TIMEOUT_S,
    )
    await runner.setup()
    assert runner.server is not None
    cap.install(runner.server)
    return runner


async def _serve(args: argparse.Namespace, host: str, port: int, sub) -> None:
    import signal

    state = LineState(args.defects)
    feed = Feed(sub, asyncio.get_running_loop(), state)
    feed.start()
    runner = await view_runner(WebView(state, args.archive, (host, *args.allow_host)))
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
        bound = runner.addresses[0]
        log.info(
            "web_listening", url=f"http://{bound[0]}:{bound[1]}/", endpoint=args.endpoint, archive=str(args.archive)
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        feed.stopping.set()
        await runner.cleanup()
        feed.join(2)
