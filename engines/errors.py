"""Error types of the model side. Every refusal is one line naming the thing and what was expected."""


def one_line(exc: BaseException) -> str:
    """An exception that was not raised on purpose, as one line of an error message: its type and first line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


class EngineError(Exception):
    """Base of every error the model side raises on purpose."""


class BundleError(EngineError):
    """A model bundle is missing, incomplete, tampered with, or not what the caller expected."""


class WeightsError(EngineError):
    """Backbone weights cannot be found or do not fit the backbone."""


class DataError(EngineError):
    """An image or dataset folder cannot be read or does not have the expected layout."""
