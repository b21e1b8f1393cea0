"""Error types of the daemon and its commands. Parsers of outside input (config, frame headers, control messages) raise
only these."""


class InspectdError(Exception):
    """Base of every error the daemon raises on purpose."""


class ConfigError(InspectdError):
    """The config file is malformed; the message starts with the key path, e.g. `cameras[1].source.url: ...`."""


class FrameError(InspectdError):
    """A frame or frame header cannot be accepted (corrupt, wrong size, wrong dtype, ...)."""


class MessageError(InspectdError):
    """A control or wire message is malformed or unknown."""


class Terminated(SystemExit):
    """SIGTERM, raised where the main thread is (inspectd.cli installs the handler) so that `finally` blocks and context
    managers run: a command's child processes are stopped and its temporary folders removed, as on Ctrl-C. Here, not
    in the cli, so that a command that tells a stop from other exits need not import the entry point."""


def one_line(exc: BaseException) -> str:
    """An exception that was not raised on purpose, as one line of an error message: its type and first line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__
