"""Models: BN-Inception, NIN-BN, the student registry, timm students, multi-scale, the model file."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from distill.embedding import EmbeddingNet
from distill.errors import DistillError
from distill.models import load_model, save_model
from distill.multiscale import MultiScaleNet
from distill.models import build_model, registry
from distill.models.inception_bn import inception_bn
from distill.students import create_student, register_student, student_names


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops(model: torch.nn.Module, size: tuple[int, int]) -> int:
    with FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 3, *size))
    return counter.get_total_flops()


def ceil_div_chain(n: int, strides: list[int]) -> int:
    """Map size after each padded stride-s layer: ceil(n / s), applied in turn (the no-shrink-to-zero rule)."""
    for s in strides:
        n = math.ceil(n / s)
    return n


def check_outputs(model: torch.nn.Module, size: tuple[int, int], embed_dim: int, num_classes: int) -> None:
    emb, logits = model(torch.randn(2, 3, *size))
    assert emb.shape == (2, embed_dim) and logits.shape == (2, num_classes)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))


def test_inception_bn_shapes_and_feature_map():
    torch.manual_seed(0)
    assert inception_bn(16, 7).feat_dim == 1024  # the paper's output width
    model = inception_bn(16, 7, width=0.25)  # same layers, a sixteenth of the compute
    strides = [2, 2, 2, 2, 2]  # conv1, pool1, pool2, inception 3c, 4e
    for size in [(32, 32), (64, 32), (33, 17)]:
        check_outputs(model.train(), size, 16, 7)
        fmap = model.eval().backbone(torch.randn(1, 3, *size))
        assert fmap.shape == (1, 256, ceil_div_chain(size[0], strides), ceil_div_chain(size[1], strides))


def test_nin_bn_shapes_feature_map_and_large_input():
    torch.manual_seed(0)
    model = create_student("nin_bn", 16, 7)
    assert isinstance(model, EmbeddingNet) and model.feat_dim == 1024
    strides = [4, 2, 2, 2]  # conv1 11x11/4, then three 3x3/2 pools
    for size in [(32, 32), (64, 32), (31, 9)]:
        check_outputs(model.train(), size, 16, 7)
        fmap = model.eval().backbone(torch.randn(1, 3, *size))
        assert fmap.shape == (1, 1024, ceil_div_chain(size[0], strides), ceil_div_chain(size[1], strides))
    check_outputs(create_student("nin_bn", 16, 7, width=0.25), (256, 128), 16, 7)


@pytest.mark.parametrize("build", [lambda w: create_student("nin_bn", 16, 7, width=w), lambda w: inception_bn(16, 7, width=w)])
def test_half_width_is_much_cheaper(build):
    full, half = build(1.0), build(0.5)
    assert params(half.backbone) < 0.3 * params(full.backbone)  # channels halve: about a quarter
    assert flops(half, (32, 32)) < 0.3 * flops(full, (32, 32))
    assert half.feat_dim == full.feat_dim // 2


def test_registry_decorator_and_errors(monkeypatch):
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))

    @register_student("tiny_test")
    def tiny(embed_dim: int, num_classes: int, width: float = 1.0) -> EmbeddingNet:
        backbone = torch.nn.Conv2d(3, max(1, round(8 * width)), 3, 2)
        return EmbeddingNet(backbone, backbone.out_channels, embed_dim, num_classes)

    assert student_names() == ["nin_bn", "tiny_test"]
    model = create_student("tiny_test", 4, 3, width=0.5)
    assert model.feat_dim == 4
    check_outputs(model, (32, 32), 4, 3)
    with pytest.raises(ValueError, match="'tiny_test' is already registered"):
        register_student("tiny_test")(tiny)
    with pytest.raises(DistillError, match=r"unknown student 'resnet'; known: nin_bn, tiny_test, timm:<name>"):
        create_student("resnet", 4, 3)
    with pytest.raises(DistillError, match="student width must be positive, got 0"):
        create_student("nin_bn", 4, 3, width=0)


def test_timm_student():
    torch.manual_seed(0)
    model = create_student("timm:mobilenetv3_small_050", 16, 5)
    assert model.feat_dim == model.backbone.body.head_hidden_size  # timm's conv head is kept and used
    check_outputs(model.train(), (32, 32), 16, 5)
    check_outputs(model.eval(), (64, 32), 16, 5)
    with pytest.raises(DistillError, match=r"unknown timm model 'no_such_net' \(see timm.list_models\(\)\)"):
        create_student("timm:no_such_net", 16, 5)
    with pytest.raises(DistillError, match="unknown student 'timm:'; known: nin_bn, timm:<name>"):
        create_student("timm:", 16, 5)
    with pytest.raises(DistillError, match="a width multiplier applies to builtin models only, not 'timm:mobilenetv3_small_050'"):
        create_student("timm:mobilenetv3_small_050", 16, 5, width=0.5)


def test_multiscale_wraps_a_teacher():
    model = build_model("inception_bn", 8, 5, width=0.125)
    check_outputs(MultiScaleNet(model), (32, 32), 8, 5)


def test_multiscale_matches_its_definition_and_uses_every_parameter():
    torch.manual_seed(0)
    model = create_student("nin_bn", 8, 5, width=0.25, multiscale=True)
    assert isinstance(model, MultiScaleNet) and model.embed_dim == 8 and model.num_classes == 5
    for size in [(32, 32), (64, 32), (7, 5)]:
        check_outputs(model.train(), size, 8, 5)
    model.eval()
    x = torch.randn(3, 3, 64, 32)
    emb, logits = model(x)
    deep, base_logits = model.base(x)
    # reference: each path by hand — block-average downsampling, convs, pool, linear, L2 norm
    parts = [deep]
    for factor, path in zip((4, 8), model.paths):
        small = x.unflatten(2, (-1, factor)).unflatten(4, (-1, factor)).mean(dim=(3, 5))
        parts.append(F.normalize(path.proj(path.convs(small).flatten(1)), dim=1))
    torch.testing.assert_close(emb, F.normalize(model.combine(torch.cat(parts, 1)), dim=1))
    torch.testing.assert_close(logits, base_logits)
    model.train()
    emb, logits = model(x)
    (emb.sum() + logits.sum()).backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert unused == []  # DDP (without find_unused_parameters) needs every parameter in the graph


@pytest.mark.parametrize(
    "arch, width, multiscale, suffix",
    [
        ("nin_bn", 0.25, True, ".pt"),
        ("nin_bn", 0.25, True, ".safetensors"),
        ("inception_bn", 0.125, False, ".pt"),
        ("timm:mobilenetv3_small_050", 1.0, False, ".safetensors"),
    ],
)
def test_model_file_roundtrip_is_bit_exact(tmp_path, arch, width, multiscale, suffix):
    torch.manual_seed(0)
    model = create_student(arch, 8, 5, width=width, multiscale=multiscale) if arch != "inception_bn" else build_model(arch, 8, 5, width=width)
    model.train()(torch.randn(4, 3, 32, 32))  # move BN running statistics away from their init
    path = tmp_path / f"model{suffix}"
    save_model(path, model, arch, width=width, seed=3, image_size=[32, 16])
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left behind
    loaded, info = load_model(path)
    assert not loaded.training and type(loaded) is type(model)
    assert info == {
        "format": "distill-model-v1", "arch": arch, "embed_dim": 8, "num_classes": 5, "width": width,
        "multiscale": multiscale, "meta": {"seed": 3, "image_size": [32, 16]},
    }
    x = torch.randn(2, 3, 32, 16)
    for a, b in zip(model.eval()(x), loaded(x)):
        assert torch.equal(a, b)


def test_save_model_rejects_wrong_multiscale_flag(tmp_path):
    with pytest.raises(ValueError, match="multiscale=True but the model is not a MultiScaleNet"):
        save_model(tmp_path / "m.pt", create_student("nin_bn", 8, 5, width=0.25), "nin_bn", width=0.25, multiscale=True)


def test_model_file_errors(tmp_path):
    from safetensors.torch import save_file

    model = create_student("nin_bn", 8, 5, width=0.25)
    with pytest.raises(DistillError, match=r"model file .*nothing.pt does not exist"):
        load_model(tmp_path / "nothing.pt")
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(DistillError, match=r"plain.pt is not a distill model file \(no 'distill-model-v1' header"):
        load_model(tmp_path / "plain.pt")
    save_file(model.state_dict(), tmp_path / "plain.safetensors")
    with pytest.raises(DistillError, match=r"plain.safetensors is not a distill model file \(no 'distill-model-v1' metadata"):
        load_model(tmp_path / "plain.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DistillError, match=r"junk.pt is not a distill model file \(torch.load failed"):
        load_model(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(DistillError, match=r"junk.safetensors is not a distill model file \(unreadable safetensors"):
        load_model(tmp_path / "junk.safetensors")
    # a pickled object torch.load(weights_only=True) refuses to run
    (tmp_path / "code.pt").write_bytes(pickle.dumps(ValueError("x"), protocol=2))
    with pytest.raises(DistillError, match="code.pt is not a distill model file") as err:
        load_model(tmp_path / "code.pt")
    assert "weights_only" not in str(err.value) and "will likely succeed" not in str(err.value)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(DistillError, match=r"empty.pt is not a distill model file \(torch.load failed: the file is empty or cut short\)$"):
        load_model(tmp_path / "empty.pt")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(DistillError, match=r"empty.safetensors is not a distill model file \(unreadable safetensors"):
        load_model(tmp_path / "empty.safetensors")

    save_model(tmp_path / "m.pt", model, "nin_bn", width=0.25)
    data = torch.load(tmp_path / "m.pt", weights_only=True)
    data["model"]["proj.weight"] = torch.zeros(8, 7)
    torch.save(data, tmp_path / "shape.pt")
    with pytest.raises(DistillError, match=r"'proj.weight' has shape \(8, 7\) in the file but \(8, 256\) in the model"):
        load_model(tmp_path / "shape.pt")
    del data["model"]["proj.weight"]
    torch.save(data, tmp_path / "missing.pt")
    with pytest.raises(DistillError, match=r"missing.pt \(nin_bn\) does not match the model \(1 missing, 0 unexpected, 0 with another shape\):\n  missing key 'proj.weight' \(8, 256\)$"):
        load_model(tmp_path / "missing.pt")
    data["model"]["proj.weight"], data["model"]["extra"] = model.proj.weight.detach(), torch.zeros(1)
    torch.save(data, tmp_path / "extra.pt")
    with pytest.raises(DistillError, match=r"\(0 missing, 1 unexpected, 0 with another shape\):\n  unexpected key 'extra' \(1,\)$"):
        load_model(tmp_path / "extra.pt")
    data["arch"] = "alexnet"
    torch.save(data, tmp_path / "arch.pt")
    with pytest.raises(DistillError, match="unknown teacher 'alexnet'; known: inception_bn, timm:<name>"):
        load_model(tmp_path / "arch.pt")
