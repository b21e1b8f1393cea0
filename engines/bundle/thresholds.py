"""The thresholds file: what turns a score into a verdict and a map into a mask, with its version and history.

It lives with the bundle, at the bottom layer (no torch, nothing of the daemon), because training writes the first
version, the daemon reads it on every reload and `inspectd calibrate` writes the next ones. Versions only go up; each
new version carries the previous ones in `history` (without their own history, and past the newest few without
their drift references) so an operator can roll back.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engines.bundle.format import THRESHOLDS
from engines.errors import listed, show

FILE_NAME = THRESHOLDS
MAX_HISTORY = 50
# provenance["good_scores"]: the image scores of the good frames the thresholds were set on, as {"n": frames,
# "quantiles": sorted scores}, the reference the daemon's score-drift alarm compares the line with. More than
# REFERENCE_POINTS frames are kept as that many evenly spaced quantiles, so the document stays small.
GOOD_SCORES = "good_scores"
# provenance["good_brightness"]: the same for the mean grey level of those frames as the model saw them (fitted to its
# input, engines.runtime.preprocess.mean_level), the reference of the alarm's brightness test: a lighting change the
# model's score is robust to still shows there.
GOOD_BRIGHTNESS = "good_brightness"
REFERENCE_POINTS = 200
# The fewest good frames a reference needs for the daemon's drift test to be able to raise at all: with fewer, its
# critical KS distance at the full window exceeds 1, which no window reaches (inspectd.daemon.drift refuses to arm
# on them; tests/test_drift_reference.py holds this number to the test's constants). calibrate and teach warn.
MIN_REFERENCE = 8
# The highest version number: every version goes out on the wire (control replies, result and status headers) and into
# the web view's JSON.parse, which reads a number as a double, exact only up to 2**53. The next version (+1, which a
# rollback, calibrate or a reload's renumbering makes) is still far inside the wire parser's 20 digits
# (inspectd.protocol.wirejson.MAX_INT_DIGITS) and the archive's 64-bit SQLite integers: a version past those turned
# every client deaf, its own replies included. parse and dumps refuse any version above it, so none is ever sent,
# written or loaded.
MAX_VERSION = 2**53 - 1
# The highest version a document already on disk may hold and still load: one set before the cap above existed (by
# hand) keeps its station running, though no version can follow it, up to the archive's 64-bit SQLite integers (past
# them every archive write failed).
LOADED_MAX_VERSION = 2**63 - 1


class ThresholdsError(ValueError):
    """A thresholds document is malformed; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The parsed, validated document."""

    version: int
    image_threshold: float
    pixel_threshold: float
    per_camera: dict[str, dict[str, float]]
    provenance: dict[str, Any]
    history: list[dict[str, Any]]

    def for_camera(self, camera: str) -> tuple[float, float]:
        """(image threshold, pixel threshold) for `camera`, its override first."""
        override = self.per_camera.get(camera, {})
        return (
            override.get("image_threshold", self.image_threshold),
            override.get("pixel_threshold", self.pixel_threshold),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def good_score_reference(scores) -> dict[str, Any]:
    """provenance["good_scores"] for the good frames' image `scores` (or provenance["good_brightness"] for their
    mean grey levels)."""
    import numpy as np

    values = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if values.size > REFERENCE_POINTS:
        values = np.quantile(values, (np.arange(REFERENCE_POINTS) + 0.5) / REFERENCE_POINTS)
    return {"n": int(np.asarray(scores).size), "quantiles": [float(f"{v:.7g}") for v in values]}


def reference_scores(
    thresholds: Thresholds, key: str = GOOD_SCORES, camera: str | None = None
) -> tuple[int, list[float]] | None:
    """(frames, sorted reference values) from provenance[key] (GOOD_SCORES or GOOD_BRIGHTNESS), or None when the
    document has none (set before it was recorded) or it is malformed. With `camera`, that camera's own reference
    in provenance[PER_CAMERA_REFERENCE] where it has one, else the pooled one."""
    if camera is not None:
        entries = thresholds.provenance.get(PER_CAMERA_REFERENCE)
        entry = entries.get(camera) if isinstance(entries, dict) else None
        if isinstance(entry, dict) and (own := _reference(entry, key)) is not None:
            return own
    return _reference(thresholds.provenance, key)


def _reference(provenance: dict[str, Any], key: str) -> tuple[int, list[float]] | None:
    reference = provenance.get(key)
    if not isinstance(reference, dict):
        return None
    n, values = reference.get("n"), reference.get("quantiles")
    if not isinstance(n, int) or n < 1 or not isinstance(values, list) or not values:
        return None
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return None
    return n, sorted(float(v) for v in values)


# provenance["image_scores"] / ["pixel_scores"]: {"n": count, "min": lowest, "max": highest} of the image scores (good
# and defective frames) and of the pixel scores `inspectd calibrate` saw; with good_scores, the range a new threshold is
# checked against (inspectd.daemon.service.check_threshold_range).
IMAGE_SCORES = "image_scores"
PIXEL_SCORES = "pixel_scores"
# provenance["per_camera_target"]: {camera: {"target": ..., "observed": ...}}, what `inspectd calibrate --camera` set
# that camera's override on. The top-level target/observed stay those of the global threshold, since every camera
# without an entry here measures its drift false-reject warning against that target.
PER_CAMERA_TARGET = "per_camera_target"
# provenance["engine_precision"]: the arithmetic the scores were computed in ("fp32" when absent), which
# engines.runtime.score_shift.needs_check compares with the engine's; with provenance["model_id"], what scores a
# version's thresholds were set on, so a rollback to it says both again.
ENGINE_PRECISION = "engine_precision"
SET_ON = (ENGINE_PRECISION, "model_id")
# provenance["per_camera_reference"]: {camera: {"good_scores": ..., "good_brightness": ...}}, that camera's own drift
# references from its own good frames (`calibrate --camera`, teach with frames that know their camera), which the
# daemon's monitor for the camera reads before the pooled ones: pooled over cameras that see the line under different
# light, a reference holds each camera's view and the others', and every camera's window then sits half off it on an
# unchanged line. They describe the scores of the model and precision the document was set on (SET_ON), so a new
# version carries them only where both stay (carried_camera_references): a teach (a new model) or a calibration on
# another precision drops them, and a global recalibration of the same model keeps them, its pooled good frames
# describing no one camera better than the camera's own did.
PER_CAMERA_REFERENCE = "per_camera_reference"
# The drift references: hundreds of numbers per camera. Copied into every later version's history, some 40 versions
# of a 4-camera station make the next one larger than a control request (1 MiB), which neither `calibrate --apply`
# nor `ctl set-thresholds` can then send. Only the newest KEPT_REFERENCES history entries keep
# them (history_after): a rollback mostly undoes the last calibration or two, or goes back across a rollback, and
# those keep the references they were set with; one further back takes the current version's, as a rollback to a
# version recorded before references existed does (rollback). Kept, they cost (cameras + 1) x 2 x REFERENCE_POINTS
# numbers each, so the document stays within a few of those however many versions are made.
REFERENCES = (GOOD_SCORES, GOOD_BRIGHTNESS, PER_CAMERA_REFERENCE)
KEPT_REFERENCES = 3
# provenance["references_dropped"]: the REFERENCES a history entry had and history_after dropped.
REFERENCES_DROPPED = "references_dropped"


def camera_targets(thresholds: Thresholds, per_camera: dict[str, dict[str, float]]) -> dict[str, Any]:
    """provenance[PER_CAMERA_TARGET] of `thresholds`, for the cameras whose image override `per_camera` (the next
    version's) still holds: an entry without its override would describe a threshold nobody judges by."""
    entries = thresholds.provenance.get(PER_CAMERA_TARGET)
    if not isinstance(entries, dict):
        return {}
    return {
        camera: copy.deepcopy(entry)
        for camera, entry in entries.items()
        if isinstance(entry, dict) and "image_threshold" in per_camera.get(camera, {})
    }


def target_for(thresholds: Thresholds, camera: str) -> dict[str, Any] | None:
    """The target `camera`'s image threshold was chosen for: its own entry in provenance[PER_CAMERA_TARGET] when its
    override holds an image threshold, else the document's provenance["target"]; None when neither was recorded
    (documents from before either)."""
    entry = camera_targets(thresholds, thresholds.per_camera).get(camera)
    own = entry.get("target") if entry is not None else None
    if isinstance(own, dict):
        return own
    target = thresholds.provenance.get("target")
    return target if isinstance(target, dict) else None


def camera_references(scores: Mapping[str, Any], brightness: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """provenance[PER_CAMERA_REFERENCE] for good frames grouped by camera: `scores[camera]` their image scores,
    `brightness[camera]` their mean grey levels as the model saw them (engines.runtime.preprocess.mean_level).
    A camera with fewer than MIN_REFERENCE scores is left out: its monitor then reads the pooled references, as
    before there were references per camera, rather than one that can never raise (camera_reference_warning)."""
    import numpy as np

    references: dict[str, dict[str, Any]] = {}
    for camera, values in scores.items():
        if np.asarray(values).size < MIN_REFERENCE:
            continue
        entry = {GOOD_SCORES: good_score_reference(values)}
        if camera in brightness and np.asarray(brightness[camera]).size:
            entry[GOOD_BRIGHTNESS] = good_score_reference(brightness[camera])
        references[str(camera)] = entry
    return references


def carried_camera_references(current: Thresholds, provenance: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """provenance[PER_CAMERA_REFERENCE] of `current` for a next version whose `provenance` was set on the same model
    and precision (SET_ON; no precision recorded: fp32), else none: another scorer's scores are not these."""
    entries = current.provenance.get(PER_CAMERA_REFERENCE)
    if not isinstance(entries, dict) or not entries:
        return {}
    model = current.provenance.get("model_id")
    if not isinstance(model, str) or provenance.get("model_id") != model:
        return {}
    if provenance.get(ENGINE_PRECISION, "fp32") != current.provenance.get(ENGINE_PRECISION, "fp32"):
        return {}
    return {str(camera): copy.deepcopy(entry) for camera, entry in entries.items() if isinstance(entry, dict)}


def camera_reference_warning(camera: str, n: int, what: str) -> str | None:
    """The WARNING for `camera`'s n good frames too few for a reference of its own (camera_references leaves it out)."""
    if n >= MIN_REFERENCE:
        return None
    return (
        f"WARNING: {n} {what} of camera {camera} are too few for its own drift reference, which needs "
        f">= {MIN_REFERENCE}: its drift alarm compares it with the reference pooled over every camera"
    )


def reference_warning(n: int, what: str) -> str | None:
    """The WARNING for a drift reference of n good frames too few for the daemon's drift test to ever raise."""
    if n >= MIN_REFERENCE:
        return None
    return (
        f"WARNING: {n} {what} are too few for the drift alarm's reference, which needs >= {MIN_REFERENCE}: the daemon "
        "leaves the alarm off for this version"
    )


# The statistics of a rate seen on a few frames, shared by the writers of thresholds: `inspectd calibrate` chooses
# its thresholds by them and train says what the held-out images of its first thresholds support.
CONFIDENCE = 0.95


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (no scipy on a runtime-only station)."""
    import numpy as np

    if p <= 0.0 or k >= n:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = np.arange(1, k + 1, dtype=np.float64)
    log_choose = np.concatenate(([0.0], np.cumsum(np.log(n - i + 1) - np.log(i))))  # log C(n, 0..k)
    j = np.arange(0, k + 1, dtype=np.float64)
    log_terms = log_choose + j * math.log(p) + (n - j) * math.log1p(-p)
    top = log_terms.max()
    return float(min(1.0, math.exp(top) * np.exp(log_terms - top).sum()))


def clopper_pearson_upper(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided upper confidence bound on a rate after k events in n trials (exact, Clopper-Pearson)."""
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    alpha = 1.0 - confidence
    if k == 0:
        return 1.0 - alpha ** (1.0 / n)
    lo, hi = k / n, 1.0
    for _ in range(100):  # bisection: binom_cdf(k, n, p) falls as p rises
        mid = (lo + hi) / 2
        if binom_cdf(k, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def frames_needed(rate: float, confidence: float = CONFIDENCE) -> int:
    """Good frames needed so that zero false rejects bound the rate below `rate` at `confidence`."""
    return math.ceil(math.log(1.0 - confidence) / math.log1p(-rate))


def supported_rate(n: int, frames: str, rate: str, upper: float) -> str:
    """What n frames support: "8 good frames support a false-reject rate of at most 0.3123 (95% upper bound)"."""
    return f"{n} {frames} frames support {rate} rate of at most {upper:.4g} ({CONFIDENCE:.0%} upper bound)"


REGIONLESS_REMEDY = "calibrate with --pixel to set both from the same frames"


def regionless_warning(
    image: float, pixel: float, camera: str | None = None, remedy: str = REGIONLESS_REMEDY
) -> str | None:
    """The WARNING when pixel threshold `pixel` is above image threshold `image` (`camera`'s, or the document's when
    None), for a model whose image score pools its map (engines.bundle.format.scores_pool_the_map). Every pooling
    (the maximum, the top k %, the mean) scores an image at most its map's maximum, so a frame scored from the image
    threshold to below the pixel one may have no pixel at or above the pixel threshold: a defect published with no
    region and an empty mask. At or below the image threshold, the pixel threshold always leaves a defect a region."""
    if pixel <= image:
        return None
    which = f"camera {camera}'s" if camera is not None else "the"
    return (
        f"WARNING: {which} pixel threshold {pixel:.6g} is above the image threshold {image:.6g}, and an image score "
        f"is at most its map's maximum: frames scored from {image:.6g} to below {pixel:.6g} can be defects with no "
        f"region (an empty mask); {remedy}"
    )


def score_range(lowest: float, highest: float, n: int) -> dict[str, Any]:
    """provenance["image_scores"] / ["pixel_scores"] for scores from `lowest` to `highest`."""
    return {"n": int(n), "min": float(f"{lowest:.7g}"), "max": float(f"{highest:.7g}")}


def calibrated_range(thresholds: Thresholds, kind: str, history: bool = True) -> tuple[float, float] | None:
    """(lowest, highest) score seen at calibration by this version and (with `history`) the earlier ones, for `kind`
    "image" (the good frames' scores and every image score recorded) or "pixel" (pixel scores); None when none was
    recorded. The history counts back to the newest version `inspectd teach` wrote: scores before it are another
    scorer's."""
    seen: list[float] = []
    taught = _taught_at(thresholds)
    for version in [thresholds.to_dict(), *(thresholds.history if history else [])]:
        number = version.get("version")
        if taught is not None and isinstance(number, int) and number < taught:
            break
        provenance = version.get("provenance")
        if not isinstance(provenance, dict):
            continue
        if kind == "image" and (good := _reference_bounds(provenance, GOOD_SCORES)) is not None:
            seen += [good["min"], good["max"]]
        for name in (IMAGE_SCORES,) if kind == "image" else (PIXEL_SCORES,):
            recorded = provenance.get(name)
            if isinstance(recorded, dict):
                bounds = [recorded.get("min"), recorded.get("max")]
                if all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in bounds):
                    seen += [float(b) for b in bounds]  # type: ignore[arg-type]
    return (min(seen), max(seen)) if seen else None


NAME_CHARS = 64  # the most of a key or camera id from a document that a refusal repeats
NAMES_LISTED = 5  # the most names a refusal lists before "and N more"


def shown_name(name: Any) -> str:
    """A key, camera id or model id from a document as a refusal repeats it: one line, at most NAME_CHARS long. The
    document comes from a client, and its refusal goes back to it and into the daemon's log whole."""
    text = str(name)
    if not text.isprintable():
        text = repr(text)
    return text if len(text) <= NAME_CHARS else text[: NAME_CHARS - 3] + "..."


def shown_names(names: list[Any]) -> str:
    """The first NAMES_LISTED of `names` (each as shown_name), then how many more."""
    return listed(names, NAMES_LISTED, shown_name)


def _number(doc: dict, key: str, where: str) -> float:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ThresholdsError(f"{where}{key}: expected a finite number, got {show(value)}")
    return float(value)


def parse(doc: Any, where: str = "thresholds", most: int = MAX_VERSION) -> Thresholds:
    """The document `doc`, checked; `most`: the highest version taken (LOADED_MAX_VERSION for one read from disk)."""
    if not isinstance(doc, dict):
        raise ThresholdsError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    known = {f.name for f in dataclasses.fields(Thresholds)}
    for key in doc:
        if key not in known:
            raise ThresholdsError(f"{where}.{shown_name(key)}: unknown key (known: {', '.join(sorted(known))})")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= most:
        raise ThresholdsError(f"{where}.version: {_version_range(most)}, got {show(version)}")
    per_camera = doc.get("per_camera", {})
    if not isinstance(per_camera, dict):
        raise ThresholdsError(f"{where}.per_camera: expected a mapping of camera id to overrides")
    clean_per_camera: dict[str, dict[str, float]] = {}
    for camera, override in per_camera.items():
        at = f"{where}.per_camera.{shown_name(camera)}"
        if not isinstance(override, dict) or not override:
            raise ThresholdsError(f"{at}: expected image_threshold and/or pixel_threshold")
        for key in override:
            if key not in ("image_threshold", "pixel_threshold"):
                raise ThresholdsError(f"{at}.{shown_name(key)}: unknown key (known: image_threshold, pixel_threshold)")
        clean_per_camera[str(camera)] = {k: _number(override, k, f"{at}.") for k in override}
    provenance = doc.get("provenance", {})
    history = doc.get("history", [])
    if not isinstance(provenance, dict):
        raise ThresholdsError(f"{where}.provenance: expected a mapping")
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise ThresholdsError(f"{where}.history: expected a list of earlier thresholds documents")
    return Thresholds(
        version,
        _number(doc, "image_threshold", f"{where}."),
        _number(doc, "pixel_threshold", f"{where}."),
        clean_per_camera,
        provenance,
        history,
    )


def _version_range(most: int = MAX_VERSION) -> str:
    if most != MAX_VERSION:
        return f"expected an integer from 1 to {most} (the archive's 64-bit integers)"
    return (
        f"expected an integer from 1 to {MAX_VERSION} (2**53-1: the next version must stay within what every "
        "client's JSON parser reads exactly)"
    )


def read(path: str | Path) -> Thresholds:
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ThresholdsError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, an integer past Python's 4300 digits
        raise ThresholdsError(f"{path}: not valid JSON ({str(exc).splitlines()[0][:200]})") from exc
    return parse(doc, where=str(path), most=LOADED_MAX_VERSION)


def dumps(thresholds: Thresholds) -> bytes:
    # A document built without parse (a reload's renumbering replaces the version in place) is checked here: written
    # past MAX_VERSION, it would be what the next start refuses to load.
    if not 1 <= thresholds.version <= MAX_VERSION:
        raise ThresholdsError(f"thresholds.version: {_version_range()}, got {thresholds.version}")
    try:  # NaN or infinity in the provenance is not JSON: jq, browsers and PLC-side parsers refuse it
        text = json.dumps(thresholds.to_dict(), indent=2, sort_keys=True, allow_nan=False)
    except ValueError as exc:
        raise ThresholdsError(f"thresholds version {thresholds.version}: {exc}, expected finite numbers") from None
    return (text + "\n").encode("utf-8")


def first_version(image_threshold: float, pixel_threshold: float, provenance: dict[str, Any]) -> Thresholds:
    return parse(
        {
            "version": 1,
            "image_threshold": image_threshold,
            "pixel_threshold": pixel_threshold,
            "provenance": {"time": _now(), **provenance},
        }
    )


def next_version(
    current: Thresholds,
    *,
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
    per_camera: dict[str, dict[str, float]] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Thresholds:
    """A new version on top of `current`, which goes into history. Unset values are carried over."""
    if current.version >= MAX_VERSION:
        raise ThresholdsError(
            f"thresholds.version: {current.version} is the highest a version may be, so no version can follow it: "
            "expected thresholds of a lower version to build on"
        )
    doc = {
        "version": current.version + 1,
        "image_threshold": current.image_threshold if image_threshold is None else image_threshold,
        "pixel_threshold": current.pixel_threshold if pixel_threshold is None else pixel_threshold,
        "per_camera": copy.deepcopy(current.per_camera if per_camera is None else per_camera),
        "provenance": {"time": _now(), **(provenance or {})},
        "history": history_after(current),
    }
    return parse(doc)


def history_after(current: Thresholds) -> list[dict[str, Any]]:
    """The history of the version after `current`: `current` without its own history, then that history, at most
    MAX_HISTORY versions, those past the newest KEPT_REFERENCES without their drift references (_thinned)."""
    history = ([_without_history(current)] + copy.deepcopy(current.history))[:MAX_HISTORY]
    for entry in history[KEPT_REFERENCES:]:
        if isinstance(entry.get("provenance"), dict):
            entry["provenance"] = _thinned(entry["provenance"])
    return history


def same_history(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Whether two histories hold the same versions, one side's entries perhaps still with drift references the
    other's dropped (history_after thins an entry once it is KEPT_REFERENCES versions back: a document built on a
    later version than the one it is compared with has thinned more of them)."""

    def comparable(entry: dict[str, Any]) -> dict[str, Any]:
        provenance = entry.get("provenance")
        return {**entry, "provenance": _thinned(provenance)} if isinstance(provenance, dict) else entry

    return len(a) == len(b) and all(comparable(x) == comparable(y) for x, y in zip(a, b))


def _thinned(provenance: dict[str, Any]) -> dict[str, Any]:
    """A history entry's `provenance` without its drift references (REFERENCES, in it and in the provenance it rolled
    back to): each reference becomes its {"n", "min", "max"} (what calibrated_range reads of it), and
    `references_dropped` names what went. A rollback to the entry then takes the current version's, as for a version
    recorded before references existed."""
    thin = {k: v for k, v in provenance.items() if k not in REFERENCES}
    dropped = [key for key in REFERENCES if key in provenance]
    for key in (GOOD_SCORES, GOOD_BRIGHTNESS):
        if key in provenance and (bounds := _reference_bounds(provenance, key)) is not None:
            thin[key] = bounds
    if dropped:
        earlier = provenance.get(REFERENCES_DROPPED)
        earlier = [k for k in earlier if isinstance(k, str)] if isinstance(earlier, list) else []
        thin[REFERENCES_DROPPED] = sorted({*earlier, *dropped})
    if isinstance(nested := provenance.get("rolled_back_provenance"), dict):
        thin["rolled_back_provenance"] = _thinned(nested)
    return thin


def _reference_bounds(provenance: dict[str, Any], key: str) -> dict[str, Any] | None:
    """{"n", "min", "max"} of provenance[key]: a whole reference, or one _thinned already made into its bounds."""
    if (reference := _reference(provenance, key)) is not None:
        return score_range(reference[1][0], reference[1][-1], reference[0])
    bounds = provenance.get(key)
    if not isinstance(bounds, dict) or "quantiles" in bounds:
        return None
    n, lo, hi = bounds.get("n"), bounds.get("min"), bounds.get("max")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return None
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in (lo, hi)):
        return None
    return score_range(lo, hi, n)  # type: ignore[arg-type]


def _taught_at(current: Thresholds) -> int | None:
    """The newest version `inspectd teach` wrote (with the scorer it refitted), None if none: versions before it were
    set on another scorer's scores. A teach --rollback's version (`restored`) puts back a scorer with its own
    thresholds, whose history says where that scorer was taught."""
    for doc in [{"version": current.version, "provenance": current.provenance}, *current.history]:
        provenance, number = doc.get("provenance"), doc.get("version")
        if not isinstance(provenance, dict) or "restored" in provenance:
            continue
        tool = provenance.get("tool")
        if isinstance(tool, str) and tool.startswith("inspectd teach") and isinstance(number, int):
            return number
    return None


def rollback(current: Thresholds, version: int) -> Thresholds:
    """A new version (numbers never go down) whose values are those of the earlier `version`.

    Its drift references, false-reject targets (global and per camera), calibrated score ranges and what its scores
    were computed on (SET_ON) come to the top of the new provenance, where the daemon's drift monitor, range check and
    score-shift check read them: left nested under rolled_back_provenance they would switch the drift alarm off, and
    thresholds set on fp16 scores would count as fp32 ones, which the fp16 engine that ran them refuses. A reference
    that version lacks (recorded before references existed, or dropped from the history: KEPT_REFERENCES) is kept
    from `current`: the model is the same, so its good frames' scores still describe it; `references_from` says so
    (the cameras' own references too, where both were set on the same model and precision). What it was set on is
    never taken from `current`: absent, the version was set on fp32 scores."""
    # Whether the version exists comes first: below a teach, a number never written (0, -1, a typo) would be told it
    # was set on the replaced scorer's scores.
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ThresholdsError(f"thresholds: version {version!r}: expected a version number >= 1")
    found = next((old for old in current.history if old.get("version") == version), None)
    if found is None:
        known = ", ".join(str(h.get("version")) for h in current.history) or "none"
        if version == current.version:
            # The number the operator has just read in `ctl status`: "no version 5" would tell them it does not exist.
            raise ThresholdsError(
                f"thresholds: version {version} is the one in use, nothing to roll back: expected an earlier version "
                f"(known: {known})"
            )
        raise ThresholdsError(f"thresholds: no version {version} in history (known: {known})")
    taught = _taught_at(current)
    if taught is not None and version < taught:
        raise ThresholdsError(
            f"thresholds: version {version} was set on the scores of the scorer `inspectd teach` replaced at version "
            f"{taught}: expected a version from {taught} on (`inspectd teach --rollback` puts the old scorer back "
            "with its thresholds)"
        )
    earlier = parse({**found, "history": []}, where=f"thresholds.history[version {version}]")
    # Without its own chain: a version that was itself a rollback would nest every earlier one, so toggling
    # between two versions grew the document without bound (history bounds how many versions, not their
    # size). Its rollback_to still names where that one came from. Nor its references: they come to the top below
    # (where it had none, the current version's, as references_from says), and a second copy doubled every rollback.
    shown = {k: v for k, v in earlier.provenance.items() if k != "rolled_back_provenance" and k not in REFERENCES}
    provenance: dict[str, Any] = {"rollback_to": version, "rolled_back_provenance": shown}
    for key in ("target", PER_CAMERA_TARGET, IMAGE_SCORES, PIXEL_SCORES, *SET_ON):
        if key in earlier.provenance:
            provenance[key] = copy.deepcopy(earlier.provenance[key])
    for key in (GOOD_SCORES, GOOD_BRIGHTNESS):
        if _reference(earlier.provenance, key) is not None:
            provenance[key] = copy.deepcopy(earlier.provenance[key])
        elif _reference(current.provenance, key) is not None:
            provenance[key] = copy.deepcopy(current.provenance[key])
            provenance.setdefault("references_from", {})[key] = current.version
    if isinstance(own := earlier.provenance.get(PER_CAMERA_REFERENCE), dict):
        provenance[PER_CAMERA_REFERENCE] = copy.deepcopy(own)
    elif carried := carried_camera_references(current, provenance):
        provenance[PER_CAMERA_REFERENCE] = carried
        provenance.setdefault("references_from", {})[PER_CAMERA_REFERENCE] = current.version
    return next_version(
        current,
        image_threshold=earlier.image_threshold,
        pixel_threshold=earlier.pixel_threshold,
        per_camera=earlier.per_camera,
        provenance=provenance,
    )


def _without_history(thresholds: Thresholds) -> dict[str, Any]:
    doc = thresholds.to_dict()
    doc.pop("history")
    return doc


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
