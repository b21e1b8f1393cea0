"""The micro-batcher on real camera queues: size and age triggers, fairness, error frames, no busy-waiting."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from inspectd.daemon.batching import MicroBatcher
from inspectd.daemon.frames import Frame
from inspectd.daemon.ingest.queue import FrameQueue

# Waits measured to tens of milliseconds: on a machine no other worker loads.
pytestmark = [pytest.mark.timeout(30), pytest.mark.exclusive]


def frame(camera: str, seq: int, error: str | None = None) -> Frame:
    image = None if error else np.zeros((8, 8), np.uint8)
    return Frame(camera, seq, f"{camera}-{seq}", time.time(), image, error=error, t_ingest=time.monotonic())


def queues(n: int, size: int = 64):
    ready = threading.Condition()
    return [FrameQueue(size, "block", ready) for _ in range(n)], ready


def test_full_batch_goes_at_once():
    (q,), ready = queues(1)
    for i in range(5):
        q.put(frame("cam0", i))
    batcher = MicroBatcher([q], ready, max_batch=4, max_wait_ms=10_000)
    t0 = time.monotonic()
    batch = batcher.next_batch(timeout=5)
    assert [f.seq for f in batch] == [0, 1, 2, 3]
    assert time.monotonic() - t0 < 0.5
    assert batcher.next_batch(timeout=0.05) == []  # frame 4 is not due for 10 s: held, not handed over
    assert batcher.pending() == 1
    assert [f.seq for f in batcher.drain()] == [4]


def test_a_caller_timeout_does_not_cut_a_batch_short_of_max_wait():
    """The daemon asks with a short idle tick; frames gathered when the tick runs out wait for max_wait_ms."""
    (q,), ready = queues(1)
    batcher = MicroBatcher([q], ready, max_batch=8, max_wait_ms=300)
    first = frame("cam0", 0)
    q.put(first)
    q.put(frame("cam0", 1))
    ticks = 0
    while not (batch := batcher.next_batch(timeout=0.05)):
        ticks += 1
        if ticks == 2:
            q.put(frame("cam0", 2))
    waited = time.monotonic() - first.t_ingest
    assert [f.seq for f in batch] == [0, 1, 2]  # nothing gathered by an earlier tick was lost or reordered
    assert ticks >= 4 and 0.29 <= waited < 0.6, (ticks, waited)  # cut at a tick, it would have gone at ~0.05 s


def test_partial_batch_goes_when_oldest_frame_is_due():
    (q,), ready = queues(1)
    batcher = MicroBatcher([q], ready, max_batch=8, max_wait_ms=150)
    first = frame("cam0", 0)
    q.put(first)
    threading.Timer(0.1, lambda: q.put(frame("cam0", 1))).start()
    batch = batcher.next_batch(timeout=5)
    waited = time.monotonic() - first.t_ingest
    assert [f.seq for f in batch] == [0, 1]
    # Due 150 ms after the OLDEST frame's ingest, not after the latest arrival (which would be ~250 ms).
    assert 0.14 <= waited < 0.23, waited


def test_waiting_wakes_on_put_and_does_not_spin():
    (q,), ready = queues(1)
    batcher = MicroBatcher([q], ready, max_batch=1, max_wait_ms=0)
    threading.Timer(0.3, lambda: q.put(frame("cam0", 7))).start()
    cpu0 = time.process_time()
    t0 = time.monotonic()
    batch = batcher.next_batch(timeout=5)
    assert [f.seq for f in batch] == [7]
    assert 0.25 <= time.monotonic() - t0 < 1.0
    assert time.process_time() - cpu0 < 0.1  # asleep on the condition, not polling


def test_round_robin_is_fair_across_cameras():
    qs, ready = queues(3)
    for cam, q in enumerate(qs):
        for i in range(20 if cam == 0 else 3):
            q.put(frame(f"cam{cam}", i))
    batcher = MicroBatcher(qs, ready, max_batch=6, max_wait_ms=0)
    batch = [f.camera for f in batcher.next_batch(timeout=1)]
    # A busy cam0 gets no more than its share while the others have frames waiting.
    assert sorted(batch) == ["cam0", "cam0", "cam1", "cam1", "cam2", "cam2"]
    batch = [f.camera for f in batcher.next_batch(timeout=1)]
    assert batch.count("cam1") == 1 and batch.count("cam2") == 1 and batch.count("cam0") == 4


def test_error_frames_travel_in_the_batch():
    (q,), ready = queues(1)
    q.put(frame("cam0", 0, error="decode: not a JPEG"))
    q.put(frame("cam0", 1))
    batch = MicroBatcher([q], ready, max_batch=2, max_wait_ms=1000).next_batch(timeout=1)
    assert [(f.seq, f.error) for f in batch] == [(0, "decode: not a JPEG"), (1, None)]


def test_stop_releases_a_waiting_batcher_and_drain_empties_queues():
    (q,), ready = queues(1)
    batcher = MicroBatcher([q], ready, max_batch=4, max_wait_ms=10_000)
    threading.Timer(0.1, batcher.stop).start()
    t0 = time.monotonic()
    assert batcher.next_batch() == []
    assert time.monotonic() - t0 < 1.0
    for i in range(6):
        q.put(frame("cam0", i))
    assert [f.seq for f in batcher.drain()] == [0, 1, 2, 3]
    assert [f.seq for f in batcher.drain()] == [4, 5]
    assert batcher.drain() == [] and batcher.pending() == 0


def test_bad_settings_name_the_key():
    (q,), ready = queues(1)
    with pytest.raises(ValueError, match="batching.max_batch"):
        MicroBatcher([q], ready, max_batch=0, max_wait_ms=1)
