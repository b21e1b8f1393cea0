"""The genicam source against a real GigE Vision peer: Aravis' fake camera (arv-fake-gv-camera-0.8) on loopback.

`make test` installs Aravis and links PyGObject into the venv (deploy/aravis.sh); without them these tests skip
with the reason. The fake camera's image brightness follows its exposure and gain, which is how the settings are
seen to reach the sensor and not only the registers.
"""

from __future__ import annotations

import gc
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from inspectd.daemon.config import parse_config
from inspectd.daemon.ingest.genicam import frames_lost, short_socket_buffer, to_image
from inspectd.daemon.ingest.queue import FrameQueue
from inspectd.daemon.ingest.supervisor import CameraIngest
from inspectd.errors import ConfigError

# Frames at 50 Hz must arrive whole: the receiving thread cannot wait for a core another worker holds.
pytestmark = [pytest.mark.timeout(90), pytest.mark.exclusive]
FAKE = "arv-fake-gv-camera-0.8"
ADDRESS = "127.0.0.1"  # the fake camera listens on an interface's address: loopback's only one
REPO = Path(__file__).resolve().parents[1]
FRAME_BYTES = 512 * 512  # the fake camera's Mono8 frame
# Run under a unit's restrictions (tests.unit_sandbox): opens the source and counts the frames of 2 s.
UNDER_UNIT = """
import errno, json, socket, threading, time
try:
    socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM)
except OSError as exc:
    assert exc.errno == errno.EAFNOSUPPORT, exc
else:
    raise AssertionError("AF_PACKET was not refused: the restriction is not in force")
from inspectd.daemon.ingest.genicam import GenICamCamera
from tests.test_genicam import camera_config
camera, stop = GenICamCamera(camera_config(frame_rate_hz=50), time.monotonic), threading.Event()
camera.open(stop)
try:
    deadline, shapes = time.monotonic() + 2, []
    while time.monotonic() < deadline:
        frame = camera.read(stop)
        if frame is not None:
            shapes.append(None if frame.error else frame.image.shape)
    print(json.dumps({"frames": len(shapes), "whole": shapes.count((512, 512))}))
finally:
    camera.close()
"""


def aravis():
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis
    except (ImportError, ValueError) as exc:
        pytest.skip(f"Aravis through PyGObject not importable ({exc}); make test installs it (deploy/aravis.sh)")
    return Aravis


class FakeCamera:
    """arv-fake-gv-camera-0.8 as a subprocess: a GigE Vision device on loopback, GVCP on UDP 3956."""

    def __init__(self, *extra: str) -> None:
        if shutil.which(FAKE) is None:
            pytest.skip(f"{FAKE} not installed (Debian aravis-tools); make test installs it (deploy/aravis.sh)")
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        Aravis = aravis()
        self.proc = subprocess.Popen(
            [FAKE, "-i", ADDRESS, "-s", "INSPECTD", *self.extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while True:
            assert self.proc.poll() is None, self.proc.stdout.read() if self.proc.stdout else ""
            try:
                cam = Aravis.Camera.new(ADDRESS)
            except Exception:  # noqa: BLE001 - not answering yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
                continue
            assert cam.get_device_serial_number() == "INSPECTD"
            del cam  # releases the control channel for the source under test
            gc.collect()
            return

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def fake_xml(tmp_path: Path, edit) -> Path:
    """The fake camera's own GenICam description with `edit` applied, for `FakeCamera("-g", path)`: a camera that
    names its formats or lacks features as some real models do, while its registers stay the fake camera's."""
    xml = aravis().FakeCamera.new("XML").get_genicam_xml()[0]
    edited = edit(xml)
    assert edited != xml, "the edit matched nothing in this Aravis' fake camera description"
    path = tmp_path / "camera.xml"
    path.write_text(edited)
    return path


@pytest.fixture
def fake_camera():
    camera = FakeCamera()
    yield camera
    camera.stop()


def camera_config(**source):
    return parse_config(
        {
            "station": "s",
            "model": {"bundle": "b"},
            "cameras": [{"id": "cam0", "source": {"kind": "genicam", "device": ADDRESS, **source}}],
        }
    ).cameras[0]


def run(ingest_threads, backoff=(0.05, 0.5), **source) -> tuple[CameraIngest, FrameQueue]:
    queue = FrameQueue(256, "drop_oldest")
    ingest = CameraIngest(camera_config(**source), queue, backoff_s=backoff)
    ingest_threads.append(ingest)
    ingest.start()
    return ingest, queue


def take(queue: FrameQueue, count: int, timeout: float = 20.0) -> list:
    frames: list = []
    deadline = time.monotonic() + timeout
    while len(frames) < count and time.monotonic() < deadline:
        frame = queue.get_nowait()
        if frame is None:
            time.sleep(0.01)
        else:
            frames.append(frame)
    assert len(frames) == count, f"{len(frames)} of {count} frames within {timeout} s"
    return frames


def take_whole(queue: FrameQueue, count: int, timeout: float = 20.0) -> list:
    """`count` frames that arrived whole. On a loaded machine the fake camera's UDP stream can drop a packet, and a
    frame that did not arrive whole is an error frame, as the module says: passed over, any other error fails."""
    whole: list = []
    deadline = time.monotonic() + timeout
    while len(whole) < count and time.monotonic() < deadline:
        frame = queue.get_nowait()
        if frame is None:
            time.sleep(0.01)
        elif frame.error is None:
            whole.append(frame)
        else:
            assert "incomplete" in frame.error or "lost between camera and host" in frame.error, frame.error
    assert len(whole) == count, f"{len(whole)} of {count} whole frames within {timeout} s"
    return whole


def stop(ingest_threads, ingest: CameraIngest) -> None:
    ingest.stop()
    ingest.join(10)
    ingest_threads.remove(ingest)


def test_frames_arrive_with_the_configured_exposure_gain_and_format(fake_camera, ingest_threads):
    ingest, queue = run(ingest_threads, pixel_format="Mono8", exposure_us=10000, gain_db=0, frame_rate_hz=50)
    taken = take(queue, 5)
    settings = ingest._source.applied  # read back from the camera's registers after open
    stop(ingest_threads, ingest)
    # A frame a loaded machine's UDP stream dropped a packet of is an error frame with its own id: only that.
    plain = [f for f in taken if f.error is None]
    assert plain and all("incomplete" in f.error or "lost between" in f.error for f in taken if f.error), taken
    assert all(f.image.shape == (512, 512) and f.image.dtype == np.uint8 for f in plain)
    assert settings["exposure_us"] == 10000 and settings["gain_db"] == 0 and settings["trigger_mode"] == "Off"
    assert settings["pixel_format"] == "Mono8" and settings["model"].startswith("Aravis")
    counters = [int(f.frame_id) for f in taken]
    assert all(frames_lost(a, b) == 0 for a, b in zip(counters, counters[1:])), counters  # the camera's own ids

    ingest, queue = run(ingest_threads, pixel_format="Mono8", exposure_us=20000, gain_db=8, frame_rate_hz=50)
    bright = take_whole(queue, 5)
    settings = ingest._source.applied
    assert settings["exposure_us"] == 20000 and settings["gain_db"] == 8
    assert np.mean([f.image.mean() for f in bright]) > 1.5 * np.mean([f.image.mean() for f in plain])

    stop(ingest_threads, ingest)
    ingest, queue = run(ingest_threads, pixel_format="RGB8", frame_rate_hz=50)
    # Three times the bytes a frame: on a loaded machine the fake camera's UDP stream can drop a packet, and a frame
    # that did not arrive whole is an error frame (as the module says). The first whole one must be RGB.
    colour = take(queue, 6)
    whole = [f for f in colour if f.error is None]
    assert whole, [f.error for f in colour]
    assert whole[0].image.shape == (512, 512, 3) and ingest._source.applied["pixel_format"] == "RGB8"


@pytest.mark.parametrize("unit", ["inspectd.service", "inspectd@.service"])
def test_a_gige_camera_streams_under_the_units_seccomp_restrictions(fake_camera, unit):
    """The unit's address families, call filter and W^X memory, set up as systemd sets them up, must leave Aravis
    what it needs: it lists the host's interfaces over netlink before it reaches any camera, even one named by its
    IP address."""
    sandbox = [sys.executable, "-m", "tests.unit_sandbox", str(REPO / "systemd" / unit)]
    result = subprocess.run(
        [*sandbox, sys.executable, "-c", UNDER_UNIT], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"{unit}: {result.stderr.strip().splitlines()[-1:]}"
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    # The restriction also takes away Aravis' packet socket (AF_PACKET), as the unit's missing CAP_NET_RAW does, so
    # frames come through a UDP socket: whole if its buffer holds a frame, else the source says what to raise.
    if short_socket_buffer(FRAME_BYTES) is None:
        assert counts["frames"] >= 40 and counts["whole"] >= 0.9 * counts["frames"], counts
    else:
        assert "genicam_socket_buffer_short" in result.stdout + result.stderr, counts


def test_a_stream_socket_too_small_for_a_frame_is_named_with_the_setting_to_raise(tmp_path):
    rmem_max = tmp_path / "rmem_max"
    rmem_max.write_text("212992\n")
    assert short_socket_buffer(212992, rmem_max) is None
    assert short_socket_buffer(FRAME_BYTES, rmem_max) == (
        "frames of 262144 bytes exceed net.core.rmem_max (212992): most will arrive with packets missing; "
        "raise it (sysctl -w net.core.rmem_max=524288, kept in /etc/sysctl.d/)"
    )
    assert short_socket_buffer(FRAME_BYTES, tmp_path / "absent") is None


def test_software_and_hardware_line_trigger(fake_camera, ingest_threads):
    ingest, queue = run(ingest_threads, trigger="software", software_rate_hz=20)
    take_whole(queue, 6)
    settings = ingest._source.applied
    assert (settings["trigger_mode"], settings["trigger_source"]) == ("On", "Software")
    stop(ingest_threads, ingest)

    # A hardware line trigger with no part passing: no frames, and that is not a dead camera.
    ingest, queue = run(ingest_threads, trigger="line", line="Line0", stall_s=0.5)
    assert _wait(lambda: ingest._source.applied.get("trigger_mode") == "On", 10)
    assert ingest._source.applied["trigger_source"] == "Line0"
    time.sleep(1.5)
    assert queue.get_nowait() is None
    assert ingest.stats()["state"] == "running" and ingest.reopen_count == 0


def test_a_camera_restart_is_survived_with_backoff(fake_camera, ingest_threads):
    ingest, queue = run(ingest_threads, frame_rate_hz=50, stall_s=1.0, backoff=(0.2, 1.0))
    take(queue, 3)
    fake_camera.stop()
    assert _wait(lambda: ingest.stats()["state"] == "reopening", 15), ingest.stats()
    assert "genicam" in (ingest.stats()["last_error"] or "")
    assert _wait(lambda: ingest.reopen_count >= 2, 15), ingest.stats()  # tried again, and again, while it is away
    # Frame counters count per stream: the new stream's (the fake camera starts near 65400) is not compared with where
    # the last one ended, which would read as tens of thousands of frames lost on the wire.
    ingest._source.last_counter = 100
    fake_camera.start()
    assert _wait(lambda: ingest.stats()["state"] == "running", 20), ingest.stats()
    frames = []
    while (frame := queue.get_nowait()) is not None:
        frames.append(frame)
    frames += take(queue, 3)
    # Packets lost under a loaded machine's scheduling are the stream's own errors; what must not appear is the new
    # stream's counter measured against the old stream's last.
    assert not any("jumped from 100 " in (f.error or "") for f in frames), [f.error for f in frames if f.error][:3]
    assert any(f.error is None for f in frames), [f.error for f in frames][:3]


def test_a_software_triggered_camera_that_vanishes_is_let_go_off_the_ingest_thread(fake_camera, ingest_threads):
    """Under a software trigger the first sign of a vanished camera is the trigger write failing: that is a camera
    that stopped answering, released on a thread of its own, not control-channel timeouts on the ingest thread."""
    ingest, queue = run(ingest_threads, trigger="software", software_rate_hz=20, stall_s=1.0, backoff=(30, 30))
    take(queue, 3)
    assert fake_camera.proc is not None
    fake_camera.proc.send_signal(signal.SIGSTOP)  # on the network still, answering nothing
    try:
        assert _wait(lambda: ingest.stats()["state"] == "reopening", 15), ingest.stats()
        error = ingest.stats()["last_error"] or ""
        assert error.startswith("OSError: genicam ") and "not answering" in error and "\n" not in error, error
        # The source was closed before the state changed; the thread now waits out the backoff, which stop() ends.
        started = time.monotonic()
        ingest.stop()
        ingest.join(5)
        assert not ingest.is_alive(), "the ingest thread is still letting go of the dead camera"
        assert time.monotonic() - started < 1.0
    finally:
        fake_camera.proc.kill()


def test_frames_lost_on_the_wire_become_error_frames(ingest_threads):
    camera = FakeCamera("-r", "300")  # the fake camera drops 30% of its stream packets
    try:
        ingest, queue = run(ingest_threads, frame_rate_hz=50, buffers=4)
        frames = take(queue, 40, timeout=40)
        stop(ingest_threads, ingest)  # before its camera goes
    finally:
        camera.stop()
    errors = [f.error for f in frames if f.error]
    assert errors, "30% packet loss and not one frame reported"
    assert all(("incomplete" in e) or ("lost between camera and host" in e) for e in errors), errors[:3]


@pytest.mark.parametrize("pixel_format", ["Mono10", "Mono12"])
def test_mono10_and_mono12_values_above_full_scale_saturate(tmp_path, ingest_threads, pixel_format):
    """A camera whose 10- or 12-bit words carry bits above full scale (aligned to the top of the word, or unused high
    bits left set): the fake camera's Mono16 ramp, reported under the narrower format's name."""
    xml = fake_xml(tmp_path, lambda x: x.replace('<EnumEntry Name="Mono16"', f'<EnumEntry Name="{pixel_format}"'))
    camera = FakeCamera("-g", str(xml))
    try:
        ingest, queue = run(ingest_threads, pixel_format=pixel_format, exposure_us=10000, gain_db=0, frame_rate_hz=50)
        frames = take_whole(queue, 3)
        assert ingest._source.applied["pixel_format"] == pixel_format
        stop(ingest_threads, ingest)
    finally:
        camera.stop()
    bits = int(pixel_format[4:])
    y, x = np.mgrid[0:512, 0:512]
    for frame in frames:
        assert frame.error is None, frame.error
        # The fake camera's Mono16 ramp at exposure 10 ms and gain 0, keyed by the frame's own counter.
        words = (256 * (x + y + int(frame.frame_id))) % 65535
        assert (words >> bits).any(), "no value above full scale in this frame"
        assert np.array_equal(frame.image, np.minimum(words >> (bits - 8), 255)), pixel_format


@pytest.mark.parametrize(
    "source",
    [
        {"trigger": "software", "software_rate_hz": 1},
        {"trigger": "free_run", "frame_rate_hz": 1},
    ],
)
def test_a_frame_period_longer_than_stall_s_is_not_taken_for_a_dead_camera(fake_camera, ingest_threads, source):
    ingest, queue = run(ingest_threads, stall_s=0.3, **source)
    take_whole(queue, 3, timeout=15)
    assert ingest.reopen_count == 0 and ingest.stats()["state"] == "running", ingest.stats()


def test_a_camera_without_trigger_source_opens_and_streams(tmp_path, ingest_threads):
    """Some USB3 Vision and line-scan models have no TriggerSource: reading it back for the record must not keep
    the camera from opening."""

    def drop_trigger_source(xml: str) -> str:
        xml = xml.replace("<pFeature>TriggerSource</pFeature>", "")
        return re.sub(r'<Enumeration Name="TriggerSource".*?</Enumeration>', "", xml, flags=re.S)

    camera = FakeCamera("-g", str(fake_xml(tmp_path, drop_trigger_source)))
    try:
        ingest, queue = run(ingest_threads, frame_rate_hz=50)
        frames = take_whole(queue, 3, timeout=10)
        applied = dict(ingest._source.applied)
        stop(ingest_threads, ingest)
    finally:
        camera.stop()
    assert all(f.image.shape == (512, 512) for f in frames)
    assert (applied["trigger_mode"], applied["trigger_source"]) == ("Off", None)
    assert ingest.reopen_count == 0


def test_frame_counter_gaps_wrap_and_resets():
    assert frames_lost(None, 7) == 0
    assert frames_lost(7, 8) == 0 and frames_lost(7, 10) == 2
    assert frames_lost(65534, 1) == 1  # 65535 lost; a 16-bit block id skips 0
    assert frames_lost(65535, 1) == 0
    assert frames_lost(500, 3) == 0  # a camera restart starts the counter again: not a loss


def test_pixel_formats_convert_to_the_engines_uint8():
    mono16 = np.array([[0, 0xFFFF], [0x8000, 0x0100]], "<u2")
    assert to_image(mono16.tobytes(), 2, 2, "Mono16").tolist() == [[0, 255], [128, 1]]
    mono12 = np.array([[0x0FFF, 0x0010]], "<u2")
    assert to_image(mono12.tobytes(), 2, 1, "Mono12").tolist() == [[255, 1]]
    # Above full scale saturates instead of wrapping to dark.
    over = np.array([[4095, 4096, 5000, 8191]], "<u2")
    assert to_image(over.tobytes(), 4, 1, "Mono12").tolist() == [[255, 255, 255, 255]]
    assert to_image(np.array([[1023, 1024]], "<u2").tobytes(), 2, 1, "Mono10").tolist() == [[255, 255]]
    bgr = np.array([[[1, 2, 3]]], np.uint8)
    assert to_image(bgr.tobytes(), 1, 1, "BGR8").tolist() == [[[3, 2, 1]]]
    # Mono8 and RGB8 need no conversion: the frame is the bytes PyGObject already copied, not a second copy of them.
    for pixel_format, shape in [("Mono8", (3, 4)), ("RGB8", (3, 4, 3))]:
        data = np.arange(np.prod(shape), dtype=np.uint8).tobytes()
        image = to_image(data, 4, 3, pixel_format)
        assert image.shape == shape and image.tobytes() == data
        assert np.shares_memory(image, np.frombuffer(data, np.uint8)), pixel_format
        assert not image.flags.writeable
        chunked = data + b"CHUNKDATA"  # chunk data after the image is left out of it, and the pixels still not copied
        image = to_image(chunked, 4, 3, pixel_format, tail=9)
        assert image.tobytes() == data and np.shares_memory(image, np.frombuffer(chunked, np.uint8)), pixel_format
    with pytest.raises(ValueError, match="expected 2x2x1 for Mono8"):
        to_image(b"\0" * 3, 2, 2, "Mono8")


def test_row_padding_and_chunk_data_after_the_image_are_not_pixels():
    """A buffer's x padding ends each row and chunk data (or y padding) follows the last: the image is what is left."""
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    padded = b"".join(row.tobytes() + b"\xee\xee" for row in rgb)
    assert np.array_equal(to_image(padded, 3, 2, "RGB8", row_padding=2), rgb)
    chunks = b"CHUNKDATA-TIMESTAMP-FRAMEID"
    assert np.array_equal(to_image(padded + chunks, 3, 2, "RGB8", row_padding=2, tail=len(chunks)), rgb)
    mono12 = np.array([[1, 4095], [16, 8191]], "<u2")
    odd = b"".join(row.tobytes() + b"\x07" for row in mono12)  # an odd padding leaves the words unaligned
    assert to_image(odd, 2, 2, "Mono12", row_padding=1).tolist() == [[0, 255], [1, 255]]
    with pytest.raises(ValueError, match="expected 3x2x3 for RGB8 in rows of 11 bytes"):
        to_image(padded + chunks, 3, 2, "RGB8", row_padding=2)  # trailing bytes no chunk data explains
    with pytest.raises(ValueError, match="no image in the buffer"):
        to_image(chunks, 0, 0, "Mono8", tail=len(chunks))  # a payload of chunk data alone is not an empty image


def test_config_errors_name_the_key():
    for source, message in [
        ({"pixel_format": "BayerRG8"}, "cameras[0].source.pixel_format: expected one of"),
        ({"trigger": "hardware"}, "cameras[0].source.trigger: expected one of"),
        ({"exposure_us": 0}, "cameras[0].source.exposure_us: expected more than 0"),
        ({"exposur_us": 10}, "cameras[0].source.exposur_us: unknown key"),
        # Only free_run sets the camera's frame rate: under a trigger it went unused, and 10 Hz ran in its place.
        (
            {"trigger": "software", "frame_rate_hz": 30},
            "cameras[0].source.frame_rate_hz: applies only with trigger: free_run (trigger is software), expected "
            "null; for software triggering set software_rate_hz",
        ),
        ({"trigger": "line", "frame_rate_hz": 30}, "cameras[0].source.frame_rate_hz: applies only with trigger: "),
    ]:
        with pytest.raises(ConfigError) as err:
            camera_config(**source)
        assert message in str(err.value), str(err.value)
        assert "\n" not in str(err.value)
    assert camera_config(trigger="free_run", frame_rate_hz=30).source.frame_rate_hz == 30
    assert (
        camera_config(trigger="software", software_rate_hz=30, frame_rate_hz=None).source.stall_after_s == 5.0 + 1 / 30
    )


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def dpkg_query(folder: Path, missing: str | None) -> Path:
    """A dpkg-query in `folder` (a PATH entry) that answers as Debian's would on a machine without the package
    `missing`, or with every package asked about installed (None): this machine has all that make test installs."""
    shim = folder / "dpkg-query"
    if missing is None:
        shim.write_text("#!/bin/sh\necho 'install ok installed'\n")
    else:
        shim.write_text(
            "#!/bin/sh\nfor a; do last=$a; done\n"
            f'[ "$last" = {missing} ] && {{ echo "dpkg-query: no packages found matching $last" >&2; exit 1; }}\n'
            'exec /usr/bin/dpkg-query "$@"\n'
        )
    shim.chmod(0o755)
    return folder


def test_make_test_as_another_user_stops_naming_a_missing_aravis_package(open_tmp_path):
    """Without the fake camera's package, a run would skip every genicam test and still read as a pass: `make test`
    stops before anything runs, naming it in one line with the other missing packages, and aravis.sh fails too."""
    from other_user import as_nobody

    env = {"PATH": f"{dpkg_query(open_tmp_path, 'aravis-tools')}:/usr/bin:/bin", "HOME": str(open_tmp_path)}
    make = subprocess.run(
        as_nobody(["make", "-s", "-C", str(REPO), "system-packages"]), capture_output=True, text=True, env=env
    )
    assert make.returncode != 0, make.stdout + make.stderr
    (line,) = make.stderr.strip().splitlines()[:1]
    assert line.startswith("make: missing Debian packages:") and line.endswith("apt-get install aravis-tools"), line
    script = subprocess.run(
        as_nobody(["sh", str(REPO / "deploy" / "aravis.sh"), str(open_tmp_path / "venv"), "--fake"]),
        capture_output=True,
        text=True,
        env=env,
    )
    assert script.returncode == 1 and script.stderr.strip().splitlines() == [
        "aravis.sh: missing Debian packages: aravis-tools; run it as root, or apt-get install aravis-tools"
    ], script.stderr


def test_aravis_sh_fails_for_a_venv_debians_pygobject_cannot_serve(tmp_path):
    """A venv of another Python minor than Debian's python3 cannot use Debian's PyGObject: a line saying what to do and
    exit 1, not a link that does not import and skipped tests; one with a PyGObject of its own is left as it is."""
    check = 'import gi; gi.require_version("Aravis", "0.8"); from gi.repository import Aravis'
    if subprocess.run(["/usr/bin/python3", "-c", check], capture_output=True).returncode != 0:
        pytest.skip("Debian's python3 cannot import Aravis through gi (gir1.2-aravis-0.8, python3-gi)")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"

    def aravis_sh(sees_gi: bool) -> subprocess.CompletedProcess:
        # Debian's interpreter saying it is another version; with -S it does not see Debian's gi, as a venv would not.
        python.write_text(
            '#!/bin/sh\ncase "$*" in *version_info*) echo 3.99 ;; *) exec /usr/bin/python3 '
            + ("" if sees_gi else "-S ")
            + '"$@" ;; esac\n'
        )
        python.chmod(0o755)
        return subprocess.run(
            ["sh", str(REPO / "deploy" / "aravis.sh"), str(venv)],
            capture_output=True,
            text=True,
            env={"PATH": f"{dpkg_query(tmp_path, None)}:/usr/bin:/bin"},
        )

    refused = aravis_sh(sees_gi=False)
    assert refused.returncode == 1, refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "has Python 3.99: make the venv with Debian's python3 (make clean && make test PYTHON=/usr/bin/python3)" in (
        line
    )
    assert not (venv / "system-gi").exists()
    own = aravis_sh(sees_gi=True)
    assert own.returncode == 0 and own.stderr == "" and not (venv / "system-gi").exists(), own.stderr
