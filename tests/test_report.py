"""Report: schema, both speedups, drop/gain, JSON round trip, Markdown, PNG, console table, load errors."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib.image
import pytest
from rich.console import Console

from distill.errors import DistillError
from distill.report import (
    METRICS, REID_NOTE, build_report, load_report, pareto_front, print_report, report_row, speed_accuracy_figure, to_markdown,
    write_report,
)
from distill.report.build import percent_beside

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_models(seed: int, baseline: bool = True, teacher_ort: bool = True) -> list[dict]:
    """Entries as a run builds them: random latencies and metrics, one entry per model/runtime."""
    rng = random.Random(seed)

    def metrics() -> dict:
        return {k: rng.random() for k in METRICS} | {"f1": rng.random()}

    t_met, b_met, s_met = metrics(), metrics(), metrics()

    def entry(name, runtime, met, params):
        return {
            "name": name, "runtime": runtime, "params": params, "gflops": rng.uniform(0.1, 5), "latency_ms_p50": rng.uniform(1, 60),
            "latency_ms_p90": rng.uniform(60, 90), "latency_ms_p99": 99.0, "throughput_ips": rng.uniform(10, 900),
            "batch_size": 64, "iters": 30, "metrics": met,
        }

    models = [entry("teacher", "torch", t_met, 11_000_000)]
    if teacher_ort:
        models.append(entry("teacher", "onnxruntime", t_met, 11_000_000))
    if baseline:
        models.append(entry("student_baseline", "torch", b_met, 900_000))
    models += [entry("student", "torch", s_met, 900_000), entry("student", "onnxruntime", s_met, 900_000)]
    return models


def p50(models, name, runtime):
    return next(m["latency_ms_p50"] for m in models if m["name"] == name and m["runtime"] == runtime)


ONNX = {"path": "/runs/x/student.onnx", "max_abs_diff": 3.1e-7, "atol": 1e-4, "opset": 17, "precision": "fp32", "bytes": 1234}
CONFIG = {"teacher": "inception_bn", "student": "nin_bn", "image_size": (64, 32), "epochs": 2}


@pytest.mark.parametrize("seed", range(3))
def test_schema_speedups_drop_and_gain(seed):
    models = fake_models(seed)
    report = build_report(models, CONFIG, ONNX)
    assert set(report) == {"models", "speedup", "speedup_like_for_like", "onnx", "config", "accuracy_drop", "distillation_gain",
                           "protocol", "accuracy_metrics", "pareto_metric", "target", "share_of_lead_kept", "verdict"}
    for row in report["models"]:
        assert {"name", "runtime", "params", "gflops", "latency_ms_p50", "latency_ms_p90", "throughput_ips", "metrics"} <= set(row)
        assert set(METRICS) <= set(row["metrics"])
    assert [(m["name"], m["runtime"]) for m in report["models"]] == [(m["name"], m["runtime"]) for m in models]
    assert report["speedup"] == p50(models, "teacher", "torch") / p50(models, "student", "onnxruntime")
    assert report["speedup_like_for_like"] == {
        "torch": p50(models, "teacher", "torch") / p50(models, "student", "torch"),
        "onnxruntime": p50(models, "teacher", "onnxruntime") / p50(models, "student", "onnxruntime"),
    }
    t, b, s = models[0]["metrics"], models[2]["metrics"], models[3]["metrics"]
    for k in (*METRICS, "f1"):
        assert report["accuracy_drop"][k] == t[k] - s[k]
        assert report["distillation_gain"][k] == s[k] - b[k]
    assert report["onnx"] == ONNX and report["config"]["image_size"] == [64, 32]


def test_missing_parts_give_null_not_made_up_numbers():
    models = fake_models(0, baseline=False, teacher_ort=False)
    models[-1]["metrics"] = {"recall@1": 0.5}  # e.g. only Recall@1 evaluated for the ONNX student
    report = build_report(models, {}, {})
    assert report["speedup_like_for_like"]["onnxruntime"] is None
    assert report["speedup"] == p50(models, "teacher", "torch") / p50(models, "student", "onnxruntime")
    assert "distillation_gain" not in report
    assert report["models"][-1]["metrics"] == {"recall@1": 0.5} | {k: None for k in METRICS if k != "recall@1"}


def test_bad_entry_names():
    with pytest.raises(DistillError, match=r"report entry needs name \(or role\) in .* got name='teachr', runtime='torch', precision='fp32'"):
        build_report([{"name": "teachr", "runtime": "torch"}], {}, {})
    with pytest.raises(DistillError, match=r"got name='student', runtime='tensorrt'"):
        build_report([{"name": "student", "runtime": "tensorrt"}], {}, {})
    with pytest.raises(DistillError, match=r"got name='student', runtime='onnxruntime', precision='int4'"):
        build_report([{"name": "student", "runtime": "onnxruntime", "precision": "int4"}], {}, {})


def test_write_then_load_round_trips(tmp_path):
    report = build_report(fake_models(1), CONFIG, ONNX)
    paths = write_report(report, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["report.json", "report.md", "speed_vs_accuracy.png"]
    assert load_report(paths["json"]) == json.loads(json.dumps(report)) == report


def test_markdown_has_every_row_and_both_speedups(tmp_path):
    models = fake_models(2)
    report = build_report(models, CONFIG, ONNX)
    md = write_report(report, tmp_path)["md"].read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [tuple(c.strip() for c in r.strip("|").split("|")[:2]) for r in rows] == [(m["name"], m["runtime"]) for m in models]
    like = report["speedup_like_for_like"]
    assert f"like-for-like speedup (same runtime, architecture only): PyTorch {like['torch']:.2f}x, ONNX Runtime {like['onnxruntime']:.2f}x" in md
    assert f"deployment speedup (teacher in PyTorch eager -> student in ONNX Runtime): {report['speedup']:.2f}x" in md
    assert "3.10e-07" in md  # the ONNX parity figure


def test_plot_is_a_valid_png(tmp_path):
    png = write_report(build_report(fake_models(3), CONFIG, ONNX), tmp_path)["png"]
    assert png.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


@pytest.mark.parametrize("width", [200, 80])
def test_print_report_renders_every_row(width):
    models = fake_models(4)
    report = build_report(models, CONFIG, ONNX)
    console = Console(file=io.StringIO(), width=width, record=True)
    print_report(report, console)
    text = console.export_text()
    assert "…" not in text  # nothing cut off, even on an 80-column terminal
    short = {"torch": "torch", "onnxruntime": "onnxruntime" if width == 200 else "ort"}
    lines = text.splitlines()
    for m in models:
        assert any(line.split()[:2] == [m["name"], short[m["runtime"]]] for line in lines if line.split())
    assert f"{report['speedup']:.2f}x" in text and "like-for-like" in text and "deployment" in text


def test_load_report_errors(tmp_path):
    with pytest.raises(DistillError, match=r"no report at .*missing.json: give a run directory or report.json"):
        load_report(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DistillError, match=r"malformed report .*bad.json: Expecting property name"):
        load_report(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(DistillError, match=r"malformed report .*list.json: expected an object with 'models'"):
        load_report(tmp_path / "list.json")
    (tmp_path / "row.json").write_text(json.dumps({"models": [{"name": "teacher"}], "speedup_like_for_like": {}}))
    with pytest.raises(DistillError, match=r"malformed report .*row.json: every model needs name, runtime"):
        load_report(tmp_path / "row.json")


def test_pareto_front_hand_made_example():
    #   latency, accuracy
    points = [
        (10.0, 0.90),  # teacher: slowest, most accurate -> on the front
        (2.0, 0.80),   # on the front
        (2.0, 0.70),   # as fast as the one above, less accurate -> dominated
        (3.0, 0.80),   # slower than (2, 0.80), as accurate -> dominated
        (1.0, 0.50),   # fastest -> on the front
        (5.0, 0.85),   # on the front (between 2 ms / 0.80 and 10 ms / 0.90)
        (0.5, None),   # no accuracy -> never on the front
        (None, 0.95),  # no latency -> never on the front, and dominates nothing
        (1.0, 0.50),   # an exact duplicate of a front point: neither dominates the other
    ]
    assert pareto_front(points) == [True, True, False, False, True, True, False, False, True]
    assert pareto_front([]) == []


def two_student_models() -> list[dict]:
    """A hand-made two-student run: the teacher in both runtimes, per student a baseline (PyTorch),
    the distilled student in PyTorch and as ONNX fp32 and int8."""

    def row(name, role, spec, runtime, precision, p50, r1, m, rank1):
        return {"name": name, "role": role, "student": spec, "runtime": runtime, "precision": precision,
                "provider": "CPUExecutionProvider" if runtime == "onnxruntime" else None, "params": 1, "gflops": 1.0,
                "latency_ms_p50": p50, "latency_ms_p90": p50, "throughput_ips": 1.0,
                "metrics": {"recall@1": r1, "map": m, "rank1": rank1}}

    return [
        row("teacher", "teacher", None, "torch", "fp32", 40.0, 0.90, 0.80, 0.85),
        row("teacher", "teacher", None, "onnxruntime", "fp32", 10.0, 0.90, 0.80, 0.85),
        row("student_baseline-a@0.5", "student_baseline", "a@0.5", "torch", "fp32", 8.0, 0.70, 0.60, 0.65),
        row("student-a@0.5", "student", "a@0.5", "torch", "fp32", 8.0, 0.75, 0.70, 0.68),
        row("student-a@0.5", "student", "a@0.5", "onnxruntime", "fp32", 2.0, 0.75, 0.70, 0.68),
        row("student-a@0.5", "student", "a@0.5", "onnxruntime", "int8", 1.0, 0.74, 0.68, 0.60),
        row("student_baseline-b@1", "student_baseline", "b@1", "torch", "fp32", 16.0, 0.80, 0.70, 0.80),
        row("student-b@1", "student", "b@1", "torch", "fp32", 16.0, 0.85, 0.75, 0.83),
        row("student-b@1", "student", "b@1", "onnxruntime", "fp32", 5.0, 0.84, 0.74, 0.82),
    ]


def test_two_students_rows_speedups_kept_gain_and_front():
    report = build_report(two_student_models(), CONFIG, ONNX, protocol="retrieval", target_accuracy=0.9)
    by = {(m["name"], m["runtime"], m["precision"]): m for m in report["models"]}
    int8 = by["student-a@0.5", "onnxruntime", "int8"]
    assert int8["speedup"] == 40.0 / 1.0 and int8["speedup_like_for_like"] == 10.0 / 1.0
    assert int8["kept"] == {"recall@1": 0.74 / 0.90, "map": 0.68 / 0.80}
    assert int8["drop"] == {"recall@1": 0.90 - 0.74, "map": 0.80 - 0.68}
    assert int8["gain"] == {"recall@1": 0.74 - 0.70, "map": 0.68 - 0.60}  # vs its own baseline, not b's
    assert by["student-b@1", "onnxruntime", "fp32"]["gain"] == {"recall@1": 0.84 - 0.80, "map": 0.74 - 0.70}
    assert by["student_baseline-b@1", "torch", "fp32"]["gain"] is None and by["teacher", "torch", "fp32"]["drop"] is None
    # R@1 fronts: 1 ms 0.74, 2 ms 0.75, 5 ms 0.84, 10 ms (teacher ORT) 0.90; the rest are slower and no better
    assert [(m["name"], m["runtime"], m["precision"]) for m in report["models"] if m["pareto"]] == [
        ("teacher", "onnxruntime", "fp32"), ("student-a@0.5", "onnxruntime", "fp32"),
        ("student-a@0.5", "onnxruntime", "int8"), ("student-b@1", "onnxruntime", "fp32"),
    ]
    # top-level keys keep their meaning with the first distilled student
    assert report["speedup"] == 40.0 / 2.0 and report["speedup_like_for_like"] == {"torch": 40.0 / 8.0, "onnxruntime": 10.0 / 2.0}
    assert report["distillation_gain"]["recall@1"] == pytest.approx(0.75 - 0.70)
    # b keeps 93%/92.5% in ONNX Runtime and 94%/94% in PyTorch; its baseline (89% R@1) and a do not
    target = report["target"]
    assert target["met"] is True and target["best"]["name"] == "student-b@1" and target["best"]["runtime"] == "onnxruntime"
    assert "2 of 7 student rows keep >= 90% of the teacher's R@1/mAP; fastest: student-b@1 (onnxruntime fp32)" in target["message"]


def test_no_student_meets_the_target_and_the_closest_is_named():
    report = build_report(two_student_models(), CONFIG, ONNX, protocol="retrieval", target_accuracy=0.95)
    # smallest of the two shares: b torch 0.75/0.80 = 93.75% is the best
    assert report["target"]["met"] is False
    assert report["target"]["message"] == (
        "no student keeps 95% of the teacher's R@1/mAP; closest: student-b@1 (torch fp32) keeps 94%/94% (2.50x like-for-like)"
    )
    assert "**Target**: no student keeps 95%" in to_markdown(report)


@pytest.mark.parametrize("value, target, text", [
    (0.896, 0.9, "89.6%"), (0.8996, 0.9, "89.96%"), (0.89999, 0.9, "89.999%"), (0.8999999, 0.9, "just under 90%"), (0.9, 0.9, "90%"),
    (0.904, 0.9, "90%"), (0.936, 0.9, "94%"), (0.5, 0.9, "50%"),
])
def test_a_share_just_under_the_target_does_not_print_as_the_target(value, target, text):
    assert percent_beside(value, target) == text


def test_reid_columns_use_rank1_and_the_caption_says_why():
    report = build_report(two_student_models(), CONFIG, ONNX, protocol="reid")
    assert report["accuracy_metrics"] == ["rank1", "map"] and report["pareto_metric"] == "map"
    int8 = next(m for m in report["models"] if m["precision"] == "int8")
    assert int8["drop"] == {"rank1": pytest.approx(0.85 - 0.60), "map": pytest.approx(0.80 - 0.68)}
    md = to_markdown(report)
    assert "drop rank-1/mAP" in md and REID_NOTE in md
    assert REID_NOTE not in to_markdown(build_report(two_student_models(), CONFIG, ONNX, protocol="retrieval"))


def test_plot_one_marker_per_row_legend_outside_front_and_teacher_drawn():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    report = build_report(two_student_models(), CONFIG, ONNX, protocol="retrieval")
    fig = speed_accuracy_figure(report)
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    offsets = [tuple(p) for c in ax.collections for p in c.get_offsets()]
    assert sorted(offsets) == sorted((m["latency_ms_p50"], m["metrics"]["recall@1"]) for m in report["models"])
    legend = ax.get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    for m in report["models"]:  # every row named once in the legend (no text next to the points)
        assert labels.count(f"{m['name']} · {m['runtime']} {m['precision']}") == 1
    assert not ax.texts
    renderer = fig.canvas.get_renderer()
    assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1  # legend right of the axes
    front = next(line for line in ax.lines if line.get_label() == "Pareto front")
    assert sorted(set(zip(*front.get_data()))) >= [(1.0, 0.74), (2.0, 0.75), (5.0, 0.84), (10.0, 0.90)]
    teacher = next(line for line in ax.lines if line.get_label() == "teacher R@1")
    assert set(teacher.get_ydata()) == {0.90}
    png = write_report(report, Path(tempfile.mkdtemp()))["png"].read_bytes()
    assert png[:8] == PNG_MAGIC


def test_report_row_of_a_torch_model_and_of_an_onnx_file():
    bench = {"runtime": "torch", "latency_ms": 2.5, "throughput_ips": 400.0}
    metrics = {"recall@1": 0.5}
    torch_row = report_row("student", "student", "tiny", bench, (1000, 0.25), metrics)
    assert torch_row == {"name": "student", "role": "student", "student": "tiny", "precision": "fp32", "runtime": "torch",
                         "latency_ms": 2.5, "throughput_ips": 400.0, "params": 1000, "gflops": 0.25, "metrics": metrics}
    info = {"path": "out/student.int8.onnx", "precision": "int8", "max_abs_diff": 0.01, "opset": 17}
    onnx_row = report_row("teacher", "teacher", None, bench | {"runtime": "onnxruntime"}, (None, None), metrics, info)
    assert onnx_row == {"name": "teacher", "role": "teacher", "student": None, "precision": "int8", "runtime": "onnxruntime",
                        "latency_ms": 2.5, "throughput_ips": 400.0, "params": None, "gflops": None, "metrics": metrics,
                        "onnx_file": "out/student.int8.onnx", "max_abs_diff": 0.01}
    report = build_report([torch_row, onnx_row], {}, info)  # build_report takes the rows as they are
    assert [(m["name"], m["precision"]) for m in report["models"]] == [("student", "fp32"), ("teacher", "int8")]


def test_share_of_the_teachers_lead_kept_by_hand():
    report = build_report(two_student_models(), CONFIG, ONNX, protocol="retrieval")
    by = {(m["name"], m["runtime"], m["precision"]): m for m in report["models"]}
    # a: teacher 0.90/0.80, baseline 0.70/0.60; distilled 0.75/0.70 (PyTorch), 0.74/0.68 (int8)
    assert by["student-a@0.5", "torch", "fp32"]["lead_kept"] == {"recall@1": pytest.approx(0.05 / 0.20), "map": pytest.approx(0.10 / 0.20)}
    assert by["student-a@0.5", "onnxruntime", "int8"]["lead_kept"] == {"recall@1": pytest.approx(0.04 / 0.20), "map": pytest.approx(0.08 / 0.20)}
    # b: teacher 0.90/0.80, baseline 0.80/0.70, distilled 0.85/0.75
    assert by["student-b@1", "torch", "fp32"]["lead_kept"] == {"recall@1": pytest.approx(0.5), "map": pytest.approx(0.5)}
    assert by["teacher", "torch", "fp32"]["lead_kept"] is None and by["student_baseline-b@1", "torch", "fp32"]["lead_kept"] is None
    assert report["share_of_lead_kept"] == by["student-a@0.5", "torch", "fp32"]["lead_kept"]
    assert "**Share of the teacher's lead kept** (R@1/mAP): 25%/50%" in to_markdown(report)
    console = Console(file=io.StringIO(), width=300, record=True)
    print_report(report, console)
    assert "share of the teacher's lead kept (R@1/mAP): 25%/50%" in console.export_text()


def test_no_lead_to_keep_when_the_teacher_does_not_lead():
    models = two_student_models()
    models[2]["metrics"]["recall@1"] = 0.95  # a's baseline beats the teacher's 0.90 R@1
    models[2]["metrics"]["map"] = 0.80  # and ties its mAP
    report = build_report(models, CONFIG, ONNX, protocol="retrieval")
    assert report["share_of_lead_kept"] == {"recall@1": None, "map": None}
    assert "**Share of the teacher's lead kept** (R@1/mAP): -/-" in to_markdown(report)


def single_student(baseline_r1: float, student_r1: float, onnx_ms: float = 2.0, baseline_onnx_ms: float = 2.1) -> list[dict]:
    """Teacher, baseline and distilled student, each in PyTorch and ONNX Runtime (same accuracy in both)."""

    def row(name, role, runtime, p50, r1, m, file):
        return {"name": name, "role": role, "student": "nin_bn@0.5" if role != "teacher" else None, "runtime": runtime,
                "precision": "fp32", "params": 1, "gflops": 1.0, "latency_ms_p50": p50, "latency_ms_p90": p50,
                "throughput_ips": 1.0, "metrics": {"recall@1": r1, "map": m}} | (
                    {"onnx_file": file} if runtime == "onnxruntime" else {"file": file})

    return [
        row("teacher", "teacher", "torch", 40.0, 0.90, 0.80, "/r/teacher.pt"),
        row("student_baseline", "student_baseline", "torch", 20.0, baseline_r1, baseline_r1 - 0.1, "/r/student_baseline.pt"),
        row("student_baseline", "student_baseline", "onnxruntime", baseline_onnx_ms, baseline_r1, baseline_r1 - 0.1, "/r/student_baseline.onnx"),
        row("student", "student", "torch", 20.0, student_r1, student_r1 - 0.1, "/r/student.pt"),
        row("student", "student", "onnxruntime", onnx_ms, student_r1, student_r1 - 0.1, "/r/student.onnx"),
    ]


def test_the_baseline_wins_so_the_verdict_says_ship_the_baseline():
    # the baseline's ONNX file measured a little slower than the student's (the same graph: timing noise)
    report = build_report(single_student(baseline_r1=0.86, student_r1=0.84), CONFIG, ONNX, target_accuracy=0.9)
    verdict = report["verdict"]
    assert verdict["ship"]["role"] == "student_baseline" and verdict["ship"]["file"] == "/r/student_baseline.onnx"
    assert verdict["students"][0]["helped"] == "no"
    assert verdict["message"] == (
        "distillation did not help nin_bn@0.5 (R@1 -0.020, mAP -0.020 over the student trained alone; one run is noisy: "
        "`distill study` gives an interval); ship the baseline: /r/student_baseline.onnx (student_baseline, onnxruntime fp32, "
        "keeps 96%/95% of the teacher's R@1/mAP, 19.0x the teacher's speed)"
    )
    assert f"**Verdict**: {verdict['message']}" in to_markdown(report)
    console = Console(file=io.StringIO(), width=400, record=True)
    print_report(report, console)
    assert console.export_text().rstrip().splitlines()[-1] == f"verdict: {verdict['message']}"


def test_distillation_helps_so_the_distilled_onnx_file_is_shipped():
    report = build_report(single_student(baseline_r1=0.80, student_r1=0.86, onnx_ms=2.2), CONFIG, ONNX, target_accuracy=0.9)
    verdict = report["verdict"]
    assert verdict["students"][0]["helped"] == "yes" and verdict["ship"]["file"] == "/r/student.onnx"
    assert verdict["message"].startswith("distillation helped nin_bn@0.5 (R@1 +0.060, mAP +0.060 over the student trained alone")


def test_an_onnx_row_is_preferred_over_an_equally_accurate_slower_row():
    models = single_student(baseline_r1=0.50, student_r1=0.60)
    for target in (0.6, 0.99):  # met (the fastest meeting it) and not met (the closest, then the fastest)
        report = build_report(models, CONFIG, ONNX, target_accuracy=target)
        ship = report["verdict"]["ship"]
        assert (ship["name"], ship["runtime"], ship["file"]) == ("student", "onnxruntime", "/r/student.onnx"), target
    assert "the closest to the 99% target" in report["verdict"]["message"]
    # reversed row order: still the ONNX file
    report = build_report(models[::-1], CONFIG, ONNX, target_accuracy=0.99)
    assert report["verdict"]["ship"]["runtime"] == "onnxruntime"


def test_two_students_never_ship_a_distilled_student_its_baseline_beats():
    models = two_student_models()
    for m in models:  # a's distillation lost: -0.039 R@1 / -0.027 mAP
        if m["name"].startswith("student-a"):
            m["metrics"] = {"recall@1": 0.70 - 0.039, "map": 0.60 - 0.027, "rank1": 0.6}
    # the baseline exported like the student: fp32 and int8, timed a little slower (the same graphs: timing noise)
    models.append(dict(models[2], runtime="onnxruntime", latency_ms_p50=2.05, onnx_file="/r/student_baseline-a@0.5.onnx"))
    models.append(dict(models[2], runtime="onnxruntime", precision="int8", latency_ms_p50=1.05,
                       metrics={"recall@1": 0.69, "map": 0.59, "rank1": 0.6}, onnx_file="/r/student_baseline-a@0.5.int8.onnx"))
    verdict = build_report(models, CONFIG, ONNX, target_accuracy=0.7)["verdict"]
    assert [s["helped"] for s in verdict["students"]] == ["no", "yes"]
    assert (verdict["ship"]["name"], verdict["ship"]["precision"]) == ("student_baseline-a@0.5", "int8")  # the fastest graph
    assert "ship the baseline: /r/student_baseline-a@0.5.int8.onnx" in verdict["message"]
    verdict = build_report(models, CONFIG, ONNX, target_accuracy=0.74)["verdict"]  # int8 keeps < 74% of the teacher's mAP
    assert (verdict["ship"]["name"], verdict["ship"]["precision"]) == ("student_baseline-a@0.5", "fp32")
    assert "ship the baseline: /r/student_baseline-a@0.5.onnx" in verdict["message"]


def test_without_a_baseline_the_verdict_says_it_cannot_tell():
    models = [m for m in single_student(0.8, 0.85) if m["role"] != "student_baseline"]
    verdict = build_report(models, CONFIG, ONNX, target_accuracy=0.9)["verdict"]
    assert verdict["students"][0]["helped"] is None
    assert verdict["message"].startswith("no baseline was trained for nin_bn@0.5, so whether distillation helped it is unknown; ship /r/student.onnx")


def test_reprinting_a_saved_report_loads_no_torch(tmp_path):
    """``distill report`` re-prints a report without torch or scikit-learn (seconds of start-up):
    the report reads each protocol's headline metrics from ``distill.headlines``."""
    write_report(build_report(fake_models(0), CONFIG, ONNX, protocol="reid"), tmp_path)
    code = ("import sys; from typer.testing import CliRunner; from distill.cli import app; "
            "result = CliRunner().invoke(app, ['report', sys.argv[1]]); "
            "print(result.exit_code, 'deployment speedup' in result.output, [m for m in ('torch', 'sklearn') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1:] == ["0 True []"], done.stdout + done.stderr


def test_comparison_files_are_the_teachers_and_baselines_own_less_the_shipped_one(tmp_path):
    from distill.run import comparison_files

    out = tmp_path / "r"
    rows = [{"role": "teacher", "name": "teacher"}, {"role": "teacher", "onnx_file": str(out / "teacher.onnx")},
            {"role": "teacher", "onnx_file": str(tmp_path / "given.onnx")},  # not written by the run: never removed
            {"role": "student_baseline", "file": str(out / "student_baseline.pt")},
            {"role": "student_baseline", "onnx_file": str(out / "student_baseline.onnx")},
            {"role": "student", "file": str(out / "student.pt")}, {"role": "student", "onnx_file": str(out / "student.onnx")}]
    ships = lambda name: {"models": rows, "target": {"best": {"file": str(out / name)}}}  # noqa: E731
    assert comparison_files(ships("student.onnx"), out) == [out / "student_baseline.onnx", out / "student_baseline.pt", out / "teacher.onnx"]
    assert comparison_files(ships("student_baseline.onnx"), out) == [out / "student_baseline.pt", out / "teacher.onnx"]
    assert comparison_files({"models": rows, "target": {"best": None}}, out)[-1] == out / "teacher.onnx"
