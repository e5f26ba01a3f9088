"""The readers of growing JSON-lines files (training curves): the last record from the end,
thinned copies, cutting past a step, all without holding the file."""

from __future__ import annotations

import json

from sweep import jsonl


def write(path, steps, torn: str = "") -> None:
    lines = "".join(
        json.dumps({"step": s, "loss": 1.0 / (s + 1), "pad": "x" * 150}) + "\n" for s in steps
    )
    path.write_text(lines + torn)


def test_the_last_record_is_read_from_the_end(tmp_path):
    path = tmp_path / "m.jsonl"
    assert jsonl.last(path) == {}
    path.write_text("")
    assert jsonl.last(path) == {}
    write(path, range(5000))  # (~0.9 MB: many blocks)
    assert jsonl.last(path)["step"] == 4999
    write(path, range(5000), torn='{"step": 5000, "lo')  # power lost mid-line
    assert jsonl.last(path)["step"] == 4999
    path.write_text('{"step": 0}')  # one line, no newline
    assert jsonl.last(path) == {"step": 0}
    path.write_text("\n" + "x" * 200_000 + "\n")  # nothing whole
    assert jsonl.last(path) == {}


def test_thinned_records_are_even_with_the_first_and_last(tmp_path):
    path = tmp_path / "m.jsonl"
    write(path, range(10))
    assert [r["step"] for r in jsonl.thinned(path, 100)] == list(range(10))
    write(path, range(10_001), torn='{"ste')
    steps = [r["step"] for r in jsonl.thinned(path, 100)]
    assert steps[0] == 0 and steps[-1] == 10_000 and len(steps) <= 102
    gaps = {b - a for a, b in zip(steps[:-2], steps[1:-1], strict=True)}
    assert gaps == {101}  # evenly spaced
    assert jsonl.thinned(tmp_path / "none.jsonl", 10) == []


def test_records_past_a_step_are_cut_and_a_usual_resume_rewrites_nothing(tmp_path):
    path = tmp_path / "m.jsonl"
    write(path, range(0, 100, 10))
    before = path.stat()
    jsonl.keep_through(path, 90)  # the usual resume: nothing past the checkpoint
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    jsonl.keep_through(path, 45)  # (a kill: records past the checkpoint it resumes from)
    assert [r["step"] for r in jsonl.records(path)] == [0, 10, 20, 30, 40]
    write(path, range(0, 50, 10), torn='{"step": 5')
    jsonl.keep_through(path, 45)  # nothing past, but a torn line the next append would join
    assert path.read_text().endswith("}\n") and len(jsonl.records(path)) == 5
    path.write_text('{"step": 0}\nnot json\n{"step": 20}\n')
    jsonl.keep_through(path, 10)
    assert path.read_text() == '{"step": 0}\n'
    jsonl.keep_through(tmp_path / "none.jsonl", 3)  # (no file: nothing to do)
    assert not (tmp_path / "none.jsonl").exists()
