"""Report: schema, both speedups, drop/gain, JSON round trip, Markdown, PNG, console table, load errors."""

from __future__ import annotations

import io
import json
import random

import matplotlib.image
import pytest
from rich.console import Console

from distill.errors import DistillError
from distill.report import METRICS, build_report, load_report, print_report, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_models(seed: int, baseline: bool = True, teacher_ort: bool = True) -> list[dict]:
    """Entries as the pipeline builds them: random latencies and metrics, one entry per model/runtime."""
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
                           "protocol", "accuracy_metrics", "pareto_metric", "target"}
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
