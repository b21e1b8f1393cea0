"""The inference stage: turns a batch of frames into judged results with one engine call.

It owns the engine and the model state (bundle, engine, thresholds). Per batch, through an engines.runtime Predictor:
each frame is fitted into one preallocated uint8 [max_batch, H, W, C] buffer, the engine runs once on the rows filled,
then each frame gets its verdict (score >= its camera's image threshold) and, only where needed (a defect, or
masks "always"), the pixel mask in the frame's own coordinates and its connected regions.

Reload builds a new ModelState beside the running one and `swap()` replaces it between batches: a batch reads the
state once at its start, so an in-flight batch finishes on the old model and every result names the model_id and
thresholds_version that judged it.

Engine faults fail that batch's frames with verdict "error" and the next batch runs; `unhealthy_after` failed
batches in a row mark the stage unhealthy until a batch succeeds again. A non-finite score (or region peak) is an
engine fault too: that frame gets verdict "error", and its batch counts as failed when no frame in it was judged.

A reduced-precision engine (an FP16 graph or plan, an INT8 plan) judges with thresholds set on FP32 scores only after
its scores were measured against the FP32 graph's on defect-free frames the bundle names (the thresholds'
calibration images, else its training images) and found within engines.runtime.score_shift.MAX_SHIFT of the lowest
image threshold: otherwise the model state is refused, at start, reload and set_thresholds alike.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog

from engines.bundle import thresholds as thresholds_doc
from engines.bundle.format import THRESHOLDS
from engines.errors import BundleError, EngineError
from engines.runtime import score_shift
from engines.runtime.predictor import Predictor
from engines.runtime.preprocess import mean_level
from inspectd.daemon.frames import Frame
from inspectd.protocol.messages import Region

log = structlog.get_logger("inspectd.daemon.inference")

MASK_POLICIES = ("defects", "always", "never")
MAX_REGIONS = 64  # the largest regions are reported; a mask full of speckle must not make a header of megabytes
SHIFT_PROBE_FRAMES = 32  # defect-free frames a reduced-precision engine's score shift is measured on
# Distinct size changes told per camera: a folder camera fed images of many sizes would otherwise log one per frame.
MAX_SIZE_CHANGES_TOLD = 8


@dataclasses.dataclass(frozen=True)
class ModelState:
    """Everything that judges a frame; replaced as a whole on reload."""

    bundle: Any
    engine: Any
    thresholds: Any  # engines.bundle.thresholds.Thresholds
    # How far a reduced-precision engine's scores are from FP32 ones (None: an FP32 engine, nothing to measure)
    shift: score_shift.ScoreShift | None = None

    @property
    def model_id(self) -> str:
        return self.bundle.model_id

    @property
    def thresholds_version(self) -> int:
        return self.thresholds.version

    @classmethod
    def open(
        cls,
        bundle_path: str | Path,
        backend: str,
        options: dict | None,
        max_batch: int,
        accept: Callable[[Any], None] | None = None,
    ) -> ModelState:
        """`accept(bundle)` may refuse the bundle (by raising) before its engine is opened."""
        # Imported here so importing the stage (e.g. for its types) does not load the bundle machinery.
        from engines.bundle.store import ChangedOnDisk

        try:
            bundle, engine, thresholds = _open_one_bundle(bundle_path, backend, options, max_batch, accept)
        except ChangedOnDisk as exc:
            # A teach or train swaps the whole directory, a calibrate rewrites thresholds.json: landing while this
            # ran, its files are not all of one bundle. Loaded afresh, once: two writes within one open are refused.
            log.info("bundle_changed_while_opening", bundle=str(bundle_path), change=str(exc), effect="opened again")
            try:
                bundle, engine, thresholds = _open_one_bundle(bundle_path, backend, options, max_batch, accept)
            except ChangedOnDisk as again:
                raise ChangedOnDisk(
                    f"{again}; changed twice while it was opened: retry once its writer is done"
                ) from None
        try:
            shift = None
            if engine.precision != "fp32":
                frames, source = probe_frames(bundle, thresholds)
                shift = score_shift.measure(engine, frames, source)
            state = cls(bundle, engine, thresholds, shift)
            state.check_thresholds(thresholds)
        except BaseException:
            engine.close()
            raise
        return state

    def check_thresholds(self, thresholds) -> None:
        """EngineError when this engine's scores are too far from the FP32 scores `thresholds` were set on."""
        if self.shift is not None and score_shift.needs_check(self.shift.precision, thresholds):
            score_shift.check(self.shift, thresholds)

    def warm_up(self) -> None:
        """One inference on two blank frames (one where max_batch is 1), so the first real batch pays no lazy
        initialisation. Two, not one: an engine that runs one frame but no more (a graph whose batch dimension is
        fixed at 1, in a backend that does not refuse it at open as ONNX Runtime's does) is then refused at start or
        reload, while the running model is kept, rather than failing every multi-frame batch once it is swapped in.
        Not max_batch: ONNX Runtime keeps the memory of the largest batch it ran for good (the catalogue's patchcore
        at 320: 2.1 GB at max_batch 8 against 0.4 GB), which a line that never fills its batches should not pay for
        at start."""
        h, w, c = self.bundle.input_shape
        n = min(2, self.engine.max_batch)
        try:
            result = self.engine.infer(np.zeros((n, h, w, c), np.uint8))
        except EngineError:
            raise
        except Exception as exc:  # the backend's own error (ONNX Runtime's multi-line RuntimeError): one line
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            raise EngineError(
                f"{self.bundle.path}: the engine fails on a batch of {n} blank frames ({type(exc).__name__}: {first}), "
                "expected a graph that runs any batch of uint8 frames with the bundle's scorer parameters"
            ) from None
        # A graph from another tool can run yet give outputs the stage cannot use (a float16 map cv2.resize refuses,
        # a map of another size): every defect frame would then be an error on the line.
        for name, got, expected in (("score", result.scores, (n,)), ("anomaly_map", result.maps, (n, h, w))):
            if got.dtype != np.float32 or got.shape != expected:
                raise EngineError(
                    f"{self.bundle.path}: output {name} is {got.dtype} {list(got.shape)} for {n} blank frames, "
                    f"expected float32 {list(expected)}"
                )
        # Finite scorer params can still overflow in the graph (a memory bank written by another tool): swapped in,
        # such a model makes every frame an error verdict and the station unhealthy, so it is refused here instead.
        if not np.isfinite(result.scores).all():
            raise EngineError(
                f"{self.bundle.path}: scores {result.scores.tolist()} on blank frames, expected finite scores: its "
                "scorer.npz or graph gives NaN/inf"
            )
        if not np.isfinite(result.maps).all():
            raise EngineError(
                f"{self.bundle.path}: anomaly map holds NaN/inf on blank frames, expected finite values: its "
                "scorer.npz or graph gives NaN/inf"
            )

    def with_thresholds(self, thresholds) -> ModelState:
        """Same model and engine, new thresholds: a threshold change costs no engine rebuild."""
        self.check_thresholds(thresholds)
        return dataclasses.replace(self, thresholds=thresholds)

    def close(self) -> None:
        self.engine.close()
        _return_freed_memory()


def _open_one_bundle(
    bundle_path: str | Path,
    backend: str,
    options: dict | None,
    max_batch: int,
    accept: Callable[[Any], None] | None,
) -> tuple[Any, Any, Any]:
    """The bundle at `bundle_path` verified, its engine opened and its thresholds read; ChangedOnDisk (the engine
    closed) when the directory no longer holds what load_bundle verified once the engine and thresholds are read.

    The engine opens the graph and the thresholds are read by name after load_bundle hashed every file: a swap in
    between would give the old manifest's model_id and scorer params with the new directory's graph and thresholds."""
    from engines.bundle.store import ChangedOnDisk, check_unchanged, load_bundle
    from engines.runtime import open_engine

    bundle = load_bundle(bundle_path)
    if accept is not None:
        accept(bundle)
    engine = open_engine(bundle, backend, options or {}, max_batch=max_batch)
    try:
        data = _verified_thresholds_bytes(bundle)
        try:
            check_unchanged(bundle.path, bundle.manifest, "its graph and thresholds may be another version's")
        except ChangedOnDisk:
            raise
        except BundleError as exc:  # its manifest gone or cut short: a swap by two renames caught between them
            raise ChangedOnDisk(str(exc)) from exc
        thresholds = _parse_thresholds(bundle, data)
    except BaseException:
        engine.close()
        raise
    return bundle, engine, thresholds


def _verified_thresholds_bytes(bundle) -> bytes:
    """thresholds.json's content, read once and checked against the checksum in the manifest load_bundle verified:
    what is parsed is then that version, even if the file was replaced and put back since."""
    from engines.bundle.store import ChangedOnDisk

    member = bundle.path / THRESHOLDS
    try:
        data = member.read_bytes()
    except OSError as exc:  # hashed by load_bundle a moment ago: gone since
        raise ChangedOnDisk(f"{member}: cannot read ({exc.strerror or exc}), expected the file just verified") from exc
    expected = bundle.manifest["files"][THRESHOLDS]
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ChangedOnDisk(
            f"{member}: sha256 {actual[:12]}... since it was loaded, expected the manifest's {str(expected)[:12]}..."
        )
    return data


def _parse_thresholds(bundle, data: bytes):
    member = bundle.path / THRESHOLDS
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{member}: not valid JSON ({exc})") from exc
    try:
        return thresholds_doc.parse(doc, where=str(member), most=thresholds_doc.LOADED_MAX_VERSION)
    except thresholds_doc.ThresholdsError as exc:
        raise BundleError(str(exc)) from exc


def probe_frames(bundle, thresholds, count: int = SHIFT_PROBE_FRAMES) -> tuple[np.ndarray, str]:
    """Up to `count` defect-free frames fitted to the model input, spread over the first folder the bundle names that
    is here: the thresholds' calibration images (newest version first), then its training images."""
    from engines.data.images import good_folder, list_images, load_image
    from engines.runtime.preprocess import fit_all

    named = [thresholds.provenance.get("good_dir")]
    # A hand-edited history entry's provenance may be anything: it only points to images, so one that is not a
    # mapping names none.
    provenances = (entry.get("provenance") for entry in thresholds.history)
    named += [p.get("good_dir") for p in provenances if isinstance(p, dict)]
    named.append(bundle.manifest.get("training", {}).get("data"))
    folders = [Path(d) for d in dict.fromkeys(n for n in named if isinstance(n, str) and n)]
    for named_folder in folders:
        try:
            folder = good_folder(named_folder, ("train",))  # train's folder as train read it: train/ok too
            if not folder.is_dir():
                continue
            paths = list_images(folder)
        except (EngineError, OSError):  # one this user may not read, or no longer a dataset: the next one named
            continue
        if not paths:
            continue
        picked = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, min(count, len(paths)))]
        decoded = []
        for path in picked:
            try:
                decoded.append(load_image(path, bundle.bit_depth))
            except (EngineError, OSError):  # a file cut short by a copy: the probe takes the others
                continue
        if decoded:
            return fit_all(decoded, bundle.input_shape, bundle.resize_policy, bundle.each_axis), str(folder)
    raise EngineError(
        f"{bundle.path}: cannot measure how far the reduced-precision engine's scores are from the FP32 ones its "
        f"thresholds were set on: none of the defect-free image folders the bundle names is here "
        f"({', '.join(map(str, folders)) or 'none named'})"
    )


def _return_freed_memory() -> None:
    """Hand the heap a closed engine freed back to the OS.

    glibc keeps freed memory in its per-thread arenas: without this, every reload (session built on the control
    thread, closed on the inference thread) leaves the old engine's memory resident and RSS grows reload after reload
    (figures in docs/RELIABILITY.md)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc (musl, macOS): nothing to trim this way


@dataclasses.dataclass(slots=True)
class Judged:
    """One frame's outcome, handed to the publisher (which encodes the mask off the engine thread)."""

    frame: Frame
    verdict: str  # ok | defect | error
    score: float | None
    threshold: float | None
    model_id: str | None
    thresholds_version: int | None
    regions: list[Region]
    mask: np.ndarray | None  # bool [frame H, frame W] when it is to be published
    error: str | None = None
    brightness: float | None = None  # mean grey level of the model input, for the drift alarm's brightness test


class InferenceStage:
    def __init__(self, state: ModelState, max_batch: int, masks: str = "defects", unhealthy_after: int = 3) -> None:
        if masks not in MASK_POLICIES:
            raise ValueError(f"publish.masks: {masks!r}, expected one of {', '.join(MASK_POLICIES)}")
        self.max_batch = max_batch
        self.masks = masks
        self.unhealthy_after = unhealthy_after
        self._state = state
        self._swap_lock = threading.Lock()
        self._predictor = Predictor(state.engine, state.bundle, max_batch)
        self.batches = 0
        self.failed_batches = 0
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self.last_batch_done = time.monotonic()
        self._told_channels: set[tuple[str, int, int]] = set()  # (camera, frame's, bundle's) channel counts told
        self._frame_sizes: dict[str, tuple[int, ...]] = {}  # camera: (height, width) of its last frame fitted
        self._told_sizes: dict[str, set[tuple[tuple[int, ...], tuple[int, ...]]]] = {}  # camera: (old, new) told

    @property
    def state(self) -> ModelState:
        return self._state

    @property
    def healthy(self) -> bool:
        return self.consecutive_failures < self.unhealthy_after

    def swap(self, state: ModelState) -> ModelState:
        """Install `state` for the next batch; returns the previous one (the caller closes it if the engine changed)."""
        with self._swap_lock:
            old, self._state = self._state, state
        return old

    def run_batch(self, frames: list[Frame]) -> list[Judged]:
        with self._swap_lock:
            state = self._state
        predictor = self._predictor
        if predictor.engine is not state.engine:
            # A reload brought another engine (perhaps of another input size): a batch buffer for it, once per reload.
            predictor = self._predictor = Predictor(state.engine, state.bundle, self.max_batch)
        results: list[Judged | None] = [None] * len(frames)
        slots = []  # index into `frames` of each batch row
        predictor.clear()
        for i, frame in enumerate(frames):
            if frame.error is not None:
                results[i] = self._error(frame, state, frame.error)
                continue
            try:
                assert frame.image is not None, "a frame without an error carries an image"
                predictor.add(frame.image)
            except Exception as exc:  # a frame that cannot be fitted fails alone, not its batch
                results[i] = self._error(frame, state, f"preprocess: {exc}")
                continue
            slots.append(i)
            size = frame.image.shape[:2]
            last = self._frame_sizes.get(frame.camera)
            if last != size:
                self._frame_sizes[frame.camera] = size
                if last is not None:
                    self._tell_size(frame.camera, last, size, state.bundle.resize_policy)
            channels = 1 if frame.image.ndim == 2 else frame.image.shape[2]
            if channels != state.bundle.input_shape[2]:
                self._tell_channels(frame.camera, channels, state.bundle.input_shape[2])
        if slots:
            try:
                output = predictor.infer()
            except Exception as exc:
                reason = f"engine: {type(exc).__name__}: {exc}".splitlines()[0]
                self.failed_batches += 1
                self.consecutive_failures += 1
                self.last_error = reason
                for i in slots:
                    results[i] = self._error(frames[i], state, reason)
            else:
                unjudged, judged_any, broken = None, False, False
                for row, i in enumerate(slots):
                    try:
                        judged = self._judge(frames[i], state, predictor, output, row)
                    except Exception as exc:  # an output of the wrong shape fails its frame, not the thread
                        judged = self._error(frames[i], state, f"engine: {type(exc).__name__}: {exc}".splitlines()[0])
                        broken = True
                    results[i] = judged
                    if judged.verdict == "error":
                        unjudged = judged.error
                    else:
                        judged_any = True
                if unjudged is not None:
                    self.last_error = unjudged
                if judged_any and not broken:
                    self.consecutive_failures = 0
                else:
                    # An output that cannot be read, or not one row judged: as sick as an engine that raises. A batch
                    # whose other rows were judged, some non-finite, is not: one camera's blown-out frames (an FP16
                    # overflow) must not make the whole station unhealthy and have the watchdog restart it for every
                    # camera; those frames are error verdicts of their own.
                    self.failed_batches += 1
                    self.consecutive_failures += 1
        self.batches += 1
        self.last_batch_done = time.monotonic()
        return results  # type: ignore[return-value]

    def _tell_channels(self, camera: str, channels: int, expected: int) -> None:
        """Once per camera and bundle kind: its frames are converted to the bundle's channels on every frame, which
        is right for a camera of the kind the bundle was trained on and goes unseen otherwise."""
        told = (camera, channels, expected)
        if told in self._told_channels:
            return
        self._told_channels.add(told)
        log.warning(
            "frame_channels_differ",
            camera=camera,
            frame_channels=channels,
            bundle_channels=expected,
            effect="every frame is converted (colour to grey, or grey copied into three channels) before it is judged: "
            "a camera of the other kind than the one the bundle was trained on, or a grey device delivered as BGR "
            "(three times the data through the queue and the archive)",
        )

    def _tell_size(self, camera: str, old: tuple[int, ...], new: tuple[int, ...], policy: str) -> None:
        """Once per camera and change (old size to new): every frame is fitted to the model input whatever its size,
        so a camera reconfigured mid-run (resolution, ROI, binning) or another camera on its id is judged at another
        scale, or stretched to other proportions, unseen otherwise. A camera that alternates two sizes tells each
        direction once; one of ever new sizes stops after MAX_SIZE_CHANGES_TOLD, saying so."""
        told = self._told_sizes.setdefault(camera, set())
        if (old, new) in told or len(told) >= MAX_SIZE_CHANGES_TOLD:
            return
        told.add((old, new))
        log.warning(
            "frame_size_changed",
            camera=camera,
            old_size=f"{old[1]}x{old[0]}",
            new_size=f"{new[1]}x{new[0]}",
            resize=policy,
            effect="frames of the new size are fitted to the model input at another scale (and, with resize "
            "stretch, other proportions): parts and defects look larger or smaller to the model than the frames it "
            "was trained on, so scores may shift",
            further_changes="not logged" if len(told) == MAX_SIZE_CHANGES_TOLD else "logged",
        )

    def _error(self, frame: Frame, state: ModelState, reason: str) -> Judged:
        return Judged(frame, "error", None, None, state.model_id, state.thresholds_version, [], None, reason)

    def _judge(self, frame: Frame, state: ModelState, predictor: Predictor, output, row: int) -> Judged:
        score = float(output.scores[row])
        if not math.isfinite(score):
            # NaN fails every comparison and would pass as "ok"; an FP16 overflow on a saturated frame or an
            # ill-conditioned scorer gives one, and neither says anything about the part.
            return self._error(frame, state, f"engine: non-finite score ({score})")
        # Checked for every verdict, not only where regions are drawn: ONNX Runtime's ReduceMax (the image score of
        # the maximum pool) skips a NaN that is not the map's first element, so a map gone NaN on a saturated spot
        # gave a finite score and the part passed as ok. The model-size map: tens of microseconds.
        if not np.isfinite(output.maps[row]).all():
            return self._error(frame, state, "engine: non-finite anomaly map")
        image_thr, pixel_thr = state.thresholds.for_camera(frame.camera)
        verdict = "defect" if score >= image_thr else "ok"
        regions: list[Region] = []
        mask = None
        if verdict == "defect" or self.masks == "always":
            frame_map = predictor.frame_map(output, row)
            binary = (frame_map >= pixel_thr).view(np.uint8)
            regions = _regions(binary, frame_map)
            if self.masks == "always" or (self.masks == "defects" and verdict == "defect"):
                mask = binary.view(np.bool_)
        brightness = mean_level(predictor.pixels[row]) if verdict == "ok" else None
        return Judged(
            frame, verdict, score, image_thr, state.model_id, state.thresholds_version, regions, mask, None, brightness
        )


def _regions(binary: np.ndarray, frame_map: np.ndarray) -> list[Region]:
    """Connected regions (8-connected) of a 0/1 uint8 mask, largest first, with the map's peak inside each."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8, ltype=cv2.CV_32S)
    if count <= 1:
        return []
    order = 1 + np.argsort(-stats[1:, cv2.CC_STAT_AREA], kind="stable")[:MAX_REGIONS]
    regions = []
    for label in order:
        x, y, w, h, area = (int(v) for v in stats[label, :5])
        window = frame_map[y : y + h, x : x + w]
        peak = float(window[labels[y : y + h, x : x + w] == label].max())
        regions.append(Region(x, y, w, h, area, round(peak, 6)))
    return regions
