"""The progress line: log lines (a validation's scores) never land on the bar's line."""

from __future__ import annotations

import logging
import sys

import pytest

from nmt.progress import Progress


def test_a_log_line_starts_on_a_line_of_its_own_and_the_bar_comes_back(capsys: pytest.CaptureFixture[str]) -> None:
    handler = logging.StreamHandler(sys.stderr)  # the stderr capsys reads, as `nmt train` logs to stderr
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        bar = Progress(100, "step", enabled=True)
        bar.update(3, loss=1.5)
        logging.getLogger("nmt.train").warning("step 3: dev BLEU 12.5")
        with bar:  # as training and evaluation use it: closed however the loop ends
            bar.update(4, loss=1.25)
        bar.close()  # again: no second line end
    finally:
        root.removeHandler(handler)
    assert bar._filter not in handler.filters
    lines = capsys.readouterr().err.split("\n")
    assert lines[0].split("\r")[-1] == "step 3: dev BLEU 12.5"  # the bar was blanked before it
    assert lines[1].split("\r")[-1].startswith("step 4/100  loss 1.25")  # redrawn at once, not 0.2 s later
    assert lines[2:] == [""]
