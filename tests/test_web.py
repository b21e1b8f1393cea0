"""`inspectd web` in a real headless chromium against a real daemon: the page loads, shows a planted defect's overlay
without a reload (asking again for one not yet on disk), and carries on when the daemon restarts. The run also takes
the screenshot in docs/ (with INSPECTD_UPDATE_DOCS=1; otherwise it goes to the test's temporary directory)."""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from browser import Browser
from daemon_harness import Station
from inspectd.clients.web import HIST_BINS, IDLE_TIMEOUT_S, MAX_CONNECTIONS, LineState
from inspectd.protocol.archive import INDEX_NAME
from inspectd.protocol.messages import Region, Result, encode_status, result_topic
from ports import free_port
from station_model import FRAME, THRESHOLD, defect_frame, drop, good_frame, judged, result_for, write_grey_bundle

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "web-view.png"


def result(camera: str, seq: int, verdict: str, score: float, archive_id: str | None = None) -> Result:
    return Result(
        "t1", camera, seq, f"{seq}", time.time(), time.time(), verdict, score, 0.5, "m", 1,
        (Region(1, 2, 3, 4, 12, 0.9),) if verdict == "defect" else (), 5.0 + seq, FRAME, FRAME, False,
        archive_id=archive_id,
    )  # fmt: skip


def test_line_state_counts_histogram_defects_and_alarms():
    state = LineState(defects_kept=2)
    assert state.snapshot()["alarms"] == ["no status from the daemon yet"]
    for seq, score in enumerate([0.1, 0.2, 0.49, 0.5, 0.99, 5.0]):
        state.on_message(result("cam0", seq, "defect" if score >= 0.5 else "ok", score, f"cam0-x-{seq}"))
    state.on_message({"station": "t1", "healthy": False, "cameras": {"cam0": {"state": "reopening"}, "cam1": {}},
                      "archive": {"degraded": True, "error": "OSError: disk full"}})  # fmt: skip
    snap = state.snapshot()
    cam0 = snap["cameras"]["cam0"]
    assert cam0["counts"] == {"ok": 3, "defect": 3, "error": 0}
    assert [d["seq"] for d in cam0["defects"]] == [5, 4], "the newest N defects, newest first"
    bins = cam0["histogram"]["bins"]
    assert len(bins) == HIST_BINS + 1 and sum(bins) == 6
    half = HIST_BINS // 2  # score == threshold: the first bin at or above it
    assert sum(bins[:half]) == 3 and bins[half] == 1 and bins[-1] == 1
    assert cam0["latency_ms"]["p50"] == 8.0 and snap["daemon_reporting"]
    assert "cam1" in snap["cameras"], "a camera the status names is shown before its first result"
    assert snap["alarms"] == ["inference unhealthy", "archive degraded: OSError: disk full", "camera cam0 reopening"]
    state.on_message({"station": "t1", "healthy": False, "unhealthy": ["engine stuck: a batch of 4 frame(s) has run "
                      "for 31 s", "threads ended: publish"], "cameras": {}})  # fmt: skip
    assert state.snapshot()["alarms"] == [
        "unhealthy: engine stuck: a batch of 4 frame(s) has run for 31 s",
        "unhealthy: threads ended: publish",
    ], "the daemon's own reasons, one line each"


def test_drift_alarms_name_the_test_that_raised_them_and_the_false_reject_warning():
    state = LineState(defects_kept=2)
    score = {"alarm": True, "score_alarm": True, "statistic": 0.5, "raise_at": 0.4}
    light = {"alarm": True, "brightness_alarm": True, "brightness_statistic": 0.9, "brightness_raise_at": 0.4}
    warning = {"alarm": False, "false_reject_warning": True, "false_reject_estimate": 0.02, "target": 0.001}
    state.on_message({"station": "t1", "healthy": True,
                      "cameras": {"a": {"drift": score}, "b": {"drift": light}, "c": {"drift": warning}}})  # fmt: skip
    assert state.snapshot()["alarms"] == [
        "camera a drift: good parts no longer score as at calibration (KS D 0.5 > 0.4; lighting, lens, focus or "
        "material?)",
        "camera b drift: good parts no longer look as bright as at calibration (KS D 0.9 > 0.4; lighting, lens, "
        "focus or material?)",
        "camera c false rejects rising: about 2 % of good parts, target 0.1 %",
    ]


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def start_web(endpoint: str, archive: Path, port: int | None = None, *extra: str) -> tuple[subprocess.Popen, str]:
    """`inspectd web` on `port` (by default a free one) with `extra` arguments, logging JSON lines to its stdout: the
    process and its page's URL."""
    port = port or free_port()
    web = subprocess.Popen(
        [sys.executable, "-m", "inspectd", "web", "--endpoint", endpoint, "--archive", str(archive),
         "--listen", f"127.0.0.1:{port}", "--log-format", "json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, text=True,
    )  # fmt: skip
    return web, f"http://127.0.0.1:{port}/"


def wait_served(web: subprocess.Popen, url: str, timeout: float = 30.0) -> None:
    """Until `web` serves its page; its output when it ends first."""
    deadline = time.monotonic() + timeout
    while True:
        assert web.poll() is None, web.communicate()[0]
        try:
            if fetch(url)[0] == 200:
                return
        except OSError:  # not listening yet
            pass
        assert time.monotonic() < deadline, "inspectd web did not serve its page"
        time.sleep(0.1)


async def overlay_shown(browser: Browser, archive_id: str, timeout: float = 75.0) -> dict:
    """The overlay of `archive_id` as the page shows it. Waited for as long as the page asks for it again (about a
    minute: a loaded machine can hold the archive writer back past the retries of the first half minute), so the
    outcome is the page's: shown, or given up on (`data-missing`), which fails here."""
    selector = json.dumps(f'img[data-archive-id="{archive_id}"]')
    shown = await browser.wait_for(
        f"(() => {{ const img = document.querySelector({selector});"
        " if (img && img.dataset.missing) return {missing: true};"
        " return img && img.dataset.loadedAt && img.naturalWidth > 0"
        " ? {loadedAt: Number(img.dataset.loadedAt), width: img.naturalWidth, height: img.naturalHeight} : null; })()",
        timeout,
        f"the overlay of {archive_id}",
    )
    assert not shown.get("missing"), f"the page gave up on the overlay of {archive_id} (not in the archive)"
    return shown


def test_web_view_in_a_real_browser_shows_defects_live_and_survives_a_daemon_restart(tmp_path):
    bundle = write_grey_bundle(tmp_path / "bundle")
    inboxes = {cam: tmp_path / f"inbox-{cam}" for cam in ("cam0", "cam1")}
    cameras = []
    for cam, inbox in inboxes.items():
        inbox.mkdir()
        cameras.append({"id": cam, "source": {"kind": "folder", "path": str(inbox), "poll_ms": 20}})
    stations = [Station(tmp_path, bundle, cameras, archive={"good_every": 1})]
    web, url = start_web(stations[0].publish, tmp_path / "state" / "archive")
    counter = iter(range(1000))

    def plant(station: Station, camera: str, defect: bool) -> Result:
        i = next(counter)
        drop(inboxes[camera], f"{i:04d}.png", defect_frame(i) if defect else good_frame(i))
        return result_for(station, f"{i:04d}.png")

    async def scenario() -> None:
        async with Browser() as browser:
            await browser.goto(url)
            await browser.wait_for("document.querySelector('#health')?.textContent === 'healthy'", 30, "healthy")
            for i in range(6):
                plant(stations[0], "cam1" if i % 2 else "cam0", defect=False)
            for camera in ("cam0", "cam1", "cam0"):
                planted = plant(stations[0], camera, defect=True)
                assert planted.verdict == "defect" and planted.archive_id, planted
                shown = await overlay_shown(browser, planted.archive_id)
                assert (shown["width"], shown["height"]) == (FRAME, FRAME)
            # What the operator reads: both cameras, their counts, the defects, the live frame.
            text = await browser.evaluate("document.body.innerText")
            assert "cam0" in text and "cam1" in text and "ok / defect / error" in text
            assert await browser.evaluate("document.querySelectorAll('.defect img').length") == 3
            await browser.wait_for(
                "Array.from(document.querySelectorAll('img.live')).every(i => i.naturalWidth > 0)", 10, "live frames"
            )
            # The live frame is sampled, not the `last` result beside it: the page says how old it is.
            await browser.wait_for(
                "document.querySelectorAll('section.camera').length === 2 && Array.from("
                "document.querySelectorAll('section.camera')).every(s => /live frame\\tsampled, \\d+ s old/"
                ".test(s.innerText))",
                10,
                "the live frames' age",
            )
            shot = SCREENSHOT if os.environ.get("INSPECTD_UPDATE_DOCS") == "1" else tmp_path / "web-view.png"
            await browser.screenshot(shot)
            assert shot.stat().st_size > 10_000

            # The daemon goes away: the page says so, and keeps what it showed.
            assert stations[0].stop() == 0, stations[0].log_tail()
            await browser.wait_for(
                "document.querySelector('#health')?.textContent === 'daemon not reporting'", 15, "the daemon's absence"
            )
            assert await browser.evaluate("document.querySelectorAll('.defect img').length") == 3
            # A new daemon on the same endpoints: the same page, without a reload, shows its defects.
            stations.append(Station(tmp_path, bundle, cameras, archive={"good_every": 1}))
            stations[1].wait_ready()
            await browser.wait_for("document.querySelector('#health')?.textContent === 'healthy'", 30, "healthy again")
            planted = plant(stations[1], "cam1", defect=True)
            shown = await overlay_shown(browser, planted.archive_id)
            assert (shown["width"], shown["height"]) == (FRAME, FRAME)

    try:
        stations[0].wait_ready()
        wait_served(web, url)
        asyncio.run(scenario())

        state = json.loads(fetch(url + "api/state")[1])
        assert state["daemon_reporting"] and state["cameras"]["cam1"]["counts"]["defect"] >= 2
        assert fetch(url + "archive/..%2F..%2Fetc%2Fpasswd/frame")[0] == 404
        assert_not_an_archive_id(url, "..%5C..%5Cetc%5Cpasswd")
        assert fetch(url + "archive/cam0-20000101T000000000-1/overlay")[0] == 404
        status, body = fetch(url + "live/cam0.jpg")
        assert status == 200 and body[:2] == b"\xff\xd8"
        # Read-only: nothing but GET is served.
        request = urllib.request.Request(url + "api/state", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 405
    finally:
        for station in stations:
            station.close()
        if web.poll() is None:
            web.send_signal(signal.SIGTERM)
        output = web.communicate(timeout=20)[0]
    assert web.returncode == 0, output
    assert "web_listening" in output


def test_an_overlay_not_yet_on_disk_is_asked_for_again_and_shown_when_it_is(tmp_path):
    """A result can reach the page before the archive writer has written its overlay (a daemon just started, a slow
    disk): the page's request is refused, and the page asks again until the image is there, without a reload. Here
    the archive does not even exist when the result is published."""
    import zmq

    from inspectd.daemon.archive import Archive
    from inspectd.protocol.archive import archive_id
    from inspectd.protocol.messages import encode_result

    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.linger = 0
    endpoint = f"tcp://127.0.0.1:{pub.bind_to_random_port('tcp://127.0.0.1')}"
    web, url = start_web(endpoint, tmp_path / "archive")
    late = judged("cam0", 7, defect_frame(7))
    entry = archive_id("cam0", 7, late.frame.t_capture)
    message = encode_result(
        station="t1", camera="cam0", seq=7, frame_id="000007.png", t_capture=late.frame.t_capture,
        t_publish=time.time(), verdict="defect", score=late.score, threshold=THRESHOLD, model_id="test-none-0",
        thresholds_version=1, regions=late.regions, latency_ms=5.0, width=FRAME, height=FRAME,
        archive_id=entry,
    )  # fmt: skip
    selector = json.dumps(f'img[data-archive-id="{entry}"]')
    img = f"document.querySelector({selector})"

    async def page() -> None:
        async with Browser() as browser:
            await browser.goto(url)
            deadline = time.monotonic() + 30
            # Until the page has asked for the overlay and been refused (a PUB socket drops what it sends before
            # the view has subscribed, so the result goes out again meanwhile; the view keeps one entry per id).
            while not await browser.evaluate(f"{img}?.dataset.retries || null"):
                pub.send_multipart(message)
                assert time.monotonic() < deadline, "the page never asked for the overlay"
                await asyncio.sleep(0.2)
            archive = Archive(tmp_path / "archive", max_mb=10, max_age_h=1, good_every=1).start()
            assert archive.offer(late) == entry
            assert archive.close()
            shown = await overlay_shown(browser, entry)
            assert (shown["width"], shown["height"]) == (FRAME, FRAME)
            assert await browser.evaluate(f"{img}.dataset.missing === undefined")
            assert await browser.evaluate("document.querySelectorAll('.defect img').length") == 1

    try:
        wait_served(web, url)
        asyncio.run(page())
    finally:
        web.send_signal(signal.SIGTERM)
        output = web.communicate(timeout=20)[0]
        pub.close()
    assert web.returncode == 0, output


def _web_start(endpoint: str, archive: Path, *extra: str) -> tuple[int, list[str]]:
    out = subprocess.run(
        [sys.executable, "-m", "inspectd", "web", "--endpoint", endpoint, "--listen", "127.0.0.1:0",
         "--archive", str(archive), *extra],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    )  # fmt: skip
    return out.returncode, out.stderr.strip().splitlines()


def test_web_start_refuses_an_endpoint_zeromq_cannot_use_in_one_line(tmp_path):
    # Past the endpoint rule every client checks, ZeroMQ's own refusal is the last check.
    code, lines = _web_start("tcp://no host:5556", tmp_path)
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("inspectd web: --endpoint 'tcp://no host:5556': cannot connect ("), lines
    assert lines[0].endswith("expected tcp://HOST:PORT or ipc://PATH"), lines


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        # deque(maxlen=...) raised OverflowError in every message's callback: a traceback per status, no cameras.
        (["--defects", "100000000000000000000"], "inspectd web: --defects 100000000000000000000, expected 1 to 1000"),
        (["--defects", "0"], "inspectd web: --defects 0, expected 1 to 1000"),
        # str.isdigit() took '²' (int() refused it with a traceback) and other scripts' digits.
        (["--listen", "127.0.0.1:\u00b2"], "inspectd web: --listen '127.0.0.1:\u00b2', expected HOST:PORT"),
        (["--listen", "127.0.0.1:\u0668\u0660\u0668\u0668"], "inspectd web: --listen '127.0.0.1:\u0668\u0660"),
        (["--listen", "127.0.0.1:" + "1" * 5000], "inspectd web: --listen '127.0.0.1:11111"),
    ],
)
def test_web_start_refuses_a_number_it_cannot_use_in_one_line(tmp_path, flags, expected):
    code, lines = _web_start("tcp://127.0.0.1:5556", tmp_path, *flags)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(expected), lines


_CONNECT_PORT = (
    "expected tcp://HOST:PORT, PORT the daemon's port, a number from 1 to 65535 (* and 0 are only for a bind)"
)


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        # libzmq cut the port to 16 bits and the page showed another daemon's line, or a silent one.
        ("tcp://127.0.0.1:71092", f"{_CONNECT_PORT}, got 'tcp://127.0.0.1:71092'"),
        ("tcp://127.0.0.1:0", f"{_CONNECT_PORT}, got 'tcp://127.0.0.1:0'"),
        ("tcp://127.0.0.1:*", f"{_CONNECT_PORT}, got 'tcp://127.0.0.1:*'"),
        ("127.0.0.1:5556", "expected a ZeroMQ endpoint (tcp://HOST:PORT or ipc://PATH), got '127.0.0.1:5556'"),
        ("", "expected a ZeroMQ endpoint (tcp://HOST:PORT or ipc://PATH), got ''"),
        (
            "ipc:///" + "a" * 120,
            "'ipc:///aaaaaaaaaaaaaaa...aaaaaaaaaaaaaaaaaaaaaaa': its path is 121 bytes, expected at most",
        ),
    ],
)
def test_web_start_refuses_an_endpoint_no_daemon_could_be_configured_with_in_the_other_clients_words(
    tmp_path, endpoint, expected
):
    code, lines = _web_start(endpoint, tmp_path)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith(f"inspectd web: --endpoint: {expected}"), lines


def test_web_feed_survives_unreadable_messages_shows_them_and_escapes_status_text(tmp_path):
    """A publisher out of step with this view (garbage, a status whose camera entry is not an object, markup in a
    state): the feed goes on, the page says messages could not be read, and status text is never markup."""
    import threading

    import zmq

    from inspectd.protocol.messages import encode_status

    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.linger = 0
    endpoint = f"tcp://127.0.0.1:{pub.bind_to_random_port('tcp://127.0.0.1')}"
    web, url = start_web(endpoint, tmp_path / "none")
    hostile = "<img src=x onerror=window.pwned=1>"
    # A throughput that is not a number: the page must still draw the cameras.
    status = {"t": time.time(), "uptime_s": 1.0, "healthy": True, "model_id": "m", "thresholds_version": 1,
              "throughput_fps": "fast", "cameras": {"cam0": {"state": hostile}, "cam1": []}}  # fmt: skip

    stop = threading.Event()

    def publish_for(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not stop.is_set():
            pub.send_multipart([b"inspect.t1.status", b"{not json"])
            pub.send_multipart(encode_status("t1", {**status, "t": time.time()}))
            time.sleep(0.1)

    async def page() -> None:
        async with Browser() as browser:
            await browser.goto(url)
            await browser.wait_for("document.querySelector('#health')?.textContent === 'healthy'", 30, "healthy")
            await browser.wait_for("!!document.querySelector('#camera-cam0 table.stats td')", 10, "cam0's table")
            cell = "document.querySelector('#camera-cam0 table.stats tr td:nth-child(2)')"
            assert await browser.evaluate(f"{cell}.textContent") == hostile
            assert await browser.evaluate("document.querySelectorAll('table.stats img').length") == 0
            assert await browser.evaluate("window.pwned === undefined")
            alarms = await browser.evaluate("document.querySelector('#alarms').innerText")
            assert "messages from the daemon could not be read" in alarms, alarms

    try:
        wait_served(web, url)
        publish_for(1.5)
        code, body = fetch(url + "api/state")
        assert code == 200, body[:500]
        state = json.loads(body)
        assert state["daemon_reporting"] and state["refused_messages"] >= 5
        assert any("messages from the daemon could not be read" in a and "JSON" in a for a in state["alarms"])
        feeder = threading.Thread(target=publish_for, args=(60.0,), daemon=True)
        feeder.start()
        asyncio.run(page())
    finally:
        stop.set()
        if "feeder" in locals():
            feeder.join(5)
        web.send_signal(signal.SIGTERM)
        output = web.communicate(timeout=20)[0]
        pub.close()
    assert web.returncode == 0, output
    refused_logs = [line for line in output.splitlines() if '"message_refused"' in line]
    assert len(refused_logs) in (1, 2), refused_logs  # logged, and at most once a minute after the first


def test_the_page_shows_the_daemons_own_counts_and_says_whose_histogram_it_is(tmp_path):
    """A web view started late shows the daemon's counters from the status message (not zero, not only what it saw
    itself), and the histogram says it covers the results this view received since it started. Two defects without
    an archive id and with the same seq (seqs start again after a journal is wiped) are two entries in the strip."""
    import zmq

    from inspectd.protocol.messages import encode_status

    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.linger = 0
    endpoint = f"tcp://127.0.0.1:{pub.bind_to_random_port('tcp://127.0.0.1')}"
    web, url = start_web(endpoint, tmp_path / "none")
    cam0 = {"state": "running", "published": 1000, "defects": 7, "errors": 3}
    status = {"t": time.time(), "uptime_s": 86400.0, "healthy": True, "model_id": "m", "thresholds_version": 1,
              "throughput_fps": 10.0, "cameras": {"cam0": cam0}}  # fmt: skip

    async def page() -> None:
        async with Browser() as browser:
            await browser.goto(url)
            deadline = time.monotonic() + 30
            while not await browser.evaluate("!!document.querySelector('#camera-cam0 table.stats td')"):
                pub.send_multipart(encode_status("t1", {**status, "t": time.time()}))
                assert time.monotonic() < deadline, "cam0 never shown"
                await asyncio.sleep(0.1)
            text = await browser.evaluate("document.querySelector('#camera-cam0').innerText")
            assert "990 / 7 / 3 (daemon, since it started)" in text, text
            assert "scores received by this view since " in text, text
            t = time.time()
            again = [replace(result("cam0", 3, "defect", 0.8), t_publish=t + i, t_capture=t + i) for i in (0, 1)]
            deadline = time.monotonic() + 10
            while await browser.evaluate("document.querySelectorAll('#camera-cam0 .defect').length") != 2:
                for r in again:
                    pub.send_multipart(frames(r))
                assert time.monotonic() < deadline, "two defects of the same seq were not two entries in the strip"
                await asyncio.sleep(0.2)

    try:
        wait_served(web, url)
        asyncio.run(page())
    finally:
        web.send_signal(signal.SIGTERM)
        output = web.communicate(timeout=20)[0]
        pub.close()
    assert web.returncode == 0, output


# --- a status or an archive the view did not expect ------------------------------------------------------------------

STATUS = {"t": 0.0, "uptime_s": 1.0, "healthy": True, "model_id": "m", "thresholds_version": 1, "throughput_fps": 1.0,
          "cameras": {"cam0": {"state": "running"}}}  # fmt: skip


def publisher():
    """A PUB socket on a free port, as a daemon's publisher: the socket and its endpoint."""
    import zmq

    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.linger = 0
    return pub, f"tcp://127.0.0.1:{pub.bind_to_random_port('tcp://127.0.0.1')}"


def frames(r: Result) -> list[bytes]:
    return [result_topic(r.station, r.camera), json.dumps(r.header()).encode()]


def stop_web(web: subprocess.Popen) -> str:
    if web.poll() is None:
        web.send_signal(signal.SIGTERM)
    output = web.communicate(timeout=20)[0]
    assert web.returncode == 0, output
    return output


def refuse_constant(name: str) -> None:
    raise AssertionError(f"{name} in the view's JSON: no browser's JSON.parse reads it")


def state_of(url: str) -> dict:
    """/api/state, read as strictly as the page's JSON.parse reads it."""
    code, body = fetch(url + "api/state")
    assert code == 200, body[:500]
    return json.loads(body, parse_constant=refuse_constant)


def both_cameras_seen(pub, url: str, both: dict) -> None:
    """The view subscribed, a status listing cam0 and cam1 (`both`), and a defect of cam1 in its state."""
    until_subscribed(pub, url)
    pub.send_multipart(encode_status("t1", {**both, "t": time.time()}))
    pub.send_multipart(frames(result("cam1", 1, "defect", 0.9)))
    state_where(url, lambda s: s["cameras"].get("cam1", {}).get("counts", {}).get("defect") == 1, 10, "cam1")


def until_subscribed(pub, url: str) -> None:
    """Until the view's SUB socket gets what is published (a PUB socket drops everything before that), by results: a
    status sent now would count as one of the daemon's status messages."""
    deadline = time.monotonic() + 20
    while "cam0" not in state_of(url)["cameras"]:
        pub.send_multipart(frames(result("cam0", 0, "ok", 0.1)))
        assert time.monotonic() < deadline, "the view never got a message"
        time.sleep(0.1)


def assert_not_an_archive_id(url: str, entry_id: str) -> None:
    """Refused by the handler's own check of the id (the router passes it on), not a 404 for no such route."""
    code, body = fetch(url + f"archive/{entry_id}/frame")
    assert code == 404 and b"expected <camera>-<YYYYmmddTHHMMSSmmm>-<seq>" in body, (code, body[:200])


def state_where(url: str, test, timeout: float, what: str) -> dict:
    """The first /api/state, asked for as the page asks (every half second), for which `test(state)` holds."""
    deadline = time.monotonic() + timeout
    while not test(state := state_of(url)):
        assert time.monotonic() < deadline, f"no state with {what} in {timeout} s"
        time.sleep(0.1)
    return state


def test_a_status_whose_figures_are_not_numbers_does_not_stop_the_pages(tmp_path):
    """A false-reject warning whose estimate is text and whose target is a list: the alarm is shown without figures,
    and the pages keep getting the state after it (the one task pushing to all pages once died of it)."""
    pub, endpoint = publisher()
    web, url = start_web(endpoint, tmp_path / "none")
    drift = {"false_reject_warning": True, "false_reject_estimate": "0.02", "target": [0.001]}
    odd = {**STATUS, "cameras": {"cam0": {"state": "running", "drift": drift}}}
    try:
        wait_served(web, url)
        until_subscribed(pub, url)
        pub.send_multipart(encode_status("t1", {**odd, "t": time.time()}))
        state_where(url, lambda s: "camera cam0 false rejects rising" in s["alarms"], 10, "the warning without figures")
        assert state_of(url)["alarms"] == ["camera cam0 false rejects rising"]
        good_at = time.time()
        pub.send_multipart(encode_status("t1", {**STATUS, "t": good_at}))
        after = state_where(url, lambda s: (s["status"] or {}).get("t") == good_at, 10, "the status after it")
        assert after["alarms"] == [] and after["daemon_reporting"]
    finally:
        output = stop_web(web)
        pub.close()
    assert '"state_failed"' not in output


def test_a_status_with_nan_or_a_name_that_is_no_camera_id_is_refused(tmp_path):
    """NaN and Infinity are not JSON: a status carrying one is refused (and counted), never passed on to the page,
    whose JSON.parse would refuse every state after it. A camera name that is not a camera id is refused as in a
    result, not made a camera of the view."""
    pub, endpoint = publisher()
    web, url = start_web(endpoint, tmp_path / "none")
    schema = json.loads(encode_status("t1", STATUS)[1])["schema"]
    whole = {"schema": schema, "station": "t1", **STATUS}
    refused = [
        json.dumps({**whole, "throughput_fps": float("nan")}).encode(),  # Python's json writes NaN
        json.dumps({**whole, "uptime_s": float("inf")}).encode(),
        json.dumps(whole).replace('"uptime_s": 1.0', '"uptime_s": 1e400').encode(),  # read as infinity
        encode_status("t1", {**STATUS, "cameras": {"cam0": {}, "../../x": {}}})[1],
    ]
    try:
        wait_served(web, url)
        until_subscribed(pub, url)
        pub.send_multipart(encode_status("t1", {**STATUS, "t": time.time()}))
        for body in refused:
            pub.send_multipart([b"inspect.t1.status", body])
        deadline = time.monotonic() + 10
        while (state := state_of(url))["refused_messages"] < len(refused):
            assert time.monotonic() < deadline, f"{state['refused_messages']} refused, expected {len(refused)}"
            time.sleep(0.1)
        assert state["status"]["throughput_fps"] == 1.0 and state["status"]["uptime_s"] == 1.0
        assert list(state["cameras"]) == ["cam0"]
        assert any("messages from the daemon could not be read" in a for a in state["alarms"]), state["alarms"]
    finally:
        output = stop_web(web)
        pub.close()
    assert "expected a finite number" in output or "expected a camera id" in output, output[-2000:]


@pytest.mark.parametrize("said", [None, 10.0])
def test_a_status_older_than_3_s_is_on_time_within_three_of_the_daemons_intervals(tmp_path, said):
    """publish.status_interval_s may be longer than the view's 3 s. A daemon that says its interval (interval_s, here
    10 s) is on time for three of them from its first status; one of an older release that does not, once the view
    has seen the gap (two statuses 5 s apart). A status 4.5 s old is then on time, not a daemon that stopped."""
    pub, endpoint = publisher()
    web, url = start_web(endpoint, tmp_path / "none")
    seen: list = []  # (status age, daemon reporting, alarms) of the last status
    try:
        wait_served(web, url)
        until_subscribed(pub, url)
        if said is None:
            first = time.monotonic()
            pub.send_multipart(encode_status("t1", {**STATUS, "t": time.time()}))
            while time.monotonic() < first + 5.0:  # the daemon's schedule
                time.sleep(0.05)
        sent = time.time()
        pub.send_multipart(encode_status("t1", {**STATUS, "t": sent, **({"interval_s": said} if said else {})}))
        until = time.monotonic() + 4.5  # past the 3 s, before the next status is due
        while time.monotonic() < until:
            state = state_of(url)
            if (state["status"] or {}).get("t") == sent:
                seen.append((state["status_age_s"], state["daemon_reporting"], state["alarms"]))
            time.sleep(0.25)
    finally:
        stop_web(web)
        pub.close()
    assert seen and max(age for age, _, _ in seen) > 3.5, seen
    assert all(reporting and not alarms for _, reporting, alarms in seen), seen


def test_live_frames_need_no_index_and_an_archive_made_anew_is_read(tmp_path):
    """With good_every 0 no frame is archived on a clean line, yet the live frames are on disk: they are served. An
    archive directory removed and made again (cleared, a new disk, a restore) is read anew, without restarting the
    view. Names that are not camera ids and ids that are not archive ids are refused by the view itself."""
    from inspectd.daemon.archive import Archive

    root = tmp_path / "archive"
    web, url = start_web(f"tcp://127.0.0.1:{free_port()}", root)  # no daemon: only the directory matters here

    def archived(seq: int, image) -> str | None:
        archive = Archive(root, max_mb=10, max_age_h=1, good_every=0).start()
        entry = archive.offer(judged("cam0", seq, image))
        assert archive.close()
        return entry

    try:
        wait_served(web, url)
        assert archived(0, good_frame(0)) is None
        assert (root / "live" / "cam0.jpg").is_file() and not (root / INDEX_NAME).exists()
        code, live = fetch(url + "live/cam0.jpg")
        assert code == 200 and live[:2] == b"\xff\xd8", (code, live[:200])
        (root / "live" / "a.b.jpg").write_bytes(live)
        assert fetch(url + "live/a.b.jpg")[0] == 404, "a name that is not a camera id was served"
        assert_not_an_archive_id(url, "..%5C..%5Cetc%5Cpasswd")

        first = archived(1, defect_frame(1))
        assert first and fetch(url + f"archive/{first}/overlay")[0] == 200
        shutil.rmtree(root)
        again = archived(2, defect_frame(2))
        assert again and again != first
        code, body = fetch(url + f"archive/{again}/overlay")
        assert code == 200, body[:200]
        assert fetch(url + f"archive/{first}/overlay")[0] == 404  # gone with its directory
    finally:
        stop_web(web)


# --- many pages, many connections, a camera taken out ----------------------------------------------------------------


async def in_every_tab(browser: Browser, expression: str) -> list:
    """`expression`'s value in each tab of `browser`, through each tab's own DevTools connection."""
    port = int((browser.profile / "DevToolsActivePort").read_text().splitlines()[0])
    session = browser._session
    assert session is not None
    async with session.get(f"http://127.0.0.1:{port}/json/list") as reply:
        tabs = [t for t in await reply.json() if t.get("type") == "page"]
    values = []
    for tab in tabs:
        async with session.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            await ws.send_json({"id": 1, "method": "Runtime.evaluate",
                                "params": {"expression": expression, "returnByValue": True}})  # fmt: skip
            while (answer := await ws.receive_json(timeout=10)).get("id") != 1:
                pass
        values.append(answer["result"]["result"].get("value"))
    return values


def test_seven_tabs_of_one_browser_each_show_the_line_and_leave_connections_for_the_rest(tmp_path):
    """A browser opens at most six HTTP/1.1 connections to one host, for all its tabs together. A page that held one
    for good (a stream) left a seventh tab connecting for ever, and every request of the other six (frames, overlays,
    state) queued behind the streams. Seven tabs each follow the line, and a request of the first is answered."""
    pub, endpoint = publisher()
    web, url = start_web(endpoint, tmp_path / "none")
    shown = "(document.querySelector('#camera-cam7 table.stats')?.innerText || '').includes('0 / 1 / 0')"

    async def tabs() -> None:
        async with Browser() as browser:
            await browser.goto(url)
            await browser.wait_for("!!document.querySelector('#camera-cam0')", 10, "the first tab's state")
            for _ in range(6):
                await browser.send("Target.createTarget", url=url)
            deadline = time.monotonic() + 3
            while len(await in_every_tab(browser, "1")) < 7:
                assert time.monotonic() < deadline, "chromium did not open seven tabs"
                await asyncio.sleep(0.1)
            # Published once all seven are open: every tab must go on asking, not only have drawn a first state.
            pub.send_multipart(frames(result("cam7", 1, "defect", 0.9)))
            deadline = time.monotonic() + 10
            while not all(seen := await in_every_tab(browser, shown)):
                health = await in_every_tab(browser, "document.querySelector('#health').textContent")
                assert time.monotonic() < deadline, f"tabs without cam7's defect: {seen}, health: {health}"
                await asyncio.sleep(0.2)
            asked = await browser.send(
                "Runtime.evaluate",
                expression="(async () => { const abort = new AbortController(); setTimeout(() => abort.abort(), 3000);"
                " try { return (await fetch('/api/state', {signal: abort.signal})).status; }"
                " catch (e) { return e.name; } })()",
                awaitPromise=True,
                returnByValue=True,
            )
            assert asked["result"]["value"] == 200, asked

    try:
        wait_served(web, url)
        until_subscribed(pub, url)
        asyncio.run(tabs())
    finally:
        stop_web(web)
        pub.close()


def closed_by_peer(sock: socket.socket) -> bool:
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_connections_past_the_cap_close_the_quietest_and_the_page_is_still_served(tmp_path):
    """Whoever can connect could hold a file descriptor per connection until the view could accept no one. One past
    MAX_CONNECTIONS closes the connection quiet longest (here: requests never finished, the first held first), so
    the page is served and the view holds at most MAX_CONNECTIONS."""
    web, url = start_web(f"tcp://127.0.0.1:{free_port()}", tmp_path / "none")
    port = urllib.parse.urlsplit(url).port
    extra = 8
    held: list[socket.socket] = []
    try:
        wait_served(web, url)
        for _ in range(MAX_CONNECTIONS + extra):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            held[-1].sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finished: a place held
        assert fetch(url)[0] == 200  # one more connection: one more of the held ones makes room
        deadline = time.monotonic() + 5
        while not all(closed_by_peer(sock) for sock in held[: extra + 1]):
            assert time.monotonic() < deadline, "the connections quiet longest were not closed to make room"
            time.sleep(0.05)
        assert not any(closed_by_peer(sock) for sock in held[extra + 1 :]), "a newer connection was closed"
    finally:
        for sock in held:
            sock.close()
        output = stop_web(web)
    evicted = [json.loads(line) for line in output.splitlines() if '"web_connection_evicted"' in line]
    assert len(evicted) == 1 and evicted[0]["limit"] == MAX_CONNECTIONS, evicted  # once a minute, not per connection


def test_a_malformed_request_is_one_json_warning_and_a_silent_connection_is_closed(tmp_path):
    """With --log-format json every line is one JSON object: a request whose header line is too long (answered 400)
    is a warning without a traceback, logged once however many come. A connection that sends no whole request is
    closed after IDLE_TIMEOUT_S."""
    web, url = start_web(f"tcp://127.0.0.1:{free_port()}", tmp_path / "none")
    port = urllib.parse.urlsplit(url).port
    try:
        wait_served(web, url)
        silent = socket.create_connection(("127.0.0.1", port), timeout=5)
        silent.sendall(b"GET / HTTP/1.1\r\n")
        opened = time.monotonic()
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 10_000 + b"\r\n\r\n")
                assert sock.recv(100).split(b" ")[1] == b"400", "an over-long header line was not refused"
        assert fetch(url)[0] == 200
        while not closed_by_peer(silent):
            assert time.monotonic() < opened + IDLE_TIMEOUT_S + 5, "a connection without a request was kept"
            time.sleep(0.1)
        assert time.monotonic() - opened >= IDLE_TIMEOUT_S - 1, "closed before its time"
        silent.close()
    finally:
        output = stop_web(web)
    lines = [json.loads(line) for line in output.splitlines()]  # each line one JSON object, or this fails
    refused = [line for line in lines if line["event"] == "bad_request"]
    assert len(refused) == 1 and refused[0]["level"] == "warning", refused
    assert refused[0]["error"].startswith("LineTooLong: ") and "exception" not in refused[0], refused


def test_a_host_that_is_no_name_of_the_view_is_refused_421_and_logged_once(tmp_path):
    """The view answered any Host: a page elsewhere, open in a browser that reaches the view (an SSH tunnel puts it on
    the operator's own localhost), could rebind its own name to the view's address and read the state and every
    image as its own origin's. Only an IP address, localhost, the --listen host and --allow-host's names are served;
    any other Host is a 421 (never cached), logged once."""
    port = free_port()
    root = live_frames(tmp_path / "archive", "cam0")
    # A name with an underscore (from /etc/hosts or mDNS) is sent as typed; one of other letters in its ASCII form.
    allowed = ("--allow-host", "station.example", "--allow-host", "line_3", "--allow-host", "prüfstand.local")
    allowed += ("--allow-host", "straße.local")  # IDNA 2008 as browsers: xn--strae-oqa, not IDNA 2003's strasse
    web, url = start_web(f"tcp://127.0.0.1:{free_port()}", root, port, *allowed)

    def get(path: str, host: str) -> tuple[int, str | None, bytes]:
        ask = urllib.request.Request(url.rstrip("/") + path, headers={"Host": host})
        try:
            with urllib.request.urlopen(ask, timeout=10) as reply:
                return reply.status, reply.headers.get("Cache-Control"), reply.read()
        except urllib.error.HTTPError as reply:
            return reply.code, reply.headers.get("Cache-Control"), reply.read()

    try:
        wait_served(web, url)
        names = [f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", "LocalHost.", f"[::1]:{port}"]
        names += [f"station.example:{port}", "Station.Example.", "line_3", "xn--prfstand-75a.local"]
        for host in [*names, "xn--strae-oqa.local"]:
            code, _, body = get("/live/cam0.jpg", host)
            assert code == 200 and body[:2] == b"\xff\xd8", (host, code, body[:200])
        for host in (f"rebind.attacker.example:{port}", "localhost.attacker.example", "127.0.0.1.nip.io", "[::1]x"):
            for path in ("/", "/api/state", "/live/cam0.jpg"):
                code, cache, body = get(path, host)
                assert (code, cache) == (421, "no-store"), (host, path, code, cache, body[:200])
                assert body.decode() == (
                    f"Host {host!r} is not a name of this view: expected an IP address, localhost, the --listen host "
                    "or a name given with --allow-host\n"
                ), body
    finally:
        output = stop_web(web)
    refused = [json.loads(line) for line in output.splitlines() if '"host_refused"' in line]
    assert len(refused) == 1 and refused[0]["level"] == "warning", refused  # once a minute, not per request
    code, lines = _web_start(f"tcp://127.0.0.1:{free_port()}", tmp_path, "--allow-host", "station.example:8088")
    assert code == 2 and lines == [
        "inspectd web: --allow-host 'station.example:8088', expected a host name without a port "
        "(e.g. station.example.com)"
    ], lines


def live_frames(root: Path, *cameras: str) -> Path:
    """`root`, an archive holding a live frame of each of `cameras` and no archived entry (good_every 0)."""
    from inspectd.daemon.archive import Archive

    archive = Archive(root, max_mb=10, max_age_h=1, good_every=0).start()
    for seq, camera in enumerate(cameras):
        assert archive.offer(judged(camera, seq, good_frame(seq))) is None
    assert archive.close()
    return root


def live_img(name: str) -> str:
    """A page expression: the live frame of camera `name` as drawn (null before its section is)."""
    img = f"document.querySelector('#camera-{name} img.live')"
    return (
        f"({img} && {{width: {img}.naturalWidth, visibility: getComputedStyle({img}).visibility,"
        f" src: {img}.getAttribute('src')}})"
    )


def live_shown(name: str) -> str:
    return f"(({live_img(name)} || {{}}).width > 0 && {live_img(name)}.visibility === 'visible')"


def test_a_camera_taken_out_of_the_daemons_config_is_greyed_and_labelled(tmp_path):
    """A daemon restarted without cam1: its status no longer lists it. The page keeps cam1's tile (its last defect,
    its counts) greyed and labelled as not in the daemon's config, not as the station's present, and hides its last
    live frame (still on disk); back in the config, it is live again."""
    pub, endpoint = publisher()
    web, url = start_web(endpoint, live_frames(tmp_path / "archive", "cam0", "cam1"))
    both = {**STATUS, "cameras": {"cam0": {"state": "running"}, "cam1": {"state": "running"}}}
    gone = "document.querySelector('#camera-cam1')?.classList.contains('gone')"

    async def page() -> None:
        async with Browser() as browser:
            await browser.goto(url)
            await browser.wait_for(f"{gone} === false", 10, "cam1 shown as a camera of the daemon")
            await browser.wait_for(live_shown("cam1"), 10, "cam1's live frame")
            pub.send_multipart(encode_status("t1", {**STATUS, "t": time.time()}))  # cam0 only
            await browser.wait_for(gone, 10, "cam1 marked as gone")
            text = await browser.evaluate("document.querySelector('#camera-cam1').innerText")
            assert "not in the daemon's config" in text and "0 / 1 / 0" in text, text
            live = await browser.evaluate(live_img("cam1"))
            assert live["visibility"] == "hidden", f"a camera gone still shows its last live frame: {live}"
            state = state_of(url)
            assert state["cameras"]["cam1"]["gone"] and not state["cameras"]["cam0"]["gone"], state["cameras"]
            pub.send_multipart(encode_status("t1", {**both, "t": time.time()}))
            await browser.wait_for(f"{gone} === false", 10, "cam1 back in the config")
            await browser.wait_for(live_shown("cam1"), 10, "cam1's live frame shown again")

    try:
        wait_served(web, url)
        both_cameras_seen(pub, url, both)
        asyncio.run(page())
    finally:
        stop_web(web)
        pub.close()


def test_an_open_page_greys_a_camera_the_restarted_web_view_no_longer_names(tmp_path):
    """The daemon and `inspectd web` both restarted without cam1 (a station reboot, a config change): the new view
    has never heard of cam1. A page left open (a wall screen) greys and labels cam1's tile, hides its live frame (the
    daemon left it on disk) and no longer asks for it, as for a camera the view saw go, instead of showing it as a
    running camera with the old view's figures; cam0 stays live."""
    pub, endpoint = publisher()
    root = live_frames(tmp_path / "archive", "cam0", "cam1")
    port = free_port()
    running = [start_web(endpoint, root, port)[0]]
    url = f"http://127.0.0.1:{port}/"
    both = {**STATUS, "cameras": {"cam0": {"state": "running"}, "cam1": {"state": "running"}}}
    gone = "document.querySelector('#camera-{}')?.classList.contains('gone')"

    async def page() -> None:
        async with Browser() as browser:
            await browser.goto(url)
            cam1 = "(document.querySelector('#camera-cam1 table.stats')?.innerText || '')"
            await browser.wait_for(f"{cam1}.includes('0 / 1 / 0') && {gone.format('cam1')} === false", 10, "cam1")
            await browser.wait_for(live_shown("cam1"), 10, "cam1's live frame")
            stop_web(running.pop())
            running.append(start_web(endpoint, root, port)[0])
            wait_served(running[0], url)
            until_subscribed(pub, url)
            pub.send_multipart(encode_status("t1", {**STATUS, "t": time.time()}))  # cam0 only
            await browser.wait_for(gone.format("cam1"), 15, "cam1 marked as gone after the restart")
            text = await browser.evaluate("document.querySelector('#camera-cam1').innerText")
            assert "not in the daemon's config" in text and "0 / 1 / 0" in text, text
            assert "running" not in text, text
            live = await browser.evaluate(live_img("cam1"))
            assert live["visibility"] == "hidden", f"a camera gone still shows its last live frame: {live}"
            assert await browser.evaluate(f"{gone.format('cam0')} === false")
            # The page asks for live frames once a second: once it has asked for cam0's again, it would have for
            # cam1's too.
            cam0 = (await browser.evaluate(live_img("cam0")))["src"]
            await browser.wait_for(f"{live_img('cam0')}.src !== {json.dumps(cam0)}", 5, "cam0's frame asked for again")
            assert (await browser.evaluate(live_img("cam1")))["src"] == live["src"], "cam1's frame still asked for"

    try:
        wait_served(running[0], url)
        both_cameras_seen(pub, url, both)
        asyncio.run(page())
    finally:
        for web in running:
            stop_web(web)
        pub.close()


def test_a_camera_sending_results_is_not_gone_before_the_restarted_daemons_first_status(tmp_path):
    """A daemon restarted with cam2 added sends cam2's results before its first status (publish.status_interval_s
    after its start, here 10 s), while the last status is the old daemon's, without cam2: cam2 is not gone. A status
    without cam2 and no result of it after that status is."""
    pub, endpoint = publisher()
    web, url = start_web(endpoint, tmp_path / "none")

    def status_sent() -> dict:
        sent = time.time()
        pub.send_multipart(encode_status("t1", {**STATUS, "t": sent, "interval_s": 10.0}))  # cam0 only
        return state_where(url, lambda s: (s["status"] or {}).get("t") == sent, 10, "the status sent")

    try:
        wait_served(web, url)
        until_subscribed(pub, url)
        status_sent()
        pub.send_multipart(frames(result("cam2", 1, "defect", 0.9)))
        state = state_where(url, lambda s: "cam2" in s["cameras"], 10, "cam2's result")
        assert state["daemon_reporting"] and not state["cameras"]["cam2"]["gone"], state["cameras"]
        assert status_sent()["cameras"]["cam2"]["gone"], "a camera neither listed nor heard of since is not gone"
        pub.send_multipart(frames(result("cam2", 2, "ok", 0.1)))
        state = state_where(url, lambda s: s["cameras"]["cam2"]["counts"]["ok"] == 1, 10, "cam2's next result")
        assert not state["cameras"]["cam2"]["gone"], state["cameras"]["cam2"]
    finally:
        stop_web(web)
        pub.close()


async def open_slow(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that takes in what it is sent only as it is read (a slow link): small receive buffers."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock, limit=16384)


async def ask(connection: tuple[asyncio.StreamReader, asyncio.StreamWriter], path: str) -> tuple[int, int]:
    """GET `path` on `connection` and read the reply's head: its status and body length, the body left unread."""
    reader, writer = connection
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode().split("\r\n")
    length = next(int(line.split(":")[1]) for line in head if line.lower().startswith("content-length:"))
    return int(head[0].split()[1]), length


async def whole(connection: tuple[asyncio.StreamReader, asyncio.StreamWriter], length: int) -> bool:
    """Whether the rest of a body of `length` bytes arrives, not cut off by the connection's close."""
    try:
        await asyncio.wait_for(connection[0].readexactly(length), 30)
    except asyncio.IncompleteReadError:
        return False
    return True


async def closed(connection: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> bool:
    """Whether the view closes `connection` (which sent no request) within a few seconds."""
    try:
        return await asyncio.wait_for(connection[0].read(1), 5) == b""
    except asyncio.TimeoutError:
        return False


def open_files(path: str) -> int:
    """How many of this process's file descriptors are open on `path`."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == path
        except OSError:  # closed since listed
            continue
    return count


def test_a_response_still_being_written_is_not_cut_to_make_room(tmp_path, monkeypatch):
    """The runner `inspectd web` serves with, its cap made 3 (the rule is tested, not the number). A large live frame
    read slowly (a slow link) has its request in flight however long ago it began: one connection more closes the
    idle connection quiet longest, and the frame arrives whole. Only when every connection has a request in flight is
    one cut: the one whose request began first."""
    from aiohttp import web as aioweb

    from inspectd.clients import web as view

    monkeypatch.setattr(view, "MAX_CONNECTIONS", 3)
    root = tmp_path / "archive"
    (root / "live").mkdir(parents=True)
    (root / "live" / "cam0.jpg").write_bytes(b"\xff\xd8" + os.urandom(8_000_000))  # past what socket buffers hold
    port = free_port()

    async def scenario() -> None:
        runner = await view.view_runner(view.WebView(LineState(), root))
        opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            opened.append(await open_slow(port))
            return opened[-1]

        try:
            await aioweb.TCPSite(runner, "127.0.0.1", port).start()
            download = await connect()
            status, length = await ask(download, "/live/cam0.jpg")
            assert status == 200
            idle = [await connect(), await connect()]  # no request: quiet since accepted, after the download began
            newcomer = await connect()
            status, size = await ask(newcomer, "/api/state")
            assert status == 200 and await whole(newcomer, size)
            assert await whole(download, length), "a response still being written was cut to make room"
            assert await closed(idle[0]), "the idle connection quiet longest was kept"

            in_flight = [idle[1], newcomer, download]  # their requests begun in this order
            lengths = [(await ask(connection, "/live/cam0.jpg"))[1] for connection in in_flight]
            late = await connect()
            status, size = await ask(late, "/api/state")
            assert status == 200 and await whole(late, size)
            assert not await whole(in_flight[0], lengths[0]), "every request in flight, and none was cut"
            for connection, length in zip(in_flight[1:], lengths[1:]):
                assert await whole(connection, length), "a request begun later was cut"
            # The one cut ends with its connection: closed under it, its task waited on the transport for good,
            # holding the frame's file (one more at every eviction, whoever sends requests it never reads).
            frame = str(root / "live" / "cam0.jpg")
            deadline = time.monotonic() + 5
            while open_files(frame) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not open_files(frame), "the request cut to make room still holds the frame it was sending"
        finally:
            for _, writer in opened:
                writer.close()
            await runner.cleanup()

    asyncio.run(scenario())


def test_a_connection_that_is_not_http_is_answered_400_and_logged_as_a_bad_request(tmp_path):
    """A TLS hello (https:// typed for http://) or a scanner's probe on the view's port: answered 400 and logged as
    the one bad_request warning, as a malformed HTTP request is (aiohttp itself logs it at debug only)."""
    web, url = start_web(f"tcp://127.0.0.1:{free_port()}", tmp_path / "none")
    port = urllib.parse.urlsplit(url).port
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(100)
    try:
        wait_served(web, url)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(hello)
            assert sock.recv(100).split(b" ")[1] == b"400", "a request that is not HTTP was not refused"
        assert fetch(url)[0] == 200
    finally:
        output = stop_web(web)
    lines = [json.loads(line) for line in output.splitlines()]
    refused = [line for line in lines if line["event"] == "bad_request"]
    assert len(refused) == 1 and refused[0]["level"] == "warning" and "exception" not in refused[0], lines
    assert refused[0]["error"].startswith("BadHttpMethod: "), refused


class SlowLink:
    """A real TCP proxy between the browser and the view, standing in for a slow link: each ask for a live frame in
    `delays` (the camera's name: seconds) is answered only that long after it arrives, the first ask for `held`
    never. It counts the asks for each camera's live frame that reach it."""

    def __init__(self, upstream: int, delays: dict[str, float], held: str) -> None:
        self.upstream, self.delays, self.held = upstream, delays, held
        self.asked: dict[str, list[float]] = {}  # camera -> time.monotonic() of each ask
        self.tasks: set[asyncio.Task] = set()

    async def start(self, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._serve, "127.0.0.1", port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tasks.add(asyncio.current_task())
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):  # the browser's GETs carry no body
                path = head.split(b" ", 2)[1].decode()
                if path.startswith("/live/"):
                    camera = urllib.parse.urlsplit(path).path.removeprefix("/live/").removesuffix(".jpg")
                    asks = self.asked.setdefault(camera, [])
                    asks.append(time.monotonic())
                    if camera == self.held and len(asks) == 1:
                        await asyncio.Event().wait()
                    await asyncio.sleep(self.delays.get(camera, 0.0))
                writer.write(await self._forward(head))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):  # the browser closed it, as when it gives up an ask
            pass
        except asyncio.CancelledError:  # the test is over: ended quietly (asyncio 3.11 logs a handler cancelled)
            pass
        finally:
            writer.close()

    async def _forward(self, head: bytes) -> bytes:
        """`head` asked of the view on a connection of its own: the whole response."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        try:
            writer.write(head)
            reply = await reader.readuntil(b"\r\n\r\n")
            fields = dict(line.split(b":", 1) for line in reply.split(b"\r\n")[1:] if b":" in line)
            length = {k.strip().lower(): v for k, v in fields.items()}.get(b"content-length")
            assert length is not None, f"a response without Content-Length: {reply!r}"
            return reply + await reader.readexactly(int(length))
        finally:
            writer.close()

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()


# Each live frame the page has drawn, counted by camera: set before the page's own script runs.
COUNT_LIVE_LOADS = """
window.liveLoads = {};
document.addEventListener("load", (e) => {  // an element's load event never reaches the window
  const img = e.target;
  if (!(img instanceof HTMLImageElement) || !img.classList.contains("live")) return;
  const name = img.closest("section").id.slice("camera-".length);
  liveLoads[name] = (liveLoads[name] || 0) + 1;
}, true);
"""


def test_a_live_frame_slower_than_a_second_to_arrive_is_shown_and_not_asked_for_again_meanwhile(tmp_path):
    """On a slow link a live frame takes longer than the second between the page's asks. The page waits for it and
    draws it rather than cutting it off with the next ask (chromium then froze on the first frame, never firing its
    load, and opened a connection for each ask): a camera's frame is asked for again only once the last ask ended.
    An ask never answered (a link that dropped it) is given up on after a bound, and asked again; one answered 404
    (no frame yet) ends as a drawn one does."""
    from aiohttp import web as aioweb

    from inspectd.clients import web as view

    state = LineState()
    running = {"state": "running"}
    state.on_message({**STATUS, "t": time.time(), "cameras": {"cam0": running, "cam1": running, "cam2": running}})
    root = live_frames(tmp_path / "archive", "cam0", "cam1")  # none of cam2: its asks answered 404
    port, proxy_port = free_port(), free_port()
    link = SlowLink(port, {"cam0": 2.5}, held="cam1")

    async def scenario() -> None:
        runner = await view.view_runner(view.WebView(state, root))
        proxy = await link.start(proxy_port)
        try:
            await aioweb.TCPSite(runner, "127.0.0.1", port).start()
            async with Browser() as browser:
                await browser.send("Page.enable")  # without it chromium runs no script added for new documents
                await browser.send("Page.addScriptToEvaluateOnNewDocument", source=COUNT_LIVE_LOADS)
                await browser.goto(f"http://127.0.0.1:{proxy_port}/")
                deadline = time.monotonic() + 20
                while True:
                    asks = len(link.asked.get("cam0", []))  # before the loads: one drawn meanwhile only helps
                    drawn = await browser.evaluate("window.liveLoads?.cam0 || 0")
                    assert asks <= drawn + 1, f"cam0's frame asked for {asks} times, drawn {drawn}: asks cut off"
                    if drawn >= 2 and len(link.asked.get("cam1", [])) >= 2:
                        break
                    assert time.monotonic() < deadline, f"in 20 s cam0's frame drawn {drawn} times, {link.asked}"
                    await asyncio.sleep(0.05)
                first, second = link.asked["cam1"][:2]
                assert second - first >= 9, f"cam1's unanswered ask was cut off after {second - first:.1f} s"
                await browser.wait_for(live_shown("cam1"), 5, "cam1's frame, asked for again")
                # A frame not there ends its ask as a drawn one does: asked for again each second, shown as absent.
                assert len(link.asked["cam2"]) >= 5, f"cam2's failed asks were waited on: {link.asked}"
                classes = await browser.evaluate("document.querySelector('#camera-cam2 img.live').className")
                assert classes == "live absent", classes
        finally:
            link.close()
            proxy.close()
            await runner.cleanup()

    asyncio.run(scenario())
