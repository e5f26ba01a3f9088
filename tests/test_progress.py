"""Progress bars: redraws on a terminal, plain lines into a log file. (disable=False: the
suite may run under TQDM_DISABLE=1, which only changes tqdm's default.)"""

from __future__ import annotations

import sys

from sweep import progress
from sweep.progress import progress_bar


def test_progress_into_a_file_is_plain_lines(capsys):
    for _ in progress_bar(range(1000), desc="rows", disable=False):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("rows: 100%")


def test_progress_lines_come_at_the_log_interval(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)
    with progress_bar(total=5, desc="n", leave=False, disable=False) as bar:
        for _ in range(5):
            bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("|")[0] for line in lines] == [f"n: {p:3d}%" for p in range(0, 101, 20)]


class _Terminal:
    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_on_a_terminal_redraws(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    for _ in progress_bar(range(3), desc="t", mininterval=0, disable=False):
        pass
    assert "\r" in term.text
