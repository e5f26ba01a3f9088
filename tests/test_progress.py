"""Progress bars: redraws on a terminal, plain lines into a log file. (disable=False: the
suite may run under TQDM_DISABLE=1, which only changes tqdm's default.)"""

from __future__ import annotations

import json
import sys
import time

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


def test_a_bar_that_would_clear_itself_leaves_its_last_line_in_a_file_once(capsys):
    """leave=False clears a terminal's bar; in a file only its first line (0%) was left. A
    refresh and the close after it draw the same line: written once."""
    with progress_bar(total=3, desc="gen", leave=False, disable=False) as bar:
        bar.update(3)
        bar.refresh()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("gen:   0%") and lines[-1].startswith("gen: 100%")
    assert len(lines) == len(set(lines)) == 2


def test_progress_lines_into_a_file_are_flushed(monkeypatch):
    """(The de-duplication's helpers were inserted between the line file's write and flush:
    flush became dead code inside _gist, and tqdm's flushes reached nothing.)"""
    import io

    flushes = []

    class Log(io.StringIO):
        def flush(self):
            flushes.append(1)

    monkeypatch.setattr(sys, "stderr", Log())
    with progress_bar(total=2, desc="f", disable=False) as bar:
        bar.update(2)
    assert flushes and "f: 100%" in sys.stderr.getvalue()


def test_a_minutes_line_is_written_though_its_count_has_not_moved(capsys, monkeypatch):
    """The count shows 3 digits: on a large sweep it stays for minutes, its rate and time
    left do not (only a line right after its twin is dropped)."""
    monkeypatch.setattr(progress, "REPEAT_AFTER", 0.0)
    with progress_bar(total=3, desc="gen", disable=False) as bar:
        bar.refresh()
        bar.refresh()
    assert len(capsys.readouterr().err.splitlines()) == 4  # (first, two refreshes, close)


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


# ------------------------------------------------------------------ the rate sweep status shows


def test_the_rate_is_measured_over_the_last_minutes(tmp_path):
    from sweep.rate import RATE, WINDOW, RateMeter, pace, words

    def describe(where, now):
        p = pace(where, now)
        return p and words(p)

    with RateMeter(tmp_path, total=1_000_000) as meter:
        meter.sample(0, now=1000.0)
        assert describe(tmp_path, now=1000.0) is None  # (written, but no rate yet)
        for t in range(1, 301):  # 500 rows/s, then 1000 rows/s for the last 150 s
            meter.sample(500 * min(t, 150) + 1000 * max(0, t - 150), now=1000.0 + t)
        said = describe(tmp_path, now=1300.0)
        assert meter.samples[-1][0] - meter.samples[0][0] <= WINDOW + 1
        assert (
            said
            == f"training 1.00k rows/s over the last {WINDOW:.0f} s; about 12:55 left at that rate"
        )
        assert describe(tmp_path, now=1300.0 + 61) is None  # stale: its driver is stuck
        later = describe(tmp_path, now=1300.0 + 5)  # (what it trained since is left out)
        assert later and later.endswith("about 12:50 left at that rate")
        assert describe(tmp_path, now=1300.0 - 30) == said  # a reader's clock behind
        meter.sample(10, now=1301.0)  # counted again (a retried ensemble): measured afresh
        assert meter.samples[0] == (1301.0, 10, 10)
    assert not (tmp_path / RATE).exists()  # the driver's training ended


def test_the_start_up_before_the_first_rows_is_not_part_of_the_rate(tmp_path):
    """A (re)started sweep trains nothing while Ray, its workers and their compiles start:
    counted in, the rate read 4x too slow and the time left 4x too long for a minute."""
    from sweep.rate import RateMeter

    with RateMeter(tmp_path, total=100_000) as meter:
        for t in range(0, 31):  # 30 s of start-up at the 40k rows a checkpoint kept
            meter.sample(40_000, now=1000.0 + t)
        assert meter.rate() is None and meter.seconds_left() is None
        for t in range(1, 11):  # then 1000 rows/s
            meter.sample(40_000 + 1000 * t, now=1030.0 + t)
        assert meter.span() == 10 and meter.rate() == 1000 and meter.seconds_left() == 50


def test_the_time_left_is_paced_by_work_when_ensembles_differ(tmp_path):
    """The largest dictionaries train first, at a slower row rate: paced by rows, the time
    left said early on was far too long. Here a row costs its dictionary's size: a 4096-wide
    run at 1k rows/s, then a 512-wide one at 8k rows/s, 100k rows each."""
    from sweep.actors import ProgressCounter
    from sweep.rate import RateMeter, pace

    counter = ProgressCounter({"big": 0, "small": 0}, {"big": 4096, "small": 512})
    totals = {"big": 100_000, "small": 100_000}
    with RateMeter(tmp_path, 200_000, 100_000 * (4096 + 512), totals) as meter:
        for t in range(0, 51):  # half of the big run trained
            counter.reach(["big"], 1000 * t)
            rows, work, runs = counter.work()
            meter.sample(rows, now=1000.0 + t, work=work, runs=runs)
        p = pace(tmp_path, now=1050.0)
        assert p["rows_per_s"] == 1000 and p["seconds_left"] == 50 + 100_000 / 8000
        assert meter.seconds_left() == p["seconds_left"]  # (the driver's bar says it too)
    assert counter.work() == (50_000, 50_000 * 4096, {"big": 50_000, "small": 0})


def test_the_time_left_of_ensembles_side_by_side_is_their_slowest(tmp_path):
    """On two GPUs at once, the 4096-wide run at 1k rows/s and the 512-wide one at 8k rows/s:
    the work's rate says the sweep ends in 46 s; the wide run alone needs 90 s more."""
    from sweep.rate import RateMeter

    totals = {"big": 100_000, "small": 100_000}
    with RateMeter(tmp_path, 200_000, 100_000 * (4096 + 512), totals) as meter:
        for t in range(0, 11):
            runs = {"big": 1000 * t, "small": 8000 * t}
            work = runs["big"] * 4096 + runs["small"] * 512
            meter.sample(sum(runs.values()), now=1000.0 + t, work=work, runs=runs)
        assert meter.seconds_left() == 90


def test_a_run_that_began_inside_the_window_is_paced_from_when_it_began(tmp_path):
    """The small run waited 100 s for its slot, then trained 8k rows/s for 10 s: spread over
    the whole window, its rate read 11x too slow, and the time left ~10x too long."""
    from sweep.rate import RateMeter

    totals = {"big": 100_000, "small": 200_000}
    with RateMeter(tmp_path, 300_000, 100_000 * 4096 + 200_000 * 512, totals) as meter:
        for t in range(0, 111):
            runs = {"big": min(1000 * t, 100_000), "small": 8000 * max(t - 100, 0)}
            work = runs["big"] * 4096 + runs["small"] * 512
            meter.sample(sum(runs.values()), now=1000.0 + t, work=work, runs=runs)
        assert meter._slowest_run() == (200_000 - 80_000) / 8000


def test_a_run_that_reports_every_half_minute_is_paced_at_its_rate(tmp_path):
    """Rows move at each report (every 50 steps), not at each sample: 100 rows/s reported
    every 30 s is 100 rows/s, wherever the window's edges fall between reports."""
    from sweep.rate import RateMeter

    for start in (0, 7, 29):
        with RateMeter(tmp_path, 100_000, None, {"run": 100_000}) as meter:
            for t in range(start, start + 200):
                rows = 3000 * (t // 30)
                meter.sample(rows, now=1000.0 + t, runs={"run": rows})
            assert meter._slowest_run() == (100_000 - rows) / 100


def test_the_time_left_looks_only_at_the_runs_that_moved_in_the_window(tmp_path):
    """A sweep of thousands of runs asks for its time left every half second: looking at
    every run's rows at every sample kept cost runs x samples each time (137 ms at 3000
    runs), most of the driver's time in a long sweep. Only the runs that moved in the window
    are kept: here the one training, not the 2999 done or waiting."""
    from sweep.rate import RateMeter

    totals = {f"run{i}": 1000.0 for i in range(3000)}
    runs = {r: (1000.0 if i < 1500 else 0.0) for i, r in enumerate(totals)}
    with RateMeter(tmp_path, 3_000_000, None, totals) as meter:
        for t in range(0, 300):
            runs["run1500"] = 2.0 * t
            meter.sample(sum(runs.values()), now=1000.0 + t, runs=runs)
        assert list(meter.moves) == ["run1500"] and len(meter.moves["run1500"]) <= 121
        assert meter._slowest_run() == (1000 - 598) / 2


def test_a_run_moving_at_the_windows_first_time_is_still_paced(tmp_path):
    """Two samples at one time (a coarse or stepped-back clock): the move at the second is in
    the window (only the first sample's is not), as the old scan of the samples kept it."""
    from sweep.rate import RateMeter

    with RateMeter(tmp_path, 100, None, {"a": 100}) as meter:
        for t, rows in ((0.0, 0), (0.0, 10), (5.0, 20)):
            meter.sample(rows, now=1000.0 + t, runs={"a": rows})
        assert meter._slowest_run() == (100 - 20) * 5 / 10


def test_status_shows_the_rate_of_a_running_sweep(tmp_path, capsys):
    from sweep.cli import main
    from sweep.lock import SweepLock
    from sweep.rate import RateMeter

    (tmp_path / "manifest.json").write_text('{"runs": {}}')
    with SweepLock(tmp_path), RateMeter(tmp_path, total=2_000_000) as meter:
        start = time.time() - 30
        for t in range(0, 31, 10):
            meter.sample(20_000 * t, now=start + t)
        assert main(["status", str(tmp_path)]) == 0
        said = " ".join(capsys.readouterr().out.split())
        assert "(running)" in said and "training 20.0k rows/s over the last 30 s; about 01:" in said
        assert main(["status", str(tmp_path), "--json"]) == 0
        facts = json.loads(capsys.readouterr().out)
        assert facts["activity"] == "running" and facts["runs"] == []
        assert facts["pace"]["rows_per_s"] == 20_000 and 65 < facts["pace"]["seconds_left"] <= 70
    assert main(["status", str(tmp_path)]) == 0
    assert "rows/s" not in capsys.readouterr().out  # no driver: no rate


def test_a_worker_reports_its_rows_at_most_once_a_second_and_at_the_end(ray_cluster):
    """(Each report is a Ray task: at every logging step a fast ensemble sent dozens a second,
    and Ray's head kept ~3 KB of records for each.)"""
    import ray

    from sweep.actors import ProgressCounter
    from sweep.launcher import ProgressReport

    counter = ray.remote(num_cpus=0)(ProgressCounter).remote({})
    report = ProgressReport(counter, ["a", "b"], every=0.5)
    for rows in range(0, 1000, 10):
        report(rows)  # (a hundred logging steps within a few ms: one report)
    assert ray.get(counter.total.remote()) == 0
    time.sleep(0.6)
    report(1000)
    assert ray.get(counter.total.remote()) == 2 * 1000
    report(1100)
    report.flush()  # the end: what came since the last report
    assert ray.get(counter.total.remote()) == 2 * 1100
