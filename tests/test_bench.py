"""Benchmarks: result schema, percentile maths, stability rule, threads, input size from the file,
parameter and FLOP counts against closed forms."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

from typer.testing import CliRunner

from distill import bench
from distill.bench import (
    benchmark_onnx, benchmark_threads, benchmark_torch, count_gflops, count_params, is_stable, latency_stats, onnx_input_size,
)
from distill.cli import app
from distill.embedding import EmbeddingNet
from distill.errors import DistillError
from distill.export import export_onnx
from distill.models import save_model
from distill.students import create_student

SIZE = (32, 16)


def tiny_net() -> EmbeddingNet:
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
    )
    return EmbeddingNet(backbone, feat_dim=16, embed_dim=8, num_classes=5)


def check_result(result: dict, runtime: str, batch: int, iters: int) -> None:
    # rounds of `iters` calls repeat until two agree; the stats come from the last two (or the only one)
    assert result["runtime"] == runtime and result["batch_size"] == batch and result["iters"] in (iters, 2 * iters)
    assert isinstance(result["stable"], bool)
    assert result["threads"] == torch.get_num_threads()
    for key in ("latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "throughput_ips"):
        assert isinstance(result[key], float) and result[key] > 0
    assert result["latency_ms_p50"] <= result["latency_ms_p90"] <= result["latency_ms_p99"]


def test_benchmark_torch_schema_and_restores_train_mode():
    net = tiny_net().train()
    result = benchmark_torch(net, SIZE, batch_sizes=(1, 3), warmup=1, iters=4)
    check_result(result, "torch", batch=3, iters=4)
    assert result["device"] == "cpu" and net.training


def test_benchmark_onnx_schema(tmp_path):
    export_onnx(tiny_net(), tmp_path / "m.onnx", SIZE)
    result = benchmark_onnx(tmp_path / "m.onnx", SIZE, batch_sizes=(2, 1), warmup=1, iters=4)
    check_result(result, "onnxruntime", batch=2, iters=4)
    assert result["provider"] == "CPUExecutionProvider"  # the test machine has no GPU provider


def percentile_reference(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks, written out (numpy's default method)."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@pytest.mark.parametrize("seed", range(4))
def test_latency_stats_against_reference(seed):
    rng = random.Random(seed)
    times = [rng.expovariate(1.0) for _ in range(rng.randint(1, 40))]
    stats = latency_stats(times)
    for q in (50, 90, 99):
        assert stats[f"latency_ms_p{q}"] == pytest.approx(percentile_reference(times, q), rel=1e-12)
    assert stats["latency_ms_p50"] <= stats["latency_ms_p90"] <= stats["latency_ms_p99"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"batch_sizes": ()}, r"batch_sizes must be positive ints, got \(\)"),
        ({"batch_sizes": (1, 0)}, r"batch_sizes must be positive ints, got \(1, 0\)"),
        ({"iters": 0}, "need warmup >= 0 and iters >= 1, got warmup=1, iters=0"),
        ({"image_size": (32, -1)}, "image_size must be two positive ints"),
    ],
)
def test_bad_benchmark_arguments(kwargs, message):
    args = {"image_size": SIZE, "warmup": 1, "iters": 2} | kwargs
    with pytest.raises(DistillError, match=message):
        benchmark_torch(tiny_net(), **args)


def test_benchmark_onnx_missing_and_corrupt_files(tmp_path):
    with pytest.raises(DistillError, match="ONNX file not found: .*nope.onnx; create one with `distill export`"):
        benchmark_onnx(tmp_path / "nope.onnx", SIZE)
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(DistillError, match="ONNX Runtime cannot load .*bad.onnx"):
        benchmark_onnx(tmp_path / "bad.onnx", SIZE)


def test_count_params_closed_form():
    # conv 3->8 (3x3, bias), BN 8, conv 8->16 (3x3, bias), BN 16, Linear 16->8, BN1d 8, Linear 8->5
    expected = (3 * 8 * 9 + 8) + 2 * 8 + (8 * 16 * 9 + 16) + 2 * 16 + (16 * 8 + 8) + 2 * 8 + (8 * 5 + 5)
    assert count_params(tiny_net()) == expected


@pytest.mark.parametrize(
    "cin,cout,k,stride,pad,groups,h,w",
    [(3, 8, 3, 1, 1, 1, 32, 16), (4, 6, 5, 2, 0, 2, 17, 11), (8, 8, 1, 1, 0, 8, 9, 7)],
)
def test_count_gflops_conv_is_two_macs(cin, cout, k, stride, pad, groups, h, w):
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, groups=groups)
    if cin != 3:  # count_gflops feeds RGB images; put the conv behind a 1x1 RGB -> cin stem
        stem = nn.Conv2d(3, cin, 1, bias=False)
        model, stem_macs = nn.Sequential(stem, conv), 3 * cin * h * w
    else:
        model, stem_macs = conv, 0
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    macs = cout * (cin // groups) * k * k * ho * wo
    assert count_gflops(model, (h, w)) == pytest.approx(2 * (macs + stem_macs) / 1e9, rel=1e-12)


@pytest.mark.parametrize("h,w,out", [(4, 2, 5), (3, 3, 7)])
def test_count_gflops_linear_is_two_macs(h, w, out):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * h * w, out))
    assert count_gflops(model, (h, w)) == pytest.approx(2 * 3 * h * w * out / 1e9, rel=1e-12)


def test_count_gflops_restores_train_mode_and_counts_tiny_net():
    net = tiny_net().train()
    h, w = SIZE
    macs = 8 * 3 * 9 * h * w + 16 * 8 * 9 * (h // 2) * (w // 2) + 16 * 8 + 8 * 5
    assert count_gflops(net, SIZE) == pytest.approx(2 * macs / 1e9, rel=1e-12)
    assert net.training


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_benchmark_onnx_fixed_batch_model(tmp_path):
    """A model exported with a fixed batch of 1 cannot run the throughput batch: one clear error."""
    torch.onnx.export(
        nn.Conv2d(3, 4, 3), (torch.zeros(1, 3, *SIZE),), str(tmp_path / "fixed.onnx"), input_names=["x"], dynamo=False
    )
    assert benchmark_onnx(tmp_path / "fixed.onnx", SIZE, batch_sizes=(1,), warmup=0, iters=2)["batch_size"] == 1
    with pytest.raises(DistillError, match=r"ONNX Runtime cannot run .*fixed.onnx on \[N, 3, 32, 16\] inputs: .*"):
        benchmark_onnx(tmp_path / "fixed.onnx", SIZE, batch_sizes=(1, 4), warmup=0, iters=2)


def test_is_stable_compares_the_medians_of_two_rounds():
    assert is_stable([1.0, 10.0, 2.0], [2.0, 2.05, 0.1])  # medians 2.0 and 2.0: outliers do not matter
    assert is_stable([1.00, 1.00], [1.05, 1.05])  # 0.05 <= 5% of 1.05
    assert not is_stable([1.00, 1.00], [1.06, 1.06])  # 0.06 > 5% of 1.06
    assert not is_stable([2.0], [1.0]) and is_stable([2.0], [1.0], tolerance=0.5)


def test_zero_budget_stops_after_one_round():
    result = benchmark_torch(tiny_net(), SIZE, batch_sizes=(1,), warmup=0, iters=3, budget_s=0.0)
    assert result["iters"] == 3 and result["stable"] is False


def test_benchmark_threads_are_the_ones_the_user_set_under_torchrun_too(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun with 4 local processes (OMP_NUM_THREADS=1 each)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert benchmark_threads() == 1
        result = benchmark_torch(tiny_net(), SIZE, batch_sizes=(1,), warmup=0, iters=2, budget_s=0.0)
        assert result["threads"] == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_onnx_input_size_fixed_and_dynamic(tmp_path):
    export_onnx(tiny_net(), tmp_path / "m.onnx", SIZE)
    assert onnx_input_size(tmp_path / "m.onnx") == SIZE
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(DistillError, match=r"cannot read ONNX file .*bad.onnx"):
        onnx_input_size(tmp_path / "bad.onnx")


def test_cli_bench_measures_at_the_files_input_size(tmp_path, monkeypatch):
    """A 32x16 model is benchmarked at 32x16 without --image-size (the default would be 64x32)."""
    monkeypatch.setattr(bench, "BUDGET_S", 0.0)
    seen = []
    real = bench.benchmark_torch
    monkeypatch.setattr(bench, "benchmark_torch", lambda model, size, **kw: seen.append(size) or real(model, size, **kw))
    torch.manual_seed(0)
    save_model(tmp_path / "s.pt", create_student("nin_bn", 8, 4, width=0.25), arch="nin_bn", width=0.25, image_size=[32, 16])
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "--checkpoint", str(tmp_path / "s.pt"), "--iters", "2", "--device", "cpu",
                                 "--json", str(tmp_path / "t.json")])
    assert result.exit_code == 0, result.output
    assert seen == [(32, 16)]
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["image_size"] == [32, 16] and saved["runtime"] == "torch"
    machine = saved["machine"]
    assert machine["cores"] >= 1 and machine["threads"] == torch.get_num_threads() and machine["cpu"]
    assert set(machine["versions"]) >= {"torch", "onnxruntime"} and "gpu" in machine

    # an ONNX graph with a fixed 32x16 input: at any other size ONNX Runtime would refuse to run it
    export_onnx(create_student("nin_bn", 8, 4, width=0.25), tmp_path / "s.onnx", (32, 16))
    result = runner.invoke(app, ["bench", "--onnx", str(tmp_path / "s.onnx"), "--iters", "2", "--json", str(tmp_path / "o.json")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "o.json").read_text())
    assert saved["image_size"] == [32, 16] and saved["provider"] == "CPUExecutionProvider"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cli_bench_onnx_with_a_dynamic_input_size_needs_image_size(tmp_path):
    torch.onnx.export(nn.Conv2d(3, 4, 3), (torch.zeros(1, 3, *SIZE),), str(tmp_path / "d.onnx"), input_names=["x"],
                      dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}}, dynamo=False)
    result = CliRunner().invoke(app, ["bench", "--onnx", str(tmp_path / "d.onnx"), "--iters", "2"])
    assert result.exit_code == 2 and "has no fixed input size in its graph: give --image-size HxW" in result.output


def test_throughput_rounds_are_a_quarter_of_the_latency_rounds(monkeypatch):
    """Counted calls: latency at batch 1 gets warm-up + rounds of ``iters``; the throughput batch gets
    at most 3 warm-up calls and rounds of ``iters // 4`` (at least 3)."""
    from distill import bench

    calls = {1: 0, 8: 0}

    def make_call(batch):
        def call():
            calls[batch] += 1
        return call

    monkeypatch.setattr(bench, "is_stable", lambda a, b: True)  # two rounds each
    result = bench._measure(make_call, (1, 8), warmup=10, iters=20, budget_s=60.0)
    assert calls == {1: 10 + 2 * 20, 8: 3 + 2 * 5}
    assert result["iters"] == 40 and result["throughput_iters"] == 10
    calls.update({1: 0, 8: 0})
    bench._measure(make_call, (1, 8), warmup=1, iters=4, budget_s=60.0)
    assert calls == {1: 1 + 2 * 4, 8: 1 + 2 * 3}
