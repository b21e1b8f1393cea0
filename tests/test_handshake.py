"""Where a restarted bridge resumes (Handshake.place): the PLC holds a seq modulo its id's width, and the bridge must
find the full seq it stands for from what it knows (the recorded ack, the daemon's newest seq, the first result).

The arithmetic alone, on a Handshake whose PLC is never touched; the bridge tests drive the same rule end to end.
"""

from __future__ import annotations

import pytest

from inspectd.clients.handshake import ID_MODULUS, Handshake, HandshakeSettings

S7_INT = 1 << 15  # an S7 Int InspectionId holds seqs modulo this


class Width:
    """What place() reads of a target: how wide its inspection id is."""

    def __init__(self, modulus: int) -> None:
        self.id_modulus = modulus


def placed(modulus: int, plc_id: int, acked: int | None, newest: int | None) -> int | None:
    handshake = Handshake(Width(modulus), HandshakeSettings(), "cam0")  # type: ignore[arg-type]
    handshake._plc_residue = plc_id % modulus if plc_id else None
    handshake.place(acked, newest)
    return handshake.last_id


@pytest.mark.parametrize(
    "modulus, plc_id, acked, newest, expected",
    [
        (S7_INT, 7233, 40000, None, 40001),  # the PLC holds the result written after the last recorded ack
        (S7_INT, 7232, 40001, None, 40001),  # it holds an older one: the ack is later
        (S7_INT, 7233, None, 40005, 40001),  # no ack recorded: the latest seq at or before the newest published
        (S7_INT, 7233, 60000, 60010, 60000),  # nearest the ack is 72769, not published yet: a stray id, the ack wins
        (S7_INT, 7233, None, None, None),  # nothing to place it by: the first result will
        (S7_INT, 0, None, 40005, None),  # 0 reads as a fresh PLC (docs/PLC.md: keep the state directory)
        (ID_MODULUS, 1, None, (1 << 32) + 7, (1 << 32) + 1),  # a full-width id past 2**32
        (ID_MODULUS, 500, None, None, 500),  # full width, nothing else known: taken as it reads
        (ID_MODULUS, 500, None, 100, 500),  # ahead of the daemon's numbering (renumbered): skip up to it, as before
        (ID_MODULUS, 500, 480, 1000, 500),
        (ID_MODULUS, 0, 480, 1000, 480),  # registers reset: only the recorded ack says where
    ],
)
def test_the_plc_id_is_placed_at_the_seq_it_stands_for(modulus, plc_id, acked, newest, expected):
    assert placed(modulus, plc_id, acked, newest) == expected
