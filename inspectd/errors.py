"""Error types of the daemon. Parsers of outside input (config, frame headers, control messages) raise only these."""


class InspectdError(Exception):
    """Base of every error the daemon raises on purpose."""


class ConfigError(InspectdError):
    """The config file is malformed; the message starts with the key path, e.g. `cameras[1].source.url: ...`."""


class FrameError(InspectdError):
    """A frame or frame header cannot be accepted (corrupt, wrong size, wrong dtype, ...)."""


class MessageError(InspectdError):
    """A control or wire message is malformed or unknown."""
