"""Error types of the model side. Every refusal is one line naming the thing and what was expected."""

import reprlib
from typing import Any

_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 50
_SHOW.maxlevel = 3


def show(value: Any) -> str:
    """A short one-line repr of a refused value (bounded however large or deep the value is)."""
    text = _SHOW.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def listed(names: Any, most: int, shown: Any = str) -> str:
    """The first `most` of `names` (each as `shown` gives it), then how many more: a message names a few of many."""
    names = list(names)
    text = ", ".join(shown(name) for name in names[:most])
    return text if len(names) <= most else f"{text} and {len(names) - most} more"


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
