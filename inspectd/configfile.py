"""Reading inspectd's YAML files (the daemon's config, the PLC bridge's): the file itself, and the key paths every
refusal starts with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from inspectd.errors import ConfigError


def key_path(where: str, key: Any) -> str:
    """`where.key` for error messages. A key from the file is outside input: one with a newline or other unprintable
    text is shown quoted, so the error stays one line."""
    key = str(key)
    if not key.isprintable():
        key = repr(key)
    return f"{where}.{key}" if where else key


def read_yaml(path: str | Path, expected: str = "a YAML config file") -> Any:
    """The one YAML reader for the daemon's config files (the daemon's, the PLC bridge's): every failure is one
    ConfigError line naming the file (and the line, where YAML says it)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text, expected {expected}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: malformed YAML: nested too deeply, expected {expected}") from None
