"""The daemon's side of a PLC bridge test: a real ZeroMQ PUB socket sending encoded results and status messages."""

from __future__ import annotations

import time

import numpy as np
import zmq

from inspectd.protocol.messages import Region, encode_mask, encode_result, encode_status

STATION, CAMERA = "st1", "cam0"
ID_MODULUS = 2**32  # a full-width id (inspectd.clients.handshake.ID_MODULUS)


def wait(predicate, timeout: float, what: str, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Daemon:
    """The publishing side: a real PUB socket sending encoded results and 1 Hz-style status messages."""

    def __init__(self, curve=None) -> None:
        self.context = zmq.Context()
        self.curve = curve
        self.pub = self.context.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve(self.pub)  # inspectd.daemon.security.CurveServer: the daemon's publish.curve
        port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        mask = np.zeros((64, 64), bool)
        mask[2:6, 1:4] = True
        self.mask = encode_mask(mask)
        self.endpoint = f"tcp://127.0.0.1:{port}"

    def status(self, healthy: bool = True, cameras: dict | None = None) -> None:
        self.pub.send_multipart(
            encode_status(
                STATION,
                {
                    "t": time.time(),
                    "uptime_s": 1.0,
                    "healthy": healthy,
                    "model_id": "m",
                    "thresholds_version": 1,
                    "throughput_fps": 10.0,
                    "cameras": cameras or {},
                },
            )
        )

    def result(
        self,
        seq: int,
        verdict: str = "ok",
        score: float = 0.2,
        regions: int = 0,
        camera: str = CAMERA,
        threshold: float = 0.5,
    ) -> None:
        self.pub.send_multipart(self.encode(seq, verdict, score, regions, camera, threshold))

    def encode(
        self, seq: int, verdict: str = "ok", score: float = 0.2, regions: int = 0, camera: str = CAMERA, threshold=0.5
    ) -> list[bytes]:
        return encode_result(
            station=STATION,
            camera=camera,
            seq=seq,
            frame_id=f"f{seq}",
            t_capture=time.time(),
            t_publish=time.time(),
            verdict=verdict,
            score=None if verdict == "error" else score,
            threshold=threshold,
            model_id="m",
            thresholds_version=1,
            regions=[Region(1, 2, 3, 4, 12, 0.9)] * regions,
            latency_ms=1.0,
            width=64,
            height=64,
            error="camera timeout" if verdict == "error" else None,
            mask_png=self.mask if verdict == "defect" else None,  # as the daemon sends defects: with a mask
        )

    def close(self) -> None:
        self.pub.close()
        if self.curve is not None:
            self.curve.stop()  # its ZAP handler in this context, which term() would otherwise wait for
        self.context.term()


class Memory:
    """What a handshake reads of and writes to a PLC, as values in memory, for driving a handshake (and a Feeder)
    without a PLC: its id's width, its inspection id, ack, heartbeat, alarm bit, alarm_reset and counters; every
    status written (`statuses`), every inspection id written (`handed`: what the PLC was handed, in order) and the
    heartbeats written (`beats`). While `acking`, the PLC program echoes the inspection id written into ack (at the
    next read of it); otherwise ack keeps what it holds (0 on a fresh PLC, or what the bridge wrote), as a real PLC's
    register does.
    With `compares_ack` (and `acking`) the echo follows the program docs/PLC.md outlines instead: IF result_valid AND
    inspection_id <> ack THEN act; ack := inspection_id, each id it acted on listed in `acted`."""

    def __init__(
        self, modulus: int = ID_MODULUS, inspection_id: int = 0, heartbeat: int = 0, alarm: int = 0, ack: int = 0
    ) -> None:
        self.id_modulus = modulus
        self.values = {
            "inspection_id": inspection_id,
            "ack": ack,
            "heartbeat": heartbeat,
            "alarm": alarm,
            "alarm_reset": 0,
            "missed_acks": 0,
            "sequence_gaps": 0,
        }
        self.statuses: list[frozenset] = []
        self.handed: list[int] = []
        self.beats = 0
        self.acking = True
        self.compares_ack = False
        self.acted: list[int] = []

    async def read(self, name: str) -> int:
        if name == "ack" and self.acking:
            held = self.values["inspection_id"] % self.id_modulus
            if not self.compares_ack:
                self.values["ack"] = held
            elif self.statuses and "result_valid" in self.status and held != self.values["ack"]:
                self.acted.append(held)
                self.values["ack"] = held
        if name == "result_valid":  # a status bit, as ModbusTarget reads one
            return int(bool(self.statuses) and name in self.status)
        return self.values[name]

    async def write(self, fields: dict, last: str | None = None) -> None:
        self.values.update({name: value for name, value in fields.items() if name in self.values})
        self.statuses += [fields["status"]] if "status" in fields else []
        self.handed += [fields["inspection_id"]] if "inspection_id" in fields else []
        self.beats += "heartbeat" in fields

    @property
    def status(self) -> frozenset:
        """The status flags the PLC holds now."""
        return self.statuses[-1]
