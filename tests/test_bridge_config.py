"""The PLC bridges' config files (Modbus and OPC UA): every value a bridge cannot work with is refused at load, in one
ConfigError line naming the key, rather than taken and found out on the line."""

from __future__ import annotations

import pytest

from inspectd.clients.plc import load_bridge_config
from inspectd.errors import ConfigError

HANDSHAKE_BOUNDS = [
    # The heartbeat register never changed, so the PLC could not tell a live bridge from a dead one.
    ("heartbeat_ms", "1.0e300", "expected at most 60000"),
    # An ack that never came never counted as missed, nor raised the alarm.
    ("ack_timeout_ms", "1.0e300", "expected at most 3600000"),
]


@pytest.mark.parametrize("key,value,expected", HANDSHAKE_BOUNDS, ids=[key for key, _, _ in HANDSHAKE_BOUNDS])
def test_a_handshake_wait_past_its_bound_is_refused_naming_the_key(tmp_path, key, value, expected):
    config = tmp_path / "bridge.yaml"
    config.write_text(f"{key}: {value}\n")
    with pytest.raises(ConfigError) as refused:
        load_bridge_config(config)
    assert str(refused.value) == f"{config}.{key}: {expected}, got 1e+300"
    limit = expected.rsplit(" ", 1)[1]
    config.write_text(f"{key}: {limit}\n")
    assert getattr(load_bridge_config(config), key) == int(limit)


def test_an_opcua_session_timeout_past_an_hour_is_refused_naming_the_key(tmp_path):
    """A 401-digit value loaded; the client then failed at connect with "required argument is not a float", blaming
    the connection."""
    pytest.importorskip("asyncua", reason="the OPC UA bridge needs the [plc] extra (asyncua)")
    from inspectd.clients.opcua import parse_opcua_config

    for value in (3_600_001, 10**400):
        with pytest.raises(ConfigError) as refused:
            parse_opcua_config({"mode": "client", "cameras": ["cam0"], "session_timeout_ms": value})
        assert str(refused.value).startswith("bridge.session_timeout_ms: expected at most 3600000, got "), refused.value
        assert "\n" not in str(refused.value)
    config = parse_opcua_config({"mode": "client", "cameras": ["cam0"], "session_timeout_ms": 3_600_000})
    assert config.session_timeout_ms == 3_600_000
