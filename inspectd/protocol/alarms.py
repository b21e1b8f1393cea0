"""What in a daemon's status calls for an operator, as one line each: shared by `inspectd ctl status` and the web view
so that both say the same during an incident; and the one-line summary `inspectd subscribe --status` prints. Reads
the status message and the control `status` reply (docs/PROTOCOL.md); a field that is missing or of another type is
taken as nothing to report."""

from __future__ import annotations

import datetime
import math
from typing import Any


def status_alarms(status: dict[str, Any]) -> list[str]:
    """The alarms a status names: why the daemon is unhealthy (engine failing or stuck, a thread ended), journal or
    archive degraded, a camera that is not running (with its last error), a drift alarm and the test that raised it,
    a false-reject warning."""
    out = []
    if status.get("healthy") is False:
        reasons = status.get("unhealthy")  # a daemon older than the field sends none: the generic line then
        reasons = [str(r) for r in reasons if r] if isinstance(reasons, list) else []
        out += [f"unhealthy: {reason}" for reason in reasons] or ["inference unhealthy"]
    for name in ("journal", "archive"):
        part = status.get(name)
        if isinstance(part, dict) and part.get("degraded"):
            lost = f" ({part['lost']} lost)" if part.get("lost") else ""
            out.append(f"{name} degraded: {part.get('error')}{lost}")
    cameras = status.get("cameras")
    for camera, stats in (cameras if isinstance(cameras, dict) else {}).items():
        if not isinstance(stats, dict):
            continue
        state = stats.get("state")
        if state not in (None, "running", "paused", "ended"):
            out.append(f"camera {camera} {state}: {stats.get('last_error') or ''}".rstrip(": "))
        drift = stats.get("drift")
        drift = drift if isinstance(drift, dict) else {}
        if drift.get("alarm"):
            if drift.get("brightness_alarm") and not drift.get("score_alarm"):
                what = "good parts no longer look as bright as at calibration"
                figures = _figures(drift, "brightness_")
            else:
                what = "good parts no longer score as at calibration"
                figures = _figures(drift, "")
            out.append(f"camera {camera} drift: {what} ({figures}; lighting, lens, focus or material?)")
        if drift.get("false_reject_warning"):
            rate, target = _number(drift.get("false_reject_estimate")), _number(drift.get("target"))
            about = f": about {100 * rate:.2g} % of good parts" if rate is not None else ""
            goal = f", target {100 * target:.2g} %" if rate is not None and target is not None else ""
            out.append(f"camera {camera} false rejects rising{about}{goal}")
    return out


def status_line(status: dict[str, Any]) -> str:
    """A status message in one line, for a terminal beside the result lines: health, uptime, throughput, model and
    thresholds version, each camera's state and counters, then the alarms (status_alarms')."""
    up = _uptime(_number(status.get("uptime_s")) or 0)
    fps = _number(status.get("throughput_fps"))
    parts = [
        f"status {status.get('station')}: {'healthy' if status.get('healthy') else 'UNHEALTHY'}, up {up}, "
        f"{fps or 0:.1f} frames/s, model {status.get('model_id')} thresholds v{status.get('thresholds_version')}"
    ]
    cameras = status.get("cameras")
    for camera, c in (cameras if isinstance(cameras, dict) else {}).items():
        if isinstance(c, dict):
            parts.append(
                f"{camera} {c.get('state', '?')} in {c.get('frames_in', 0)} published {c.get('published', 0)} "
                f"defects {c.get('defects', 0)} errors {c.get('errors', 0)} dropped {c.get('dropped', 0)}"
            )
    parts += [f"ALARM {alarm}" for alarm in status_alarms(status)]
    return "; ".join(parts)


# What timedelta takes, in whole seconds: a status from a foreign or broken publisher may claim far more.
_MOST_UPTIME_S = datetime.timedelta.max.days * 86400


def _uptime(seconds: float) -> str:
    """`seconds` as days and h:mm:ss, or as plain seconds where it is not a count timedelta takes (negative, past
    its 999999999 days, not finite), so one malformed status is still printed, not the end of the subscriber."""
    if math.isfinite(seconds) and 0 <= seconds < _MOST_UPTIME_S:
        return str(datetime.timedelta(seconds=int(seconds)))
    return f"{seconds:g} s"


def _figures(drift: dict[str, Any], prefix: str) -> str:
    """The raised test's D against the level that matters now: above raise_at while it is, else (the alarm holding
    through its hysteresis, the line perhaps already mended) the level D must fall below to clear."""
    statistic = _number(drift.get(f"{prefix}statistic"))
    raise_at, clear_at = drift.get(f"{prefix}raise_at"), _number(drift.get(f"{prefix}clear_at"))
    numeric_raise = _number(raise_at)
    if statistic is None or numeric_raise is None or statistic > numeric_raise:
        return f"KS D {drift.get(f'{prefix}statistic')} > {raise_at}"
    if clear_at is not None:
        return f"KS D {statistic}, clears below {clear_at}"
    return f"KS D {statistic}, raised above {raise_at}, not yet cleared"  # a daemon older than clear_at


def _number(value: Any) -> float | None:
    """`value` when it is a number a format spec can take (a string or list raises there), else None."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
