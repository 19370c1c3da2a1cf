"""The command line end to end on a tiny embedded data set, and its one-line errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from distill import bench
from distill.cli import app
from distill.config_load import load_config
from distill.data import base
from distill.data.dataset import ImageDataset, stack_labels
from distill.data.synthetic import load_synthetic
from distill.evaluate import reid_metrics, retrieval_metrics
from distill.models import load_model
from distill.data.prepare import prepare_data

runner = CliRunner()
TINY = ["--image-size", "32x16", "--epochs", "1", "--teacher-epochs", "1", "--batch-size", "16", "--bench-iters", "2", "--min-steps", "0",
        "--teacher-min-steps", "0", "--no-retry-lr"]  # 3 steps of training learn nothing: no retry (tested in test_retry)


@pytest.fixture
def tiny_data(monkeypatch):
    """`synthetic` shrunk to 8 train / 4 test identities so a whole run takes seconds."""
    small = dict(train_ids=8, test_ids=4, images_per_id=8, height=32, width=16)
    monkeypatch.setitem(base._LOADERS, "synthetic", lambda path=None, **o: load_synthetic(path, **small))
    monkeypatch.setattr(bench, "BUDGET_S", 0.0)  # one round of timed calls: speed is not what these tests check


def test_run_writes_report_and_a_matching_onnx_and_reuses_the_teacher(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--teacher", "inception_bn", "--student", "nin_bn", "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    for name in ("report.json", "report.md", "speed_vs_accuracy.png", "teacher.pt", "student.pt", "student.onnx"):
        assert (out / name).is_file(), name

    report = json.loads((out / "report.json").read_text())
    assert {(m["name"], m["runtime"]) for m in report["models"]} == {
        ("teacher", "torch"), ("teacher", "onnxruntime"), ("student_baseline", "torch"), ("student_baseline", "onnxruntime"),
        ("student", "torch"), ("student", "onnxruntime"),
    }
    # the baseline is exported and scored like the student; then the files only its rows needed are removed
    shipped = report["verdict"]["ship"]["file"]
    comparison = {"teacher.onnx", "student_baseline.pt", "student_baseline.onnx"} - {shipped.removeprefix(f"{out}/")}
    assert sorted(report["removed_files"]) == sorted(comparison) and not any((out / name).exists() for name in comparison)
    assert f"`{sorted(comparison)[0]}`" in (out / "report.md").read_text() and "--keep-comparison-files keeps them" in result.output
    assert not (out / "cache").exists()  # the teacher-output cache goes with the checkpoints
    assert "".join(f"verdict: {report['verdict']['message']}".split()) in "".join(result.output.split())  # rich wraps it
    assert report["warnings"] and all("near chance on validation" in w for w in report["warnings"])  # 3 steps of training
    assert report["verdict"]["ship"]["file"] in {str(out / f) for f in ("student.onnx", "student_baseline.onnx", "student.pt", "student_baseline.pt")}
    assert set(report["selection"]) == {"teacher", "student_baseline", "student"}
    assert all(fit["best_epoch"] == fit["last_epoch"] == 1 for fit in report["selection"].values())  # one epoch each
    for m in report["models"]:
        assert set(m["metrics"]) >= {"recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map", "rank1"}
        assert m["latency_ms_p50"] > 0 and m["throughput_ips"] > 0 and m["params"] > 0
    by = {(m["name"], m["runtime"]): m for m in report["models"]}
    assert report["speedup"] == pytest.approx(by["teacher", "torch"]["latency_ms_p50"] / by["student", "onnxruntime"]["latency_ms_p50"])
    assert report["onnx"]["max_abs_diff"] <= 1e-4
    assert report["config"]["epochs"] == 1 and report["config"]["image_size"] == [32, 16]

    student, _ = load_model(out / "student.pt")
    images = torch.randn(3, 3, 32, 16)
    expected = student(images)[0].detach().numpy()
    got = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"]).run(None, {"images": images.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)

    again = runner.invoke(app, ["run", "--out", str(out), "--no-baseline", *TINY])
    assert again.exit_code == 0, again.output
    assert "reusing the teacher trained earlier" in again.output
    assert {m["name"] for m in json.loads((out / "report.json").read_text())["models"]} == {"teacher", "student"}

    shown = runner.invoke(app, ["report", str(out)])
    assert shown.exit_code == 0 and "student" in shown.output

    # the model file remembers its input size (32x16), so eval and export need no --image-size
    evaluated = runner.invoke(app, ["eval", "--checkpoint", str(out / "student.pt")])
    assert evaluated.exit_code == 0, evaluated.output
    assert all(k in evaluated.output for k in ("recall@1", "map", "nmi", "f1"))
    quick = runner.invoke(app, ["eval", "--checkpoint", str(out / "student.pt"), "--no-clustering"])
    assert quick.exit_code == 0 and "recall@1" in quick.output and "nmi" not in quick.output and "f1" not in quick.output
    exported = runner.invoke(app, ["export", "--checkpoint", str(out / "student.pt"), "-o", str(tmp_path / "s.onnx")])
    assert exported.exit_code == 0, exported.output
    session = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[2:] == [32, 16]


def metrics_by_hand(model, image_size) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Test-set metrics from a model's own outputs: the eval-transformed test images through an ONNX
    Runtime session (``model`` an ONNX file) or a PyTorch module, written out here, then the
    (separately tested) metric functions. Returns the metrics, the query images and the query embeddings."""
    data = prepare_data(load_config(None, image_size=image_size))
    if isinstance(model, torch.nn.Module):
        def forward(images):
            with torch.no_grad():
                return model.eval()(images)[0]  # (embedding, logits)
    else:
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])

        def forward(images):
            return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])

    def embed(samples):
        images = torch.stack([ImageDataset(samples, data.eval_transform)[i][0] for i in range(len(samples))])
        return forward(images), images

    (qf, q_images), (gf, _) = embed(data.splits.query), embed(data.splits.gallery)
    (q_labels, q_cams), (g_labels, g_cams) = stack_labels(data.splits.query), stack_labels(data.splits.gallery)
    reid = reid_metrics(qf, gf, q_labels, g_labels, q_cams, g_cams)
    pooled = retrieval_metrics(torch.cat([qf, gf]), torch.cat([q_labels, g_labels]), clustering=False)
    return {"recall@1": pooled["recall@1"], "map": reid["map"], "rank1": reid["rank1"]}, q_images, qf


def test_eval_layer_scores_a_layers_pooled_output_as_a_run_reads_it(tiny_data, tmp_path):
    """``eval --layer NAME`` scores the global-average-pooled, L2-normalised output of that layer
    (what ``--teacher-layer NAME`` distils from), computed here by a hook on the plain model; an
    unknown layer and an ONNX file each end in one message."""
    from distill.export import export_onnx
    from distill.models import save_model
    from distill.students import create_student

    torch.manual_seed(0)
    model = create_student("nin_bn", 16, 8, width=0.25).eval()
    save_model(tmp_path / "s.pt", model, "nin_bn", width=0.25, image_size=[32, 16])
    layer = "backbone.layers.2"
    kept = {}
    dict(model.named_modules())[layer].register_forward_hook(lambda m, args, out: kept.update(out=out))

    class PooledByHand(torch.nn.Module):
        def forward(self, images):
            model(images)
            out = kept["out"].double()
            pooled = torch.stack([out[i].reshape(out.shape[1], -1).mean(dim=1) for i in range(len(out))])
            return (pooled / pooled.norm(dim=1, keepdim=True)).float(), None

    result = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "s.pt"), "--no-clustering", "--layer", layer])
    assert result.exit_code == 0, result.output
    rows = [line.strip("│ ").split("│") for line in result.output.splitlines() if "│" in line]
    scored = {k.strip(): float(v) for k, v in rows if k.strip() != "metric"}
    by_hand, _, _ = metrics_by_hand(PooledByHand(), "32x16")
    own, _, _ = metrics_by_hand(model, "32x16")
    for k in by_hand:
        assert scored[k] == pytest.approx(float(by_hand[k]), abs=1e-4), k
    assert any(abs(float(by_hand[k]) - float(own[k])) > 1e-3 for k in by_hand)  # not the embedding's scores

    unknown = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "s.pt"), "--layer", "backbone.nowhere"])
    assert unknown.exit_code == 2 and "the model has no layer 'backbone.nowhere'" in " ".join(unknown.output.split())
    export_onnx(model, tmp_path / "s.onnx", (32, 16))
    onnx_layer = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "s.onnx"), "--layer", layer])
    message = f"{tmp_path / 's.onnx'} runs in ONNX Runtime, which gives only its output: --layer needs a distill model file"
    assert onnx_layer.exit_code == 2 and message in " ".join(onnx_layer.output.split())


def test_two_students_each_with_and_without_distillation_every_onnx_row_scored_in_onnx_runtime(tiny_data, tmp_path):
    out = tmp_path / "two"
    result = runner.invoke(app, ["run", "--student", "nin_bn@0.25,nin_bn@0.5", "--export-precision", "int8,int8-static",
                                 "--no-clustering", "--keep-comparison-files", "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    rows = {(m["name"], m["runtime"], m["precision"]): m for m in report["models"]}
    expected = {("teacher", "torch", "fp32"), ("teacher", "onnxruntime", "fp32")}
    for spec in ("nin_bn@0.25", "nin_bn@0.5"):
        for name in ("student_baseline", "student"):
            expected |= {(f"{name}-{spec}", "torch", "fp32"), (f"{name}-{spec}", "onnxruntime", "int8"),
                         (f"{name}-{spec}", "onnxruntime", "int8-static")}
        for name in (f"student_baseline-{spec}.pt", f"student-{spec}.pt", f"student-{spec}.int8.onnx", f"student-{spec}.int8-static.onnx",
                     f"student_baseline-{spec}.int8.onnx"):
            assert (out / name).is_file(), name
        assert load_model(out / f"student-{spec}.pt")[1]["width"] == float(spec.split("@")[1])
        base_row = rows[f"student_baseline-{spec}", "torch", "fp32"]
        for precision in ("int8", "int8-static"):
            row = rows[f"student-{spec}", "onnxruntime", precision]
            assert row["student"] == spec and row["role"] == "student" and row["provider"] == "CPUExecutionProvider"
            assert row["gain"] == {k: pytest.approx(row["metrics"][k] - base_row["metrics"][k]) for k in ("rank1", "map")}
    assert set(rows) == expected
    assert not (out / "student.pt").exists()  # several students: every file is named after its student
    assert report["protocol"] == "reid" and report["accuracy_metrics"] == ["rank1", "map"] and "machine" in report
    assert " ".join(report["target"]["message"].split()) in " ".join(result.output.split())  # printed (rich wraps it)

    # the int8 row's metrics are those of the int8 file run in ONNX Runtime, not copied from PyTorch
    row = rows["student-nin_bn@0.5", "onnxruntime", "int8"]
    assert row["onnx_file"] == str(out / "student-nin_bn@0.5.int8.onnx")
    by_hand, images, _ = metrics_by_hand(row["onnx_file"], [32, 16])
    for key, value in by_hand.items():
        assert row["metrics"][key] == pytest.approx(value, abs=1e-6), key
    student, _ = load_model(out / "student-nin_bn@0.5.pt")
    with torch.no_grad():
        torch_emb = student.eval()(images)[0].numpy()
    ort_emb = ort.InferenceSession(row["onnx_file"], providers=["CPUExecutionProvider"]).run(None, {"images": images.numpy()})[0]
    assert 0 < np.abs(ort_emb - torch_emb).max() < 0.1  # quantised: close to, but not, the PyTorch embedding

    # int8 is dynamic quantisation; int8-static has activation scales fixed by calibration
    ops = {p: {n.op_type for n in onnx.load(out / f"student-nin_bn@0.5.{p}.onnx").graph.node} for p in ("int8", "int8-static")}
    assert "DynamicQuantizeLinear" in ops["int8"] and "DynamicQuantizeLinear" not in ops["int8-static"]
    assert "QuantizeLinear" in ops["int8-static"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--teacher", "resnet_huge"], "unknown teacher 'resnet_huge'; known: inception_bn"),
        (["--student", "tiny"], "unknown student 'tiny'; known: nin_bn"),
        (["--darkrank", "medium"], "--darkrank must be one of hard, soft, got 'medium'"),
        (["--teacher", "timm:resnet18"], "needs local weights (nothing is downloaded)"),
        (["--teacher", "onnx:/nonexistent/t.onnx"], "ONNX teacher file not found"),
        (["--data", "nowhere"], "unknown data set 'nowhere'"),
        (["--data", "market1501:/nonexistent"], "/nonexistent"),
        (["--lr", "-1"], "lr (--lr) must be > 0, got -1"),
        (["--lr", "0"], "lr (--lr) must be > 0, got 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    result = runner.invoke(app, ["run", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 2  # one line (rich may wrap it once)


def test_train_takes_one_student(tmp_path):
    result = runner.invoke(app, ["train", "--student", "nin_bn@0.25,nin_bn@0.5", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "train takes one student: give one spec to --student, or use `distill run` for several" in " ".join(result.output.split())


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = runner.invoke(app, ["run", "--out", str(blocker / "sub")])
    assert result.exit_code == 2
    assert "cannot write to output directory" in result.output


def test_list_shows_every_registry():
    from distill.losses.registry import entries

    result = runner.invoke(app, ["list"], env={"COLUMNS": "400"})  # one line per loss
    assert result.exit_code == 0
    for name in ("inception_bn", "nin_bn", "synthetic", "market1501", "triplet", "hdml-triplet"):
        assert name in result.output
    rows = {line.split("│")[2].strip(): line for line in result.output.splitlines() if line.count("│") == 5}
    for kind, option in (("task", "--loss"), ("distill", "--distill")):
        for name, entry in entries(kind).items():  # every loss, with each of its defaults
            assert option in rows[name] and entry.summary in rows[name]
            assert all(f"{k}={'unset' if v is None else v}" in rows[name] for k, v in entry.defaults.items())
    assert "triplet_margin=0.2, triplet_mining=hard" in rows["triplet"] and "kd_temperature=1.0" in rows["kd"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kd-weight", "1"], 'error: kd_weight was replaced by --distill: use --distill kd=1,darkrank=0.02 (in a TOML file: distill = "kd=1,darkrank=0.02")'),
        (["--darkrank", "none", "--pkt-weight", "2"], 'error: pkt_weight, darkrank = "none" were replaced by --distill: use --distill kd=3,pkt=2 '),
        (["--compat-weight", "1"], "error: compat_weight was replaced by --distill: use --distill kd=3,darkrank=0.02,compat=1 "),
    ],
)
def test_replaced_options_fail_with_one_line_naming_the_distill_spec(args, message, tmp_path):
    result = runner.invoke(app, ["run", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2 and not (tmp_path / "o").exists()
    assert " ".join(result.output.split()).startswith(message)
    assert "--kd-weight" not in runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output  # hidden


def test_the_teacher_gate_warns_records_and_can_fail_the_run(tiny_data, tmp_path):
    out = tmp_path / "gate"
    # a margin of 1 cannot be met: the teacher is never "clearly better" by a whole point of R@1/mAP
    warned = runner.invoke(app, ["run", "--out", str(out), "--gate-margin", "1", *TINY])
    assert warned.exit_code == 0, warned.output
    text = " ".join(warned.output.split())
    assert "warning: teacher gate: validation map with training distractors teacher" in text
    assert "the teacher is not clearly better" in text
    gate = json.loads((out / "report.json").read_text())["teacher_gate"]
    assert gate["verdict"] == "not better" and gate["metric"] == "map with training distractors" and gate["margin"] == 1
    assert 0 <= gate["teacher"] <= 1 and 0 <= gate["baseline"] <= 1
    assert "**Teacher gate**: validation map with training distractors teacher" in (out / "report.md").read_text()

    failed = runner.invoke(app, ["run", "--out", str(out), "--gate-margin", "1", "--require-better-teacher", *TINY])
    assert failed.exit_code == 1
    assert "--require-better-teacher" in " ".join(failed.output.split()) and "Traceback" not in failed.output

    passed = runner.invoke(app, ["run", "--out", str(out), "--gate-margin", "0", *TINY, "--val-fraction", "0"])
    assert passed.exit_code == 0, passed.output
    assert json.loads((out / "report.json").read_text())["teacher_gate"]["verdict"] == "skipped"


def test_run_prints_the_inputs_it_chose_for_the_data(tiny_data, tmp_path):
    args = ["--teacher-epochs", "1", "--batch-size", "16", "--teacher-min-steps", "0"]  # train-teacher takes no student option
    result = runner.invoke(app, ["train-teacher", "--out", str(tmp_path / "t"), *args])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "chosen for synthetic: input 64x32, augmentation 'none'" in text
    assert "48 train images of 6 identities, 16 validation images of held-out identities" in text


def test_eval_scores_a_model_file_and_its_onnx_export_alike(tiny_data, tmp_path):
    """``eval`` takes any model file distill writes: a ``.pt`` by its recorded input size, an exported
    ``.onnx`` in ONNX Runtime by its graph's input size; the ONNX scores are those computed by hand."""
    from distill.export import export_onnx
    from distill.models import save_model
    from distill.students import create_student

    torch.manual_seed(0)
    model = create_student("nin_bn", 16, 8, width=0.25).eval()
    save_model(tmp_path / "s.pt", model, "nin_bn", width=0.25, image_size=[32, 16])
    export_onnx(model, tmp_path / "s.onnx", (32, 16))

    def scores(path, *extra):
        result = runner.invoke(app, ["eval", "--checkpoint", str(path), "--no-clustering", *extra])
        assert result.exit_code == 0, result.output
        rows = [line.strip("│ ").split("│") for line in result.output.splitlines() if "│" in line]
        return {k.strip(): float(v) for k, v in rows if k.strip() != "metric"}

    from_onnx, from_pt = scores(tmp_path / "s.onnx"), scores(tmp_path / "s.pt")
    assert set(from_onnx) == set(from_pt) >= {"recall@1", "map", "rank1"}
    onnx_by_hand, _, onnx_emb = metrics_by_hand(tmp_path / "s.onnx", "32x16")
    pt_by_hand, _, pt_emb = metrics_by_hand(model, "32x16")
    for k in onnx_by_hand:
        assert from_onnx[k] == pytest.approx(float(onnx_by_hand[k]), abs=1e-4), k
        assert from_pt[k] == pytest.approx(float(pt_by_hand[k]), abs=1e-4), k
    # fp32 ONNX is the same model up to rounding; the metrics themselves may differ by a near-tied
    # neighbour of this untrained model (R@1 by 2 of 32 queries with one OpenMP thread)
    torch.testing.assert_close(onnx_emb, pt_emb, rtol=1e-4, atol=1e-5)

    unfixed = tmp_path / "dynamic.onnx"
    graph = onnx.load(tmp_path / "s.onnx")
    for d in graph.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_param = "side"
    onnx.save(graph, unfixed)
    result = runner.invoke(app, ["eval", "--checkpoint", str(unfixed)])
    assert result.exit_code == 2 and f"{unfixed} has no fixed input size in its graph: give --image-size HxW" in " ".join(result.output.split())
    assert scores(unfixed, "--image-size", "32x16") == from_onnx
