"""Issue 20, items 5-12: every bad input is one exact line (exit 2), never a traceback, a hang or a
wrong result. Each case fails before any training, so these tests take seconds."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from conftest import image_folder
from distill.cli import app

runner = CliRunner()


def one_line_error(args: list[str], code: int = 2) -> str:
    """Run the CLI; assert it failed with ``code`` in exactly one line; return that line."""
    result = runner.invoke(app, args)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    assert result.exit_code == code, result.output
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture
def no_training(monkeypatch):
    """A bad input must be refused before training: reaching training fails the test at once (on code
    that accepts the input, instead of a full run)."""
    from distill import engine

    def fit(*args, **kwargs):
        raise AssertionError("training started: the input was not refused")

    monkeypatch.setattr(engine, "fit", fit)


def test_no_training_stops_the_teachers_and_the_students_training(tmp_path, no_training):
    """The fixture above can fail a test: both trainings go through the ``engine.fit`` it replaces."""
    from distill.config_load import load_config
    from distill.run import setup
    from distill.students.train import train_student
    from distill.teachers.acquire import acquire_teacher

    cfg, data, device = setup(load_config(None, image_size="32x16", out=str(tmp_path / "o"), device="cpu"))
    with pytest.raises(AssertionError, match="training started"):
        acquire_teacher(cfg, data, device)
    with pytest.raises(AssertionError, match="training started"):
        train_student(cfg, data, device)


# ---------------------------------------------------------------- item 5: one type check everywhere


@pytest.mark.parametrize(
    "toml, message",
    [
        ("student = 5", "student (--student) must be a string, got 5"),
        ("device = 0", "device (--device) must be a string, got 0"),
        ("teacher = 1", "teacher (--teacher) must be a string, got 1"),
        ('data = ["x"]', "data (--data) must be a string, got ['x']"),
        ("export_precision = 32", "export_precision (--export-precision) must be a string or a list of strings, got 32"),
        ('epochs = "three"', "epochs (--epochs) must be an integer, got 'three'"),
        ('target_accuracy = "high"', "target_accuracy (--target-accuracy) must be a number, got 'high'"),
        ('seed = "x"', "seed (--seed) must be an integer, got 'x'"),
        ('resume = "no"', "resume (--resume) must be true or false, got 'no'"),
        ('amp = "no"', "amp (--amp) must be true or false, got 'no'"),
        ("darkrank_list_size = 2.5", "darkrank_list_size (--darkrank-list-size) must be an integer or 'all', got 2.5"),
        ("loss_options = 5", "loss_options (--loss-opt) must be a table of KEY = VALUE (e.g. triplet_margin = 0.3), got 5"),
        ("students = [1, 2]", "students must be a list of strings, got [1, 2]"),
    ],
)
def test_config_file_values_are_type_checked(tmp_path, no_training, toml, message):
    path = tmp_path / "c.toml"
    path.write_text(toml + "\n")
    line = one_line_error(["run", "--config", str(path), "--out", str(tmp_path / "o")])
    assert line == f"error: config file {path}: {message}"


def test_run_key_that_is_not_a_table(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("run = 5\n")
    line = one_line_error(["run", "--config", str(path), "--out", str(tmp_path / "o")])
    assert line == f"error: config file {path}: run must be a table of Config keys ([run]), got 5"


def test_non_utf8_and_directory_config_files(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b'data = "caf\xe9"\n')
    assert one_line_error(["run", "--config", str(path)]) == f"error: config file {path} is not UTF-8 text (byte 0xe9 at offset 11)"
    # item 12: a directory is named as such, not as a disk or permission problem
    assert one_line_error(["run", "--config", str(tmp_path)]) == f"error: config file {tmp_path} is a directory, not a TOML file"


def test_recipes_file_errors_through_the_cli(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("recipe = [1, 2]\n")
    line = one_line_error(["study", "--recipes-file", str(path), "--out", str(tmp_path / "o")])
    # the tool's own hint [[recipe]] prints literally (it is not rich markup)
    assert line == f'error: recipes file {path}: recipe #1 must be a [[recipe]] table (name = "..." plus Config keys), got 1'
    path.write_text('[[recipe]]\nname = "x"\nloss_options = 5\n')
    line = one_line_error(["study", "--recipes-file", str(path), "--out", str(tmp_path / "o")])
    assert line == "error: recipe 'x': loss_options (--loss-opt) must be a table of KEY = VALUE (e.g. triplet_margin = 0.3), got 5"


# ---------------------------------------------------------------- item 6: values that passed, then crashed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", "-1"], "--seed must be in [0, 2^32), got -1"),
        (["--seed", "4294967296"], "--seed must be in [0, 2^32), got 4294967296"),
        (["--device", "cudax"], "--device must be auto, cpu, cuda or cuda:N (N a GPU index), got 'cudax'"),
        (["--device", "cuda:abc"], "--device must be auto, cpu, cuda or cuda:N (N a GPU index), got 'cuda:abc'"),
        (["--student", "nin_bn@inf"], "student spec 'nin_bn@inf' must be NAME or NAME@WIDTH with a finite WIDTH > 0, e.g. nin_bn@0.5"),
        (["--student", "nin_bn@nan"], "student spec 'nin_bn@nan' must be NAME or NAME@WIDTH with a finite WIDTH > 0, e.g. nin_bn@0.5"),
        (["--workers", "-1"], "--workers must be >= 0, got -1"),
    ],
)
def test_values_that_used_to_crash_later(tmp_path, no_training, args, message):
    assert one_line_error(["run", "--out", str(tmp_path / "o"), *args]) == f"error: {message}"


@pytest.mark.parametrize("spec", ["cudax", "cuda:abc", "gpu", ""])
def test_resolve_device_checks_what_bench_and_eval_pass(spec):
    from distill.engine import resolve_device
    from distill.errors import DistillError

    with pytest.raises(DistillError) as err:
        resolve_device(spec)
    assert str(err.value) == f"--device must be auto, cpu, cuda or cuda:N (N a GPU index), got '{spec}'"


def test_a_gpu_index_beyond_the_machine_is_one_line(monkeypatch):
    import torch

    from distill.engine import resolve_device
    from distill.errors import DistillError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(DistillError) as err:
        resolve_device("cuda:3")
    assert str(err.value) == "--device cuda:3: there are only 1 CUDA device(s), numbered from 0"


# ---------------------------------------------------------------- item 7: user text is never rich markup


@pytest.mark.parametrize(
    "args, message",
    [
        (["--teacher", "[/x]"], "unknown teacher '[/x]'; known: inception_bn, timm:<name>, torchvision:<name>, onnx:<path>"),
        (["--student", "nin_bn,[bold]x"], "unknown student '[bold]x'; known: nin_bn, timm:<name>"),
        (["--data", "imagefolder:/nonexistent/a[/b]"], "imagefolder: directory not found: /nonexistent/a[/b] (it should hold one sub-directory of images per class)"),
        (["--config", "cfg/[/nope].toml"], "config file not found: cfg/[/nope].toml"),
    ],
)
def test_user_text_is_printed_literally(tmp_path, no_training, args, message):
    assert one_line_error(["run", "--out", str(tmp_path / "o"), *args]) == f"error: {message}"


# ---------------------------------------------------------------- item 8: hostile image files


def bomb_png(path) -> None:
    """A PNG whose header claims 30000 x 30000 pixels (PIL refuses it as a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


@pytest.fixture
def hostile_folder(tmp_path):
    """An ImageFolder (4 classes x 3 images) with a decompression bomb and a FIFO among the images."""
    import os
    import signal

    root = image_folder(tmp_path / "folder", {f"c{c:02d}": 3 for c in range(4)})
    bomb_png(root / "c00" / "bomb.png")
    os.mkfifo(root / "c00" / "pipe.png")
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("reading the image folder hung"))
    signal.alarm(60)  # a FIFO read blocks forever: fail instead of hanging the test session
    yield root
    signal.alarm(0)


def test_bomb_and_fifo_are_skipped_with_a_warning(hostile_folder):
    from distill.data import load_dataset

    with pytest.warns(UserWarning) as caught:
        splits = load_dataset(f"imagefolder:{hostile_folder}")
    messages = [str(w.message) for w in caught]
    c00 = hostile_folder / "c00"
    assert messages == [f"skipping 2 unreadable image(s): {c00 / 'bomb.png'}, {c00 / 'pipe.png'}"]
    assert sorted(s.path for s in splits.train) == sorted(str(c00 / f"{i}.png") for i in range(3)) + sorted(
        str(hostile_folder / "c01" / f"{i}.png") for i in range(3)
    )


def test_bomb_and_fifo_fail_with_strict(hostile_folder):
    from distill.data import load_dataset
    from distill.errors import DistillError

    c00 = hostile_folder / "c00"
    with pytest.raises(DistillError) as err:
        load_dataset(f"imagefolder:{hostile_folder}", strict=True)
    assert str(err.value) == f"2 unreadable image(s): {c00 / 'bomb.png'}, {c00 / 'pipe.png'} (drop --strict to skip them)"


def test_read_image_refuses_a_bomb_and_a_fifo(hostile_folder):
    from distill.data.dataset import read_image
    from distill.errors import DistillError

    with pytest.raises(DistillError, match=r"^corrupt or unreadable image: .*bomb.png \(Image size \(900000000 pixels\) exceeds limit"):
        read_image(str(hostile_folder / "c00" / "bomb.png"))
    with pytest.raises(DistillError) as err:
        read_image(str(hostile_folder / "c00" / "pipe.png"))
    assert str(err.value) == f"corrupt or unreadable image: {hostile_folder / 'c00' / 'pipe.png'} (not a regular file)"


# ---------------------------------------------------------------- item 9: a malformed report.json


@pytest.fixture(scope="module")
def good_report() -> dict:
    from distill.report import build_report

    bench = {"latency_ms_p50": 2.0, "latency_ms_p90": 2.5, "throughput_ips": 500.0}
    metrics = {"recall@1": 0.8, "map": 0.6}
    models = [
        {"name": "teacher", "runtime": "torch", "params": 1e6, "gflops": 1.0, "metrics": metrics, **bench, "latency_ms_p50": 8.0},
        {"name": "student", "runtime": "torch", "params": 1e5, "gflops": 0.1, "metrics": metrics, **bench},
    ]
    return build_report(models, {}, {})


SELECTED = {"best_epoch": 12, "best_score": 0.09, "last_score": 0.09, "top_score": 0.09, "top_epoch": 12}


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda r: r.update(models=[]), "'models' is empty (a report has at least the teacher's row)"),
        (lambda r: r["models"][1].update(metrics=5), "models[1].metrics must be an object of numbers, got 5"),
        (lambda r: r["models"][0].update(latency_ms_p50="fast"), "models[0].latency_ms_p50 must be a number or null, got 'fast'"),
        (lambda r: r.update(speedup_like_for_like=None), "'speedup_like_for_like' must be an object of numbers per runtime, got None"),
        (lambda r: r["models"][0].update(name=7), "models[0].name must be a string, got 7"),
        (lambda r: r.update(teacher_gate={"verdict": "better"}), "'teacher_gate' must be an object with metric, teacher, baseline, margin and verdict, got {'verdict': 'better'}"),
        (lambda r: r.update(accuracy_metrics=["speed"]), "accuracy_metrics and pareto_metric must name metrics of recall@1, map, rank1"),
        (lambda r: r.update(selection=[1]), "'selection' must be an object per model, got [1]"),
        (lambda r: r.update(selection={"student": {"best_epoch": 3, "best_score": "high"}}),
         "selection.student must hold numbers best_epoch, best_score, last_score, top_score, top_epoch (chance, untrained_score: "
         "numbers or null), got {'best_epoch': 3, 'best_score': 'high'}"),
        *[(lambda r, retry=retry: r.update(selection={"student": SELECTED | {"retry": retry}}),
           f"selection.student.retry must hold numbers lr, first_lr and first.best_score, got {retry!r}")
          for retry in ("x", {"lr": 0.001, "first_lr": None, "first": {"best_score": 0.1}},
                        {"lr": 0.001, "first_lr": 0.003, "first": []}, {"lr": 0.001, "first_lr": 0.003, "first": {"best_score": "0.1"}})],
    ],
)
def test_malformed_report_is_one_line(tmp_path, good_report, edit, problem):
    import copy
    import json

    report = copy.deepcopy(good_report)
    edit(report)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert one_line_error(["report", str(tmp_path)]) == f"error: malformed report {path}: {problem}"


def test_a_good_report_prints(tmp_path, good_report):
    import json

    (tmp_path / "report.json").write_text(json.dumps(good_report))
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0 and "like-for-like speedup" in result.output


# ---------------------------------------------------------------- item 10: the README's student lists


def test_a_width_default_applies_to_builtin_students_only():
    from distill.config_load import load_config, student_specs
    from distill.run import check_models

    cfg = load_config(None, student="nin_bn@0.25,nin_bn,timm:mobilenetv3_small_050", student_width=0.5)
    assert student_specs(cfg) == [("nin_bn", 0.25), ("nin_bn", 0.5), ("timm:mobilenetv3_small_050", 1.0)]
    check_models(cfg)  # builds each student: the timm one at its own size


def test_an_explicit_width_on_a_library_student_is_still_refused(tmp_path):
    line = one_line_error(["run", "--out", str(tmp_path / "o"), "--student", "timm:mobilenetv3_small_050@0.5"])
    assert line == "error: a width multiplier applies to builtin models only, not 'timm:mobilenetv3_small_050' (its name sets its size)"


# ---------------------------------------------------------------- item 11: checked before training


@pytest.mark.parametrize(
    "args, message",
    [
        (["--images-per-id", "1"], "--images-per-id 1 puts one image of each identity in a batch, so triplet never sees a "
                                   "positive pair and is always 0: use --images-per-id 2 or more, or a --loss without it"),
        (["--images-per-id", "1", "--loss", "softmax,lifted=0.5,verification"], "--images-per-id 1 puts one image of each identity "
         "in a batch, so lifted, verification never sees a positive pair and is always 0: use --images-per-id 2 or more, or a --loss without it"),
        (["--loss-opt", "triplet_margin=-1"], "triplet_margin must be > 0, got -1"),
        (["--loss-opt", "hdml_decay=1"], "hdml_decay must be >= 0 and < 1, got 1"),
        (["--loss-opt", "lifted_margin=nan"], "lifted_margin must be a finite number, got nan"),
        (["--loss-opt", "verification_balanced=2"], "verification_balanced must be true or false, got 2"),
        (["--split-file", "split.txt"], "synthetic does not take the option(s) split_file; it takes: strict"),
        (["--cuhk03-variant", "detected"], "synthetic does not take the option(s) cuhk03_variant; it takes: strict"),
    ],
)
def test_refused_before_training(tmp_path, no_training, args, message):
    assert one_line_error(["run", "--out", str(tmp_path / "o"), *args]) == f"error: {message}"


def test_softmax_alone_takes_one_image_per_identity():
    from distill.config_load import load_config

    assert load_config(None, images_per_id=1, loss="softmax").images_per_id == 1


def test_compat_with_another_embedding_size_fails_before_any_student_trains():
    from types import SimpleNamespace

    from distill.config_load import load_config
    from distill.errors import DistillError
    from distill.teachers.acquire import check_compat

    cfg = load_config(None, distill="kd=3,compat=1", embed_dim=64)
    with pytest.raises(DistillError) as err:
        check_compat(cfg, SimpleNamespace(embed_dim=1024), "backbone.blocks.5b")
    assert str(err.value) == (
        "--distill compat puts the student in the teacher's embedding space, so --embed-dim must be its size: got "
        "--embed-dim 64, the teacher's backbone.blocks.5b layer gives 1024 (set --embed-dim 1024, or leave compat out of --distill)"
    )
    assert check_compat(load_config(None, distill="kd=3,compat=0", embed_dim=64), SimpleNamespace(embed_dim=1024), "x")


def test_compat_uses_the_teachers_own_embedding_not_a_searched_layer(tmp_path, monkeypatch):
    from distill.config_load import load_config
    from distill.data import base
    from distill.data.synthetic import load_synthetic

    small = dict(train_ids=8, test_ids=4, images_per_id=8, height=32, width=16)
    monkeypatch.setitem(base._LOADERS, "synthetic", lambda path=None, **o: load_synthetic(path, **small))
    cfg = load_config(None, distill="compat=1", embed_dim=64, image_size="32x16", teacher_epochs=1, teacher_min_steps=0,
                      batch_size=16, out=str(tmp_path / "o"), device="cpu")
    from distill.run import setup
    from distill.teachers.acquire import acquire_teacher

    acquired = acquire_teacher(*setup(cfg))
    assert acquired.teacher.embed_dim == 64 and acquired.layer_choice is None  # no layer search: the student joins this space


# ---------------------------------------------------------------- item 12: messages say what is wrong


@pytest.fixture
def student_file(tmp_path, monkeypatch):
    from distill import bench
    from distill.models.file import save_model
    from distill.students import create_student

    monkeypatch.setattr(bench, "BUDGET_S", 0.0)  # one round of timed calls
    path = tmp_path / "student.pt"
    save_model(path, create_student("nin_bn", 8, 4, width=0.25), arch="nin_bn", width=0.25, image_size=[32, 16])
    return path


def test_export_under_a_file_says_not_a_directory(student_file):
    target = student_file / "x.onnx"
    line = one_line_error(["export", "--checkpoint", str(student_file), "-o", str(target)])
    assert line == f"error: cannot write the ONNX file {target}: Not a directory (choose another output path)"


@pytest.mark.parametrize("where", ["under_file", "proc"])
def test_bench_json_names_the_file_asked_for(student_file, where):
    target = student_file / "x.json" if where == "under_file" else "/proc/x.json"
    result = runner.invoke(app, ["bench", "--checkpoint", str(student_file), "--iters", "2", "--json", str(target)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    reason = "Not a directory" if where == "under_file" else "No such file or directory"
    assert result.output.strip().splitlines()[-1] == f"error: cannot write the JSON file {target}: {reason} (choose another --json path)"


def test_atomic_write_names_the_target_not_its_temp_file(tmp_path):
    import errno

    from distill.atomic import atomic_write_text

    (tmp_path / "f").write_text("")
    with pytest.raises(NotADirectoryError) as err:
        atomic_write_text(tmp_path / "f" / "x.json", "{}")
    assert (err.value.errno, err.value.filename) == (errno.ENOTDIR, str(tmp_path / "f" / "x.json"))
    with pytest.raises(OSError) as err:
        atomic_write_text("/proc/x.json", "{}")
    assert err.value.filename == "/proc/x.json"
