"""Programs that consume a running daemon over the wire: `inspectd subscribe` (and the Subscriber the tools use) and
the Modbus PLC bridge (bridge: the process; plc: the register map and handshake). They import inspectd.protocol,
never the daemon."""
