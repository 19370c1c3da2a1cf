"""Stage timings: the clock's arithmetic on a fake timer, and a whole run's ``timings`` consistent
with its own wall time (no assertion on how long anything takes)."""

from __future__ import annotations

import json
import tempfile
import time

import pytest
from typer.testing import CliRunner

from distill import timing
from distill.cli import app
from distill.timing import StageClock, summary_line

from test_cli import TINY, tiny_data  # noqa: F401 (fixture)


def test_clock_adds_repeated_stages_and_keeps_their_order(monkeypatch: pytest.MonkeyPatch) -> None:
    now = iter([100.0, 101.0, 103.5, 104.0, 104.5, 105.0, 105.75, 110.0])  # made, then start/end of each stage, then timings()
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(now))
    clock = StageClock()
    with clock.stage("b"):
        pass
    with clock.stage("a"):
        pass
    with pytest.raises(RuntimeError):  # a failing stage still counts
        with clock.stage("b"):
            raise RuntimeError
    clock.add("c", 0.5)
    assert clock.timings() == {"stages_s": {"b": 2.5 + 0.75, "a": 0.5, "c": 0.5}, "total_s": 10.0, "other_s": 10.0 - 4.25}


def test_summary_line_names_the_longest_stages() -> None:
    line = summary_line({"stages_s": {"data": 1.0, "teacher": 30.0, "student": 6.0, "report": 0.5}, "total_s": 40.0, "other_s": 2.5})
    assert line == "time 40.0 s: teacher 30.0 s (75%), student 6.0 s (15%), data 1.0 s (2%), report 0.5 s (1%), the rest 2.5 s"


def test_run_records_every_stage_within_its_wall_time(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # export folders private to this test
    out = tmp_path / "run"
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["run", "--out", str(out), "--export-precision", "fp32,fp16", *TINY])
    wall = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    timings = report["timings"]
    stages = timings["stages_s"]
    expected = {"data", "teacher", "teacher layer choice", "student_baseline", "teacher gate", "student", "report",
                "export teacher (onnx fp32)", "export student (onnx fp32)", "export student (onnx fp16)",
                "benchmark teacher (torch fp32)", "benchmark student (torch fp32)"}
    for row in report["models"]:
        expected.add(f"evaluate {row['name']} ({row['runtime']} {row['precision']})")
        if row["runtime"] == "onnxruntime" and row["name"] == "student_baseline":  # the student's graph: timed once
            expected.add(f"export student_baseline (onnx {row['precision']})")
        elif row["runtime"] == "onnxruntime":
            expected.add(f"benchmark {row['name']} (onnxruntime {row['precision']})")
    assert set(stages) == expected
    assert all(seconds >= 0 for seconds in stages.values())
    assert sum(stages.values()) <= timings["total_s"] + 1e-3 <= wall + 1e-3
    # each figure is rounded to 1 ms: the sum of n rounded stages may be off by up to n / 2 ms
    assert timings["other_s"] == pytest.approx(timings["total_s"] - sum(stages.values()), abs=5e-4 * (len(stages) + 2))
    assert report["config"]["wall_time_s"] <= timings["total_s"] + 0.05
    assert "time " in result.output and "s: " in result.output
