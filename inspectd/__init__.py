"""The inspectd daemon: ingest, micro-batching, inference stage, publishing and control, wired by `daemon`."""

__version__ = "0.1.0"
