"""The web view's archive side over real HTTP (aiohttp's test server, in this process): which image requests are
waited on and which are answered at once, what an error reply may be cached for, and the alarm for a view whose
--archive is not the daemon's archive; and, run as another user (tests/other_user.py), a view that may not enter a
folder of the archive or of the daemon's state_dir. The archive itself is written by the real writer."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path, PosixPath

import pytest
from aiohttp.test_utils import TestClient, TestServer

from inspectd.clients import web as web_module
from inspectd.clients.web import ConnectionCap, LineState, WebView
from inspectd.daemon.archive import Archive
from inspectd.protocol.archive import archive_id, live_frame
from other_user import REPO, as_nobody
from ports import free_port
from station_model import defect_frame, judged

pytestmark = pytest.mark.timeout(60)
IMMUTABLE = "max-age=86400, immutable"  # an archived image's: its id never names another image


def archived(root: Path, *items) -> list[str | None]:
    archive = Archive(root, max_mb=10, max_age_h=1, good_every=0).start()
    ids = [archive.offer(item) for item in items]
    assert archive.close()
    return ids


async def timed_get(client: TestClient, path: str) -> tuple[int, str | None, float]:
    """(status, Cache-Control, seconds taken) of a GET."""
    start = time.monotonic()
    async with client.get(path) as reply:
        await reply.read()
        return reply.status, reply.headers.get("Cache-Control"), time.monotonic() - start


def serve(view: WebView) -> TestClient:
    return TestClient(TestServer(view.app(ConnectionCap())))


def test_an_image_request_waiting_cannot_help_is_answered_at_once(tmp_path):
    """Each 404 was held 2 s whatever its cause, and a page of missing overlays (no archive, pruned ones, a wrong
    --archive) kept the browser's six connections busy for minutes, its state asks queued behind them. Only an id of
    the last seconds that the open index does not name yet is waited for, and is served when it comes."""
    root = tmp_path / "archive"
    recent = archive_id("cam0", 5, time.time())

    async def asks() -> None:
        async with serve(WebView(LineState(), root)) as client:
            # No archive at all (a wrong --archive, or none written yet): at once.
            status, cache, took = await timed_get(client, f"/archive/{recent}/overlay")
            assert (status, cache) == (404, "no-store") and took < 0.5, (status, cache, took)
            (old,) = archived(root, judged("cam0", 1, defect_frame(1), t=time.time() - 3600))
            (kept,) = archived(root, judged("cam0", 2, defect_frame(2)))
            assert old and kept
            assert (await timed_get(client, f"/archive/{kept}/overlay"))[0] == 200
            # An id from an hour ago the index does not name (expired, never written): at once.
            expired = archive_id("cam0", 9, time.time() - 3600)
            status, cache, took = await timed_get(client, f"/archive/{expired}/overlay")
            assert (status, cache) == (404, "no-store") and took < 0.5, (status, cache, took)
            # In the index, its file gone (pruned under the request): at once.
            next(root.glob(f"cam0/*/{old}.overlay.jpg")).unlink()
            status, cache, took = await timed_get(client, f"/archive/{old}/overlay")
            assert (status, cache) == (404, "no-store") and took < 0.5, (status, cache, took)
            # An id of now the index does not name yet: waited for, and served once written.
            late = judged("cam0", 3, defect_frame(3))
            late_id = archive_id("cam0", 3, late.frame.t_capture)
            writer = threading.Timer(0.5, archived, (root, late))
            writer.start()
            try:
                status, cache, took = await timed_get(client, f"/archive/{late_id}/overlay")
            finally:
                writer.join()
            assert (status, cache) == (200, IMMUTABLE) and took >= 0.4, (status, cache, took)
            # ... and one that never comes is waited for ARCHIVE_WAIT_S, no longer.
            status, _, took = await timed_get(client, f"/archive/{archive_id('cam0', 4, time.time())}/overlay")
            assert status == 404 and web_module.ARCHIVE_WAIT_S - 0.1 <= took < web_module.ARCHIVE_WAIT_S + 1, took

    asyncio.run(asks())


def test_an_error_reply_for_an_image_is_never_cached(tmp_path, monkeypatch):
    """A file pruned between the handler's check and aiohttp opening it: aiohttp answered 404 itself, with the
    image's one-day `immutable` header, which a browser may keep for a day (a 403 would outlast its chmod)."""
    root = tmp_path / "archive"
    (entry,) = archived(root, judged("cam0", 1, defect_frame(1)))
    is_file = PosixPath.is_file

    def pruned_right_after_the_check(path: PosixPath) -> bool:
        found = is_file(path)
        if path.name.endswith(".overlay.jpg"):
            path.unlink(missing_ok=True)  # retention's thread deletes it at any moment
        return found

    async def ask() -> tuple[int, str | None, float]:
        async with serve(WebView(LineState(), root)) as client:
            assert (await timed_get(client, f"/archive/{entry}/frame"))[:2] == (200, IMMUTABLE)
            monkeypatch.setattr(PosixPath, "is_file", pruned_right_after_the_check)
            return await timed_get(client, f"/archive/{entry}/overlay")

    status, cache, _ = asyncio.run(ask())
    assert (status, cache) == (404, "no-store")


def status_naming(path: Path | str | None) -> dict:
    archive = None if path is None else {"path": str(path), "degraded": False, "error": None, "lost": 0}
    return {"t": time.time(), "interval_s": 0.5, "healthy": True, "cameras": {}, "archive": archive}


def test_a_view_reading_another_archive_than_the_daemons_says_so(tmp_path, monkeypatch):
    """A typo in --archive, or another instance's state_dir, looked like a healthy archive with nothing in it: no
    live frames, and every overlay "not in the archive" a minute later."""
    monkeypatch.setattr(web_module, "ARCHIVE_CHECK_S", 0.05)
    daemons = tmp_path / "state" / "archive"
    typo = tmp_path / "state" / "archiv"

    async def alarms(view: WebView, status: dict) -> list[str]:
        view.state.on_message(status)
        async with serve(view) as client:
            await asyncio.sleep(0.3)  # a few of the view's archive checks
            async with client.get("/api/state") as reply:
                return (await reply.json())["alarms"]

    # Neither there yet (no frame written): told apart by path.
    (alarm,) = asyncio.run(alarms(WebView(LineState(), typo), status_naming(daemons)))
    assert alarm.startswith(f"archive elsewhere: the daemon archives to {daemons} (not there yet"), alarm
    assert f"this view reads --archive {typo}" in alarm
    assert asyncio.run(alarms(WebView(LineState(), daemons), status_naming(daemons))) == []
    # Both there: the same directory under another name (a symlink, a bind mount) is no alarm; another one is.
    daemons.mkdir(parents=True)
    typo.mkdir()
    (tmp_path / "link").symlink_to(daemons)
    assert asyncio.run(alarms(WebView(LineState(), tmp_path / "link"), status_naming(daemons))) == []
    (alarm,) = asyncio.run(alarms(WebView(LineState(), typo), status_naming(daemons)))
    assert alarm.startswith(f"archive elsewhere: the daemon archives to {daemons}, this view reads"), alarm
    # A daemon without an archive (that alarm of its own), or one naming no absolute path: nothing to compare.
    assert asyncio.run(alarms(WebView(LineState(), typo), status_naming(None))) == [web_module.ARCHIVE_OFF]
    assert asyncio.run(alarms(WebView(LineState(), typo), status_naming("archive"))) == []


def test_a_daemon_archiving_nothing_has_no_live_frame_served_and_the_page_says_why(tmp_path):
    """A station restarted with archive.enabled false keeps live/ from its earlier runs: the view served that old frame
    as the camera's live frame, once a second, with no alarm. A status naming no archive now has no live frame
    served, and an alarm says why; a status naming the archive, or none yet, or one without the field, serves it."""
    root = tmp_path / "archive"
    archived(root, judged("cam0", 1, defect_frame(1)))
    assert (root / "live" / "cam0.jpg").is_file()

    async def asks(status: dict | None) -> tuple[int, str, list[str]]:
        state = LineState()
        if status is not None:
            state.on_message(status)
        async with serve(WebView(state, root)) as client:
            async with client.get("/live/cam0.jpg?t=1") as reply:
                live = reply.status, (await reply.read()).decode(errors="replace")
            async with client.get("/api/state") as reply:
                return (*live, (await reply.json())["alarms"])

    status, text, alarms = asyncio.run(asks(status_naming(None)))
    assert (status, text) == (404, "the daemon archives nothing (its archive is off): no live frames"), (status, text)
    assert alarms == [web_module.ARCHIVE_OFF], alarms
    status, _, alarms = asyncio.run(asks(status_naming(root)))
    assert status == 200 and alarms == [], alarms
    status, _, alarms = asyncio.run(asks(None))
    assert status == 200 and alarms == ["no status from the daemon yet"], alarms
    without_field = status_naming(None)
    del without_field["archive"]
    status, _, alarms = asyncio.run(asks(without_field))
    assert status == 200 and alarms == [], alarms


def test_a_name_no_camera_could_have_is_no_live_frame_not_an_unreadable_archive(tmp_path):
    """A name past the camera id's 64 characters reached the disk, which refused it (ENAMETOOLONG, past 255 bytes):
    any client raised the page's "archive unreadable" alarm for a minute with one request. Such a name is not there,
    as is one under an archive path too long for the disk."""
    root = tmp_path / "archive"
    archived(root, judged("cam0", 1, defect_frame(1)))
    assert (root / "live").is_dir()

    async def asks() -> list[tuple[int, list[str]]]:
        state = LineState()
        async with serve(WebView(state, root)) as client:
            seen = []
            for name in ("a" * 65, "a" * 300, "live"):
                async with client.get(f"/live/{name}.jpg") as reply:
                    seen.append((reply.status, state.snapshot()["alarms"]))
            return seen

    for status, alarms in asyncio.run(asks()):
        assert (status, alarms) == (404, ["no status from the daemon yet"]), (status, alarms)
    assert live_frame(root, "a" * 64) is None and live_frame(root, "cam0") == root / "live" / "cam0.jpg"
    assert live_frame(Path("/" + "a/" * 2100), "cam0") is None  # past PATH_MAX


def closed_to_others(folder: Path) -> None:
    """`folder` closed to the user as_nobody runs as (root enters any folder whatever its mode; another user only its
    own folders, mode 0 then)."""
    folder.chmod(0o700 if os.geteuid() == 0 else 0o000)


@pytest.mark.parametrize("closed", ["folders", "files"])
def test_an_image_the_view_may_not_read_is_a_403_and_an_alarm_logged_once(open_tmp_path, closed):
    """Path.is_file() raises for a folder on the way this user may not enter (a live/ or day folder restored under
    umask 077): every live frame and overlay the page asked for was a 500 with aiohttp's traceback in the log, once a
    second per camera and tab, and the page showed no alarm. A file it may not read (0600, in folders it may enter)
    passes is_file(): aiohttp then answered an empty 403 of its own, and the log said nothing."""
    root = open_tmp_path / "archive"
    (entry,) = archived(root, judged("cam0", 1, defect_frame(1)))
    live = root / "live" / "cam0.jpg"
    assert entry and live.is_file()
    (overlay,) = root.glob(f"cam0/*/{entry}.overlay.jpg")
    if closed == "folders":
        closed_to_others(live.parent)
        closed_to_others(overlay.parent)
    else:
        for private in (live, overlay):
            private.chmod(0o600 if os.geteuid() == 0 else 0o000)  # root reads any file whatever its mode
    port = free_port()
    log_file = open_tmp_path / "web.log"
    with log_file.open("wb") as log_out:
        web = subprocess.Popen(
            as_nobody(
                [sys.executable, "-m", "inspectd", "web", "--endpoint", "tcp://127.0.0.1:1", "--archive", str(root)]
                + ["--listen", f"127.0.0.1:{port}", "--log-format", "json"],
                group=os.getegid(),  # in the archive's group: it may read all but what was closed
            ),
            stdout=log_out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:

        def get(path: str) -> tuple[int, str | None, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
                    return reply.status, reply.headers.get("Cache-Control"), reply.read().decode(errors="replace")
            except urllib.error.HTTPError as reply:
                return reply.code, reply.headers.get("Cache-Control"), reply.read().decode()

        deadline = time.monotonic() + 30
        while True:
            try:
                assert get("/api/state")[0] == 200
                break
            except OSError:
                assert time.monotonic() < deadline and web.poll() is None, log_file.read_text()
                time.sleep(0.2)
        if closed == "files":
            assert get(f"/archive/{entry}/frame")[0] == 200  # the files it may read are served as before
        live_error = f"{live}: cannot read the live frame (Permission denied)"
        for _ in range(5):  # the page's asks: each refused alike
            assert get("/live/cam0.jpg?t=1") == (403, "no-store", live_error)
        assert f"archive unreadable: {live_error}" in json.loads(get("/api/state")[2])["alarms"]
        overlay_error = f"{overlay}: cannot read the overlay image (Permission denied)"
        for _ in range(5):
            assert get(f"/archive/{entry}/overlay") == (403, "no-store", overlay_error)
        assert f"archive unreadable: {overlay_error}" in json.loads(get("/api/state")[2])["alarms"]
    finally:
        web.terminate()
        web.wait(10)
    logged = log_file.read_text()
    assert "Traceback" not in logged and "Error handling request" not in logged, logged[-3000:]
    events = [json.loads(line).get("event") for line in logged.splitlines() if line.startswith("{")]
    assert events.count("live_frame_unreadable") == 1 and events.count("image_unreadable") == 1, logged[-3000:]


def test_a_daemons_archive_under_a_folder_the_view_may_not_enter_is_an_archive_elsewhere_alarm(open_tmp_path):
    """The installed state_dir (0750) seen by a user outside its group: Path.exists() raised PermissionError, so the
    alarm with its `not seen from here` hint, written for this very case, never showed, and the view logged a
    traceback every minute instead."""
    state_dir = open_tmp_path / "state"
    daemons = state_dir / "archive"
    daemons.mkdir(parents=True)
    ours = open_tmp_path / "archive"
    ours.mkdir(mode=0o755)
    closed_to_others(state_dir)
    probe = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from inspectd.clients.web import LineState, WebView\n"
        "state = LineState()\n"
        "state.on_message(json.loads(sys.argv[1]))\n"
        "print(WebView(state, Path(sys.argv[2])).archive_elsewhere())\n"
    )
    looked = subprocess.run(
        as_nobody([sys.executable, "-c", probe, json.dumps(status_naming(daemons)), str(ours)]),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert looked.returncode == 0 and looked.stderr == "", looked.stderr
    assert looked.stdout.strip() == (
        f"archive elsewhere: the daemon archives to {daemons} (not there yet, or not seen from here), this view reads "
        f"--archive {ours}: its overlays and live frames are not shown here"
    )


def test_a_view_reading_another_archive_serves_none_of_its_live_frames(tmp_path, monkeypatch):
    """Another station's archive (a typo, the instance next door, whose cameras are also cam0): its live frame was
    served in this daemon's cam0 tile, under this daemon's verdicts, while the alarm said live frames were not shown."""
    monkeypatch.setattr(web_module, "ARCHIVE_CHECK_S", 0.05)
    daemons, other = tmp_path / "run1" / "archive", tmp_path / "run2" / "archive"
    archived(daemons, judged("cam0", 1, defect_frame(1)))
    archived(other, judged("cam0", 1, defect_frame(2)))

    async def asks(root: Path) -> tuple[int, str | None, list[str], float | None]:
        view = WebView(LineState(), root)
        view.state.on_message({**status_naming(daemons), "cameras": {"cam0": {}}})
        async with serve(view) as client:
            await asyncio.sleep(0.3)  # a few of the view's archive checks
            async with client.get("/live/cam0.jpg?t=1") as reply:
                await reply.read()
                live = reply.status, reply.headers.get("Cache-Control")
            async with client.get("/api/state") as reply:
                state = await reply.json()
        return (*live, state["alarms"], state["cameras"]["cam0"].get("live_age_s"))

    status, cache, alarms, age = asyncio.run(asks(other))
    assert alarms and alarms[0].startswith("archive elsewhere: "), alarms
    assert (status, cache) == (404, "no-store")
    assert age is None
    status, _, alarms, age = asyncio.run(asks(daemons))
    assert (status, alarms) == (200, []) and age is not None


def test_a_link_at_a_live_frame_is_not_followed_out_of_the_archive(tmp_path):
    """aiohttp's FileResponse followed a symlink planted at live/<camera>.jpg: any file the view's user could read was
    served as image/jpeg to whoever could reach the view. Archived images were already kept inside the archive."""
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-of-web-user")
    root = tmp_path / "archive"
    archived(root, judged("cam0", 1, defect_frame(1)), judged("cam1", 1, defect_frame(2)))
    frame = (root / "live" / "cam1.jpg").read_bytes()
    (root / "live" / "cam0.jpg").unlink()
    (root / "live" / "cam0.jpg").symlink_to(secret)
    # live/ itself a link to a folder elsewhere, holding a cam0.jpg
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "live").mkdir(parents=True)
    (elsewhere / "live" / "cam0.jpg").write_text("SECRET-elsewhere")
    linked = tmp_path / "linked"
    archived(linked, judged("cam0", 1, defect_frame(1)))
    live_dir = linked / "live"
    for f in live_dir.iterdir():
        f.unlink()
    live_dir.rmdir()
    live_dir.symlink_to(elsewhere / "live")

    async def ask(root: Path, camera: str) -> tuple[int, bytes, list[str], float | None]:
        state = LineState()
        state.on_message({**status_naming(root), "cameras": {camera: {}}})
        async with serve(WebView(state, root)) as client:
            async with client.get(f"/live/{camera}.jpg") as reply:
                seen = reply.status, await reply.read()
            async with client.get("/api/state") as reply:
                body = await reply.json()
        return (*seen, body["alarms"], body["cameras"][camera].get("live_age_s"))

    status, body, alarms, age = asyncio.run(ask(root, "cam0"))
    assert status == 404 and b"SECRET" not in body and age is None, (status, body, age)
    assert b"a link" in body and alarms == [], (body, alarms)
    status, body, _, _ = asyncio.run(ask(linked, "cam0"))
    assert status == 404 and b"SECRET" not in body, (status, body)
    status, body, _, age = asyncio.run(ask(root, "cam1"))
    assert (status, body) == (200, frame) and age is not None and 0 <= age < 60, age


def test_the_state_gives_each_live_frames_age_as_it_is_sampled_not_the_last_result(tmp_path):
    """The live tile sat beside "last: <verdict>" with nothing saying which frame it was: it is one frame a second at
    most, and a camera that stopped sending kept its last one. The state gives its age (from its mtime)."""
    root = tmp_path / "archive"
    archived(root, judged("cam0", 1, defect_frame(1)))
    old = time.time() - 42
    os.utime(root / "live" / "cam0.jpg", (old, old))
    state = LineState()
    state.on_message({**status_naming(root), "cameras": {"cam0": {}, "cam1": {}}})

    async def ask() -> dict:
        async with serve(WebView(state, root)) as client:
            async with client.get("/api/state") as reply:
                return (await reply.json())["cameras"]

    cameras = asyncio.run(ask())
    assert 41 <= cameras["cam0"]["live_age_s"] < 50, cameras["cam0"]
    assert cameras["cam1"]["live_age_s"] is None  # no live frame (yet)
