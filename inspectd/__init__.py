"""inspectd: the daemon (daemon/), the protocol it shares with its clients (protocol/), the clients (clients/), the
tools around it (tools/), and `cli`, the single `inspectd` entry point. errors, configfile and logs are shared by
all of them and import nothing else of the package but the protocol (configfile: the camera-id rule)."""

__version__ = "0.1.0"
