"""A finished model as the teacher: timm / torchvision / builtin state dicts used as they are."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from typer.testing import CliRunner

from distill.cli import app
from distill.models import IMAGENET_MEAN, IMAGENET_STD
from distill.errors import DistillError
from distill.models import ModelCfg, build_model, model_cfg
from distill.teachers.acquire import task_logits
from distill.teachers import load_teacher
from distill.teachers.finished import FinishedModel
from test_cli import TINY, tiny_data  # noqa: F401  (fixture)

runner = CliRunner()


@pytest.fixture(scope="module")
def tv_r18(tmp_path_factory):
    torch.manual_seed(1)
    model = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    path = tmp_path_factory.mktemp("tv") / "r18.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_timm_state_dict_is_a_frozen_teacher_with_timm_pooled_features(timm_r18):
    model, path = timm_r18
    teacher = load_teacher("timm:resnet18", weights=path)
    assert not teacher.module.training and all(not p.requires_grad for p in teacher.module.parameters())
    assert teacher.embed_dim == 512 and teacher.num_classes == 1000 and teacher.has_logits
    x = torch.randn(2, 3, 64, 48)
    emb, logits = teacher(x)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        ref_logits = model(x)
    assert (emb - F.normalize(pooled, dim=1)).abs().max() <= 1e-5
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert not emb.requires_grad


def test_torchvision_state_dict_is_a_frozen_teacher_with_the_features_before_the_classifier(tv_r18):
    model, path = tv_r18
    teacher = load_teacher("torchvision:resnet18", weights=path)
    assert teacher.embed_dim == 512 and teacher.num_classes == 4  # classes read from the state dict
    x = torch.randn(3, 3, 64, 32)
    emb, logits = teacher(x)
    with torch.no_grad():  # torchvision's ResNet.forward written out
        f = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        f = model.layer4(model.layer3(model.layer2(model.layer1(f))))
        pooled = f.mean(dim=(2, 3))
    assert (emb - F.normalize(pooled, dim=1)).abs().max() <= 1e-5
    torch.testing.assert_close(logits, model.fc(pooled), atol=1e-5, rtol=1e-4)

    layered = load_teacher("torchvision:resnet18", weights=path, layer="layer3")
    assert layered.embed_dim == 256 and layered.fingerprint != teacher.fingerprint
    with torch.no_grad():
        f3 = model.layer3(model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))))
    torch.testing.assert_close(layered(x)[0], F.normalize(f3.mean(dim=(2, 3)), dim=1), atol=1e-5, rtol=1e-4)
    with pytest.raises(DistillError, match=r"the model has no layer 'layer9'; its last layers are: .*layer4.1.bn2, avgpool, fc$"):
        load_teacher("torchvision:resnet18", weights=path, layer="layer9")


def test_input_is_renormalised_to_the_models_own_mean_and_std():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).double()
    cfg = ModelCfg(input_size=(8, 8), mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))
    wrapped = FinishedModel(net, "classifier", cfg).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)  # normalised with ImageNet's mean/std
    raw = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    own = (raw - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)
    emb, logits = wrapped(x)
    torch.testing.assert_close(logits, net(own))
    torch.testing.assert_close(emb, F.normalize(net[:3](own), dim=1))
    assert model_cfg("timm:vit_tiny_patch16_224").mean == (0.5, 0.5, 0.5)  # timm's pretrained_cfg, not ImageNet's
    assert model_cfg("timm:resnet18").input_size == (224, 224) and model_cfg("inception_bn").embed_dim == 128
    with pytest.raises(DistillError, match="no Linear classifier to take the features before: name one with --teacher-layer"):
        FinishedModel(nn.Conv2d(3, 4, 3), "classifier", cfg)


def test_builtin_state_dict_and_a_state_dict_that_does_not_fit(tmp_path, timm_r18):
    torch.manual_seed(0)
    net = build_model("nin_bn", 8, 5, width=1.0).eval()
    torch.save(net.state_dict(), tmp_path / "nin.pt")
    teacher = load_teacher("nin_bn", weights=tmp_path / "nin.pt")
    x = torch.randn(2, 3, 32, 16)
    for a, b in zip(teacher(x), net(x)):
        torch.testing.assert_close(a, b)

    with pytest.raises(DistillError) as err:
        load_teacher("timm:resnet34", weights=timm_r18[1])
    lines = str(err.value).splitlines()
    assert lines[0].startswith("timm:resnet34 weights does not match the model (") and "missing" in lines[0]
    assert lines[1].startswith("  missing key 'layer1.2.conv1.weight'") and lines[-2].startswith("  ... and ")
    assert lines[-1].endswith("pass --teacher-finetune)") and len(lines) == 9


class Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_a_malicious_pickle_is_refused_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"fc.weight": Evil()}, protocol=2))
    torch.save({"fc.weight": Evil()}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(DistillError, match=rf"cannot read weights file .*{name}"):
            load_teacher("timm:resnet18", weights=tmp_path / name)
    assert not (tmp_path / "PWNED").exists()


def test_logits_only_for_the_tasks_classes(tv_r18, capsys):
    teacher = load_teacher("torchvision:resnet18", weights=tv_r18[1])
    assert task_logits(teacher, 4).has_logits
    assert teacher(torch.randn(1, 3, 32, 32))[1] is not None
    assert not task_logits(teacher, 7).has_logits
    assert teacher(torch.randn(1, 3, 32, 32))[1] is None
    assert capsys.readouterr().err == ""  # said once, by build_objective, and only when a term needs the logits


@pytest.mark.parametrize("spec", ["timm", "torchvision"])
def test_run_distils_from_a_finished_model_without_training_it(spec, tiny_data, timm_r18, tv_r18, tmp_path):  # noqa: F811
    path = (timm_r18 if spec == "timm" else tv_r18)[1]
    out = tmp_path / "run"
    args = ["run", "--teacher", f"{spec}:resnet18", "--teacher-weights", str(path), "--out", str(out), *TINY]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert not (out / "teacher.pt").exists() and not (out / "teacher.ckpt").exists()  # nothing trained
    text = " ".join(result.output.split())  # 1000 / 4 classes, the task 6: one message, with its reason
    assert text.count("kd is off") == 1 and "classes, the task 6: kd is off (the embedding-level terms still apply)" in text
    assert "no classifier logits" not in text and "KD is disabled" not in text
    report = json.loads((out / "report.json").read_text())
    assert {m["name"] for m in report["models"]} >= {"teacher", "student"}
    teacher_row = next(m for m in report["models"] if m["name"] == "teacher" and m["runtime"] == "torch")
    assert teacher_row["params"] == sum(p.numel() for p in load_teacher(f"{spec}:resnet18", weights=path).module.parameters())


def test_train_teacher_fine_tunes_a_plain_state_dict(tiny_data, tv_r18, tmp_path):  # noqa: F811
    out = tmp_path / "t"
    args = ["train-teacher", "--teacher", "torchvision:resnet18", "--teacher-weights", str(tv_r18[1]), "--out", str(out)]
    teacher_tiny = ["--image-size", "32x16", "--teacher-epochs", "1", "--batch-size", "16", "--teacher-min-steps", "0"]  # no student options
    result = runner.invoke(app, [*args, "--embed-dim", "8", *teacher_tiny])
    assert result.exit_code == 0, result.output
    teacher = load_teacher("torchvision:resnet18", weights=out / "teacher.pt")
    assert teacher.embed_dim == 8 and teacher.num_classes == 6  # a new embedding head, trained on the task


def test_teacher_finetune_and_layer_bad_combinations(tmp_path, timm_r18):
    onnx = tmp_path / "t.onnx"
    onnx.write_bytes(b"")
    for args, message in [
        (["--teacher", "inception_bn", "--teacher-finetune"], "--teacher-finetune fine-tunes given weights: pass --teacher-weights"),
        (["--teacher", f"onnx:{onnx}", "--teacher-layer", "fc"], "runs in ONNX Runtime as it is: drop --teacher-layer"),
    ]:
        result = runner.invoke(app, ["run", *args, "--out", str(tmp_path / "o"), *TINY])
        assert result.exit_code != 0 and message in result.output.replace("\n", " "), result.output
    with pytest.raises(DistillError, match="--teacher-layer cannot pick its layers"):
        load_teacher(f"onnx:{onnx}", layer="fc")
