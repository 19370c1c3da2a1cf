"""Runs you can trust (issue 11) through the command line: the cached teacher never overrides given
weights or options, --seed fixes the teacher, one run per --out, empty model files, one-line warnings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import image_folder
from distill.cli import app
from distill.models import save_model
from distill.students import create_student
from tests.test_cli import tiny_data  # noqa: F401  (fixture)

runner = CliRunner()
TEACHER = ["--image-size", "32x16", "--teacher-epochs", "1", "--batch-size", "16", "--teacher-min-steps", "0"]


def train_teacher(out, *extra):
    return runner.invoke(app, ["train-teacher", "--out", str(out), *TEACHER, *extra])


def one_line_error(result, message: str, code: int = 2) -> None:
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    error = result.output[result.output.index("error:"):]
    assert message in error and len(error.strip().splitlines()) <= 2  # one line (rich may wrap it once)


def weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.fixture
def teacher_run(tiny_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    result = train_teacher(out, "--seed", "3")
    assert result.exit_code == 0, result.output
    return out


def test_given_teacher_weights_are_always_read_even_with_a_cached_teacher(teacher_run, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)))
    result = train_teacher(teacher_run, "--seed", "3", "--teacher-weights", str(junk))
    one_line_error(result, f"cannot read weights file {junk}: ")
    assert "reusing" not in result.output
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    one_line_error(train_teacher(teacher_run, "--seed", "3", "--teacher-weights", str(empty)),
                   f"cannot read weights file {empty}: the file is empty or cut short")


def test_the_cache_is_reused_only_when_every_teacher_option_matches(teacher_run):
    before = weights(teacher_run / "teacher.pt")
    same = train_teacher(teacher_run, "--seed", "3")
    assert same.exit_code == 0 and "reusing the teacher trained earlier" in same.output
    longer = train_teacher(teacher_run, "--seed", "3", "--teacher-epochs", "2")
    assert longer.exit_code == 0, longer.output
    assert "reusing" not in longer.output
    assert "teacher_epochs=1 (now 2)" in longer.output
    after = weights(teacher_run / "teacher.pt")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_an_empty_cached_teacher_is_trained_again(teacher_run):
    (teacher_run / "teacher.pt").write_bytes(b"")
    result = train_teacher(teacher_run, "--seed", "3")
    assert result.exit_code == 0, result.output
    assert "the cached teacher is unusable" in result.output and "Traceback" not in result.output
    assert len(weights(teacher_run / "teacher.pt")) > 0


def test_the_same_seed_gives_the_same_teacher(teacher_run, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    assert train_teacher(again, "--seed", "3").exit_code == 0
    assert train_teacher(other, "--seed", "4").exit_code == 0
    first, second, third = (weights(out / "teacher.pt") for out in (teacher_run, again, other))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], third[k]) for k in first)


def test_eval_of_an_empty_model_file_is_one_line(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    one_line_error(runner.invoke(app, ["eval", "--checkpoint", str(empty)]),
                   f"{empty} is not a distill model file (torch.load failed: the file is empty or cut short)")


def test_export_to_an_unwritable_place_is_one_line(tmp_path):
    model = tmp_path / "m.pt"
    save_model(model, create_student("nin_bn", 8, 4, width=0.25), "nin_bn", width=0.25, image_size=[32, 16])
    blocker = tmp_path / "file"
    blocker.write_text("")
    one_line_error(runner.invoke(app, ["export", "--checkpoint", str(model), "-o", str(blocker / "s.onnx")]),
                   "cannot write the ONNX file")


def test_a_second_run_on_the_same_out_is_refused_with_the_first_ones_pid(tiny_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    code = (
        "import sys; from distill.outdir import locked_out_dir\n"
        "with locked_out_dir(sys.argv[1]):\n    print('locked', flush=True); sys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        for command in (["run"], ["train-teacher"], ["train"]):
            result = runner.invoke(app, [*command, "--out", str(out), "--image-size", "32x16"])
            one_line_error(result, f"output directory {out} is in use by another distill run (pid {holder.pid})")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written by the refused runs
    finally:
        holder.communicate("", timeout=60)
    result = train_teacher(out)
    assert result.exit_code == 0, result.output  # the lock went with the first process


def test_stale_temp_files_in_out_are_removed_on_the_next_start(tiny_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    out.mkdir()
    (out / ".teacher.ckpt.x1y2.tmp").write_bytes(b"\0" * 1024)  # what SIGKILL during a checkpoint write leaves
    result = train_teacher(out)
    assert result.exit_code == 0, result.output
    assert "warning: removed 1 temp file(s) left by an interrupted run: .teacher.ckpt.x1y2.tmp" in result.output
    assert not list(out.glob(".*.tmp"))


def test_warnings_are_one_line_without_their_source(tmp_path):
    root = image_folder(tmp_path / "folder", {f"c{c}": 6 for c in range(4)})
    (root / "c3" / "broken.png").write_bytes(b"not a png")
    model = tmp_path / "m.pt"
    save_model(model, create_student("nin_bn", 8, 4, width=0.25), "nin_bn", width=0.25, image_size=[32, 16])
    result = runner.invoke(app, ["eval", "--checkpoint", str(model), "--data", f"imagefolder:{root}", "--no-clustering"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "broken.png" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: skipping 1 unreadable image(s)")
    assert "warnings.warn" not in result.output and ".py:" not in result.output


def test_a_batch_larger_than_the_identities_is_fitted_to_them_and_said(tiny_data, tmp_path):  # noqa: F811
    args = ["--out", str(tmp_path / "o"), "--image-size", "32x16", "--batch-size", "64", "--teacher-epochs", "1", "--teacher-min-steps", "0"]
    result = runner.invoke(app, ["train-teacher", *args])
    assert result.exit_code == 0, result.output
    assert "batch 24 (6 identities x 4)" in " ".join(result.output.split())
    for command in ("train-teacher", "train"):
        assert "--batch-size" in runner.invoke(app, [command, "--help"]).output


@pytest.mark.parametrize(
    "per_class, message",
    [
        ({f"c{i}": 1 for i in range(8)}, "training needs at least 2 classes with 2 or more images each, got 4 classes and 4 images: add images per class"),
        ({**{f"a{i}": 3 for i in range(4)}, **{f"b{i}": 1 for i in range(4)}}, "no test class has 2 or more images, so no query has a match"),
        ({**{f"a{i}": 3 for i in range(2)}, **{f"b{i}": 2 for i in range(2)}}, "Recall@8 needs at least 9 test images, got 4"),
    ],
)
def test_data_that_cannot_be_trained_or_evaluated_fails_before_training(tmp_path, per_class, message):
    root = image_folder(tmp_path / "folder", per_class)
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--data", f"imagefolder:{root}", "--out", str(out), "--image-size", "32x16", "--batch-size", "12"])
    one_line_error(result, f"data set 'imagefolder:{root}': {message}")
    assert "camera" not in result.output
    assert not list(out.glob("*.ckpt")) and not list(out.glob("*.pt"))  # nothing was trained


def test_reid_data_without_a_cross_camera_match_fails_before_training():
    from distill.data.base import Sample, Splits
    from distill.errors import DistillError
    from distill.data.prepare import check_splits

    train = [Sample(f"t{i}", i // 2, i % 2) for i in range(8)]
    query = [Sample("q", 10, 1)]
    splits = Splits("market1501", train, query, [Sample("g0", 10, 1), Sample("g1", 11, 2)], protocol="reid")
    with pytest.raises(DistillError, match=r"no query has an image of the same person from another camera in the gallery"):
        check_splits(splits, "market1501:/x")
    splits.gallery.append(Sample("g2", 10, 3))
    check_splits(splits, "market1501:/x")
    splits.train = train[:3]
    with pytest.raises(DistillError, match=r"training needs at least 2 identities with 2 or more images each, got 2 identities"):
        check_splits(splits, "market1501:/x")
