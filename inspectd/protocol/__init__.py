"""What the daemon and everything that talks to it share (docs/PROTOCOL.md): the result and status messages
(messages), the control request grammar and its client (control), the journal's on-disk format and readers
(journal), CurveZMQ key files with the client socket hook (keys), the alarms a status calls for (alarms), and
what every socket does with its endpoint (endpoints).

Clients, `inspectd calibrate --apply` and the daemon all import this package; it imports nothing of the daemon."""
