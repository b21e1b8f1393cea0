"""The single `inspectd` console entry point.

Each subcommand lives in the module that owns its work. That module exposes `add_arguments(parser)` and
`run(args) -> int`; adding a subcommand is one line in SUBCOMMANDS. Modules are imported lazily, one at a time, so a
runtime-only station without torch still gets `inspectd run` and is told what to install for `inspectd train`.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import select
import signal
import sys
from typing import TYPE_CHECKING, Any

from inspectd.errors import Terminated, one_line

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

# (command, module, one-line help) in the order `inspectd --help` lists them.
SUBCOMMANDS = [
    ("train", "engines.training.train", "train a model bundle from defect-free images"),
    ("eval", "engines.training.evaluate", "measure a bundle on an MVTec-layout folder"),
    ("eval-suite", "engines.training.suite", "train with the default and evaluate on every dataset: accuracy table"),
    ("export", "engines.model.export", "export a bundle's ONNX graph (uint8 pixels -> score and map)"),
    ("build-engine", "engines.model.build_engine", "build a TensorRT plan for a bundle (GPU station)"),
    ("run", "inspectd.daemon.service", "run the inspection daemon"),
    ("subscribe", "inspectd.clients.subscribe", "tail results published by a daemon"),
    ("calibrate", "calibration.calibrate", "set, apply or roll back thresholds"),
    ("teach", "calibration.teach", "refit the scorer on confirmed-good frames (no torch), apply or roll back"),
    ("bench", "inspectd.tools.bench.command", "benchmark the engine, the daemon and a naive loop"),
    ("demo", "inspectd.tools.demo", "train on the synthetic line, run the daemon, show verdicts arriving"),
    ("keys", "inspectd.protocol.keys", "generate CurveZMQ key pairs"),
    ("bridge", "inspectd.clients.bridge", "bridge results to a PLC (Modbus TCP, OPC UA)"),
    ("archive", "inspectd.clients.archive", "list or export the frames the daemon archived"),
    ("ctl", "inspectd.clients.ctl", "steer a running daemon: status, pause/resume, reload, thresholds, rollback"),
    ("web", "inspectd.clients.web", "the live web view: last frames, defects with overlays, counts, alarms"),
]


# Commands that claim SIGTERM themselves, each to stop in its own way (the daemon drains, training keeps a checkpoint,
# the bridge finishes a PLC handshake, the web view closes its clients), and build-engine, which SIGTERM ends at once
# as before: an exception would wait for TensorRT's build, minutes, to return to Python. Left alone from the start: a
# SIGTERM during their imports still ends them by the signal, which is how systemd tells a clean stop from a failure.
OWN_SIGTERM = {"run", "train", "bridge", "web", "build-engine"}
# The offline commands, which a script may start in the background and stop with `kill -INT` as Ctrl-C stops them in
# the foreground. A shell without job control starts background commands with SIGINT ignored, and Python then installs
# no handler of its own: the signal was dropped and the run (an eval or a calibrate of thousands of images, a suite of
# hours) went on to its end. The others keep what they inherit: the daemon and the clients stop in their own ways, and
# bench's and demo's waits on their daemon leave an ignored SIGINT ignored (inspectd.tools.children).
STOPPED_BY_SIGINT = {"train", "eval", "eval-suite", "calibrate", "teach"}
INTERRUPTED_EXIT = 128 + signal.SIGINT
TERMINATED_EXIT = 128 + signal.SIGTERM
# What a shell reports for a writer killed by SIGPIPE (`yes | head -1`), the status a pipeline's readers expect.
CLOSED_STDOUT_EXIT = 128 + signal.SIGPIPE


def _terminate(signum, _frame):
    # The cleanup this starts stops children and waits for them: a second SIGTERM must not cut it short (SIGKILL can).
    # A wait that can end early without leaving its child behind claims SIGTERM back for as long as it lasts (bench's
    # and demo's waits on their daemon's drain kill the daemon on it: inspectd.tools.children).
    signal.signal(signum, signal.SIG_IGN)
    raise Terminated(TERMINATED_EXIT)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, save that a help or --version text whose reader went away is not taken for written, and
    that an option given `--` as its value is refused."""

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        # argparse drops an OSError of the write. With stdout unbuffered (PYTHONUNBUFFERED=1) the write itself is
        # what fails, and the help into a closed pipe exited 0; buffered, main's flush fails and ends it with 141.
        # Raised, it reaches main as the flush's does. Subparsers are made of this class too.
        if not message or file is None or file is not sys.stdout:
            super()._print_message(message, file)
            return
        try:
            file.write(message)
        except BrokenPipeError:
            raise
        except OSError:
            pass  # argparse's rule for any other failed write

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        # `--camera=--` (a script's `--camera="$CAM"` with CAM set to `--`): argparse takes the `--` for the end of
        # the options and strips it, and the option's value comes back as [] with its type and choices never
        # applied: a traceback in the command, or a falsy value that silently drops the option (`--apply=--`).
        # Refused here, for every command and its subcommands (built of this class too), on every Python version.
        if (
            action.option_strings
            and arg_strings == ["--"]
            and action.nargs not in (argparse.PARSER, argparse.REMAINDER)
        ):
            flag = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
            self.exit(2, f"{self.prog}: {flag}: expected a value, got '--'\n")
        return super()._get_values(action, arg_strings)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Only the chosen command's module is imported: `inspectd run` never pays for torch."""
    from engines.bundle.format import inspectd_version

    parser = _Parser(
        prog="inspectd", description="Streaming line-inspection daemon for unsupervised surface-defect detection."
    )
    parser.add_argument("--version", action="version", version=f"inspectd {inspectd_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in SUBCOMMANDS:
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name != command:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            sub.set_defaults(func=_needs(name, exc.name), unparsed=True)
            continue
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)
    return parser


def _needs(command: str, dependency: str | None):
    def run(_args) -> int:
        print(
            f"inspectd {command}: needs the Python package {dependency!r}, which is not installed (training commands: "
            "pip install 'inspectd[train]'; otherwise the installation is incomplete: run deploy/install.sh again)",
            file=sys.stderr,
        )
        return 1

    return run


def main(argv: list[str] | None = None) -> int:
    _names_printable()
    try:
        try:
            code = _main(argv)
        except SystemExit:  # argparse after --help, --version or a usage error: its output is in the buffer too
            _flush_stdout()
            raise
        _flush_stdout()  # here, not at exit: a reader that went away is then the BrokenPipeError below
        return code
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # another pipe or socket of the command's: a failure of its own
        # The reader went away (`| head -1`): the end of the output, not an error to tell. Python's last flush of
        # stdout at exit would raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return CLOSED_STDOUT_EXIT


def _names_printable() -> None:
    """Let stdout print any file name: under a station locale such as de_DE.UTF-8 it is strict, and a name that is not
    UTF-8 (held as surrogate escapes: a Windows ZIP unpacked) ended train, eval, calibrate or teach in a traceback, or
    in a refusal of the whole run, where it should only be named. Such names print as backslash escapes, as stderr
    always prints them."""
    if isinstance(sys.stdout, io.TextIOWrapper) and sys.stdout.errors == "strict":
        sys.stdout.reconfigure(errors="backslashreplace")


def _flush_stdout() -> None:
    if sys.stdout is not None:  # None when started with stdout closed (`>&-`)
        sys.stdout.flush()


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    if command == "run":
        # `systemctl reload` soon after the start would kill the daemon (SIGHUP's default) while it imports, before
        # run() installs its own handler; until then a reload has nothing to reload.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if command in STOPPED_BY_SIGINT:
        # Claimed before the command's module is imported: a background job's `kill -INT` during train's seconds of
        # torch and timm was dropped (SIGINT inherited ignored) and the run went on.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        # The command's module is imported here (train's: torch and timm, seconds on a cold disk): a Ctrl-C right
        # after Enter lands in it, and is the same one line as later.
        parser = build_parser(command)
        args, unknown = parser.parse_known_args(argv)
    except KeyboardInterrupt:
        return _stopped(command or "", "interrupted", INTERRUPTED_EXIT)
    # A command whose module could not be imported declares no options: whatever it was given, it says what is
    # missing, not a usage error (exit 2 reads as a refused config, which the units do not restart, while a package
    # missing mid-upgrade is worth another start).
    if unknown and not getattr(args, "unparsed", False):
        parser.parse_args(argv)  # the usage error, as before
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command not in OWN_SIGTERM:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return _stopped(args.command, "interrupted", INTERRUPTED_EXIT)
    except Terminated:
        return _stopped(args.command, "stopped by SIGTERM", TERMINATED_EXIT)
    except BrokenPipeError:
        raise  # main's: whether it was stdout's reader that went away
    except Exception as exc:
        # A library that turns the signal's exception into its own (onnxruntime's loader: "ImportError:
        # initialization failed") is still the signal, not a broken install.
        # An error of the clean-up that ran after the signal is said too: it may have left something undone.
        cause = exc.__cause__ or exc.__context__
        then = f" ({one_line(exc)})"
        if isinstance(cause, KeyboardInterrupt):
            return _stopped(args.command, "interrupted" + then, INTERRUPTED_EXIT)
        if isinstance(cause, Terminated):
            return _stopped(args.command, "stopped by SIGTERM" + then, TERMINATED_EXIT)
        raise


def _stdout_closed() -> bool:
    """Whether nothing reads stdout any more: a pipe or socket whose reading end was closed polls as an error."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):  # no stdout at all (closed, or replaced by an object without a descriptor)
        return False


def _stopped(command: str, how: str, code: int) -> int:
    # On a terminal a progress line may be open: the line goes under it, not on its end.
    name = f"inspectd {command}" if command else "inspectd"
    print(("\n" if sys.stderr.isatty() else "") + f"{name}: {how}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
