"""`inspectd archive list|export`: the frames the daemon kept, by camera, verdict and time range; exported as an
MVTec-layout folder that `inspectd train --data` and `inspectd calibrate --good` read directly.

Reads the archive directory only (inspectd.protocol.archive), so it works beside a running daemon or without one.
A frame whose file is empty or not a whole PNG (a power cut can leave one cut short) is not exported: it is counted
and its id named on stderr, so nothing unreadable lands in a training folder. A frame retention deleted between the
query and its copy is counted as expired, not as exported.
An export into an OUT whose split folder already holds frames it would not write itself (an earlier export's, or
copied in) is refused unless --add says to add to them: calibrate, train and teach read the whole folder, so a
recipe exporting into the same folder every time would otherwise set thresholds on every earlier span too.
A --camera the index holds no frame of is named on stderr with the cameras it does hold, so a mistyped id does not
read as an empty archive; an export that matched nothing creates no OUT.
Exit codes: 0 done, 1 export matched no frame (or none that could be copied), 2 bad arguments (a span that holds
nothing, a --camera no camera can have), no archive there (or unreadable), an OUT that cannot be written (one line
naming it and why), or one already holding other frames.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from engines.schema import listed
from inspectd.protocol.archive import (
    DEFAULT_ARCHIVE,
    EXPORT_FOLDERS,
    EXPORT_SPLITS,
    ArchiveError,
    ArchiveReader,
    Entry,
    NotArchived,
    camera_id_problem,
    parse_span,
    split_frames,
)

VERDICTS = ("ok", "defect")
MAX_LIMIT = 2**63 - 1  # the largest integer SQLite takes: a larger --limit is a typo, not a bound
MAX_NAMED = 20  # cameras named when a --camera matched none of them


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list archived frames, oldest first", description="list archived frames")
    export = actions.add_parser(
        "export",
        help="copy archived frames into an MVTec-layout folder",
        description="copy archived frames into OUT/<split>/good (verdict ok) and OUT/<split>/defect (verdict "
        "defect), with OUT/archive.jsonl naming each (and, by its export_run, the export that copied it); `inspectd "
        "calibrate BUNDLE --good OUT` reads OUT/test/good. "
        "Verdicts are the model's, not labels: review defect frames before using them as --defective.",
    )
    export.add_argument(
        "out",
        type=Path,
        metavar="OUT",
        help="folder to export into (created); one whose split folder holds other frames is refused without --add",
    )
    export.add_argument(
        "--add",
        action="store_true",
        help="add to the frames OUT/<split>/ already holds (an earlier export's): calibrate, train and teach then "
        "read them all; a frame exported there before is copied again, not listed twice in archive.jsonl",
    )
    export.add_argument(
        "--split",
        choices=EXPORT_SPLITS,
        default="test",
        help="test (held out: what calibrate reads, the default) or train (what train reads)",
    )
    for sub in (listing, export):
        sub.add_argument(
            "--archive",
            type=Path,
            default=DEFAULT_ARCHIVE,
            metavar="DIR",
            help=f"the daemon's archive directory (archive.path; default {DEFAULT_ARCHIVE})",
        )
        sub.add_argument("--camera", metavar="ID", help="only this camera")
        sub.add_argument("--verdict", choices=VERDICTS, help="only frames with this verdict")
        sub.add_argument("--since", metavar="TIME", help="captured at or after TIME: ISO (2026-03-01T14:00) or 1h, 30m")
        sub.add_argument("--until", metavar="TIME", help="captured before TIME (same forms)")
        sub.add_argument("--limit", type=int, metavar="N", help="at most N frames (the newest N with --newest)")
        sub.add_argument("--newest", action="store_true", help="newest first")
        sub.add_argument("--json", action="store_true", help="machine-readable output on stdout (one JSON document)")


def _query(reader: ArchiveReader, args: argparse.Namespace) -> list[Entry]:
    """The entries the arguments select. A filter that cannot match anything (a span ending before it starts, a
    camera id no camera can have) is refused rather than answered with an empty list the operator would read as an
    empty archive."""
    from engines.schema import show

    since, until = parse_span(args.since or None, args.until or None)
    if args.limit is not None and not 1 <= args.limit <= MAX_LIMIT:
        raise ArchiveError(f"--limit: {args.limit}, expected a positive number of frames (at most {MAX_LIMIT})")
    if args.camera is not None:
        problem = camera_id_problem(args.camera, show(args.camera))
        if problem is not None:
            raise ArchiveError(f"--camera: {problem}")
    return reader.query(args.camera, args.verdict, since, until, args.limit, newest_first=args.newest)


def _no_such_camera(reader: ArchiveReader, camera: str | None) -> str | None:
    """Why nothing matched, where it is that the index holds no frame of `camera` at all: the cameras it does hold,
    so a mistyped id does not read as an empty archive."""
    if camera is None:
        return None
    held = reader.cameras()
    if camera in held:
        return None
    named = listed(held, MAX_NAMED)
    return f"no frame of camera {camera} in the archive, which holds {named or 'none yet'}"


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).isoformat(timespec="milliseconds")


def run(args: argparse.Namespace) -> int:
    try:
        with ArchiveReader(args.archive) as reader:
            entries = _query(reader, args)
            hint = None if entries else _no_such_camera(reader, args.camera)
            if args.action == "list":
                code = _list(entries, args.json)
            else:
                code = _export(reader, entries, args)
            if hint is not None:
                print(f"inspectd archive: {hint}", file=sys.stderr)
            return code
    except ArchiveError as exc:
        print(f"inspectd archive: {exc}", file=sys.stderr)
        return 2


def _list(entries: list[Entry], as_json: bool) -> int:
    if as_json:
        json.dump([e.to_dict() for e in entries], sys.stdout)
        print()
        return 0
    for e in entries:
        score = "-" if e.score is None else f"{e.score:.4g}"
        print(f"{e.id}  {e.camera}  {e.verdict:6}  score {score:>8}  {_when(e.t_capture)}  regions {e.regions}")
    print(f"{len(entries)} frame(s)", file=sys.stderr)
    return 0


def _export(reader: ArchiveReader, entries: list[Entry], args: argparse.Namespace) -> int:
    where = f"{args.out}/{args.split}/"
    before = {folder: set(names) for folder, names in split_frames(args.out, args.split).items()}
    ours = {e.export_name for e in entries}
    others = sum(1 for names in before.values() for name in names if name not in ours)
    if others and not args.add:
        raise ArchiveError(
            f"export {args.out}: {where} already holds {others} frame(s) not of this export (an earlier export's, or "
            "copied in), which calibrate, train and teach would read too: export into a fresh folder, or --add to add "
            "to them"
        )
    unreadable: list[str] = []
    expired: list[str] = []
    matched = [e for e in entries if e.verdict in EXPORT_FOLDERS]
    copied = reader.export(matched, args.out, args.split, unreadable, expired) if matched else 0
    # A frame whose file was not there expired only if retention also took its row; a row still in the index names an
    # image that is missing (an index restored or copied without its images, an image folder not mounted).
    missing = [i for i in expired if _indexed(reader, i)]
    expired = [i for i in expired if i not in set(missing)]
    skipped = {*unreadable, *expired, *missing}
    done = [e for e in matched if e.id not in skipped]
    counts = {v: sum(1 for e in done if e.verdict == v) for v in VERDICTS}
    already = sum(1 for e in done if e.export_name in before.get(EXPORT_FOLDERS[e.verdict], ()))
    holds = {folder: len(names) for folder, names in split_frames(args.out, args.split).items() if names}
    if unreadable:
        print(
            f"inspectd archive: skipped {len(unreadable)} frame(s) whose file is empty, not a whole PNG or a link "
            f"loop: "
            f"{' '.join(unreadable)}",
            file=sys.stderr,
        )
    if args.json:
        json.dump(
            {
                "out": str(args.out) if Path(args.out).exists() else None,  # none made for nothing to copy
                "split": args.split,
                "exported": copied,
                "copied": counts,
                "matched": {v: sum(1 for e in matched if e.verdict == v) for v in VERDICTS},
                "unreadable": unreadable,
                "expired": expired,
                "missing": missing,
                "already_there": already,
                "holds": holds,
            },
            sys.stdout,
        )
        print()
    elif matched:  # nothing matched: the line below says so, and no OUT was made to name
        line = f"exported {copied} frame(s) to {where} (good: {counts['ok']}, defect: {counts['defect']})"
        if expired:
            line += f"; {len(expired)} matched frame(s) expired (deleted by retention) before they could be copied"
        if missing:
            line += f"; {len(missing)} matched frame(s) have no image file though the index names them"
        if any(before.values()):
            held = ", ".join(f"{f}: {n}" for f, n in sorted(holds.items(), key=lambda h: (h[0] != "good", h)))
            line += f"; {already} of them were there already; {where} now holds {sum(holds.values())} frame(s) ({held})"
        print(line)
    if copied == 0:
        print(
            f"inspectd archive: {_none_copied(len(matched), len(unreadable), len(expired), len(missing))}",
            file=sys.stderr,
        )
        return 1
    return 0


def _none_copied(matched: int, unreadable: int, expired: int, missing: int = 0) -> str:
    if not matched:
        return "no archived frame matched"
    if not expired and not missing:
        return "no archived frame could be read"
    whys = []
    if missing:
        whys.append(
            f"{missing} of the {matched} that matched have no image file though the index names them (an index "
            "restored or copied without its images, or an image folder not mounted?)"
        )
    if expired:
        whys.append(f"{expired} of the {matched} that matched expired during the export (deleted by retention)")
    if unreadable:
        whys.append(f"{unreadable} unreadable")
    return "no archived frame could be copied: " + ", ".join(whys)


def _indexed(reader: ArchiveReader, entry_id: str) -> bool:
    try:
        reader.get(entry_id)
    except NotArchived:
        return False
    return True
