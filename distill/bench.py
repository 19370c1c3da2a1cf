"""Latency and throughput of an embedding model in PyTorch eager and in ONNX Runtime, params, GFLOPs.

Both runtimes get the same inputs (random ``[N, 3, H, W]`` float32), the same warm-up and iteration
counts and the same CPU threads (:func:`benchmark_threads`, also ORT's intra-op pool), so their numbers
compare like for like. Latency is per call at the smallest batch size; throughput is images per
second at the largest batch size. Calls are timed in rounds of ``iters`` until the median of the
last round is within ``STABLE_TOLERANCE`` of the round before (or ``budget_s`` is spent); the
numbers come from those last two rounds. :func:`machine_info` records where they were measured.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
import platform
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distill.embedding import EmbeddingOnly
from distill.errors import DistillError
from distill.export import check_image_size


def latency_stats(times_ms: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99 of per-call latencies (linear interpolation, as ``numpy.percentile``)."""
    p50, p90, p99 = np.percentile(np.asarray(times_ms, dtype=np.float64), [50, 90, 99])
    return {"latency_ms_p50": float(p50), "latency_ms_p90": float(p90), "latency_ms_p99": float(p99)}


STABLE_TOLERANCE = 0.05  # the medians of the last two rounds of timed calls differ by at most 5%
BUDGET_S = 3.0  # timed seconds per batch size after which an unstable measurement stops (budget_s=None)


def is_stable(previous: Sequence[float], last: Sequence[float], tolerance: float = STABLE_TOLERANCE) -> bool:
    """True when the medians of two rounds of timings differ by at most ``tolerance`` of the larger."""
    a, b = float(np.median(previous)), float(np.median(last))
    return abs(a - b) <= tolerance * max(a, b)


def benchmark_threads() -> int:
    """CPU threads for benchmarks: the ones the user set, ``torch.get_num_threads()`` (``OMP_NUM_THREADS``
    or ``torch.set_num_threads``), under ``torchrun`` too: a benchmark that takes more threads than
    the process was given competes with the other ranks for the cores and measures that contention."""
    return torch.get_num_threads()


def machine_info() -> dict:
    """Where a benchmark ran: CPU model, cores, benchmark threads, GPU name, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import onnxruntime as ort

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": benchmark_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
    }


def onnx_input_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(height, width)`` of an ONNX graph's first input when both are fixed numbers, else None."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as err:
        raise DistillError(f"cannot read ONNX file {path} ({type(err).__name__}): export one with `distill export`") from None
    dims = graph.input[0].type.tensor_type.shape.dim if graph.input else []
    if len(dims) != 4 or not all(d.HasField("dim_value") for d in dims[2:]):
        return None
    return int(dims[2].dim_value), int(dims[3].dim_value)


def _check_args(batch_sizes: Sequence[int], warmup: int, iters: int) -> None:
    if not batch_sizes or not all(isinstance(b, int) and b > 0 for b in batch_sizes):
        raise DistillError(f"batch_sizes must be positive ints, got {tuple(batch_sizes)!r}")
    if warmup < 0 or iters < 1:
        raise DistillError(f"need warmup >= 0 and iters >= 1, got warmup={warmup}, iters={iters}")


def _time_calls(call: Callable[[], None], warmup: int, iters: int, budget_s: float) -> tuple[list[float], bool]:
    """Milliseconds per call after ``warmup`` untimed calls (``call`` must block until done), timed in
    rounds of ``iters`` until two rounds agree (:func:`is_stable`) or ``budget_s`` is spent.
    Returns the last two rounds' times (one round if only one ran) and whether they agreed."""
    for _ in range(warmup):
        call()
    rounds: list[list[float]] = []
    spent = 0.0
    while True:
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
        rounds.append(times)
        spent += sum(times) / 1e3
        stable = len(rounds) > 1 and is_stable(rounds[-2], rounds[-1])
        if stable or spent >= budget_s:
            return [t for r in rounds[-2:] for t in r], stable


def large_batch_calls(warmup: int, iters: int) -> tuple[int, int]:
    """``(warm-up, timed calls per round)`` at the throughput batch: a quarter of the latency rounds'
    (at least 3 timed calls, at most 3 warm-up calls). Each call there already runs a whole batch, and
    only the mean of the two last rounds is reported, so a quarter of the calls gives the same
    stability check at a quarter of the time (the largest share of a run's benchmark time)."""
    return min(warmup, 3), max(3, iters // 4)


def _measure(
    make_call: Callable[[int], Callable[[], None]], batch_sizes: Sequence[int], warmup: int, iters: int, budget_s: float
) -> dict:
    """Latency stats at the smallest batch, throughput (images/s) at the largest."""
    small, large = min(batch_sizes), max(batch_sizes)
    small_times, small_stable = _time_calls(make_call(small), warmup, iters, budget_s)
    if large == small:
        large_times, large_stable = small_times, small_stable
    else:
        large_times, large_stable = _time_calls(make_call(large), *large_batch_calls(warmup, iters), budget_s)
    throughput = large * len(large_times) / (sum(large_times) / 1e3)
    return latency_stats(small_times) | {
        "throughput_ips": throughput, "batch_size": large, "iters": len(small_times), "throughput_iters": len(large_times),
        "stable": small_stable and large_stable,
    }


def benchmark_torch(
    model: nn.Module,
    image_size: tuple[int, int],
    batch_sizes: Sequence[int] = (1, 64),
    warmup: int = 10,
    iters: int = 50,
    device: str = "cpu",
    budget_s: float | None = None,
) -> dict:
    """PyTorch eager, ``inference_mode``, embedding only, :func:`benchmark_threads` CPU threads; the model
    is moved to ``device`` and put in eval mode for the run (its train/eval flag and the thread count
    are restored). CUDA is synchronised after every call."""
    height, width = check_image_size(image_size)
    _check_args(batch_sizes, warmup, iters)
    dev = torch.device(device)
    net = EmbeddingOnly(model).to(dev)
    was_training = model.training
    net.eval()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def make_call(batch: int) -> Callable[[], None]:
        x = torch.randn(batch, 3, height, width, device=dev)

        def call() -> None:
            with torch.inference_mode():
                net(x)
            sync()

        return call

    threads, before = benchmark_threads(), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = _measure(make_call, batch_sizes, warmup, iters, BUDGET_S if budget_s is None else budget_s)
    finally:
        model.train(was_training)
        torch.set_num_threads(before)
    return {"runtime": "torch", "device": str(dev), "threads": threads} | result


def ort_providers() -> list[str]:
    """The best usable ONNX Runtime execution providers: TensorRT, CUDA, then CPU.

    ``onnxruntime-gpu`` lists CUDA/TensorRT even on machines without a GPU driver or TensorRT
    libraries (session creation then fails noisily and falls back), so they are only offered when
    PyTorch sees a GPU and, for TensorRT, when its libraries can be found.
    """
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    gpu = torch.cuda.is_available()
    tensorrt = importlib.util.find_spec("tensorrt") is not None or ctypes.util.find_library("nvinfer") is not None
    wanted = [
        ("TensorrtExecutionProvider", gpu and tensorrt),
        ("CUDAExecutionProvider", gpu),
        ("CPUExecutionProvider", True),
    ]
    return [p for p, usable in wanted if usable and p in available]


def benchmark_onnx(
    path: str | os.PathLike,
    image_size: tuple[int, int],
    batch_sizes: Sequence[int] = (1, 64),
    warmup: int = 10,
    iters: int = 50,
    providers: Sequence[str] | None = None,
    budget_s: float | None = None,
) -> dict:
    """ONNX Runtime with ``providers`` (default: :func:`ort_providers`) and :func:`benchmark_threads`
    intra-op threads; inputs are numpy arrays, so on GPU providers the host-device copies are included."""
    import onnxruntime as ort

    height, width = check_image_size(image_size)
    _check_args(batch_sizes, warmup, iters)
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"ONNX file not found: {path}; create one with `distill export`")
    options = ort.SessionOptions()
    options.intra_op_num_threads = benchmark_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(str(path), options, providers=list(providers or ort_providers()))
    except Exception as err:
        raise DistillError(f"ONNX Runtime cannot load {path}: {str(err).strip().splitlines()[0]}") from err
    name = session.get_inputs()[0].name
    gen = np.random.default_rng(0)

    def make_call(batch: int) -> Callable[[], None]:
        feed = {name: gen.standard_normal((batch, 3, height, width), dtype=np.float32)}
        return lambda: session.run(None, feed)

    try:
        result = _measure(make_call, batch_sizes, warmup, iters, BUDGET_S if budget_s is None else budget_s)
    except Exception as err:  # e.g. a model exported with a fixed batch size or another input size
        first = str(err).strip().splitlines()[0]
        raise DistillError(f"ONNX Runtime cannot run {path} on [N, 3, {height}, {width}] inputs: {first}") from err
    return {"runtime": "onnxruntime", "provider": session.get_providers()[0], "threads": options.intra_op_num_threads} | result


def count_params(model: nn.Module) -> int:
    """All parameters of the model (embedding network and classifier head)."""
    return sum(p.numel() for p in model.parameters())


def count_gflops(model: nn.Module, image_size: tuple[int, int]) -> float:
    """Forward GFLOPs of one image (batch 1) counted by ``torch.utils.flop_counter.FlopCounterMode``.

    FLOPs = 2 * MACs (one multiply and one add per multiply-accumulate) for convolutions and matrix
    products; bias additions, normalisation, activations and pooling are not counted.
    """
    height, width = check_image_size(image_size)
    param = next(model.parameters(), None)
    x = torch.zeros(1, 3, height, width, device=param.device if param is not None else "cpu")
    was_training = model.training
    model.eval()  # batch 1 in train mode would break BatchNorm1d
    try:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9
