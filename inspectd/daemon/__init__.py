"""The daemon, one module per stage of the data path:

    ingest/ (a thread per camera) -> bounded queues -> batching -> inference (engine, verdicts, masks, regions)
      -> publish (ZeroMQ PUB, journal)           control (REP socket) and signals steer it

`service` wires the stages together and owns the process lifecycle (`inspectd run`); config reads its YAML file;
notify speaks systemd's notify protocol, metrics serves Prometheus, security holds CurveZMQ on the server sockets and
the never-root rule. The daemon runs bundles through engines.runtime and imports no model or training code (no
torch): the runtime-only station installs without it.
"""
