"""Shared timing and reporting for the per-kernel benchmarks (`bench_<op>.py`).

On CUDA a configuration is timed with CUDA events after warm-up and the median is reported; the Triton
kernel and its plain-torch `_ref` run on the same inputs. Without CUDA only the reference is timed
(the Triton interpreter measures Python, not the kernel) and the kernel columns say so.
Results go to benchmarks/results/<op>-<device>.json with the device, torch and triton versions.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def kernels_timed() -> bool:
    """Kernel timings need a GPU; under the interpreter they would time Python."""
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def device_slug() -> str:
    return "".join(c if c.isalnum() else "-" for c in device_name().lower()).strip("-").replace("--", "-")


def median_us(fn: Callable[[], object], *, warmup: int = 10, iters: int = 50) -> float:
    """Median wall time of one call in microseconds (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def run(op: str, configs: list[tuple[str, Callable[[], object], Callable[[], object], int]],
        *, cpu_iters: int = 5) -> list[dict]:
    """Time each (shape label, kernel call, reference call, bytes moved), print one line each, write JSON."""
    timed = kernels_timed()
    if not timed:
        print(f"{op}: kernel timings need a GPU (no CUDA here); timing the plain-torch reference only")
    warmup, iters = (10, 50) if torch.cuda.is_available() else (1, cpu_iters)
    rows = []
    for shape, kernel, ref, nbytes in configs:
        ref_us = median_us(ref, warmup=warmup, iters=iters)
        kernel_us = median_us(kernel, warmup=warmup, iters=iters) if timed else None
        row = dict(shape=shape, kernel_us=kernel_us, ref_us=ref_us, bytes=nbytes,
                   speedup=ref_us / kernel_us if kernel_us else None,
                   kernel_gb_s=nbytes / kernel_us / 1e3 if kernel_us else None,
                   ref_gb_s=nbytes / ref_us / 1e3)
        rows.append(row)
        kernel_txt = f"{kernel_us:9.1f} us" if kernel_us else "        - us"
        speed_txt = f"{row['speedup']:6.2f}x" if kernel_us else "     -"
        gbs = row["kernel_gb_s"] if kernel_us else row["ref_gb_s"]
        print(f"{device_name()} | {op} {shape:<40} | kernel {kernel_txt} | ref {ref_us:9.1f} us | "
              f"{speed_txt} | {gbs:8.2f} GB/s ({'kernel' if kernel_us else 'ref'})")
    RESULTS.mkdir(exist_ok=True)
    import triton

    path = RESULTS / f"{op}-{device_slug()}.json"
    path.write_text(json.dumps(dict(op=op, device=device_name(), torch=torch.__version__,
                                    triton=triton.__version__, kernels_timed=timed, results=rows), indent=2) + "\n")
    print(f"wrote {path.relative_to(RESULTS.parent.parent)}")
    return rows
