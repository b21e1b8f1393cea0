"""Declared settings: how a config section or a backend's options are declared, and the one-line errors they give.

Owns the rules every declaration follows, on the model side and the daemon side alike. A declaration is a frozen
pydantic dataclass made with `@declared`: it refuses unknown keys (naming the known ones), takes a null section as an
empty one, and its fields never turn a YAML string into a number or a number into a string (`Int`, `Number`, `Text`,
`Flag`, `one_of`, `matching`). `validate` checks plain data (as YAML or a caller gives it) against a declaration and
turns every refusal into one line that starts with the key path:

    engine.options.providers: expected one of auto|cpu|cuda, got 'gpu'

The runtime backends declare their options with these pieces; inspectd's config files (the daemon's, the PLC
bridge's) are declared with them too, so there is one way to declare a setting and one form of error everywhere.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Annotated, Any, NoReturn, TypeVar, cast

from pydantic import Field, PlainValidator, Strict, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic_core import InitErrorDetails, PydanticCustomError
from typing_extensions import dataclass_transform

from engines.errors import listed as listed  # re-exported for the clients, which import no error module
from engines.errors import show

T = TypeVar("T")

# Field types. Strict: YAML's `"10"` is text and `true` is a flag, so neither may pass for a number here.
Int = Annotated[int, Strict()]
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]  # an integer or a float, finite
Text = Annotated[str, Strict(), Field(min_length=1)]
Flag = Annotated[bool, Strict()]


def one_of(choices: Iterable[Any]) -> PlainValidator:
    """Field metadata: the value must be one of `choices` (the caller's one definition of them), of the same type,
    so `true` is not the choice 1: `Annotated[str, one_of(MASK_POLICIES)]`."""
    allowed = tuple(choices)
    shown = "|".join('""' if choice == "" else str(choice) for choice in allowed)

    def check(value: Any) -> Any:
        if not any(type(value) is type(choice) and value == choice for choice in allowed):
            raise invalid(f"expected one of {shown}, got {show(value)}")
        return value

    return PlainValidator(check)


def matching(pattern: str | re.Pattern[str], expected: str) -> PlainValidator:
    """Field metadata: a string the whole of which matches `pattern`; `expected` says in words what that is."""
    regex = re.compile(pattern)

    def check(value: Any) -> str:
        if not isinstance(value, str) or not regex.fullmatch(value):
            raise invalid(f"expected {expected}, got {show(value)}")
        return value

    return PlainValidator(check)


def invalid(message: str) -> PydanticCustomError:
    """The error a validator raises for the value it checks; `message` is the whole text after the key path."""
    return PydanticCustomError("invalid", message)


def refuse(loc: str | int | tuple[str | int, ...], message: str, value: Any) -> NoReturn:
    """From a validator of a section: refuse `value` at the sub-key `loc` of that section (a key, or a path of keys
    and list indices), so the error names the key to fix rather than the whole section."""
    loc = loc if isinstance(loc, tuple) else (loc,)
    details = InitErrorDetails(type=invalid(message), loc=loc, input=value)
    raise ValidationError.from_exception_data("refused", [details])


def _check_keys(cls: type, data: Any) -> Any:
    if data is None:
        return {}  # a section left empty in YAML (every line under it commented out): its defaults
    if isinstance(data, dict):
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in data if key not in known]
        if unknown:
            message = f"unknown key (known: {', '.join(sorted(known)) or 'none'})"
            raise ValidationError.from_exception_data(
                cls.__name__,
                [InitErrorDetails(type=invalid(message), loc=(str(key),), input=data[key]) for key in unknown],
            )
    return data


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, Field))
def declared(cls: type[T]) -> type[T]:
    """Make `cls` a declaration: a frozen pydantic dataclass whose fields are its keys, with their defaults."""
    # Set before pydantic builds the class, which collects it like a validator written in the class body; it runs
    # before the class's own validators, so they see a mapping with known keys only.
    cls._check_keys = model_validator(mode="before")(_check_keys)  # type: ignore[attr-defined]
    return cast("type[T]", pydantic_dataclass(frozen=True, config={"extra": "forbid"})(cls))


_ADAPTERS: dict[Any, TypeAdapter] = {}


def _adapter(declaration: Any) -> TypeAdapter:
    if declaration not in _ADAPTERS:
        _ADAPTERS[declaration] = TypeAdapter(declaration)
    return _ADAPTERS[declaration]


def check(declaration: type[T], raw: Any, context: dict[str, Any] | None = None) -> T:
    """`raw` as a `declaration`, or pydantic's ValidationError: for validators that check a part of their section
    against another declaration (the error keeps its key path inside the section)."""
    return _adapter(declaration).validate_python(raw, context=context)


def validate(
    declaration: type[T],
    raw: Any,
    *,
    where: str = "",
    error: type[Exception] = ValueError,
    context: dict[str, Any] | None = None,
) -> T:
    """`raw` as a `declaration`, or `error` with one line naming the first refused key (after the prefix `where`)."""
    try:
        return check(declaration, raw, context)
    except ValidationError as exc:
        raise error(one_line(exc, where)) from None


def one_line(exc: ValidationError, where: str = "") -> str:
    """`key.path[1].sub: what was expected, got what` for the first error pydantic found."""
    error = exc.errors(include_url=False)[0]
    path = where
    for item in error["loc"]:
        path = f"{path}[{item}]" if isinstance(item, int) else key_path(path, item)
    return f"{path or '<top>'}: {_message(error)}"


def key_path(where: str, key: Any) -> str:
    """`where.key`. A key from a file is outside input: one with a newline or other unprintable text is shown
    quoted, so the error stays one line."""
    key = str(key)
    if not key.isprintable():
        key = repr(key)
    return f"{where}.{key}" if where else key


_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "string_unicode": "a string",
    "string_too_short": "a non-empty string",
    "dataclass_type": "a mapping",
    "dataclass_exact_type": "a mapping",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "tuple_type": "a list",
    "list_type": "a list",
}
_BOUNDS = {
    "greater_than": "more than",
    "greater_than_equal": "at least",
    "less_than": "less than",
    "less_than_equal": "at most",
}


def _message(error: Any) -> str:
    kind, ctx, got = error["type"], error.get("ctx") or {}, show(error["input"])
    if kind == "missing":
        return "required"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        return "unknown key"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {got}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return f"expected {_BOUNDS[kind]} {bound}, got {got}"
    if kind in ("too_short", "too_long"):
        n = ctx["min_length"] if kind == "too_short" else ctx["max_length"]
        return f"expected {'at least' if kind == 'too_short' else 'at most'} {n} item{'s' * (n != 1)}, got {got}"
    if kind == "literal_error":
        return f"expected {ctx['expected']}, got {got}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"]))
    if kind == "invalid":
        return error["msg"]
    return f"{error['msg']}, got {got}"
