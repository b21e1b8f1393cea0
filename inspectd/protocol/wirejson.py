"""Reading JSON that came from outside the process: the one parser that control requests, frame headers and published
messages all go through.

Python's json module raises a zoo of exceptions on hostile input (UnicodeDecodeError, JSONDecodeError, RecursionError
for deep nesting, a plain ValueError for an integer of more than 4300 digits) and accepts values no field of ours can
use (integers with hundreds of digits, whose float() overflows; NaN and Infinity, which are not JSON, and numbers like
1e400 that Python reads as infinity: a client that passes either on writes what a browser's JSON.parse refuses). Here
every one of them becomes one MessageError naming `what`, so a thread serving outside input has exactly one exception
type to catch.
"""

from __future__ import annotations

import json
import math
from typing import Any

from inspectd.errors import MessageError

# Every integer on the wire is a seq, a size or a version: 64 bits hold all of them. Longer digit strings are refused
# while parsing, before Python builds (or refuses to build) a huge int.
MAX_INT_DIGITS = 20


class _Unusable(ValueError):
    """A value the parser read but no field of ours can hold."""


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Unusable(f"an integer of {len(text.lstrip('-'))} digits, expected at most {MAX_INT_DIGITS}")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Unusable(f"{text[:40]}, expected a finite number")
    return value


def _parse_constant(name: str) -> float:
    raise _Unusable(f"{name}, expected a finite number")


class _DuplicateKey(ValueError):
    """A key given twice in one object, which json.loads settles silently by keeping the last."""


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return doc


_DECODER = json.JSONDecoder(parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
_UNIQUE_DECODER = json.JSONDecoder(
    parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant, object_pairs_hook=_unique
)


def loads(data: bytes | bytearray | memoryview, what: str, expected: str, unique_keys: bool = False) -> Any:
    """The JSON value in `data`; MessageError `"<what>: not JSON (<reason>), expected <expected>"` for anything else.
    `unique_keys`: an object that gives a key twice is refused too (a request whose second "cmd" would otherwise be
    the one run, as the config loader refuses a key given twice)."""
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise MessageError(f"{what}: not JSON (not UTF-8), expected {expected}") from None
    try:
        return (_UNIQUE_DECODER if unique_keys else _DECODER).decode(text)
    except json.JSONDecodeError as exc:
        reason = exc.msg
    except _DuplicateKey as exc:
        raise MessageError(
            f"{what}: key {str(exc.args[0])[:40]!r} given twice in one object, expected each key once"
        ) from None
    except _Unusable as exc:
        reason = str(exc)
    except RecursionError:
        reason = "nested too deeply"
    except ValueError as exc:  # anything else the scanner trips over: still the sender's fault, not ours
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    raise MessageError(f"{what}: not JSON ({reason}), expected {expected}")
