"""``--teacher-layer auto``: the candidate layers and the choice among them on validation."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from typer.testing import CliRunner

from distill.run import setup
from distill.cli import app
from distill.config import Config
from distill.data.dataset import read_image
from distill.models import build_model, save_model
from distill.teachers import load_teacher
from distill.teachers.layers import EMBEDDING, choose_layer, feature_layers
from test_cli import TINY, tiny_data  # noqa: F401  (fixture)

runner = CliRunner()


@pytest.mark.parametrize("seed", range(5))
def test_choose_layer_takes_the_best_score_and_breaks_ties_towards_the_first_listed(seed):
    gen = torch.Generator().manual_seed(seed)
    names = [EMBEDDING, *(f"l{i}" for i in range(6))]
    scores = {name: float(v) for name, v in zip(names, torch.randint(0, 4, (7,), generator=gen) / 4)}
    best = max(scores.values())
    assert choose_layer(scores) == [n for n in names if scores[n] == best][0]  # the slow way


def test_builtin_feature_layers_are_blocks_of_the_model_shallow_to_deep():
    teacher = build_model("inception_bn", 8, 3, width=0.125)
    names = dict(teacher.named_modules())
    layers = feature_layers("inception_bn", teacher)
    assert layers == [f"backbone.blocks.{b}" for b in ("3a", "3b", "3c", "4a", "4b", "4c", "4d", "4e", "5a", "5b")]
    assert all(name in names for name in layers)
    student = build_model("nin_bn", 8, 3, width=0.25, role="student")
    convs = [dict(student.named_modules())[n][0][0] for n in feature_layers("nin_bn", student)]
    assert [c.kernel_size[0] for c in convs] == [11, 5, 3, 3]  # the kxk convolution opening each mlpconv block


def test_library_feature_layers_timm_stages_and_none_for_torchvision(tmp_path):
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    save_file(model.state_dict(), tmp_path / "r18.safetensors")
    teacher = load_teacher("timm:resnet18", weights=tmp_path / "r18.safetensors")
    assert feature_layers("timm:resnet18", teacher.module) == ["act1", "layer1", "layer2", "layer3", "layer4"]
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), tmp_path / "tv.pth")
    assert feature_layers("torchvision:resnet18", load_teacher("torchvision:resnet18", weights=tmp_path / "tv.pth").module) == []
    assert feature_layers("onnx:x.onnx", None) == []


def test_a_feature_layer_teacher_embeds_with_the_pooled_normalised_block_output(tmp_path):
    torch.manual_seed(0)
    model = build_model("inception_bn", 8, 3, width=0.125).eval()
    save_model(tmp_path / "t.pt", model, "inception_bn", width=0.125)
    x = torch.randn(2, 3, 32, 32)
    for layer in feature_layers("inception_bn", model):
        emb, logits = load_teacher("inception_bn", weights=tmp_path / "t.pt", layer=layer)(x)
        with torch.no_grad():
            out = model.backbone.stem(x)
            for name, block in model.backbone.blocks.named_children():
                out = block(out)
                if f"backbone.blocks.{name}" == layer:
                    break
            ref = F.normalize(out.mean(dim=(2, 3)), dim=1)
        torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
        assert torch.allclose(logits, model(x)[1], atol=1e-5)


def test_run_chooses_the_teacher_layer_on_validation_and_reports_it(tiny_data, tmp_path):
    out = tmp_path / "auto"
    result = runner.invoke(app, ["run", "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    choice = report["teacher_layer"]
    layers = [f"backbone.blocks.{b}" for b in ("5b", "5a", "4e", "4d", "4c", "4b", "4a", "3c", "3b", "3a")]
    assert list(choice["scores"]) == [EMBEDDING, *layers] and choice["metric"] == "map with training distractors"
    assert choice["scores"][choice["chosen"]] == max(choice["scores"].values())
    assert f"teacher embedding: {choice['chosen']}" in " ".join(result.output.split())
    assert f"**Teacher embedding**: {choice['chosen']}, the best on validation map with training distractors" in (out / "report.md").read_text()
    # the recorded scores are what the validation split gives for that layer of the saved teacher
    fields = {k: v for k, v in report["config"].items() if k in Config.__dataclass_fields__}
    cfg = Config(**{**fields, "image_size": tuple(fields["image_size"]), "out": str(tmp_path / "check")})
    _, data, device = setup(cfg)
    for name, score in choice["scores"].items():  # one pass for all layers = one teacher per layer
        teacher = load_teacher("inception_bn", weights=out / "teacher.pt", layer=None if name == EMBEDDING else name)
        assert data.protocol.distractor_map(teacher, data, device) == pytest.approx(score, abs=1e-5)

    fixed = runner.invoke(app, ["run", "--out", str(out), *TINY, "--teacher-layer", "embedding"])
    assert fixed.exit_code == 0, fixed.output
    report = json.loads((out / "report.json").read_text())
    assert report["teacher_layer"] is None and "teacher embedding:" not in fixed.output
    assert "reusing the teacher trained earlier" in " ".join(fixed.output.split())


def test_distractor_map_against_a_loop_over_validation_queries(tiny_data, tmp_path):
    cfg = Config(out=str(tmp_path), image_size=(32, 16))
    _, data, device = setup(cfg)
    projection = torch.randn(3 * 32 * 16, 8, generator=torch.Generator().manual_seed(0))

    def model(images):  # a random projection of the pixels: embeddings spread out, no near-ties
        return F.normalize(images.flatten(1) @ projection, dim=1)

    got = data.protocol.distractor_map(model, data, device, max_distractors=10)

    def embed(samples):
        return torch.stack([model(data.eval_transform(read_image(s.path))[None])[0] for s in samples]).double()

    picks = torch.linspace(0, len(data.train_plain) - 1, 10).long()
    val, train = embed(data.val), embed([data.train_plain.samples[int(i)] for i in picks])
    aps = []
    for i, query in enumerate(val):
        same_person = [data.val[j].label == data.val[i].label for j in range(len(val))]
        # re-ID: the query's own camera is not searched for its matches (as in the test protocol)
        gallery = [(float(query @ g), same_person[j]) for j, g in enumerate(val)
                   if not (same_person[j] and data.val[j].camera == data.val[i].camera)]
        gallery += [(float(query @ g), False) for g in train]
        ranked = [match for _, match in sorted(gallery, key=lambda pair: -pair[0])]
        hits = [k for k, match in enumerate(ranked) if match]
        if hits:
            aps.append(sum((n + 1) / (k + 1) for n, k in enumerate(hits)) / len(hits))
    assert len({s.camera for s in data.val}) > 1 and 0 < len(aps) <= len(val)
    assert got == pytest.approx(sum(aps) / len(aps), abs=1e-5)


def test_an_unknown_layer_of_a_builtin_teacher_fails_before_training(tiny_data, tmp_path):
    result = runner.invoke(app, ["run", "--out", str(tmp_path / "x"), *TINY, "--teacher-layer", "backbone.blocks.9z"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "--teacher-layer: inception_bn has no layer 'backbone.blocks.9z'; use auto, embedding or one of backbone.blocks.3a," in text
    assert "teacher: epoch" not in text and not (tmp_path / "x" / "teacher.pt").exists()
