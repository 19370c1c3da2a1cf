"""Speed and memory of soft DarkRank: enumeration vs the exact subset DP (in probabilities, and the
log-space DP it falls back to for rows with a very wide score spread, which was the only DP before)
vs the sampled estimator.

    python benchmarks/darkrank.py --out benchmarks/results/darkrank.json

All timings are forward + backward on random [Q, M] float32 scores, the best of ``--repeats`` runs
after one warm-up (the least disturbed by other load on a shared machine), and every ratio compares
numbers measured in the same run. Peak memory is the peak above the starting point: CUDA allocator
peak on GPU; on CPU the resident-set high-water mark (Linux ``/proc/self/clear_refs``) in a fresh
process with glibc's mmap threshold pinned so freed buffers leave the RSS (null where unsupported).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import multiprocessing
import os
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from distill.atomic import atomic_write_text
from distill.losses import plackett_luce
from distill.losses.darkrank import soft_darkrank

SAMPLE_COUNTS = (16, 64, 256, 1024, 4096)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _scores(q: int, m: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(2, q, m, generator=g).mul(2).to(device).unbind()
    return s.requires_grad_(True), t


def log_space_dp(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact soft DarkRank by the log-space subset DP alone (what ``exact`` uses for wide rows)."""
    return plackett_luce._RowwiseKL.apply(s, t.detach(), plackett_luce._soft_exact_log, s.shape[0]).mean()


def time_step(s: torch.Tensor, t: torch.Tensor, repeats: int, fn=soft_darkrank, **kw) -> float:
    """Best seconds of one forward + backward of ``fn`` after a warm-up call: over ``repeats`` runs,
    and for fast calls more runs until 0.5 s were spent (at most 200)."""
    times: list[float] = []
    for _ in range(201):
        _sync(s.device)
        start = time.perf_counter()
        fn(s, t, **kw).backward()
        _sync(s.device)
        times.append(time.perf_counter() - start)
        s.grad = None
        if len(times) > repeats and sum(times[1:]) >= 0.5:
            break
    return min(times[1:])


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _cpu_peaks(q: int, ms: list[int]) -> list[float | None]:
    """Peak extra RSS (MiB) of exact forward + backward per M; run in a fresh process, because
    glibc reuses heap pages an earlier benchmark left resident and the peak would not show."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD 128 KiB: big buffers are mmapped
        clear_refs = Path("/proc/self/clear_refs")
        peaks = []
        for m in [ms[0], *ms]:  # the first run warms up
            s, t = _scores(q, m, torch.device("cpu"))
            clear_refs.write_text("5")  # reset the high-water mark to the current RSS
            base = _rss_kib("VmRSS")
            soft_darkrank(s, t).backward()
            peaks.append((_rss_kib("VmHWM") - base) / 1024)
        return peaks[1:]
    except OSError:
        return [None] * len(ms)


def peak_memory_mib(device: torch.device, q: int, ms: list[int]) -> list[float | None]:
    """Peak extra memory of one exact forward + backward per M, in MiB."""
    if not ms:  # --max-m below 10: no exact-DP row to measure
        return []
    if device.type == "cpu":
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_cpu_peaks, (q, ms))
    peaks = []
    for m in ms:
        s, t = _scores(q, m, device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        soft_darkrank(s, t).backward()
        torch.cuda.synchronize(device)
        peaks.append((torch.cuda.max_memory_allocated(device) - base) / 2**20)
    return peaks


def run_device(device: torch.device, args: argparse.Namespace, console: Console) -> dict:
    q, repeats = args.queries, args.repeats
    ratio, exact, sampled = [], [], []
    for m in range(4, min(9, args.max_m) + 1):
        s, t = _scores(q, m, device)
        brute_s = time_step(s, t, repeats if m < 9 else 1, method="bruteforce")
        exact_s = time_step(s, t, repeats, method="exact")
        ratio.append({"M": m, "bruteforce_s": brute_s, "exact_s": exact_s, "ratio": brute_s / exact_s})
        console.log(f"{device.type} M={m}: bruteforce {brute_s:.4f}s exact {exact_s:.5f}s")
    for m in range(10, args.max_m + 1):
        s, t = _scores(q, m, device)
        row = {"M": m, "exact_s": time_step(s, t, repeats if m <= 17 else 1, method="exact")}
        if m <= args.max_log_m:  # side by side: the log-space DP on the same scores
            row["log_dp_s"] = time_step(s, t, repeats if m <= 17 else 1, fn=log_space_dp)
            row["log_dp_ratio"] = row["log_dp_s"] / row["exact_s"]
        exact.append(row)
        console.log(f"{device.type} M={m}: exact {row['exact_s']:.4f}s" + (f" log-space DP {row['log_dp_s']:.4f}s" if "log_dp_s" in row else ""))
    m = min(args.sampled_m, args.max_m)
    s, t = _scores(q, m, device)
    kl = soft_darkrank(s, t).item()
    for n in SAMPLE_COUNTS:
        seconds = time_step(s, t, repeats, method="sampled", num_samples=n)
        estimates = torch.stack([soft_darkrank(s, t, "sampled", n).detach() for _ in range(10)])
        sampled.append({"M": m, "num_samples": n, "sampled_s": seconds, "rel_std": estimates.std().item() / kl})
    for row, peak in zip(exact, peak_memory_mib(device, q, [row["M"] for row in exact])):
        row["peak_mib"] = peak
    under_1s = [row["M"] for row in exact if row["exact_s"] < 1.0]
    return {"ratio": ratio, "exact": exact, "largest_m_under_1s": max(under_1s, default=None),
            "sampled": sampled, "sampled_exact_kl": kl}


def render(device: str, res: dict, q: int, console: Console) -> None:
    table = Table(title=f"soft DarkRank, forward+backward, Q={q}, {device}")
    for col in ("M", "bruteforce", "exact DP", "speedup", "log-space DP", "exact peak MiB"):
        table.add_column(col, justify="right")
    for row in res["ratio"]:
        table.add_row(str(row["M"]), f"{row['bruteforce_s'] * 1e3:.2f} ms", f"{row['exact_s'] * 1e3:.2f} ms",
                      f"{row['ratio']:.0f}x", "", "")
    for row in res["exact"]:
        peak = "n/a" if row["peak_mib"] is None else "<1" if row["peak_mib"] < 1 else f"{row['peak_mib']:.0f}"
        log_dp = f"{row['log_dp_s'] * 1e3:.1f} ms ({row['log_dp_ratio']:.1f}x slower)" if "log_dp_s" in row else ""
        table.add_row(str(row["M"]), f"~{math.factorial(row['M']):.1e} perms", f"{row['exact_s'] * 1e3:.1f} ms", "",
                      log_dp, peak)
    console.print(table)
    console.print(f"largest M with exact forward + backward under 1 s: {res['largest_m_under_1s']}")
    table = Table(title=f"sampled soft DarkRank, M={res['sampled'][0]['M']}, Q={q}, {device}")
    for col in ("samples/query", "time", "std / exact KL"):
        table.add_column(col, justify="right")
    for row in res["sampled"]:
        table.add_row(str(row["num_samples"]), f"{row['sampled_s'] * 1e3:.2f} ms", f"{row['rel_std']:.4f}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/darkrank.json"))
    parser.add_argument("--queries", type=int, default=32, help="queries per batch (Q)")
    parser.add_argument("--max-m", type=int, default=20, help="longest list for the exact DP (<= 20)")
    parser.add_argument("--max-log-m", type=int, default=16, help="longest list timed with the log-space DP too")
    parser.add_argument("--sampled-m", type=int, default=16, help="list length for the sampled estimator")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per point (the best is kept)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is steadiest on a loaded machine)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CPU, plus CUDA when present")
    args = parser.parse_args()
    console = Console()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] if args.device == "auto" else [args.device]
    if args.device == "auto" and torch.cuda.is_available():
        devices.append("cuda")
    results = {d: run_device(torch.device(d), args, console) for d in devices}
    for d, res in results.items():
        render(d, res, args.queries, console)
    env = {
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "cuda_device": torch.cuda.get_device_name() if "cuda" in devices else None,
    }
    payload = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "environment": env, "results": results}
    atomic_write_text(args.out, json.dumps(payload, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
