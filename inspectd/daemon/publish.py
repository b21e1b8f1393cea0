"""The publisher: sends judged frames and periodic status over a ZeroMQ PUB socket, on its own thread.

The inference stage hands results over through a bounded queue and goes back to the engine; PNG encoding of masks
and the socket work happen here. The PUB socket has a bounded send high-water mark: when a subscriber is slow or
stuck ZeroMQ drops messages for that subscriber instead of blocking, so a consumer can never stall inference
(subscribers see the loss as a gap in `seq`).

Journal: every encoded result passes through `Journal.append` before it is sent, so a journal that writes the frames
to disk (for `subscribe --since SEQ` and for resuming seq after a restart) plugs in here without touching the send
path. None is configured by default.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog
import zmq

from inspectd.daemon.inference import Judged
from inspectd.daemon.security import open_ipc_to_group, refuse_served_ipc
from inspectd.daemon.socket_file import SocketFile
from inspectd.protocol.endpoints import take_endpoint
from inspectd.protocol.messages import encode_mask, encode_result, encode_status

_STOP = object()
_WAKE = object()  # wakes the thread to look at its flags (a re-bind asked for)
REBIND_WAIT_S = 5.0  # how long the endpoint may take to come free again after unbind
BIND_RETRY_S = 3.0  # how often a bind that failed is tried again, results still journalled meanwhile
SUBMIT_CHECK_S = 0.5  # how often a submit waiting on a full queue looks whether the thread is still there to empty it
log = structlog.get_logger("inspectd.daemon.publish")


class Journal(Protocol):
    def append(self, camera: str, seq: int, frames: list[bytes]) -> None: ...

    def close(self) -> None: ...


class CameraCounters:
    __slots__ = ("published", "ok", "defect", "error")

    def __init__(self) -> None:
        self.published = self.ok = self.defect = self.error = 0

    def as_dict(self) -> dict[str, int]:
        return {"published": self.published, "ok": self.ok, "defect": self.defect, "error": self.error}


class Publisher:
    def __init__(
        self,
        endpoint: str,
        station: str,
        *,
        sndhwm: int = 1000,
        queue_size: int = 256,
        status_interval_s: float = 1.0,
        status: Callable[[], dict[str, Any]] | None = None,
        linger_ms: int = 500,
        journal: Journal | None = None,
        context: zmq.Context | None = None,
        socket_options: Callable[[zmq.Socket], None] | None = None,
        on_published: Callable[[Judged, float], None] | None = None,
        archive: Callable[[Judged], str | None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.station = station
        self.status_interval_s = status_interval_s
        self._status = status
        self._journal = journal
        self._on_published = on_published
        self._archive = archive  # Archive.offer: the id the frame is kept under, or None; never blocks
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUB)
        take_endpoint(self._socket, endpoint)
        self._socket.setsockopt(zmq.SNDHWM, sndhwm)
        self._socket.setsockopt(zmq.LINGER, linger_ms)
        if socket_options is not None:
            try:
                socket_options(self._socket)  # e.g. CurveZMQ server keys, set before bind
            except zmq.ZMQError as exc:  # a libzmq built without CURVE refuses curve_server
                self._socket.close(0)
                raise OSError(
                    f"publish.endpoint {endpoint!r}: cannot set its security options ({exc}), "
                    f"expected a libzmq with CURVE (zmq.has('curve') is {zmq.has('curve')})"
                ) from None
        try:
            refuse_served_ipc(endpoint)  # another daemon's socket file: refused as a taken port is
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close(0)
            raise OSError(f"publish.endpoint {endpoint!r}: cannot bind ({exc})") from None
        try:
            open_ipc_to_group(self._socket)  # `inspectd web` and `subscribe` run as members of the service's group
        except OSError as exc:
            self._socket.close(0)
            raise OSError(f"publish.endpoint {exc}") from None
        self.bound_endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.cameras: dict[str, CameraCounters] = {}
        self.published = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="publish", daemon=True)
        self._stopping = False
        self._stopped = False  # the thread took the stop: it did not end on its own
        self._rebind = threading.Event()
        self.rebinds = 0
        self.bound = True  # False while a rebind has failed: results are journalled, not sent
        self._unbound_since: float | None = None  # monotonic time the endpoint was given up, while it is
        self._bind_retry_at = 0.0  # when a failed bind is tried again
        # Looked at each status tick, as a zmq camera looks at its own.
        self._socket_file = SocketFile(log, "subscribers", "at each status")
        self._socket_file.bound(self.bound_endpoint)

    def start(self) -> Publisher:
        self._thread.start()
        return self

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def alive(self) -> bool:
        """The publishing thread is running, or was asked to stop: one that ended on its own publishes nothing."""
        return self._thread.is_alive() or self._stopping

    def unbound_s(self) -> float:
        """How long the endpoint has been unbound (a rebind that keeps failing); 0 while it is bound."""
        since = self._unbound_since
        return 0.0 if since is None else time.monotonic() - since

    def submit(self, judged: Judged) -> None:
        """Queue a result for sending; blocks only while the queue is full (the send path itself never blocks) and
        the publishing thread is there to empty it. Once that thread has ended the result is counted in `failed`
        and logged (`publish_dropped`), so the inference thread and the shutdown never wait on it forever."""
        while self._thread.is_alive() or not self.started:
            try:
                self._queue.put(judged, timeout=SUBMIT_CHECK_S)
                return
            except queue.Full:
                continue
        self._dropped(judged)

    def _dropped(self, judged: Judged) -> None:
        self.failed += 1
        log.error(
            "publish_dropped",
            camera=judged.frame.camera,
            seq=judged.frame.seq,
            reason="the publishing thread has ended",
            effect="this accepted frame gets no result, published or journalled",
        )

    def drop_peers(self) -> None:
        """Disconnect every subscriber (the publishing thread unbinds and binds the endpoint again, between two
        sends): each reconnects by itself and handshakes again, so a CURVE key removed from the allow-list since its
        handshake is refused. The others miss what is published while they reconnect (a gap in seq, which a journal
        fills)."""
        self._rebind.set()
        try:
            self._queue.put_nowait(_WAKE)
        except queue.Full:
            pass  # the thread is busy with a full queue and sees the flag after its next send

    def counters(self, camera: str) -> CameraCounters:
        counters = self.cameras.get(camera)
        if counters is None:
            counters = self.cameras[camera] = CameraCounters()
        return counters

    def _run(self) -> None:
        next_status = time.monotonic() + self.status_interval_s
        while True:
            wait = max(0.0, next_status - time.monotonic()) if self._status else None
            if not self.bound:  # woken for the next bind try even when nothing comes
                retry = max(0.0, self._bind_retry_at - time.monotonic())
                wait = retry if wait is None else min(wait, retry)
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = None
            if item is _STOP:
                self._stopped = True
                break
            if self._rebind.is_set() or (not self.bound and time.monotonic() >= self._bind_retry_at):
                self._rebind.clear()
                self._bind_again()
            if item is not None and item is not _WAKE:
                try:
                    self._send_result(item)
                except Exception as exc:  # one unsendable result must not end publishing for every camera
                    self.failed += 1
                    log.error(
                        "publish_failed",
                        camera=item.frame.camera,
                        seq=item.frame.seq,
                        error=f"{type(exc).__name__}: {exc}".splitlines()[0],
                    )
            if self._status and time.monotonic() >= next_status:
                try:
                    self._check_socket_file()
                except Exception as exc:  # as for a status: the results go on whatever the check met
                    log.error("socket_file_check_failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0])
                try:
                    self.send_status()
                except Exception as exc:  # a status that cannot be built must not end publishing of results
                    log.error("status_failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0])
                next_status = time.monotonic() + self.status_interval_s
        if self._status:
            try:
                self.send_status()  # a last status so subscribers see the final counters
            except Exception as exc:
                log.error("status_failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0])

    def _send_result(self, judged: Judged) -> None:
        frame = judged.frame
        mask_png = None
        if judged.mask is not None:
            try:
                mask_png = encode_mask(judged.mask)
            except Exception as exc:  # the verdict matters more than its picture: send it without the mask
                self.failed += 1
                log.error(
                    "mask_encode_failed",
                    camera=frame.camera,
                    seq=frame.seq,
                    error=f"{type(exc).__name__}: {exc}".splitlines()[0],
                )
        height, width = frame.image.shape[:2] if frame.image is not None else (None, None)
        archive_id = self._archive(judged) if self._archive is not None else None
        t_publish = time.time()
        latency_ms = (time.monotonic() - frame.t_ingest) * 1000.0 if frame.t_ingest else 0.0
        frames = encode_result(
            station=self.station,
            camera=frame.camera,
            seq=frame.seq,
            frame_id=frame.frame_id,
            t_capture=frame.t_capture,
            t_publish=t_publish,
            verdict=judged.verdict,
            score=judged.score,
            threshold=judged.threshold,
            model_id=judged.model_id,
            thresholds_version=judged.thresholds_version,
            regions=judged.regions,
            latency_ms=latency_ms,
            width=width,
            height=height,
            error=judged.error,
            truth=frame.truth,
            mask_png=mask_png,
            archive_id=archive_id,
        )
        if self._journal is not None:
            self._journal.append(frame.camera, frame.seq, frames)
        self._socket.send_multipart(frames, copy=False)
        if frame.on_published is not None:
            try:
                frame.on_published()
            except Exception as exc:  # the result is out; the source's clean-up failing must not hide it
                log.error(
                    "frame_cleanup_failed",
                    camera=frame.camera,
                    seq=frame.seq,
                    error=f"{type(exc).__name__}: {exc}".splitlines()[0],
                )
        counters = self.counters(frame.camera)
        counters.published += 1
        if judged.verdict == "ok":
            counters.ok += 1
        elif judged.verdict == "defect":
            counters.defect += 1
        else:
            counters.error += 1
        self.published += 1
        if self._on_published is not None:
            self._on_published(judged, latency_ms)

    def _check_socket_file(self) -> None:
        """Bind the path again when the ipc socket file bound is gone or is another file (SocketFile.check): new
        subscribers (`inspectd subscribe`, the web view, a restarted PLC bridge) could no longer connect, while the
        daemon went on as if healthy. The subscribers connected through the old file keep their connections and lose
        nothing; past socket_file.MAX_REBINDS the endpoint is bound afresh (`_bind_again`), which drops the old
        listeners, and with them those subscribers, who reconnect."""
        if not self.bound:
            return
        if (reason := self._socket_file.check(self._socket, self.bound_endpoint)) is not None:
            self._bind_again(reason)

    def _bind_again(self, reason: str = "a key was removed from the allow-list") -> None:
        """Unbind (libzmq closes every connection accepted on the endpoint with it) and bind the same endpoint. The
        listener closes on libzmq's I/O thread, so a TCP port may stay busy for a moment. A bind that fails (the
        port taken meanwhile, the ipc path served by another process meanwhile, the ipc directory gone) is logged
        and tried again every BIND_RETRY_S by `_run`: the thread goes on journalling every result (sends on the
        unbound socket reach no one, a gap `--journal` fills), so no accepted frame goes without a result and
        nothing waits on a thread that is gone."""
        endpoint = self.bound_endpoint
        was_bound = self.bound
        if was_bound:
            try:
                self._socket.unbind(endpoint)
            except zmq.ZMQError as exc:
                log.error(
                    "publish_rebind_failed",
                    endpoint=endpoint,
                    error=f"unbind: {exc}",
                    effect="still bound: the subscribers connected keep their connections",
                )
                return
            self.bound = False
            self._unbound_since = time.monotonic()
        # Only right after the unbind may the port still be held by the listener being closed.
        deadline = time.monotonic() + (REBIND_WAIT_S if was_bound else 0.0)
        while True:
            try:
                # Another process's socket file meanwhile: retried every BIND_RETRY_S as a taken port is, not in the
                # wait below, which is for our own listener to close (each probe is a connection the other process
                # sees: a refused handshake where it uses CURVE).
                refuse_served_ipc(endpoint)
                try:
                    self._socket.bind(endpoint)
                    break
                except zmq.ZMQError as exc:
                    if exc.errno == zmq.EADDRINUSE and time.monotonic() < deadline:
                        time.sleep(0.01)
                        continue
                    raise
            except zmq.ZMQError as exc:
                if was_bound:  # logged once per outage, not at every retry
                    log.error(
                        "publish_rebind_failed",
                        endpoint=endpoint,
                        error=str(exc),
                        effect=f"results are journalled but not sent; the bind is tried again every {BIND_RETRY_S:g} s",
                    )
                self._bind_retry_at = time.monotonic() + BIND_RETRY_S
                return
        self.bound = True
        self._unbound_since = None
        if not was_bound:
            log.warning("publish_bound_again", endpoint=endpoint)
        try:
            open_ipc_to_group(self._socket)  # an ipc bind made a new socket file
        except OSError as exc:
            # Only the group's subscribers are shut out: the journal and the service user's own clients still get
            # every result, so publishing goes on.
            log.error("publish_mode_failed", endpoint=endpoint, error=str(exc), effect="group members cannot connect")
        self._socket_file.bound(self.bound_endpoint)
        self.rebinds += 1
        log.info("publish_rebound", endpoint=endpoint, reason=reason)

    def send_status(self) -> None:
        if self._status is not None:
            self._socket.send_multipart(encode_status(self.station, self._status()))

    def stop(self, timeout: float | None = None) -> bool:
        """Send everything queued so far, then close the socket (lingering so the last messages leave); returns
        within `timeout` (None: however long that takes).

        Returns False when the thread did not finish within `timeout`, or had ended on its own before: then what
        was left queued is logged (`publish_dropped`) and counted in `failed`, and the stop is not a clean one.
        """
        self._stopping = True
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float:
            return SUBMIT_CHECK_S if deadline is None else max(0.0, deadline - time.monotonic())

        while self._thread.is_alive():  # the queue may be full behind a thread stuck in the disk
            try:
                self._queue.put(_STOP, timeout=min(SUBMIT_CHECK_S, left()))
                break
            except queue.Full:
                if deadline is not None and time.monotonic() >= deadline:
                    break
        self._thread.join(None if deadline is None else left())
        if self._thread.is_alive():
            return False
        self._socket.close()
        if self._journal is not None:
            self._journal.close()
        unsent = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP and item is not _WAKE:
                unsent += 1
                self._dropped(item)
        return (self._stopped or not self.started) and not unsent
