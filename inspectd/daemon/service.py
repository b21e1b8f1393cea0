"""`inspectd run`: wires the stages together and owns the process lifecycle. No model code lives here.

Threads: one ingest thread per camera -> per-camera bounded queues -> one batcher+inference thread -> publisher
thread (ZeroMQ PUB); the control server answers on its own thread; the main thread handles signals and the systemd
watchdog, and starts a thread for each reload SIGHUP asks for.

Lifecycle:
  start    load config, open bundle + engine, one warm-up inference, bind publish/control/metrics, start ingest,
           then READY=1.
  reload   (SIGHUP or control `reload`) build a new model state beside the running one and swap it between batches;
           the engine it replaced is closed by the inference thread once its last batch has finished.
  stop     (SIGTERM/SIGINT) stop ingest, drain every queued and in-flight frame through the engine, publish the
           results, close the PUB socket with a short linger, close the engines, exit 0: the drain within
           shutdown_timeout_s, the rest within graces of their own past it (see Daemon.shutdown). A stop during
           the model load ends it between its steps (bundle verified, engine opened, warmed up): no READY=1, exit 0.
  watchdog WATCHDOG=1 is sent only while the pipeline makes progress (a batch finished recently, or nothing is waiting)
           and the inference stage is healthy; a stuck engine therefore gets the service restarted by systemd.
  drift    every published `ok` score (and the mean grey level of its model input) feeds its camera's drift monitor
           (inspectd.daemon.drift) on the publisher thread; a new model starts a fresh monitor, and so does a
           thresholds version that changes what that camera's monitor judges by (its threshold, target, references).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from inspectd.daemon.batching import MicroBatcher
from inspectd.daemon.drift import DriftMonitor, drift_inputs, monitor_for
from inspectd.daemon.inference import InferenceStage, Judged, ModelState
from inspectd.daemon.publish import Publisher
from inspectd.errors import InspectdError
from inspectd.logs import configure_logging

if TYPE_CHECKING:
    from inspectd.daemon.control import ControlServer
    from inspectd.daemon.frames import Frame

INGEST_STOP_S = 1.0  # how long shutdown waits for the ingest threads to stop before it drains the queues
PUBLISH_GRACE_S = 2.0  # how long results already judged (or refused at shutdown) may take to leave, past the timeout
# How long a stop waits, once the last result is out, for what the cameras do after a result (a folder camera's
# deletes and moves, on a share that may stall).
SETTLE_S = 1.0
PUB_LINGER_MS = 1000  # long enough for the last results to leave on shutdown, short enough to never hang
# How long a stop waits at least for the engines' close (a CUDA/TensorRT teardown), past shutdown_timeout_s: a close
# that hangs must not hold the process up to systemd's SIGKILL.
ENGINE_CLOSE_GRACE_S = 5.0
# How long past shutdown_timeout_s a stop that drained in time waits for a reload it caught (SIGHUP's or control's,
# opening its engine) to give that engine up, so the running one can be closed and the stop end clean.
RELOAD_GRACE_S = 15.0
# A reload that has given its engine up (shutdown then took the lock from it) only logs its refusal: its thread ends
# within this.
RELOAD_END_S = 1.0
IDLE_TICK_S = 0.5  # how often an idle inference thread reports progress
STUCK_AFTER_S = 10.0  # a batch older than this without finishing means the pipeline is stuck...
# ...or, for a batch this many times as long as its frames took in recent batches (a full batch of hundreds of frames
# on a slow CPU), longer: a slow batch that finishes is no fault.
STUCK_FACTOR = 4.0
# ...but never past this: the factor rests on a warm-up (one-time set-up included) and on batches that decay only as
# they finish, and a hung engine must not pass for a slow one for long.
STUCK_MAX_S = 60.0
STATE_LOCK = "inspectd.lock"  # in state_dir: held by the running daemon, holding its pid
SERVICE_USER = "inspectd"  # the units' User=: `run --check` as root checks what it may read
# How long the results endpoint may stay unbound (a rebind after a key reload that keeps failing, retried meanwhile)
# before the daemon counts as unhealthy.
PUBLISH_UNBOUND_S = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="the daemon's YAML config file")
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the config and the bundle it names (every checksum, the thresholds; the engine opened and run "
        "once on blank frames where that needs no GPU), print what would run, and exit (0 valid, 2 not) without "
        "starting the daemon; allowed as root",
    )
    parser.add_argument(
        "--service-user",
        default=SERVICE_USER,
        metavar="NAME",
        help=f"with --check as root: the user the unit runs the daemon as (default {SERVICE_USER}, as the units "
        "say); the config, its keys and its bundle are loaded as that user too, since root reads anything and a "
        "file only root may read would pass the check and fail the unit's start; '' for a config no unit runs",
    )


class StartStopped(Exception):
    """A stop asked for while the model loaded: the start ends between two of its steps, with nothing taken in."""


class Daemon:
    """The running pipeline; also the control handler (status/reload/set_thresholds/pause/resume)."""

    def __init__(self, config, log=None, stop: threading.Event | None = None) -> None:
        """Opens the journal and loads the model; StartStopped where `stop` is set between the load's steps (the
        bundle verified, the engine opened), each of which may take minutes on a GPU station."""
        from inspectd.daemon.ingest.queue import FrameQueue
        from inspectd.daemon.ingest.supervisor import CameraIngest

        self.config = config
        self.log = log or structlog.get_logger("inspectd")
        self.t_start = time.monotonic()
        self._reload_lock = threading.Lock()
        self._retired: list[ModelState] = []
        # model id -> the document that ran before a reload took the version back (its bundle could not be written):
        # a later reload of that model numbers above it and keeps its history, so retrying the reload mends it.
        self._went_back: dict[str, Any] = {}
        self._stopping = threading.Event()
        self._in_flight: list = []  # the frames of the batch the engine is running
        self._abandon = threading.Event()  # set when shutdown ran out of time: queued frames go out as errors
        self._inference_done = threading.Event()
        self._inference_failed = False  # the inference thread ended on an exception: nothing is judged any more
        self._last_progress = time.monotonic()
        self._batch_started: float | None = None
        # Seconds per frame of recent batches (a maximum that decays by a tenth per batch), seeded by the warm-up.
        self._frame_s = 0.0
        self._frames_done = 0
        self._rate = (time.monotonic(), 0, 0.0)  # (when, frames_done then, fps) for throughput

        # Key material (and its file permissions) and the journal first: a refusal there costs no model load. In
        # `run --check`'s order, so that a key file both sockets name is refused in the same words.
        self.control_curve = self._curve("control", config.control.curve)
        self.publish_curve = self._curve("publish", config.publish.curve)
        self.journal = self._open_journal()
        self.reload_left_running = False  # a stop gave up waiting for a reload (said once, by shutdown)
        try:
            _stop_check(stop)
            state = ModelState.open(
                config.model.bundle,
                config.engine.backend,
                config.engine.options,
                config.batching.max_batch,
                accept=lambda _bundle: _stop_check(stop),
            )
            try:
                _stop_check(stop)
                warm_s = self._timed_warm_up(state)  # READY=1 then means the engine is warm
            except BaseException:
                state.close()
                raise
        except BaseException:
            # Stopped, or the bundle refused: nothing was taken in, and the next start must not take this run for a
            # crash (`unclean_shutdown` and its fsyncs) every RestartSec while a bad bundle is mended.
            if self.journal is not None:
                self.journal.close()
            raise
        self.stage = InferenceStage(state, config.batching.max_batch, config.publish.masks)
        # camera -> ((model_id, thresholds_version) its reference belongs to, monitor)
        self._drift: dict[str, tuple[tuple[str, int], DriftMonitor]] = {}
        self._drift_lock = threading.Lock()
        for cam in config.cameras:
            self._follow_drift(cam.id, state)
            monitor = self._drift[cam.id][1]
            if monitor.running:
                # The windows are not kept across a restart: an alarm raised before it is down until the window
                # refills and raises it again, which must not pass without a word.
                self.log.info(
                    "drift_reset",
                    camera=cam.id,
                    reason="start",
                    model_id=state.model_id,
                    thresholds_version=state.thresholds_version,
                    samples_needed=monitor.min_samples,
                )
        self._frame_s = warm_s
        self.log.info(
            "model_loaded",
            model_id=state.model_id,
            thresholds_version=state.thresholds_version,
            backend=config.engine.backend,
            input_shape=list(state.bundle.input_shape),
            bit_depth=state.bundle.bit_depth,
            bundle=str(config.model.bundle),
        )
        self._tell_unknown_cameras(state)

        self.ready = threading.Condition()
        self.queues = {
            cam.id: FrameQueue(cam.queue.size, cam.queue.policy, self.ready, cam.queue.max_bytes)
            for cam in config.cameras
        }
        self.batcher = MicroBatcher(
            list(self.queues.values()), self.ready, config.batching.max_batch, config.batching.max_wait_ms
        )
        self.metrics = self._open_metrics()
        self.archive = self._open_archive()
        self.publisher = Publisher(
            config.publish.endpoint,
            config.station,
            sndhwm=config.publish.sndhwm,
            status_interval_s=config.publish.status_interval_s,
            status=self.status_message,
            linger_ms=PUB_LINGER_MS,
            on_published=self._on_published,
            journal=self.journal,
            socket_options=self.publish_curve,
            archive=self.archive.offer if self.archive is not None else None,
        )
        for cam in config.cameras:  # created here, before the threads that read and update them start
            self.publisher.counters(cam.id)
        self._narrow_depth = state.bundle.bit_depth
        self.ingest = {
            cam.id: CameraIngest(
                cam,
                self.queues[cam.id],
                first_seq=self._first_seq(cam.id),
                mark_seq=self._seq_marker(cam.id),
                bit_depth=state.bundle.bit_depth,
                where=f"cameras[{i}]",
            )
            for i, cam in enumerate(config.cameras)
        }
        self._inference_thread = threading.Thread(target=self._inference_loop, name="inference", daemon=True)
        self.control: ControlServer | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self, stop: threading.Event | None = None) -> None:
        """Start every stage; the cameras last, and not at all once `stop` is set (a stop asked for during the start:
        shutdown() then finds nothing taken in)."""
        from inspectd.daemon.control import ControlServer

        if self.archive is not None:
            self.archive.start()
        self.publisher.start()
        # Loading and warming the model took as long as it took: no pass of the inference loop is overdue yet.
        self._last_progress = time.monotonic()
        self._inference_thread.start()
        self.control = ControlServer(self.config.control.endpoint, self, curve=self.control_curve)
        self.control.start()
        if stop is not None and stop.is_set():
            self.log.info("cameras_not_started", reason="the daemon is stopping")
            return
        for ingest in self.ingest.values():
            ingest.start()
        self.log.info(
            "started",
            station=self.config.station,
            cameras=list(self.ingest),
            publish=self.publisher.bound_endpoint,
            control=self.config.control.endpoint,
        )

    def shutdown(self) -> bool:
        """Stop ingest, drain, publish, close. True when the drain finished within shutdown_timeout_s, and the
        publish and the engines' close within their graces past it."""
        deadline = time.monotonic() + self.config.shutdown_timeout_s
        self.log.info("stopping", pending=self.batcher.pending())
        # A zmq camera first unbinds, so its producers keep what they have not handed over for the next start, and
        # takes in what its socket already holds (its producers will not send that again; what is left there once
        # ingest stops is logged as lost).
        # Half the drain's time at most (or INGEST_STOP_S): what is taken in must still be judged before the deadline.
        now = time.monotonic()
        drained_by = min(deadline, now + max(INGEST_STOP_S, (deadline - now) / 2))
        receiving = [ingest.stop_receiving() for ingest in self.ingest.values()]
        for emptied in receiving:
            if emptied is not None:
                emptied.wait(max(0.0, drained_by - time.monotonic()))
        for ingest in self.ingest.values():
            ingest.stop()
        # Sources notice stop within a read; one stuck in a driver call longer must not spend every other
        # camera's drain time (what it returns after stop is not accepted).
        joined_by = min(deadline, time.monotonic() + INGEST_STOP_S)
        for ingest in self.ingest.values():
            if ingest.started:
                ingest.join(max(0.0, joined_by - time.monotonic()))
        for queue in self.queues.values():
            queue.close()
        self._stopping.set()
        self.batcher.stop()
        drained = self._inference_done.wait(max(0.0, deadline - time.monotonic())) and not self._inference_failed
        if not drained:
            self._publish_unjudged()
        # The results already handed over still go out (and into the journal) even when the drain ran late.
        published = self.publisher.stop(max(PUBLISH_GRACE_S, deadline - time.monotonic()))
        # What a camera does once a result is out (a folder's delete or move) comes after the publish: a file left
        # when the process ends is inspected again at the next start, and its part gets a second verdict.
        settled_by = time.monotonic() + SETTLE_S
        for ingest in self.ingest.values():
            ingest.settle(max(0.0, settled_by - time.monotonic()))
        if self.archive is not None:
            from inspectd.daemon.archive import CLOSE_GRACE_S

            # Its queued frames are named in results already out: a grace of their own, as those results had.
            self.archive.close(max(CLOSE_GRACE_S, deadline - time.monotonic()))
        # A stop takes at most about 21 s past shutdown_timeout_s, which the units' TimeoutStopSec=90 allows for
        # with shutdown_timeout_s at its 60 s maximum: up to about 12 s of the graces above and below (2 x
        # PUBLISH_GRACE_S, PUB_LINGER_MS, SETTLE_S, archive's CLOSE_GRACE_S, control's and metrics' stops); where
        # the drain finished, up to RELOAD_GRACE_S (those graces within it) for a reload it caught, then
        # ENGINE_CLOSE_GRACE_S for the engines' close and RELOAD_END_S for the reload's thread to end.
        if self.control is not None:
            self.control.stop()
        if self.metrics is not None:
            self.metrics.stop()
        # A reload still opening its engine (SIGHUP's thread, or control's) would swap it in after this close. Once
        # every result is out it is waited for past the deadline: it sees the stop when its open ends and gives
        # that engine up, and exiting under it would end the process inside the engine's native code.
        closed = False
        if drained:
            waited = time.monotonic()
            if self._reload_lock.acquire(timeout=max(0.0, deadline + RELOAD_GRACE_S - time.monotonic())):
                try:
                    closed = self._close_engines(max(ENGINE_CLOSE_GRACE_S, deadline - time.monotonic()))
                finally:
                    self._reload_lock.release()
            else:  # SIGHUP's reload or control's, said here for either
                self.reload_left_running = True
                self.log.warning(
                    "reload_still_running",
                    waited_s=round(time.monotonic() - waited, 1),
                    effect="a reload still holds the engines: the process exits with the running engine unclosed",
                )
        clean = drained and published and closed
        self.log.info(
            "stopped",
            published=self.publisher.published,
            drained=drained,
            engines_closed=closed,
            clean=clean,
            frames_in={cam: ingest.frames_in for cam, ingest in self.ingest.items()},
        )
        return clean

    def _publish_unjudged(self) -> None:
        """The shutdown timeout ran out with frames still queued: each accepted frame still gets a result, verdict
        error with the reason, rather than vanishing with its seq."""
        self._abandon.set()  # the inference thread takes no further batch
        # First the batch the engine is running now, so results stay in seq order; only an engine stuck for longer
        # than the grace keeps its frames from a result, and then the log names them.
        if not self._inference_done.wait(PUBLISH_GRACE_S):
            self.log.error(
                "shutdown_in_flight_lost",
                frames=[f"{frame.camera}:{frame.seq}" for frame in self._in_flight],
                reason=f"the engine did not finish its batch within {PUBLISH_GRACE_S:g} s of the shutdown timeout",
            )
        reason = (
            "shutdown: not inspected, the inference thread had ended (inference_thread_failed in the log); the "
            "frame was accepted but never judged"
            if self._inference_failed
            else f"shutdown: not inspected within shutdown_timeout_s={self.config.shutdown_timeout_s:g} "
            f"after SIGTERM, the frame was accepted but never judged"
        )
        state = self.stage.state
        unjudged: dict[str, int] = {}
        for frame in self._unjudged_frames():
            unjudged[frame.camera] = unjudged.get(frame.camera, 0) + 1
            self.publisher.submit(
                Judged(frame, "error", None, None, state.model_id, state.thresholds_version, [], None, reason)
            )
        self.log.warning("shutdown_unjudged", frames=unjudged, reason=reason)

    def _unjudged_frames(self) -> Iterator[Frame]:
        if self._inference_done.is_set():
            # The batcher is no longer the inference thread's: it also gives the frames it gathered and held (not
            # yet due) when the drain was abandoned, which are in no queue.
            while batch := self.batcher.drain():
                yield from list(batch)
            return
        for frames in self.queues.values():
            while (frame := frames.get_nowait()) is not None:
                yield frame

    def _inference_loop(self) -> None:
        try:
            while not self._stopping.is_set():
                batch = self.batcher.next_batch(timeout=IDLE_TICK_S)
                if batch:
                    self._run(batch)
                if self._retired:
                    self._close_retired()
                self._last_progress = time.monotonic()
            # Ingest has stopped: everything still queued was accepted and gets its result.
            while not self._abandon.is_set() and (batch := self.batcher.drain()):
                self._run(batch)
        except Exception:
            self._inference_failed = True
            self.log.exception("inference_thread_failed")
            self._publish_in_flight("inference thread failed")
        finally:
            self._inference_done.set()

    def _publish_in_flight(self, why: str) -> None:
        """The frames of the batch the engine was running when the inference thread ended: each accepted frame still
        gets a result, verdict error, rather than vanishing with its seq."""
        state = self.stage.state
        for frame in self._in_flight:
            self.publisher.submit(
                Judged(frame, "error", None, None, state.model_id, state.thresholds_version, [], None, f"daemon: {why}")
            )
        self._in_flight = []

    def _run(self, batch: list) -> None:
        self._in_flight = list(batch)
        t0 = self._batch_started = time.monotonic()
        was_healthy = self.stage.healthy
        results = self.stage.run_batch(batch)
        took = time.monotonic() - t0
        self._frame_s = max(took / len(batch), 0.9 * self._frame_s)
        self._batch_started = None
        # Progress from the batch's end: results a full publish queue does not take count from here, not from
        # before a long batch began.
        self._last_progress = time.monotonic()
        for judged in results:
            self.publisher.submit(judged)
        self._in_flight = []  # handed over: none of them is left without a result should this thread end now
        self._frames_done += len(results)
        if self.metrics is not None:
            self.metrics.observe_batch(len(results), took)
        if was_healthy != self.stage.healthy:
            self.log.warning("health_changed", healthy=self.stage.healthy, last_error=self.stage.last_error)

    def _close_retired(self) -> None:
        """Close engines a reload replaced; called between batches, so none is in use. The closing itself (the
        session's teardown and malloc_trim over every arena, tens of ms with a real model) runs on its own thread:
        on the inference thread it was a stall every reload, long enough to overflow a live camera's queue."""
        retired = self._take_retired()
        if retired:
            threading.Thread(target=_close_all, args=(retired,), name="retire-engine", daemon=True).start()

    def _take_retired(self) -> list[ModelState]:
        retired = []
        while self._retired:
            old = self._retired.pop()
            if old.engine is not self.stage.state.engine:
                retired.append(old)
        return retired

    def _close_engines(self, wait_s: float) -> bool:
        """At stop: close the replaced engines and the running one, waiting `wait_s` at most. False, said in one
        line, where the running one's close failed or did not end in time (a hung GPU teardown is left to the
        process exit rather than holding the stop up to systemd's SIGKILL)."""
        from inspectd.daemon.control import error_line

        retired = self._take_retired()
        state = self.stage.state
        failed: list[BaseException] = []

        def close() -> None:
            _close_all(retired)  # each failure logged as a warning: these engines judge nothing any more
            try:
                state.close()
            except Exception as exc:
                failed.append(exc)

        closer = threading.Thread(target=close, name="close-engine", daemon=True)
        closer.start()
        closer.join(wait_s)
        if closer.is_alive():
            self.log.error(
                "engine_close_timeout", waited_s=round(wait_s, 1), effect="the process exits with the engine closing"
            )
            return False
        if failed:
            self.log.error("engine_close_failed", error=error_line(failed[0]))
            return False
        return True

    def _on_published(self, judged: Judged, latency_ms: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_result(judged.frame.camera, judged.verdict, latency_ms / 1000.0)
        if judged.verdict == "ok" and judged.score is not None:
            self._observe_drift(judged)

    def _follow_drift(self, camera: str, state: ModelState) -> None:
        """`camera`'s monitor for `state`: the one it has, window and raised alarm included, where `state` is the
        same model and leaves that camera's drift_inputs as they were (a new version for another camera, a reload of
        the same document), else a fresh one on `state`'s. A raised alarm ends only with the reference it was raised
        against: starting afresh on an unchanged one would drop the PLC drift bit for at least MIN_SAMPLES good
        frames."""
        inputs = drift_inputs(state.thresholds, camera)
        key = (state.model_id, state.thresholds_version)
        with self._drift_lock:
            old = self._drift.get(camera)
            if old is not None and old[0][0] == state.model_id and old[1].inputs == inputs:
                self._drift[camera] = (key, old[1])
                return
            self._drift[camera] = (key, monitor_for(state.thresholds, camera))
        if old is None:
            return
        # The fresh monitor starts with both PLC bits at 0: each one that was up must be seen to drop in the log,
        # which otherwise shows it raised and never cleared.
        for event, was_up in (
            ("drift_cleared", old[1].state.alarm),
            ("false_reject_warning_cleared", old[1].state.false_reject_warning),
        ):
            if was_up:
                self.log.info(
                    event,
                    camera=camera,
                    reason="new reference",
                    model_id=state.model_id,
                    thresholds_version=state.thresholds_version,
                )

    def _observe_drift(self, judged: Judged) -> None:
        camera = judged.frame.camera
        key = (judged.model_id, judged.thresholds_version)
        entry = self._drift.get(camera)
        if entry is None or entry[0] != key:
            state = self.stage.state
            if (state.model_id, state.thresholds_version) != key:
                return  # judged by a model or thresholds since replaced: not evidence about the new reference
            self._follow_drift(camera, state)
            entry = self._drift[camera]
        monitor = entry[1]
        with self._drift_lock:
            warned = monitor.state.false_reject_warning
            change = monitor.add(float(judged.score), judged.brightness)  # type: ignore[arg-type]
            warning_changed = monitor.state.false_reject_warning != warned
            if change is None and not warning_changed:
                return  # the status dict (dataclasses.asdict) is built only for the rare frame that logs it
            fields = dict(
                camera=camera, seq=judged.frame.seq, model_id=key[0], thresholds_version=key[1], **monitor.status()
            )
        if change == "raised":
            self.log.warning("drift_raised", **fields)
        elif change == "cleared":
            self.log.info("drift_cleared", reason="window back on the reference", **fields)
        if warning_changed:
            if warned:
                self.log.info("false_reject_warning_cleared", **fields)
            else:
                self.log.warning("false_reject_warning_raised", **fields)

    def drift_status(self, camera: str) -> dict[str, Any]:
        entry = self._drift.get(camera)
        return entry[1].status() if entry is not None else {"active": False}

    def _open_journal(self):
        path = self.config.journal_path
        if path is None:
            return None
        from inspectd.daemon.journal import Journal

        # Under state_dir: the config refused it otherwise (Config._writes_under_state_dir).
        journal = self.config.publish.journal
        return Journal(
            path,
            int(journal.max_mb * 2**20),
            fsync_interval_s=journal.fsync_interval_s,
            camera_count=len(self.config.cameras),
        )

    def _first_seq(self, camera: str) -> int:
        """Seq numbering resumes after the last seq given out, so no seq is ever published twice; seqs given to
        frames that got no journalled result (in flight at a crash) are skipped, and subscribers see them as a gap."""
        if self.journal is None:
            return 0
        next_seq, skipped = self.journal.resume(camera)
        if next_seq == 0:
            return 0
        event = self.log.warning if skipped else self.log.info
        event(
            "seq_resumed",
            camera=camera,
            last_journalled=self.journal.last_seq(camera),
            next_seq=next_seq,
            skipped=[skipped.start, skipped.stop - 1] if skipped else None,
            unclean_shutdown=self.journal.unclean,
            after_reboot=self.journal.rebooted,
        )
        return next_seq

    def _seq_marker(self, camera: str):
        if self.journal is None:
            return None
        return functools.partial(self.journal.mark_accepted, camera)

    @staticmethod
    def _curve(role: str, curve_config):
        if curve_config is None:
            return None
        from inspectd.daemon.security import CurveServer

        return CurveServer(role, curve_config.server_secret_key, curve_config.allowed_clients_dir)

    def _open_archive(self):
        archive = self.config.archive
        if not archive.enabled:
            return None
        from inspectd.daemon.archive import Archive

        return Archive(archive.path, archive.max_mb, archive.max_age_h, archive.good_every, archive.queue)

    def _open_metrics(self):
        if self.config.metrics.address is None:
            return None
        from inspectd.daemon.metrics import Metrics

        return Metrics(self.config.metrics.address, self)

    # -- health ------------------------------------------------------------------------------------------------

    def progressing(self) -> bool:
        """The pipeline moved recently (a batch finished or the inference thread found nothing waiting), and every
        thread that serves outside input is still there to serve it."""
        if not self.stage.healthy or self._inference_done.is_set() or self.dead_threads():
            return False
        return self._stuck() is None

    def _stuck(self) -> str | None:
        """Why the inference thread counts as stuck (one line), or None: a batch in the engine for longer than
        STUCK_AFTER_S or STUCK_FACTOR times what its frames took in recent batches, whichever is longer (at most
        STUCK_MAX_S), or no pass of its loop for STUCK_AFTER_S outside a batch (results it cannot hand on to a full
        publish queue). An idle line is not stuck: with nothing waiting the loop still comes round every
        IDLE_TICK_S."""
        now = time.monotonic()
        started, frames = self._batch_started, len(self._in_flight)
        if started is not None:
            limit = min(STUCK_MAX_S, max(STUCK_AFTER_S, STUCK_FACTOR * self._frame_s * frames))
            if now - started <= limit:
                return None
            return (
                f"engine stuck: a batch of {frames} frame(s) has run for {now - started:.1f} s (more than {limit:.1f} "
                f"s: {STUCK_FACTOR:g} times what its frames took in recent batches, {STUCK_AFTER_S:g} to "
                f"{STUCK_MAX_S:g} s)"
            )
        overdue = now - self._last_progress >= STUCK_AFTER_S
        if overdue:
            return (
                f"pipeline stuck: the inference thread has not come round for {now - self._last_progress:.0f} s "
                f"(more than {STUCK_AFTER_S:g} s; results not taken by the publisher?)"
            )
        return None

    def health_problems(self) -> list[str]:
        """What makes the daemon unhealthy, one line each; empty while healthy. The same conditions as withhold the
        watchdog's WATCHDOG=1, so the status (ctl, the PUB status the PLC bridge lowers TriggerReady on, the metric)
        says unhealthy from the moment systemd is no longer told the pipeline moves, not only once it restarts it.
        While stopping, the drain's end (the inference thread done, no further pass) is no fault."""
        problems = []
        if not self.stage.healthy:
            problems.append(
                f"inference: {self.stage.consecutive_failures} batches failed in a row "
                f"(last error: {self.stage.last_error})"
            )
        dead = self.dead_threads()
        if dead:
            problems.append(f"threads ended: {', '.join(dead)}")
        if not self._stopping.is_set() and self._inference_thread.ident is not None and not dead:
            stuck = self._stuck()
            if stuck is not None:
                problems.append(stuck)
        return problems

    def dead_threads(self) -> list[str]:
        """Threads that ended while they should be serving: each is a part of the daemon that no longer answers
        (its camera, the inference stage, the publisher, the control channel, the CURVE authenticator, the journal's
        syncer, the image archive's writer)."""
        dead = [
            f"ingest-{cam}"
            for cam, ingest in self.ingest.items()
            if ingest.started and not ingest.is_alive() and ingest.state in ("running", "reopening")
        ]
        if self._inference_failed or (
            self._inference_thread.ident is not None and not self._stopping.is_set() and self._inference_done.is_set()
        ):
            dead.append("inference")
        if self.publisher.started and not self.publisher.alive():
            dead.append("publish")
        elif self.publisher.unbound_s() > PUBLISH_UNBOUND_S:
            # Results are journalled but reach no subscriber: past a moment for the port to come free this is a
            # daemon that no longer serves, so the watchdog restarts it (and a start that cannot bind keeps failing
            # until the endpoint is free).
            dead.append("publish-unbound")
        if self.archive is not None and not self._stopping.is_set() and not self.archive.alive():
            dead.append("archive")
        if self.control is not None and not self.control.alive():
            dead.append("control")
        if self.journal is not None and not self.journal.alive():
            dead.append("journal-sync")
        dead += [f"auth-{role}" for role, curve in self.curves() if not curve.alive()]
        return dead

    def curves(self) -> list[tuple[str, Any]]:
        """Every CurveServer by role: control, publish, and `ingest-<camera>` for each zmq camera with CURVE."""
        roles = [("control", self.control_curve), ("publish", self.publish_curve)]
        roles += [(f"ingest-{cam}", ingest.curve) for cam, ingest in self.ingest.items()]
        return [(role, curve) for role, curve in roles if curve is not None]

    def throughput(self) -> float:
        """Frames per second over the last few seconds."""
        when, done, fps = self._rate
        now = time.monotonic()
        if now - when >= 2.0:
            fps = (self._frames_done - done) / (now - when)
            self._rate = (now, self._frames_done, fps)
        return fps

    # -- control handler ---------------------------------------------------------------------------------------

    def camera_stats(self) -> dict[str, dict[str, Any]]:
        cameras = {}
        for cam_id, ingest in self.ingest.items():
            stats = dict(ingest.stats())
            counters = self.publisher.counters(cam_id)
            stats.update(
                queued=len(self.queues[cam_id]),
                dropped=self.queues[cam_id].dropped,
                published=counters.published,
                defects=counters.defect,
                errors=counters.error,
                drift=self.drift_status(cam_id),
            )
            cameras[cam_id] = stats
        return cameras

    def status(self) -> dict[str, Any]:
        state = self.stage.state
        problems = self.health_problems()
        return {
            "station": self.config.station,
            "healthy": not problems,
            "unhealthy": problems,
            "model_id": state.model_id,
            "thresholds_version": state.thresholds_version,
            "uptime_s": round(time.monotonic() - self.t_start, 3),
            "throughput_fps": round(self.throughput(), 3),
            "published": self.publisher.published,
            "batches": self.stage.batches,
            "failed_batches": self.stage.failed_batches,
            "last_error": self.stage.last_error,
            "cameras": self.camera_stats(),
            "journal": self.journal.status() if self.journal is not None else None,
            "archive": self.archive.status() if self.archive is not None else None,
            "auth_refused": {role: curve.refused for role, curve in self.curves()},
        }

    def status_message(self) -> dict[str, Any]:
        """The periodic status on the PUB socket (see messages.STATUS_FIELDS)."""
        state = self.stage.state
        problems = self.health_problems()
        return {
            "t": time.time(),
            "interval_s": self.config.publish.status_interval_s,  # when the next one is due: a client's staleness
            "uptime_s": round(time.monotonic() - self.t_start, 3),
            "healthy": not problems,
            "unhealthy": problems,
            "model_id": state.model_id,
            "thresholds_version": state.thresholds_version,
            "throughput_fps": round(self.throughput(), 3),
            "cameras": self.camera_stats(),
            "journal": self.journal.status() if self.journal is not None else None,
            "archive": self.archive.status() if self.archive is not None else None,
        }

    def reload(self) -> dict[str, Any]:
        # Opening, warming up and measuring a bundle takes seconds: the journal shows one is under way.
        self.log.info("reload_started", bundle=str(self.config.model.bundle))
        # Key allow-lists first, and whatever the model does: revoking a client must not wait on a good bundle.
        allow_lists = self._reload_allow_lists()
        try:
            with self._reload_lock:
                self._refuse_when_stopping()
                old = self.stage.state
                new, frame_s = self._open_reloaded()
                try:
                    # Shutdown closes the engines once, under this lock: one swapped in after it would never be
                    # closed.
                    self._refuse_when_stopping()
                    new, numbering = self._keep_version_rising(old, new)
                except BaseException:
                    new.close()
                    raise
                self._retired.append(self.stage.swap(new))
                # The larger of the two: a batch of the old engine may still be running, and the new may be slower.
                self._frame_s = max(self._frame_s, frame_s)
        except Exception as exc:
            from inspectd.daemon.control import mark_refusal

            # The lists were reloaded all the same: an operator revoking a key while the bundle is refused is told
            # who was removed (and which list failed), beside the refusal.
            if allow_lists:  # none without CurveZMQ: the refusal's reply stays as it was
                mark_refusal(exc, allow_lists=allow_lists)
            raise
        # A reload that reads the same model and document back (one run to revoke a key, or a routine systemctl
        # reload) keeps every window and a raised alarm. By what each monitor judges by, not the version: a version
        # written over on disk judges by other values, and one that changes a camera's override leaves the others'.
        for camera in self.ingest:
            self._follow_drift(camera, new)
        self._tell_unknown_cameras(new)
        self.log.info(
            "reloaded",
            model_id=new.model_id,
            thresholds_version=new.thresholds_version,
            previous_model_id=old.model_id,
            previous_thresholds_version=old.thresholds_version,
        )
        reply = {"model_id": new.model_id, "thresholds_version": new.thresholds_version, "allow_lists": allow_lists}
        return {**reply, **numbering}

    def _keep_version_rising(self, old: ModelState, new: ModelState) -> tuple[ModelState, dict[str, Any]]:
        """`new` judged by a thresholds version above the running one where the reload brings another document of
        the same model under the same or a lower number (the bundle copied over again, a link pointed back at an
        older copy): results are keyed by model and version, so one number must never name two documents, and the
        station's own versions stay reachable by `ctl rollback`. Written into the new bundle before the swap, as
        set-thresholds writes, so a restart reads the same; a bundle the daemon may not write in keeps its number,
        said as a warning. What was done goes into the reload's reply too (`thresholds_renumbered` or
        `thresholds_version_went_back`), for `ctl reload` to print."""
        from engines.bundle import thresholds as thresholds_doc
        from engines.bundle.store import NotDurable
        from engines.errors import BundleError
        from inspectd.daemon.control import BUNDLE_LOCK_WAIT_S

        running, loaded = old.thresholds, new.thresholds
        behind = self._went_back.get(new.model_id) if new.model_id == old.model_id else None
        if behind is not None and behind.version > running.version:
            running = behind
        if new.model_id != old.model_id or loaded.version > running.version or loaded == running:
            return new, {}
        doc = dataclasses.replace(loaded, version=running.version + 1, history=thresholds_doc.history_after(running))
        try:
            new.bundle.replace_file(thresholds_doc.FILE_NAME, thresholds_doc.dumps(doc), wait_s=BUNDLE_LOCK_WAIT_S)
        except NotDurable as exc:
            self.log.warning("thresholds_not_durable", thresholds_version=doc.version, error=str(exc))
        except (BundleError, OSError, thresholds_doc.ThresholdsError) as exc:
            self.log.warning(
                "thresholds_version_went_back",
                model_id=new.model_id,
                thresholds_version=loaded.version,
                previous_thresholds_version=running.version,
                error=str(exc),
                effect=f"results name version {loaded.version} again, now with this bundle's values",
            )
            self._went_back[new.model_id] = running
            went_back = {"previous_version": running.version, "version": loaded.version, "error": str(exc)}
            return new, {"thresholds_version_went_back": went_back}
        self.log.warning(
            "thresholds_renumbered",
            model_id=new.model_id,
            loaded_version=loaded.version,
            thresholds_version=doc.version,
            previous_thresholds_version=running.version,
            effect="the reloaded bundle's thresholds under a new number; ctl rollback reaches the earlier versions",
        )
        self._went_back.pop(new.model_id, None)
        renumbered = {"loaded_version": loaded.version, "version": doc.version, "previous_version": running.version}
        return new.with_thresholds(doc), {"thresholds_renumbered": renumbered}

    def _tell_unknown_cameras(self, state: ModelState) -> None:
        """A camera override the daemon has no camera for judges nothing: written by `calibrate --camera` without
        --apply under a mistyped id (cam01 for cam1), it would otherwise be taken without a word while the operator
        believes the camera recalibrated. Said at every start and reload, as `run --check` notes it."""
        running = [camera.id for camera in self.config.cameras]
        unknown = cameras_not_run(state.thresholds.per_camera, running)
        if unknown:
            self.log.warning(
                "thresholds_unknown_cameras",
                cameras=unknown,
                thresholds_version=state.thresholds_version,
                running=running,
                effect="these overrides judge nothing (a mistyped calibrate --camera, or a camera out of the config)",
            )

    def _open_reloaded(self) -> tuple[ModelState, float]:
        """model.bundle opened, checked and warmed up beside the running model (the swap costs the line nothing). A
        failure here is the bundle's own (its files, bit depth, engine, score shift), which the daemon's next start
        would meet too: its control reply says so (BUNDLE_REFUSED), so the tool that wrote the bundle can put back
        the one running, where a refusal of the moment (stopping, a key no longer allowed) leaves it be."""
        try:
            new = ModelState.open(
                self.config.model.bundle,
                self.config.engine.backend,
                self.config.engine.options,
                self.config.batching.max_batch,
                accept=self._same_bit_depth,
            )
            try:
                frame_s = self._timed_warm_up(new)
            except BaseException:
                # Its session (on a GPU, its device memory) would stay held until the garbage collector found it,
                # another engine each retry, while the running one holds its own: the next reload runs out sooner.
                new.close()
                raise
        except Exception as exc:
            from engines.bundle.store import ChangedOnDisk
            from inspectd.daemon.control import mark_refusal
            from inspectd.protocol.control import BUNDLE_REFUSED

            # A bundle still being written (it changed on disk twice while it opened) is a refusal of the moment:
            # a tool that put back the running bundle for it would undo a write that is fine once it ends.
            if not isinstance(exc, ChangedOnDisk):
                mark_refusal(exc, **{BUNDLE_REFUSED: True})
            raise
        return new, frame_s

    def _timed_warm_up(self, state: ModelState) -> float:
        """Warm `state`'s engine up; the seconds per frame it took (lazy initialisation included: an upper bound)."""
        t0 = time.monotonic()
        state.warm_up()
        return (time.monotonic() - t0) / min(2, state.engine.max_batch)

    def _same_bit_depth(self, bundle) -> None:
        """Cameras that narrow 16-bit frames by the bundle's depth do so by the depth of the bundle the daemon started
        with, frames already queued too: a bundle of another is refused before its engine is opened. So is one that
        declares none where the running one does (trained on these cameras' narrowed frames, an archive export,
        without --bit-depth): it would be judged right until the next restart narrowed the frames as 16-bit."""
        narrowing = [cam for cam, ingest in self.ingest.items() if ingest.narrows_16_bit]
        if narrowing and bundle.bit_depth != self._narrow_depth:
            declared = "input.bit_depth" if bundle.declared_bit_depth is not None else "no input.bit_depth"
            raise InspectdError(
                f"reload: {bundle.path}: 16-bit frames narrowed as {bundle.bit_depth}-bit ({declared}), expected "
                f"{self._narrow_depth}-bit, as cameras {', '.join(narrowing)} narrow them since the daemon started: "
                f"retrain with --bit-depth {self._narrow_depth} if its images are their frames, or restart the daemon "
                "to change the depth"
            )

    def _refuse_when_stopping(self) -> None:
        if self._stopping.is_set():
            raise InspectdError("reload: the daemon is stopping")

    def _reload_allow_lists(self) -> dict[str, Any]:
        from inspectd.protocol.keys import KeysError

        changes: dict[str, Any] = {}
        for role, curve in self.curves():
            try:
                changes[role] = curve.reload()
            except KeysError as exc:
                changes[role] = {"error": str(exc)}
                self.log.error(
                    "allow_list_reload_failed", domain=role, error=str(exc), effect="the previous list stays"
                )
        if changes.get("publish", {}).get("removed"):
            self.publisher.drop_peers()  # a PUB socket cannot refuse one peer's messages: everyone handshakes again
        return changes

    def set_thresholds(
        self, doc: Any, force: bool = False, own_history: bool = False, built_on: tuple[str, int] | None = None
    ) -> dict[str, Any]:
        """Check, write and swap in a thresholds document. `force` (`ctl set-thresholds --force`) skips the fit
        checks (model, cameras) and the range check, not the version's nor the engine's score shift. `own_history`: a
        version restored from the running document's history (rollback), made for this daemon when it was set, so
        not checked for fit again; `built_on`: the (model id, thresholds version) it was built from, which must still
        run once the reload lock is held."""
        from engines.bundle import thresholds as thresholds_doc
        from engines.bundle.store import NotDurable
        from inspectd.daemon.control import BUNDLE_LOCK_WAIT_S

        try:
            new = thresholds_doc.parse(doc)
        except thresholds_doc.ThresholdsError as exc:
            raise InspectdError(str(exc)) from None
        # A reload (SIGHUP's thread) holds this lock while it opens and warms the new bundle, minutes on a GPU: the
        # control thread answers one request at a time, so an unbounded wait here would leave every client, `status`
        # too, unanswered for as long, and the version would land after its sender gave up.
        if not self._reload_lock.acquire(timeout=BUNDLE_LOCK_WAIT_S):
            what = "rollback" if own_history else "set_thresholds"
            raise InspectdError(
                f"{what}: a reload of the bundle is under way (still after {BUNDLE_LOCK_WAIT_S:g} s), nothing "
                "written: expected the request again once it has ended (the log's reloaded or reload_failed line)"
            )
        try:
            state = self.stage.state
            if built_on is not None and built_on != (state.model_id, state.thresholds_version):
                # A reload finished while this waited for its lock: restored onto another model, the old model's
                # values and history would judge (and be written into) the new one, unchecked for fit.
                raise InspectdError(
                    f"rollback: a reload changed the running thresholds while it waited (now model {state.model_id}, "
                    f"version {state.thresholds_version}), nothing written: expected the request again against "
                    "what runs now (`inspectd ctl status`)"
                )
            # Above a version a reload took back too (the bundle could not be written then): that number and those
            # below it already named other documents of this model.
            behind = self._went_back.get(state.model_id)
            floor = max(state.thresholds_version, behind.version if behind is not None else 0)
            if new.version <= floor:
                raise InspectdError(f"thresholds.version: {new.version}, expected more than the current {floor}")
            kept = own_history or _builds_on(new, state.thresholds)
            if not kept:
                new = dataclasses.replace(new, history=thresholds_doc.history_after(state.thresholds))
            if not force:
                if not own_history:
                    self._check_thresholds_fit(new, state)
                check_threshold_range(new, state.thresholds)
            # Every check first (with_thresholds refuses a score shift the engine's precision cannot hold), then the
            # file, then the swap: a refused document left on disk would be what the next start or reload loads,
            # and a restart would then fail on it. The file before the swap, so a restart keeps what the line judges.
            judged_by = state.with_thresholds(new)
            try:
                state.bundle.replace_file(
                    thresholds_doc.FILE_NAME, thresholds_doc.dumps(new), wait_s=BUNDLE_LOCK_WAIT_S
                )
            except NotDurable as exc:
                # Written, and what the next load reads: judged by from now on too, or the disk and the line differ.
                self.log.warning("thresholds_not_durable", thresholds_version=new.version, error=str(exc))
            self.stage.swap(judged_by)
            self._went_back.pop(state.model_id, None)
        finally:
            self._reload_lock.release()
        for camera in self.ingest:
            self._follow_drift(camera, self.stage.state)
        self.log.info(
            "thresholds_set",
            thresholds_version=new.version,
            image_threshold=new.image_threshold,
            pixel_threshold=new.pixel_threshold,
            previous_version=state.thresholds_version,
            history="sent" if kept else "the running document's",
        )
        return {"thresholds_version": new.version}

    def _check_thresholds_fit(self, new, state) -> None:
        """InspectdError unless `new` was made for this daemon: thresholds calibrated on another model's scores (an
        operator's stale copy, a document from another station) and overrides for cameras it does not run judge
        nothing as intended. Overrides already in force are kept as they are (a camera taken out of the config)."""
        from engines.bundle.thresholds import shown_name, shown_names

        recorded = new.provenance.get("model_id")
        if isinstance(recorded, str) and recorded != state.model_id:
            raise InspectdError(
                f"thresholds.provenance.model_id: {shown_name(recorded)}, expected the running model "
                f"{state.model_id} (calibrated on another model's scores), or force"
            )
        unknown = cameras_not_run(set(new.per_camera) - set(state.thresholds.per_camera), self.ingest)
        if unknown:
            raise InspectdError(
                f"thresholds.per_camera: {shown_names(unknown)}: not a camera of this daemon, expected one of "
                f"{', '.join(self.ingest)}, or force"
            )

    def rollback(self, version: Any) -> dict[str, Any]:
        """A new thresholds version with the values of the earlier `version` from the current document's history."""
        from engines.bundle import thresholds as thresholds_doc

        if isinstance(version, bool) or not isinstance(version, int):
            raise InspectdError(f"rollback.version: {version!r}, expected an earlier thresholds version (integer)")
        state = self.stage.state
        try:
            new = thresholds_doc.rollback(state.thresholds, version)
        except thresholds_doc.ThresholdsError as exc:
            raise InspectdError(str(exc)) from None
        built_on = (state.model_id, state.thresholds_version)
        return {**self.set_thresholds(new.to_dict(), own_history=True, built_on=built_on), "rolled_back_to": version}

    def _ingest_for(self, camera: Any):
        if camera not in self.ingest:
            from engines.schema import show

            raise InspectdError(f"camera {show(camera)}: unknown, expected one of {', '.join(self.ingest)}")
        return self.ingest[camera]

    def pause(self, camera: Any) -> dict[str, Any]:
        self._ingest_for(camera).paused = True
        self.log.info("camera_paused", camera=camera)
        return {"camera": camera, "paused": True}

    def resume(self, camera: Any) -> dict[str, Any]:
        self._ingest_for(camera).paused = False
        self.log.info("camera_resumed", camera=camera)
        return {"camera": camera, "paused": False}


def _builds_on(new: Any, current: Any) -> bool:
    """Whether the history `new` carries was built on the running document `current`: its entries up to `current`'s
    version are `current` and `current`'s history, as they are (calibrate --apply's next_version of the bundle's
    thresholds.json, maybe over versions written to disk since the daemon loaded it, which it keeps). Any other
    history (a hand-written document's none, another model's or an old copy's) would replace the daemon's own: gone
    from `ctl rollback`, which would then restore what another model's thresholds were."""
    earlier = [
        entry
        for entry in new.history
        if not isinstance(entry.get("version"), int)
        or isinstance(entry.get("version"), bool)
        or entry["version"] <= current.version
    ]
    from engines.bundle import thresholds as thresholds_doc

    return bool(earlier) and thresholds_doc.same_history(earlier, thresholds_doc.history_after(current)[: len(earlier)])


def _stop_check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise StartStopped("the daemon was stopped during its start")


def _close_all(states: list[ModelState]) -> None:
    for state in states:
        try:
            state.close()
        except Exception as exc:  # a failing teardown of a replaced engine must not take anything else with it
            from inspectd.daemon.control import error_line

            structlog.get_logger("inspectd").warning("retired_engine_close_failed", error=error_line(exc))


# Without recorded scores (documents from before calibration recorded them), a new threshold may move this far (as a
# factor) beyond every version of the model's thresholds; further is a typo or an attack (1e300 passes everything).
THRESHOLD_SPAN = 10.0


def check_threshold_range(new: Any, current: Any) -> None:
    """Refuse (InspectdError naming the key) thresholds outside the scores seen at calibration, accepted only with
    `force`.

    The range is what the current document and its history recorded, and what the new document's own calibration
    recorded (engines.bundle.thresholds.calibrated_range: the good frames' scores, every image score, the pixel
    scores; a recalibration on new images brings its own), widened by its own width on each side: a
    threshold below every good score rejects everything, one far above every defect passes everything, while the
    rules calibration uses (the top of the good scores and a margin, a point among the defect scores) land inside.
    A document that recorded no scores falls back to the span of its versions' thresholds widened THRESHOLD_SPAN
    times. Values are finite already (the thresholds parser refuses anything else)."""
    from engines.bundle import thresholds as thresholds_doc

    versions = [current.to_dict(), *current.history]
    for key, kind in (("image_threshold", "image"), ("pixel_threshold", "pixel")):
        ranges = [thresholds_doc.calibrated_range(current, kind), thresholds_doc.calibrated_range(new, kind, False)]
        recorded = [bound for found in ranges if found is not None for bound in found]
        if recorded:
            lo, hi = min(recorded), max(recorded)
            width = max(hi - lo, 1e-6 * max(1.0, abs(hi)))
            allowed = (lo - width, hi + width)
            seen = f"the {kind} scores seen at calibration span {lo:g}..{hi:g}"
        else:
            values = [float(v[key]) for v in versions if isinstance(v.get(key), (int, float))]
            values += [float(o[key]) for v in versions for o in (v.get("per_camera") or {}).values() if key in o]
            if not values:
                continue
            lo, hi = min(values), max(values)
            margin = max(abs(lo), abs(hi), 1e-6) * (THRESHOLD_SPAN - 1.0)
            allowed = (lo - margin, hi + margin) if lo < 0 else (lo / THRESHOLD_SPAN, hi + margin)
            seen = f"no scores recorded at calibration; its versions' thresholds span {lo:g}..{hi:g}"
        proposed = [("", getattr(new, key))] + [
            (f"per_camera.{cam}.", o[key]) for cam, o in new.per_camera.items() if key in o
        ]
        for where, value in proposed:
            if not allowed[0] <= value <= allowed[1]:
                raise InspectdError(
                    f"thresholds.{where}{key}: {value:g} is outside {allowed[0]:g}..{allowed[1]:g} ({seen}), "
                    f"expected a value in that range or force: true"
                )


def _as_service_user(user: str, config_path: Path) -> tuple[str | None, str | None]:
    """Load the config, its CurveZMQ keys (owners checked) and its bundle as the daemon does at start, in a child that
    takes `user`'s ids (with its groups): (the refusal the daemon would meet, in its own words, or None; a note for
    run --check to print, or None). The refusal is "no user" when no such user exists here.

    Root reads anything, so only this sees what the service user may not: modes, owners, groups, ACLs, folders it
    cannot enter or list, a manifest only root may read."""
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return "no user", None
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        code = 0
        try:
            os.close(reader)
            os.setgroups(os.getgrouplist(user, entry.pw_gid))
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            try:
                note = _load_as_the_daemon(config_path)
            except Exception as exc:  # any refusal is the answer, sent back as text
                os.write(writer, b"refused " + str(exc).encode(errors="backslashreplace"))
            else:
                if note is not None:
                    os.write(writer, b"note " + note.encode(errors="backslashreplace"))
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(writer)
    with os.fdopen(reader, "rb") as answer:
        said = answer.read().decode(errors="backslashreplace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise InspectdError(f"--service-user {user}: could not take that user's ids to check what it may read")
    kind, _, text = said.partition(" ")
    return (text, None) if kind == "refused" else (None, text or None)


def _load_as_the_daemon(config_path: Path) -> str | None:
    """What the daemon loads at start, loaded as this user: raises what it would refuse; returns a note for run
    --check where state_dir is not this user's to write yet."""
    from engines.bundle.store import load_bundle
    from inspectd.daemon.config import DEFAULT_STATE_DIR, load_config
    from inspectd.daemon.security import load_keys

    config = load_config(config_path)
    for where, curve in _curves(config):
        load_keys(curve.server_secret_key, curve.allowed_clients_dir, where)
    load_bundle(config.model.bundle).thresholds()
    # The start makes state_dir (with the folders missing above it) and locks it, and fails (exit 1, retried) where
    # this user may not. Under DEFAULT_STATE_DIR only a note: the unit's StateDirectory= creates its folder, or hands
    # an existing one to User=, before the daemon starts, so a folder root's now may well be this user's then. Any
    # other folder this user cannot write is refused: the units also leave it read-only (ProtectSystem=strict).
    existing = next(path for path in (config.state_dir, *config.state_dir.parents) if os.path.lexists(path))
    if os.access(existing, os.W_OK | os.X_OK):
        return None
    made = "" if existing == config.state_dir else f" (it would be created in {existing}, which it may not write)"
    units = Path(os.path.realpath(DEFAULT_STATE_DIR))
    if not Path(os.path.realpath(config.state_dir)).is_relative_to(units):
        raise InspectdError(
            f"state_dir {config.state_dir}: not writable by this user{made}, expected a directory it owns or may "
            f"write (chown it to the service user; the units also leave any folder outside {DEFAULT_STATE_DIR} "
            "read-only: add it to ReadWritePaths= in a drop-in)"
        )
    return (
        f"state_dir {config.state_dir}: not writable by this user now{made}: a unit's StateDirectory= gives "
        f"{DEFAULT_STATE_DIR} (inspectd.service) or {DEFAULT_STATE_DIR}/NAME (inspectd@NAME) to its User= at start, "
        "creating it where missing"
    )


def _curves(config) -> list[tuple[str, Any]]:
    """(where, curve) of every socket of `config` that has CurveZMQ, in the order the daemon loads them."""
    curves = [("control", config.control.curve), ("publish", config.publish.curve)]
    curves += [
        (f"cameras[{i}].source", getattr(camera.source, "curve", None)) for i, camera in enumerate(config.cameras)
    ]
    return [(where, curve) for where, curve in curves if curve is not None]


def check(path: Path, service_user: str = SERVICE_USER) -> int:
    """`inspectd run --check`: the config as the daemon would load it, its CurveZMQ keys and its bundle verified,
    and its engine opened and run once on blank frames where that needs no GPU; the daemon is not started. As root,
    also whether `service_user` (where that user exists) may read each of those files."""

    from engines.bundle.store import load_bundle
    from engines.errors import EngineError
    from engines.runtime import backend_class
    from inspectd.daemon.config import ipc_hidden_by_the_units, load_config
    from inspectd.daemon.inference import ModelState
    from inspectd.daemon.security import load_keys
    from inspectd.protocol.keys import duplicate_keys

    try:
        config = load_config(path)
        empty, duplicates = [], []
        for where, curve in _curves(config):
            # By the loader the daemon starts with; as root (which may read anything) the owners are left out, since
            # the files belong to the service user: those are checked at start.
            names = load_keys(curve.server_secret_key, curve.allowed_clients_dir, where, os.geteuid() != 0)[2]
            if not names:
                empty.append(f"{where}.curve.allowed_clients_dir {curve.allowed_clients_dir}")
            for key, files in sorted(duplicate_keys(names).items()):
                # A file name with bytes that are not UTF-8 cannot be printed as it is: those bytes as \\xNN.
                shown = ", ".join(os.fsencode(name).decode("utf-8", "backslashreplace") for name in files)
                duplicates.append(
                    f"{where}.curve.allowed_clients_dir {curve.allowed_clients_dir}: {shown} hold the same key "
                    f"{key.decode()}: it stays allowed until every one of them is deleted"
                )
        bundle = load_bundle(config.model.bundle)
        thresholds = bundle.thresholds()
        # What the backend needs of the bundle (an FP16 graph, a named plan), by the rule opening the engine applies.
        backend = backend_class(config.engine.backend)
        options = backend.parse_options(config.engine.options, where="engine.options")
        backend.check_bundle(bundle, options)
        opened = not backend.needs_device(options)
        if opened:
            # Opened and run once on blank frames as the start does: a graph this onnxruntime cannot load (a newer
            # IR version, exported on another machine) matches every checksum and would fail only the unit's start.
            state = ModelState.open(
                config.model.bundle, config.engine.backend, config.engine.options, config.batching.max_batch
            )
            try:
                state.warm_up()
            finally:
                state.close()
        checked_as = os.geteuid() == 0 and service_user != ""
        as_user, user_note = _as_service_user(service_user, Path(path).absolute()) if checked_as else (None, None)
        if as_user not in (None, "no user"):
            raise InspectdError(f"as the service user {service_user} (the unit's User=), {as_user}")
    except (InspectdError, EngineError, OSError, ValueError) as exc:
        print(f"inspectd run --check: {exc}", file=sys.stderr)
        return 2
    unknown = cameras_not_run(thresholds.per_camera, [camera.id for camera in config.cameras])
    genicam = [camera.id for camera in config.cameras if camera.source.kind == "genicam"]
    genicam_missing = _aravis_missing() if genicam else None
    print(f"{path}: valid")
    print(f"  station {config.station}: cameras {', '.join(camera.id for camera in config.cameras)}")
    print(f"  bundle {config.model.bundle}: model {bundle.model_id}, thresholds version {thresholds.version}")
    declared = "input.bit_depth" if bundle.declared_bit_depth is not None else "the bundle declares no input.bit_depth"
    print(
        f"  16-bit frames of folder, zmq and opencv cameras narrowed as {bundle.bit_depth}-bit, >> "
        f"{bundle.bit_depth - 8} ({declared}); "
        "genicam cameras' by their pixel format"
    )
    print(f"  engine {config.engine.backend}, publish {config.publish.endpoint}, control {config.control.endpoint}")
    if not opened:
        print("  note: the engine needs the GPU, so it was not opened here; the start opens it and runs it once")
    if unknown:
        print(f"  note: thresholds.per_camera names cameras not in this config: {', '.join(unknown)}")
    if not Path(config.model.bundle).resolve().is_relative_to(Path(config.state_dir).resolve()):
        # Under the units the daemon may write only its state_dir: the bundle runs, its thresholds cannot be set.
        print(
            f"  note: model.bundle {config.model.bundle} is outside state_dir {config.state_dir}: under the systemd "
            "units, which let the daemon write only there, ctl set-thresholds and calibrate/teach --apply cannot "
            "write its thresholds (Read-only file system)"
        )
    for hidden in ipc_hidden_by_the_units(config):
        print(f"  note: {hidden}")
    for directory in empty:
        print(f"  note: {directory} holds no client key (*.key): every client is refused there")
    if genicam_missing is not None:
        # Not a refusal: the config loads and the other cameras run; these fail at start and are not retried.
        print(f"  note: cameras {', '.join(genicam)}: {genicam_missing}: they fail at start, not retried")
    for duplicate in duplicates:
        print(f"  note: {duplicate}")
    if as_user == "no user":
        print(
            f"  note: no user {service_user} here, so what the unit's daemon may read was not checked "
            "(--service-user NAME: the unit's User=)"
        )
    if user_note is not None:
        print(f"  note: as the service user {service_user} (the unit's User=), {user_note}")
    return 0


def _aravis_missing() -> str | None:
    """Why genicam cameras cannot open with this Python, as their open says it; None where Aravis imports."""
    from inspectd.daemon.ingest.genicam import aravis_missing, import_aravis

    try:
        import_aravis()
    except (ImportError, ValueError) as exc:
        return aravis_missing(exc)
    return None


def cameras_not_run(named: Iterable[str], cameras: Iterable[str]) -> list[str]:
    """The camera ids in `named` (per-camera thresholds) that are not among the daemon's `cameras`, sorted."""
    return sorted(set(named) - set(cameras))


def hold_state_dir(state_dir: Path) -> None:
    """Lock `state_dir` for as long as this process runs (inspectd.durable.hold_pid_lock on its STATE_LOCK, which then
    holds this pid): a second daemon on it would bind its ipc sockets over the first one's, leaving that one running
    unreachable, and give out the same seqs into one journal. InspectdError naming the pid that holds it.

    Folders it creates are DIR_MODE (0750) whatever the umask: under the units' UMask=0077 they would be the service
    user's alone, and the group could not reach control.sock (0660) nor the journal and archive under them. Folders
    that already exist keep their mode."""
    from inspectd.durable import LockHeld, fsync_dir, hold_pid_lock, make_dirs

    path = state_dir / STATE_LOCK
    try:
        created = make_dirs(state_dir)
    except OSError as exc:
        # Said here, naming the key the operator set: the journal's open would name publish.journal.path instead.
        raise InspectdError(
            f"state_dir {state_dir}: cannot create it ({exc.strerror or exc}), expected a directory this user may "
            "create or use"
        ) from None
    # A directory created on a first start is an entry in its parent, which a power cut can lose (with the journal
    # under it) until the parent is fsynced: the journal would do this had it created them. A parent this user may
    # write but not read cannot be fsynced; the lock is taken all the same.
    for directory in created:
        with contextlib.suppress(OSError):
            fsync_dir(directory.parent)
    try:
        lock = hold_pid_lock(path)
    except LockHeld as held:
        raise InspectdError(
            f"state_dir {state_dir} is in use by inspectd pid {held.holder or '(not yet written)'}, expected a "
            "state_dir of each daemon's own (stop that daemon first, or give this config another state_dir)"
        ) from None
    except PermissionError as exc:
        raise InspectdError(
            f"state_dir {state_dir}: cannot open its {STATE_LOCK} ({exc.strerror}), expected one this user may read: "
            "remove it (left by a run as another user)"
        ) from None
    if lock is None and not os.access(state_dir, os.W_OK | os.X_OK):
        # No lock for want of rights (not a file system without locks): the journal's open would fail next, naming
        # publish.journal.path, a key the operator may never have set.
        raise InspectdError(
            f"state_dir {state_dir}: not writable by this user, expected a directory it owns or may write (chown it "
            "to the service user)"
        )


def raise_open_files_limit(log) -> None:
    """The soft RLIMIT_NOFILE raised to the hard one: a daemon run outside the units' LimitNOFILE (by hand, another
    supervisor) would otherwise have the usual 1024, which idle connections to a CURVE tcp endpoint can fill, and the
    journal's fsyncs and the archive's writes then fail. Never lowered; one warning line where it cannot be raised."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or soft == resource.RLIM_INFINITY:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.warning(
            "open_files_limit_not_raised",
            soft=soft,
            hard=hard,
            error=str(exc),
            effect=f"the daemon may hold {soft} descriptors at most",
        )


def _reload(daemon: Daemon, log) -> None:
    try:
        daemon.reload()
    except Exception as exc:  # a bad bundle on disk must not take the running line down
        from inspectd.daemon.control import error_line

        log.error("reload_failed", error=error_line(exc))


def run(args: argparse.Namespace) -> int:
    if args.check:
        return check(args.config, args.service_user)
    # Signals only set flags; the main loop below does the work outside the handler. Installed before anything else:
    # until then a SIGHUP (an early `systemctl reload`) kills the process and a SIGINT raises in whatever is loading.
    stop = threading.Event()
    reload_requested = threading.Event()
    wake = threading.Event()  # either signal wakes the main loop at once instead of at its next tick

    def on_signal(flag: threading.Event):
        def handler(*_):
            flag.set()
            wake.set()

        return handler

    signal.signal(signal.SIGTERM, on_signal(stop))
    signal.signal(signal.SIGINT, on_signal(stop))
    signal.signal(signal.SIGHUP, on_signal(reload_requested))

    import zmq

    from engines.errors import EngineError
    from inspectd.daemon.config import load_config
    from inspectd.daemon.notify import Notifier, follow_parent
    from inspectd.daemon.security import SecurityError, refuse_root
    from inspectd.protocol.keys import KeysError

    try:
        refuse_root()
    except SecurityError as exc:
        # 2 like a refused config: the unit's RestartPreventExitStatus=2 stops systemd from retrying what cannot pass.
        print(f"inspectd run: {exc}", file=sys.stderr)
        return 2
    try:
        follow_parent()
    except InspectdError as exc:
        print(f"inspectd run: {exc}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
    except InspectdError as exc:
        print(f"inspectd run: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.logging.level, config.logging.format)
    log = structlog.get_logger("inspectd")
    notifier = Notifier.from_env()
    raise_open_files_limit(log)

    try:
        hold_state_dir(Path(config.state_dir))
        if stop.is_set():  # stopped while the config loaded: no model to load, nothing taken in
            log.info("stopped", before="the start", clean=True)
            return 0
        daemon = Daemon(config, log, stop)  # a stop between the load's steps ends the start there
        daemon.start(stop)  # a stop during the last step (the warm-up) starts no camera
    except StartStopped:
        notifier.stopping()
        log.info("stopped", during="the model load", clean=True)
        return 0
    except KeysError as exc:
        # A key file the config names, refused as `run --check` refuses it: exit 2 like the config's own refusals,
        # which the units do not retry (it would be refused again every RestartSec until someone mends the file).
        log.error("start_failed", error=str(exc))
        print(f"inspectd run: {exc}", file=sys.stderr)
        return 2
    except (InspectdError, EngineError, OSError, ValueError, zmq.ZMQError) as exc:
        log.error("start_failed", error=str(exc))
        print(f"inspectd run: {exc}", file=sys.stderr)
        return 1
    if not stop.is_set():
        notifier.ready()
        log.info("ready")

    # Ping at least twice per WatchdogSec, and look at progress often enough to notice a stuck pipeline.
    interval = notifier.watchdog_interval_s()
    tick = min(1.0, interval / 2) if interval else 1.0
    healthy = True
    reloader: threading.Thread | None = None
    while not stop.is_set():
        # Loading, warming up and (FP16) measuring a bundle takes seconds: on this thread it would hold back
        # WATCHDOG=1 (and SIGTERM) for as long. A SIGHUP during a reload is served once that reload is done.
        if reload_requested.is_set() and (reloader is None or not reloader.is_alive()):
            reload_requested.clear()
            reloader = threading.Thread(target=_reload, args=(daemon, log), name="reload", daemon=True)
            reloader.start()
        progressing = daemon.progressing()
        if progressing:
            notifier.watchdog()
        problems = [] if progressing else daemon.health_problems()
        if progressing != healthy:
            healthy = progressing
            log.warning(
                "pipeline_progress",
                progressing=progressing,
                healthy=daemon.stage.healthy,
                dead_threads=daemon.dead_threads(),
                problems=problems,
            )
        notifier.status(
            f"{daemon.throughput():.1f} frames/s, {daemon.publisher.published} published, "
            + ("healthy" if progressing else f"UNHEALTHY: {'; '.join(problems) or 'no progress'}")
        )
        if stop.is_set() or (wake.wait(tick) and stop.is_set()):
            break
        wake.clear()
    notifier.stopping()
    deadline = time.monotonic() + daemon.config.shutdown_timeout_s
    clean = daemon.shutdown()
    if reloader is not None and reloader.is_alive():
        # A reload caught opening a bundle gives its engine up when it sees the stop; exiting under it would end
        # the process inside the engine's native code. Where the stop drained, shutdown waited for it (up to
        # RELOAD_GRACE_S) and it only has its refusal to log.
        reloader.join(max(RELOAD_END_S, deadline - time.monotonic()))
        if reloader.is_alive():
            if not daemon.reload_left_running:  # a stop that did not drain: shutdown did not wait for it
                log.warning("reload_still_running", effect="the process exits while the reload's thread runs")
            clean = False
    return 0 if clean else 1
