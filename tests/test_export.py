"""ONNX export: checker, parity with PyTorch at several batch sizes, atomic replace, fp16 / int8."""

from __future__ import annotations

import copy
import sys

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.embedding import EmbeddingNet
from distill.errors import DistillError
from distill.export import CONVERTED_ATOL, export_onnx

SIZE = (32, 16)


def tiny_net(seed: int = 0) -> EmbeddingNet:
    """2-conv EmbeddingNet with non-trivial BatchNorm running statistics (so eval != train mode)."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
    )
    net = EmbeddingNet(backbone, feat_dim=16, embed_dim=8, num_classes=5)
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net


def ort_embed(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def torch_embed(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    net = net.eval()
    with torch.no_grad():
        return net(x)[0]


@pytest.mark.parametrize("seed,opset", [(0, 17), (1, 13)])
def test_fp32_export_checks_and_matches_pytorch_at_any_batch(tmp_path, seed, opset):
    net = tiny_net(seed).eval()
    path = tmp_path / "m.onnx"
    info = export_onnx(net, path, SIZE, opset=opset)
    assert set(info) == {"path", "max_abs_diff", "atol", "opset", "precision", "bytes"}
    assert info["path"] == str(path) and info["precision"] == "fp32" and info["opset"] == opset
    assert info["bytes"] == path.stat().st_size and 0 <= info["max_abs_diff"] <= 1e-4
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    assert [i.name for i in model.graph.input] == ["images"] and [o.name for o in model.graph.output] == ["embedding"]
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    for batch in (1, 3):  # batch sizes other than the export's 4: the axis is really dynamic
        x = torch.randn(batch, 3, *SIZE, generator=torch.Generator().manual_seed(seed + batch))
        got, ref = ort_embed(path, x), torch_embed(net, x)
        assert got.shape == (batch, 8)
        assert (F.normalize(got.double(), dim=1) - ref.double()).abs().max() <= 1e-4


def test_exports_eval_mode_copy_and_leaves_model_untouched(tmp_path):
    net = tiny_net(2).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    export_onnx(net, tmp_path / "m.onnx", SIZE)
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # no BN running-stat updates
    x = torch.randn(4, 3, *SIZE)
    with torch.no_grad():
        train_out = copy.deepcopy(net)(x)[0]
    got, ref = ort_embed(tmp_path / "m.onnx", x), torch_embed(net, x)
    assert (got - ref).abs().max() <= 1e-4
    assert (got - train_out).abs().max() > 1e-2  # train-mode BN would give other embeddings


def test_failed_export_leaves_existing_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous model")

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::boom")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(DistillError, match=r"ONNX export \(opset 17\) failed: unsupported operator aten::boom"):
        export_onnx(tiny_net(), path, SIZE)
    assert path.read_bytes() == b"previous model"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


class CallCounter(nn.Module):
    """Adds how often it was called: tracing freezes the count, so ONNX and PyTorch disagree."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_net(3).eval()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        emb, logits = self.net(x)
        return F.normalize(emb + self.calls, dim=1), logits


def test_parity_failure_raises_and_keeps_old_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous model")
    with pytest.raises(DistillError, match=r"ONNX parity check failed: ONNX Runtime embeddings differ from PyTorch by .* > atol 1e-04"):
        export_onnx(CallCounter(), path, SIZE)
    assert path.read_bytes() == b"previous model"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_int8_export_quantises_and_reports_its_diff(tmp_path):
    net = tiny_net(4).eval()
    info = export_onnx(net, tmp_path / "q.onnx", SIZE, precision="int8")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert "DynamicQuantizeLinear" in ops and info["precision"] == "int8" and info["atol"] == CONVERTED_ATOL["int8"]
    assert 0 < info["max_abs_diff"] <= CONVERTED_ATOL["int8"]  # lossy, but within the documented bound
    x = torch.randn(2, 3, *SIZE)
    diff = (F.normalize(ort_embed(tmp_path / "q.onnx", x), dim=1) - torch_embed(net, x)).abs().max()
    assert 0 < diff <= CONVERTED_ATOL["int8"]


def test_fp16_export_keeps_fp32_io(tmp_path):
    net = tiny_net(5).eval()
    info = export_onnx(net, tmp_path / "h.onnx", SIZE, precision="fp16")
    model = onnx.load(str(tmp_path / "h.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert info["max_abs_diff"] <= CONVERTED_ATOL["fp16"]
    x = torch.randn(3, 3, *SIZE)
    got = ort_embed(tmp_path / "h.onnx", x)
    assert got.dtype == torch.float32
    assert (F.normalize(got, dim=1) - torch_embed(net, x)).abs().max() <= CONVERTED_ATOL["fp16"]


def test_fp16_without_converter_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime.transformers.float16", None)  # makes the import fail
    with pytest.raises(DistillError, match=r"fp16 export needs onnxruntime.transformers \(.*\); install onnxruntime>=1.16 or use fp32"):
        export_onnx(tiny_net(), tmp_path / "h.onnx", SIZE, precision="fp16")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"precision": "int4"}, "precision must be one of fp32, fp16, int8, int8-static, got 'int4'"),
        ({"image_size": (0, 16)}, r"image_size must be two positive ints \(height, width\), got \(0, 16\)"),
        ({"image_size": (32,)}, r"image_size must be two positive ints \(height, width\), got \(32,\)"),
    ],
)
def test_bad_inputs(tmp_path, kwargs, message):
    args = {"image_size": SIZE} | kwargs
    with pytest.raises(DistillError, match=message):
        export_onnx(tiny_net(), tmp_path / "m.onnx", **args)
    assert not (tmp_path / "m.onnx").exists()


def test_an_unwritable_output_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DistillError, match=r"^cannot write the ONNX file .*file/sub/m.onnx: Not a directory \(choose another output path\)$"):
        export_onnx(tiny_net(), blocker / "sub" / "m.onnx", SIZE)
