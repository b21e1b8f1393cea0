"""How `inspectd` ends when its stdout reader goes away (the shell's status for a writer SIGPIPE ended) or a Ctrl-C
comes before its command runs: no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A command whose whole output still sits in stdout's buffer when it returns, as `archive list` leaves a short listing.
BUFFERED = """
import argparse, sys
from inspectd import cli

def listing(args):
    for i in range(100):
        print(f"line {i}")
    return 0

def parser(command):
    p = argparse.ArgumentParser()
    p.set_defaults(func=listing, command="listing")
    return p

cli.build_parser = parser
sys.exit(cli.main([]))
"""


def test_output_left_in_the_buffer_for_a_reader_that_went_away_ends_with_141_and_no_traceback():
    """Flushed by Python at exit, the write failed outside main: "Exception ignored ... BrokenPipeError" and 120."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command writes its first byte
    try:
        done = subprocess.run(
            [sys.executable, "-c", BUFFERED], stdout=write, stderr=subprocess.PIPE, text=True, env=env, timeout=60
        )
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == "", done.stderr


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "PYTHONUNBUFFERED"])
def test_help_for_a_reader_that_went_away_ends_with_141_and_no_traceback(unbuffered):
    """argparse prints the help and exits (SystemExit) outside the command: flushed at exit, the same note and 120.
    With stdout unbuffered the write itself fails, inside argparse, which dropped the error: exit 0, as if read."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    for args in (["--help"], ["train", "--help"], ["--version"], []):
        read, write = os.pipe()
        os.close(read)
        try:
            done = subprocess.run(
                [sys.executable, "-m", "inspectd", *args],
                stdout=write,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                timeout=60,
                cwd=REPO,
            )
        finally:
            os.close(write)
        assert done.returncode == 141 and done.stderr == "", (args, done.returncode, done.stderr)


def test_a_command_started_with_stdout_closed_exits_as_it_would_with_one():
    """`>&-`: Python's sys.stdout is None, and flushing it raised AttributeError, exit 1 with a traceback, where a
    refused config must exit 2 (the units do not restart that)."""
    done = subprocess.run(
        [sys.executable, "-m", "inspectd", "run", "--check", "--config", "/nonexistent/inspectd.yaml"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        cwd=REPO,
        preexec_fn=lambda: os.close(1),
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN], ids=["foreground", "background-job"])
def test_a_ctrl_c_while_the_command_is_still_importing_is_one_line_and_130(inherited):
    """Train's module pulls in torch and timm before its options are even parsed: a Ctrl-C right after Enter ended in
    a 60-line traceback through the imports, killed by the signal, instead of the line every later Ctrl-C gives. A
    background job of a shell without job control inherits SIGINT ignored: its `kill -INT` during the imports was
    dropped and the run went on."""
    late = (2, "inspectd train: /nonexistent: not a directory, expected a folder of images\n")
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "inspectd", "train", "--data", "/nonexistent", "--out", "/nonexistent-out"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            preexec_fn=lambda: signal.signal(signal.SIGINT, inherited),
        )
        maps = Path(f"/proc/{proc.pid}/maps")
        deadline = time.monotonic() + 60
        # torch's native library mapped: its Python half, then timm's, are still being imported.
        while "libtorch_cpu" not in maps.read_text() and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        # On a loaded machine the signal can land after the imports and the refusal: that run tested nothing.
        if (proc.returncode, err) != late:
            break
    assert (proc.returncode, err) == (130, "inspectd train: interrupted\n"), err[-2000:]


@pytest.mark.parametrize(
    "args",
    [
        ["calibrate", "/nonexistent", "--good", "/nonexistent", "--camera=--", "--dry-run"],
        ["calibrate", "/nonexistent", "--good", "/nonexistent", "--apply=--"],
        ["teach", "/nonexistent", "--since=--"],
        ["bench", "engine", "/nonexistent", "--batch=--"],
    ],
    ids=["calibrate-camera", "calibrate-apply", "teach-since", "bench-engine-batch"],
)
def test_an_option_given_dash_dash_as_its_value_is_refused_in_one_line(args):
    """Python 3.11's argparse strips the `--` of `--camera=--` and hands the command [] with no type or choices
    applied: a traceback (`--camera`), a TypeError (`--backend`), a refusal that names no flag, or `--apply` dropped
    without a word, exit 0."""
    flag = next(a for a in args if a.endswith("=--")).split("=")[0]
    prog = " ".join(a for a in args[:2] if not a.startswith("/"))
    done = subprocess.run(
        [sys.executable, "-m", "inspectd", *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert (done.returncode, done.stderr) == (2, f"inspectd {prog}: {flag}: expected a value, got '--'\n"), done.stderr[
        -2000:
    ]
