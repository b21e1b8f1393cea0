"""The progress line of long commands beside what they print to stdout: `--recipe auto`'s candidates counted with the
time left, the table unchanged, and on a terminal the table's rows not drawn into the progress line's row."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest

from engines.model.recipes import Recipe
from engines.progress import Progress
from engines.training.select import select_recipe
from tiny_dataset import one_torch_thread  # noqa: F401 (fixture)

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_torch_thread")]
# Two cheap candidates of one backbone and input: one features pass, two scorer fits.
FIRST = Recipe("first", taps=(8, 16), size=(64, 64), aggregation=1, memory_size=256)
SECOND = Recipe("second", taps=(8, 16), size=(64, 64), aggregation=3, memory_size=256)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Both:
    """stderr (a terminal) and stdout's lines in the order they were written, as a terminal shows them."""

    def __init__(self) -> None:
        self.screen: list[str] = []
        self.stderr = self

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> None:
        self.screen.append(text)

    def flush(self) -> None:
        pass

    def stdout(self, line: str) -> None:
        self.screen.append(f"[stdout]{line}\n")


def frames(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [np.clip(128 + rng.normal(0, 6, (64, 64)), 0, 255).astype(np.uint8) for _ in range(n)]


def test_auto_counts_its_candidates_with_the_time_left_and_leaves_its_table_alone():
    """Auto's only sign of life was a table row per candidate: no count of how many were left, and no ETA, over
    minutes per candidate on a large set."""
    images = frames(8)
    quiet: list[str] = []
    select_recipe(images, [FIRST, SECOND], channels=1, seed=0, score_shares=(0.0,), report=quiet.append)
    table: list[str] = []
    stderr = io.StringIO()
    select_recipe(
        images,
        [FIRST, SECOND],
        channels=1,
        seed=0,
        score_shares=(0.0,),
        report=table.append,
        progress=Progress(stderr),
    )
    assert [re.sub(r"\d+s\b", "", line) for line in table] == [re.sub(r"\d+s\b", "", line) for line in quiet]
    lines = stderr.getvalue().splitlines()
    assert lines[0] == "recipe auto 0/2", lines
    assert re.fullmatch(r"recipe auto 2/2 elapsed \d+s ETA 0s", lines[-1]), lines


def test_a_table_row_is_written_on_a_terminal_with_the_progress_line_erased_and_drawn_again_below():
    both = Both()
    progress = Progress(both)
    progress.start(3, "recipe auto")
    progress.update(0)
    progress.around(both.stdout, "row")
    assert both.screen == ["\rrecipe auto 0/3\x1b[K", "\r\x1b[K", "[stdout]row\n", "recipe auto 0/3"]
    both.screen.clear()
    progress.finish()
    progress.around(both.stdout, "after")  # no progress line shown: nothing to erase
    assert both.screen == ["\n", "[stdout]after\n"]


def test_a_table_row_off_a_terminal_or_with_the_line_off_is_written_alone():
    for stream, enabled in ((io.StringIO(), True), (Terminal(), False)):
        progress = Progress(stream, enabled)
        progress.start(2, "recipe auto")
        progress.update(0)
        written = stream.getvalue()
        rows: list[str] = []
        progress.around(rows.append, "row")
        assert rows == ["row"] and stream.getvalue() == written
