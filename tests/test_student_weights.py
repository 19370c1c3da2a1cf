"""Student weights (--student-weights, --student-pretrained): loading timm, builtin and distill model
files into a fresh student, the mismatch table, malicious pickles, the architecture a model file
records (no --teacher/--student repeated), and timm teachers trained from scratch by train-teacher."""

from __future__ import annotations

import pickle

import pytest
import torch
from typer.testing import CliRunner

from distill import engine
from distill.cli import app
from distill.config_load import load_config
from distill.errors import DistillError
from distill.models import save_model
from distill.run import check_models, setup
from distill.students import create_student
from distill.students.train import student_runs, train_student
from distill.students.weights import load_student_weights, pretrained_file

runner = CliRunner()


def test_run_starts_the_timm_student_from_its_weights(timm_r18, tmp_path, monkeypatch):
    """`distill run --student timm:resnet18 --student-weights r18.safetensors`: the model that
    training starts from has timm's backbone features, within 1e-5."""
    ref, path = timm_r18
    started = {}

    def capture(model, *args, **kwargs):
        started["model"] = model
        raise KeyboardInterrupt  # stop before the first step: what was loaded is what training starts from

    monkeypatch.setattr(engine, "fit", capture)
    cfg = load_config(None, student="timm:resnet18", student_weights=str(path), data="digits", image_size="32x32",
                      out=str(tmp_path / "o"), device="cpu")
    assert cfg.student_width == 0.5  # the default: a bare timm:NAME still builds at width 1
    cfg, data, device = setup(cfg)
    run_cfg = student_runs(cfg)[0][2]
    with pytest.raises(KeyboardInterrupt):
        train_student(run_cfg, data, device, name="student")
    student = started["model"].eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(student.backbone(x), ref.forward_features(x), atol=1e-5, rtol=0)
        pooled = ref.forward_head(ref.forward_features(x), pre_logits=True)
        torch.testing.assert_close(student.features(x), pooled, atol=1e-5, rtol=0)
    fresh = create_student("timm:resnet18", 128, data.num_classes)
    assert not torch.equal(fresh.backbone.body.conv1.weight, student.backbone.body.conv1.weight)


def test_a_distill_model_file_keeps_backbone_and_matching_heads_and_refreshes_the_classifier(tmp_path):
    torch.manual_seed(0)
    trained = create_student("nin_bn", 16, 5, width=0.25)
    for p in trained.parameters():
        p.data.add_(0.5)  # not what a fresh student has
    path = save_model(tmp_path / "student.pt", trained, arch="nin_bn", width=0.25)
    torch.manual_seed(7)
    student = create_student("nin_bn", 16, 3, width=0.25)
    fresh_classifier = student.classifier.weight.clone()
    load_student_weights(student, path, "nin_bn", 0.25)
    for name, value in trained.backbone.state_dict().items():
        assert torch.equal(student.backbone.state_dict()[name], value), name
    assert torch.equal(student.proj.weight, trained.proj.weight)  # same embedding size: kept
    assert torch.equal(student.classifier.weight, fresh_classifier)  # 3 classes, not 5: fresh

    other = create_student("nin_bn", 8, 5, width=0.25)  # another embedding size: proj, bn fresh too
    proj = other.proj.weight.clone()
    load_student_weights(other, path, "nin_bn", 0.25)
    assert torch.equal(other.proj.weight, proj)
    for name, value in trained.backbone.state_dict().items():
        assert torch.equal(other.backbone.state_dict()[name], value), name

    # a plain state dict of the whole student (backbone.*, proj.* ...) loads the same way
    torch.save(trained.state_dict(), tmp_path / "plain.pth")
    again = create_student("nin_bn", 16, 3, width=0.25)
    load_student_weights(again, tmp_path / "plain.pth", "nin_bn", 0.25)
    assert torch.equal(again.proj.weight, trained.proj.weight)


def test_wrong_architecture_width_and_shapes_fail_in_one_message(timm_r18, tmp_path):
    _, r18 = timm_r18
    nin = create_student("nin_bn", 16, 5, width=0.5)
    path = save_model(tmp_path / "nin.pt", nin, arch="nin_bn", width=0.5)
    with pytest.raises(DistillError, match=r"nin.pt holds a 'nin_bn@0.5' model, not the student 'nin_bn@0.25': pass --student nin_bn@0.5$"):
        load_student_weights(create_student("nin_bn", 16, 5, width=0.25), path, "nin_bn", 0.25)
    with pytest.raises(DistillError, match=r"holds a 'nin_bn@0.5' model, not the student 'timm:resnet18': pass --student nin_bn@0.5"):
        load_student_weights(create_student("timm:resnet18", 16, 5), path, "timm:resnet18")

    # a backbone state dict of another width: the table names the keys with another shape
    torch.save(nin.backbone.state_dict(), tmp_path / "nin_backbone.pth")
    with pytest.raises(DistillError) as err:
        load_student_weights(create_student("nin_bn", 16, 5, width=0.25), tmp_path / "nin_backbone.pth", "nin_bn", 0.25)
    lines = str(err.value).splitlines()
    assert lines[0].startswith(f"backbone weights {tmp_path / 'nin_backbone.pth'} does not match the model (0 missing, 0 unexpected, ")
    assert "in the file but" in lines[1]
    assert lines[-1] == "(--student-weights takes weights of the student's own architecture, nin_bn)"
    assert len(lines) <= 9  # the short table: at most 6 rows and "... and N more"

    # resnet18's ImageNet file into a nin_bn student: every key missing or unexpected
    with pytest.raises(DistillError, match=r"does not match the model \(\d+ missing, \d+ unexpected, 0 with another shape\)"):
        load_student_weights(create_student("nin_bn", 16, 5, width=0.5), r18, "nin_bn", 0.5)


class Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_a_malicious_pickle_is_refused_before_training_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"conv1.weight": Evil()}, protocol=2))
    with pytest.raises(DistillError, match=r"cannot read weights file .*evil.pt"):
        load_student_weights(create_student("nin_bn", 16, 5), tmp_path / "evil.pt", "nin_bn")
    result = runner.invoke(app, ["run", "--student-weights", "evil.pt", "--data", "digits", "--out", "o"])
    assert result.exit_code == 2 and "cannot read weights file evil.pt" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 2
    assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path / "o" / "teacher.ckpt").exists()  # refused before the teacher trains


def test_missing_or_doubled_student_weights(tmp_path):
    result = runner.invoke(app, ["run", "--student-weights", str(tmp_path / "none.pt"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "student weights not found" in result.output
    result = runner.invoke(app, ["run", "--student", "timm:resnet18", "--student-weights", str(tmp_path / "x.pt"),
                                 "--student-pretrained", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "give --student-weights or --student-pretrained, not both" in result.output


def test_student_pretrained_reads_the_local_cache_only(tmp_path, timm_r18):
    """Never downloads: an empty cache names the file to fetch; timm's hub layout in the cache is used."""
    with pytest.raises(DistillError) as err:
        pretrained_file("timm:resnet18", cache_dir=tmp_path / "hub")
    message = str(err.value)
    assert message.startswith("timm's pretrained weights of timm:resnet18 are not on this machine (nothing is downloaded): fetch ")
    assert "https://huggingface.co/timm/resnet18.a1_in1k/resolve/main/model.safetensors" in message
    assert message.endswith("pass it with --student-weights PATH") and "\n" not in message
    with pytest.raises(DistillError, match="--student-pretrained takes timm students"):
        pretrained_file("nin_bn")

    repo = tmp_path / "hub" / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(timm_r18[1].read_bytes())
    found = pretrained_file("timm:resnet18", cache_dir=tmp_path / "hub")
    assert found == str(snapshot / "model.safetensors")
    load_student_weights(create_student("timm:resnet18", 16, 3), found, "timm:resnet18")


def test_a_model_file_names_its_architecture(tmp_path):
    torch.manual_seed(0)
    teacher = save_model(tmp_path / "teacher.pt", create_student("nin_bn", 16, 5, width=1.0), arch="nin_bn", width=1.0)
    student = save_model(tmp_path / "student.pt", create_student("nin_bn", 16, 5, width=0.25), arch="nin_bn", width=0.25)
    cfg = load_config(None, teacher_weights=str(teacher), student_weights=str(student))
    assert cfg.teacher == "nin_bn" and cfg.student == "nin_bn@0.25"
    assert student_runs(cfg)[0][2].student_width == 0.25
    given = load_config(None, teacher="inception_bn", teacher_weights=str(teacher), student="nin_bn@0.5", student_weights=str(student))
    assert given.teacher == "inception_bn" and given.student == "nin_bn@0.5"  # what is given stays (and is checked later)
    torch.save(create_student("nin_bn", 16, 5).state_dict(), tmp_path / "plain.pth")
    assert load_config(None, teacher_weights=str(tmp_path / "plain.pth")).teacher == "inception_bn"  # a plain state dict names nothing


def test_a_timm_teacher_without_weights_trains_from_scratch_in_train_teacher_only():
    cfg = load_config(None, teacher="timm:resnet10t")
    with pytest.raises(DistillError, match=r"teacher timm:resnet10t needs local weights .*`distill train-teacher --teacher timm:resnet10t`"):
        check_models(cfg)
    check_models(cfg, scratch_teacher=True)
