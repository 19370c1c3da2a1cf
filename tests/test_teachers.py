"""Teachers: registry, torchvision/timm backbones and their ImageNet-style weights, frozen teachers
from model files and from ONNX."""

from __future__ import annotations

import hashlib
import shutil
import warnings

import pytest
import torch
import torchvision
from torch import nn

from distill.embedding import EmbeddingOnly
from distill.errors import DistillError
from distill.models import save_model
from distill.students import create_student
from distill.models import build_model, model_names
from distill.models.file import load_backbone_weights
from distill.models.library import LibraryBackbone
from distill.teachers import load_teacher


@pytest.fixture(scope="module")
def resnet18_teacher():
    torch.manual_seed(0)
    return build_model("torchvision:resnet18", 16, 5)


def resnet18_feature_map(net: torchvision.models.ResNet, x: torch.Tensor) -> torch.Tensor:
    """Reference: torchvision's ResNet.forward written out, stopping before avgpool/fc."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def test_registry_names_and_errors():
    assert model_names("teacher") == ["inception_bn"] and model_names() == ["inception_bn", "nin_bn"]
    with pytest.raises(DistillError, match=r"unknown teacher 'bninception'; known: inception_bn, timm:<name>, torchvision:<name>, onnx:<path>"):
        build_model("bninception", 8, 5)
    with pytest.raises(DistillError, match="unknown teacher 'torchvision:'"):
        build_model("torchvision:", 8, 5)
    with pytest.raises(DistillError, match=r"unknown torchvision model 'resnet9' \(see torchvision.models.list_models\(\)\)"):
        build_model("torchvision:resnet9", 8, 5)
    with pytest.raises(DistillError, match="unknown timm model 'resnet9'"):
        build_model("timm:resnet9", 8, 5)
    with pytest.raises(DistillError, match="'onnx:t.onnx' runs in ONNX Runtime and cannot be trained"):
        build_model("onnx:t.onnx", 8, 5)
    with pytest.raises(DistillError, match="a width multiplier applies to builtin models only, not 'timm:resnet10t'"):
        build_model("timm:resnet10t", 8, 5, width=0.5)
    with pytest.raises(DistillError, match=r"'vit' gives no \[N, C, H, W\] feature map; pick a convolutional model"):
        LibraryBackbone(nn.Flatten(), ()).feature_dim("vit")
    with pytest.raises(DistillError, match="'tiny' cannot run on a 64x64 image"):
        LibraryBackbone(nn.Conv2d(3, 4, 65), ()).feature_dim("tiny")


def test_torchvision_teacher_shapes_and_cut(resnet18_teacher):
    model = resnet18_teacher
    assert model.feat_dim == 512 and model.backbone.head_prefixes == ("fc.",)
    for size in [(32, 32), (64, 32)]:
        emb, logits = model.train()(torch.randn(2, 3, *size))
        assert emb.shape == (2, 16) and logits.shape == (2, 5)
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    reference = torchvision.models.resnet18(weights=None).eval()
    missing = reference.load_state_dict(model.backbone.body.state_dict(), strict=False).missing_keys
    assert missing == ["fc.weight", "fc.bias"]
    x = torch.randn(2, 3, 64, 32)
    torch.testing.assert_close(model.eval().backbone(x), resnet18_feature_map(reference, x), rtol=0, atol=0)


def test_load_torchvision_backbone_weights(tmp_path, resnet18_teacher):
    from safetensors.torch import save_file

    model = resnet18_teacher
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None).eval()  # an "ImageNet" network, classifier included
    for m in reference.modules():  # non-trivial BN statistics, so a missed buffer would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    state = reference.state_dict()
    head_before = model.classifier.weight.clone()
    x = torch.randn(2, 3, 32, 32)
    for name, payload in [
        ("plain.pth", state),
        ("wrapped.pt", {"state_dict": {f"module.{k}": v for k, v in state.items()}}),
        ("plain.safetensors", None),
    ]:
        body = model.backbone.body
        body.load_state_dict({k: torch.zeros_like(v) for k, v in body.state_dict().items()})
        if payload is None:
            save_file(state, tmp_path / name)
        else:
            torch.save(payload, tmp_path / name)
        load_backbone_weights(model, tmp_path / name)
        torch.testing.assert_close(model.eval().backbone(x), resnet18_feature_map(reference, x), rtol=0, atol=0)
    assert torch.equal(model.classifier.weight, head_before)  # heads untouched

    older = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(older, tmp_path / "old.pth")
    load_backbone_weights(model, tmp_path / "old.pth")  # counters missing from old files are fine

    bad = dict(state, **{"layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)})
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(DistillError, match=r"backbone weights .*shape.pth does not match the model \(0 missing, 0 unexpected, 1 with another shape\):\n  'layer1.0.conv1.weight' has shape \(64, 64, 1, 1\) in the file but \(64, 64, 3, 3\)"):
        load_backbone_weights(model, tmp_path / "shape.pth")
    torch.save({k: v for k, v in state.items() if k != "layer4.1.bn2.bias"}, tmp_path / "missing.pth")
    with pytest.raises(DistillError, match="missing key 'layer4.1.bn2.bias'"):
        load_backbone_weights(model, tmp_path / "missing.pth")
    torch.save(dict(state, **{"layer5.weight": torch.zeros(1)}), tmp_path / "extra.pth")
    with pytest.raises(DistillError, match="unexpected key 'layer5.weight'"):
        load_backbone_weights(model, tmp_path / "extra.pth")
    with pytest.raises(DistillError, match=r"weights file .*none.pth does not exist"):
        load_backbone_weights(model, tmp_path / "none.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(DistillError, match=r"cannot read weights file .*junk.pth"):
        load_backbone_weights(model, tmp_path / "junk.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(DistillError, match=r"weights file .*list.pth holds no state dict of tensors"):
        load_backbone_weights(model, tmp_path / "list.pth")


def test_torchvision_teacher_from_model_file(tmp_path, resnet18_teacher):
    path = tmp_path / "r18.safetensors"
    save_model(path, resnet18_teacher, "torchvision:resnet18")
    teacher = load_teacher("torchvision:resnet18", weights=path)
    x = torch.randn(2, 3, 32, 32)
    for a, b in zip(teacher(x), resnet18_teacher.eval()(x)):
        assert torch.equal(a, b)


def test_load_timm_backbone_weights_ignores_the_classifier(tmp_path):
    import timm

    torch.manual_seed(0)
    model = build_model("timm:mobilenetv3_small_050", 8, 5)
    full = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=1000)
    torch.save(full.state_dict(), tmp_path / "imagenet.pth")
    load_backbone_weights(model, tmp_path / "imagenet.pth")
    loaded = model.backbone.body.state_dict()
    assert set(full.state_dict()) - set(loaded) == {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in loaded.items())


def test_frozen_teacher_from_model_file(tmp_path):
    torch.manual_seed(0)
    model = build_model("inception_bn", 8, 5, width=0.125)
    model.train()(torch.randn(4, 3, 32, 32))
    path = tmp_path / "teacher.pt"
    save_model(path, model, "inception_bn", width=0.125)
    teacher = load_teacher("inception_bn", weights=path)
    assert teacher.spec == "inception_bn" and teacher.embed_dim == 8 and teacher.has_logits
    assert teacher.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert all(not p.requires_grad for p in teacher.module.parameters())
    teacher.module.train()  # a stray .train() must not let the teacher's BN statistics drift
    x = torch.randn(3, 3, 32, 32)
    emb, logits = teacher(x)
    ref_emb, ref_logits = model.eval()(x)
    assert torch.equal(emb, ref_emb) and torch.equal(logits, ref_logits) and not emb.requires_grad
    assert torch.equal(teacher(x)[0], emb)

    shutil.copy(path, tmp_path / "copy.pt")
    assert load_teacher("inception_bn", weights=tmp_path / "copy.pt").fingerprint == teacher.fingerprint
    save_model(tmp_path / "other.pt", model, "inception_bn", width=0.125, note="changed")
    assert load_teacher("inception_bn", weights=tmp_path / "other.pt").fingerprint != teacher.fingerprint

    student = create_student("nin_bn", 8, 5, width=0.25)
    save_model(tmp_path / "student.safetensors", student, "nin_bn", width=0.25)
    assert load_teacher("nin_bn", weights=tmp_path / "student.safetensors").embed_dim == 8  # a student can teach


def test_load_teacher_errors(tmp_path):
    with pytest.raises(DistillError, match="unknown teacher 'bninception'"):
        load_teacher("bninception", weights="x.pt")
    with pytest.raises(DistillError, match=r"teacher 'inception_bn' has no weights: pass --teacher-weights PATH"):
        load_teacher("inception_bn")
    with pytest.raises(DistillError, match=r"teacher 'torchvision:resnet18' needs a local weights file \(nothing is downloaded\): pass --teacher-weights PATH"):
        load_teacher("torchvision:resnet18")
    with pytest.raises(DistillError, match="teacher 'timm:resnet10t' needs a local weights file"):
        load_teacher("timm:resnet10t")
    with pytest.raises(DistillError, match=r"model file .*none.pt does not exist"):
        load_teacher("inception_bn", weights=tmp_path / "none.pt")
    student = create_student("nin_bn", 8, 5, width=0.25)
    save_model(tmp_path / "student.pt", student, "nin_bn", width=0.25)
    with pytest.raises(DistillError, match=r"student.pt holds a 'nin_bn' model, not 'inception_bn': pass --teacher nin_bn"):
        load_teacher("inception_bn", weights=tmp_path / "student.pt")
    torch.save(student.backbone.state_dict(), tmp_path / "backbone.pth")  # backbone weights: no heads, other names
    with pytest.raises(DistillError, match=r"nin_bn weights does not match the model \(\d+ missing, \d+ unexpected, 0 with another shape\):\n  missing key 'backbone.layers.0.0.0.weight'") as err:
        load_teacher("nin_bn", weights=tmp_path / "backbone.pth")
    assert str(err.value).endswith("pass --teacher-finetune)") and "... and" in str(err.value)


def export(model: nn.Module, path, outputs: list[str], dynamic: bool = True) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (torch.randn(2, 3, 32, 16),), str(path), input_names=["images"], output_names=outputs,
            dynamic_axes={"images": {0: "batch"}} if dynamic else None, dynamo=False,
        )


def test_onnx_teacher_matches_torch(tmp_path):
    torch.manual_seed(0)
    model = create_student("nin_bn", 8, 5, width=0.25, multiscale=True)
    model.train()(torch.randn(4, 3, 32, 16))
    model.eval()
    export(model, tmp_path / "two.onnx", ["embedding", "logits"])
    teacher = load_teacher(f"onnx:{tmp_path / 'two.onnx'}")
    assert teacher.module is None and teacher.embed_dim == 8 and teacher.has_logits
    assert teacher.fingerprint == hashlib.sha256((tmp_path / "two.onnx").read_bytes()).hexdigest()[:16]
    x = torch.randn(5, 3, 32, 16)
    emb, logits = teacher(x)
    ref_emb, ref_logits = model(x)
    torch.testing.assert_close(emb, ref_emb, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)

    class Unnormalised(nn.Module):  # the teacher must L2-normalise whatever embedding the ONNX gives
        def __init__(self) -> None:
            super().__init__()
            self.inner = EmbeddingOnly(model)

        def forward(self, images):
            return 3.0 * self.inner(images)

    export(Unnormalised(), tmp_path / "one.onnx", ["embedding"])
    one = load_teacher(f"onnx:{tmp_path / 'one.onnx'}")
    assert not one.has_logits
    emb, logits = one(x)
    assert logits is None
    torch.testing.assert_close(emb, ref_emb, atol=1e-5, rtol=1e-4)


def test_onnx_teacher_errors(tmp_path):
    model = create_student("nin_bn", 8, 5, width=0.25)
    with pytest.raises(DistillError, match=r"ONNX teacher file .*none.onnx does not exist"):
        load_teacher(f"onnx:{tmp_path / 'none.onnx'}")
    export(model, tmp_path / "fixed.onnx", ["embedding", "logits"], dynamic=False)
    with pytest.raises(DistillError, match=r"carries its own weights; drop --teacher-weights"):
        load_teacher(f"onnx:{tmp_path / 'fixed.onnx'}", weights="w.pt")
    fixed = load_teacher(f"onnx:{tmp_path / 'fixed.onnx'}")
    assert fixed(torch.randn(2, 3, 32, 16))[0].shape == (2, 8)
    with pytest.raises(DistillError, match=r"takes input of shape \[2, 3, 32, 16\], got \(3, 3, 32, 16\): export it with a dynamic batch axis"):
        fixed(torch.randn(3, 3, 32, 16))
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(DistillError, match=r"cannot load ONNX teacher .*junk.onnx"):
        load_teacher(f"onnx:{tmp_path / 'junk.onnx'}")

    class Map(nn.Module):
        def forward(self, images):
            return images * 2

    export(Map(), tmp_path / "map.onnx", ["out"])
    with pytest.raises(DistillError, match=r"must take one image input and give a \[batch, dim\] first output"):
        load_teacher(f"onnx:{tmp_path / 'map.onnx'}")
