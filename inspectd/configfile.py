"""inspectd's config files (the daemon's, the PLC bridge's): reading the YAML, checking it against a declaration, and
the field types both declare with.

Owns the one YAML reader (a safe loader that also refuses a key given twice in one mapping, which PyYAML would settle
silently by keeping the last), `parse` (plain data against a declaration from engines.schema, every refusal one
ConfigError line starting with the key path), and the field types of inspectd's settings: ZeroMQ endpoints, paths
(relative ones resolve against the config file's directory) and camera ids.

Numbers are read as YAML 1.2 reads them (the core schema), not as PyYAML's YAML 1.1: `1e4` is a number, not the text
"1e4"; `1:30` is text, not 90 (base 60). Only `0x` and `0o` give another base. A plain number the two read differently
or that no float holds is refused rather than given a value the operator may not have meant: an integer with a leading
zero (`0100`: octal 64 in YAML 1.1, 100 in 1.2; `0815`: text in 1.1) and a float past the largest one (`4E1234`).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import PlainValidator, ValidationInfo

from engines import schema
from inspectd.errors import ConfigError
from inspectd.protocol.archive import camera_id_problem
from inspectd.protocol.endpoints import endpoint_problem
from inspectd.protocol.endpoints import ipc_path_problem as _ipc_path_problem

T = TypeVar("T")


def _endpoint(value: Any) -> str:
    problem = endpoint_problem(value, schema.show)
    if problem is not None:
        raise schema.invalid(problem)
    return value


def ipc_path_problem(endpoint: str) -> str | None:
    """inspectd.protocol.endpoints.ipc_path_problem, showing the endpoint as config errors show values."""
    return _ipc_path_problem(endpoint, schema.show)


def _expanded(path: str | Path) -> Path:
    """`path` with ~ expanded. Raises schema.invalid for a path no system call could take: a NUL byte, or a ~ or
    ~user with no home directory to expand to."""
    if "\0" in str(path):
        raise schema.invalid(f"{schema.show(str(path))} holds a NUL byte, expected a path")
    try:
        path = Path(path).expanduser()
    except RuntimeError:  # pathlib's "Could not determine home directory."
        raise schema.invalid(
            f"cannot expand {schema.show(str(path))} (no such user or home directory), expected an absolute path or "
            "one relative to the config file"
        ) from None
    return path


def resolve(path: str | Path, info: ValidationInfo) -> Path:
    """`path` with ~ expanded, relative to the config file's directory (`base_dir` in the validation context; the
    working directory when there is none)."""
    path = _expanded(path)
    if path.is_absolute():
        return path
    base_dir = (info.context or {}).get("base_dir") or Path.cwd()
    return Path(os.path.normpath(Path(base_dir) / path))


def _path(value: Any, info: ValidationInfo) -> Path:
    if not isinstance(value, (str, Path)) or not str(value):
        raise schema.invalid(f"expected a path string, got {schema.show(value)}")
    return resolve(value, info)


def _not_a_variable(value: str | Path) -> None:
    """Refuses a $ in a path the program writes to: ${STATE_DIRECTORY} (what systemd sets for StateDirectory=) or
    $HOME/x was taken literally, a folder of that name beside the config file."""
    if "$" in str(value):
        raise schema.invalid(
            f"{schema.show(str(value))} holds a $, expected the path written out: environment variables are not "
            "expanded"
        )


def written_path(value: Any) -> Path:
    """A path the program writes to while it runs: absolute (after ~), never resolved against the config file's
    folder, which the service units make read-only (ProtectSystem=strict), nor against a working directory the
    config file does not show."""
    if not isinstance(value, (str, Path)) or not str(value):
        raise schema.invalid(f"expected a path string, got {schema.show(value)}")
    _not_a_variable(value)
    path = _expanded(value)
    if not path.is_absolute():
        raise schema.invalid(
            f"{schema.show(str(value))} is relative, expected an absolute path: it is written to, and the config "
            "file's folder is read-only under the service units"
        )
    return path


def _state_path(value: Any, info: ValidationInfo) -> Path:
    if isinstance(value, (str, Path)):
        _not_a_variable(value)
    return _path(value, info)


Endpoint = Annotated[str, PlainValidator(_endpoint)]
ConfigPath = Annotated[Path, PlainValidator(_path)]
WrittenPath = Annotated[Path, PlainValidator(written_path)]
# The daemon's state_dir, journal and archive: a ConfigPath (a relative one is read against the config file's folder,
# as it always was) without $.
StatePath = Annotated[Path, PlainValidator(_state_path)]


def _camera_id(value: Any) -> str:
    problem = camera_id_problem(value, schema.show(value))
    if problem is not None:
        raise schema.invalid(problem)
    return value


CameraId = Annotated[str, PlainValidator(_camera_id)]


def parse(declaration: type[T], raw: Any, where: str = "", base_dir: str | Path | None = None) -> T:
    """`raw` (as YAML gives it) as a `declaration`, or ConfigError naming the first refused key after the prefix
    `where`. Relative paths resolve against `base_dir` (default: the working directory)."""
    context = {"base_dir": Path(base_dir) if base_dir is not None else Path.cwd()}
    return schema.validate(declaration, raw, where=where, error=ConfigError, context=context)


class _DuplicateKey(yaml.constructor.ConstructorError):
    def __init__(self, mapping: yaml.MappingNode, key: yaml.Node, first: yaml.Node) -> None:
        super().__init__(problem="duplicate key", problem_mark=key.start_mark)
        self.mapping, self.key, self.first = mapping, key, first


# YAML 1.2's core schema for numbers. PyYAML resolves YAML 1.1's, where `1e4` is text, `0123` octal and `1:30`
# base 60: each a different value from the one an operator wrote, and a refusal that contradicts what they see.
_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_INT_RE = re.compile(r"[-+]?[0-9]+\Z|0o[0-7]+\Z|0x[0-9a-fA-F]+\Z")
_FLOAT_RE = re.compile(
    r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?\Z|[-+]?\.(?:inf|Inf|INF)\Z|\.(?:nan|NaN|NAN)\Z"
)


class _AmbiguousNumber(yaml.constructor.ConstructorError):
    """A plain scalar refused as a number, raised with its node so that read_yaml can name the key."""

    def __init__(self, node: yaml.ScalarNode, problem: str) -> None:
        super().__init__(problem=problem, problem_mark=node.start_mark)
        self.node = node


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last one silently, and a
    pasted-in second `queue:` quietly replacing the first is a config bug nobody sees. Numbers as YAML 1.2 reads
    them (above)."""

    # A copy without YAML 1.1's number resolvers: add_implicit_resolver would otherwise share SafeLoader's lists.
    yaml_implicit_resolvers = {
        first: [(tag, regex) for tag, regex in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = str(self.construct_scalar(node))
        base = {"0x": 16, "0o": 8}.get(text[:2], 10)
        if base == 10 and re.match(r"[-+]?0+[1-9]", text):
            # YAML 1.1 (PyYAML before, and most YAML tools) read 0100 as octal 64 and 0815 as the text "0815": a Modbus
            # register written 0100 moved without a word when 1.2 made it 100. All zeros mean 0 in both.
            sign, digits = text[: len(text) - len(text.lstrip("+-"))], text.lstrip("+-").lstrip("0")
            if set(digits) <= set("01234567"):
                was = f"octal {sign.strip('+')}{int(digits, 8)}"
                ways = f"{sign}{digits}, {'' if sign else f'0o{digits} for {was}, '}or "
            else:
                was, ways = f'the text "{text}"', f"{sign}{digits}, or "
            raise _AmbiguousNumber(
                node,
                f"{text} has a leading zero, which YAML 1.1 read as {was}, expected {ways}"
                f'"{text}" in quotes for a name',
            )
        try:
            return int(text[2:] if base != 10 else text, base)
        except ValueError:  # only where a tag says !!int: the resolver gives this constructor numbers alone
            raise yaml.constructor.ConstructorError(
                problem=f"expected an integer, got {schema.show(text)}", problem_mark=node.start_mark
            ) from None

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        text = str(self.construct_scalar(node))
        lowered = text.lower()
        try:
            value = float(lowered.replace(".inf", "inf").replace(".nan", "nan"))
        except ValueError:
            raise yaml.constructor.ConstructorError(
                problem=f"expected a number, got {schema.show(text)}", problem_mark=node.start_mark
            ) from None
        if math.isinf(value) and not lowered.endswith(".inf"):
            # float() rounds 4E1234 (a serial number, say) to inf without a word.
            raise _AmbiguousNumber(
                node,
                f"{text} is too large for a number (it would be read as infinite), expected a smaller one "
                f'(or "{text}" in quotes for a name)',
            )
        return value

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: the mapping's own keys override merged ones, as YAML intends
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:
                continue  # an unhashable key: the base constructor refuses it with its own message
            if first is not key_node:
                raise _DuplicateKey(node, key_node, first)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(_INT_TAG, _INT_RE, list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+.0123456789"))
_Loader.add_constructor(_INT_TAG, _Loader.construct_yaml_int)
_Loader.add_constructor(_FLOAT_TAG, _Loader.construct_yaml_float)


def read_yaml(path: str | Path, expected: str = "a YAML config file") -> Any:
    """The one YAML reader for inspectd's config files: every failure is one ConfigError line naming the file (and
    the line, where YAML says it)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text, expected {expected}") from exc
    loader, root = None, None
    try:
        loader = _Loader(text)  # reads the whole text at once: refuses unprintable characters here
        root = loader.get_single_node()
        return None if root is None else loader.construct_document(root)
    except _DuplicateKey as exc:
        where = schema.key_path(_path_to(root, exc.mapping), exc.key.value)
        raise ConfigError(
            f"{path}:{exc.key.start_mark.line + 1}: {where}: duplicate key "
            f"(first on line {exc.first.start_mark.line + 1}), expected each key once"
        ) from None
    except _AmbiguousNumber as exc:
        where = _path_to(root, exc.node)  # "" for a mapping key: the line names it then
        raise ConfigError(
            f"{path}:{exc.node.start_mark.line + 1}: {where + ': ' if where else ''}{exc.problem}"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: malformed YAML: nested too deeply, expected {expected}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _path_to(root: yaml.Node | None, target: yaml.Node) -> str:
    """The key path of `target` in the document under `root` (depth-first, each node once: aliases can loop)."""
    stack: list[tuple[yaml.Node, str]] = [(root, "")] if root is not None else []
    visited: set[int] = set()
    while stack:
        node, where = stack.pop()
        if node is target:
            return where
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            stack.extend((value, schema.key_path(where, key.value)) for key, value in node.value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((value, f"{where}[{i}]") for i, value in enumerate(node.value))
    return ""
