"""The default dtype of a CPU decoder, chosen by measuring this machine rather than by reading a CPU flag.

bf16 weights halve the bytes a decode step reads, but whether that makes the step faster depends on the
kernel the CPU gets: torch's bf16 F.linear was measured slower than fp32 on an AVX512-BF16 Xeon and 3x faster
on an EPYC. enginepy's bf16 path is the packed kernel of enginepy.cpu_linear, so the choice times exactly
that: one decoder layer's matmuls (musicgen widths by default) at 2 and 16 rows (batch 1 and 8 with CFG),
cold, fp32 F.linear against the bf16 kernel. bfloat16 is chosen only if it wins at both row counts (by 10%
at 2 rows, where the step is bound by memory and the expected gain is ~2x), so the default is never slower
than fp32. The answer is kept per process and on disk ($ENGINEPY_CACHE/cpu_dtype.json), keyed by the CPU,
thread count and torch version, so the ~1 s measurement runs once per machine.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import time

import torch
import torch.nn.functional as F

from .cpu_linear import isas, last_level_cache_bytes, linear, pack_weight

CHOICES = ("float32", "bfloat16")
ROWS = (2, 16)
GAIN_AT_FEW_ROWS = 0.9  # bf16 must take <= 90% of fp32's time at 2 rows
_memo: dict[str, dict] = {}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor() or platform.machine()


def machine_key(hidden_size: int) -> str:
    """What the measurement depends on: CPU model, the kernels it runs, threads, torch, and the width."""
    return (f"{_cpu_model()}|bf16:{isas('bf16')[0]}|threads:{torch.get_num_threads()}|torch:{torch.__version__}"
            f"|hidden:{hidden_size}")


def _cache_file() -> str:
    from .loading import default_cache_dir

    return os.path.join(default_cache_dir(), "cpu_dtype.json")


def _layer_shapes(hidden_size: int) -> list[tuple[int, int]]:
    """[N, K] of one MusicGen layer's matmuls: qkv, out, cross_q, cross_out, fc1, fc2 (FFN = 4 x width)."""
    d = hidden_size
    return [(3 * d, d), (d, d), (d, d), (d, d), (4 * d, d), (d, 4 * d)]


def _min_round_us(calls: list, rounds: int) -> float:
    """Least time (µs) of one pass through `calls` over `rounds` passes (the least is the run others disturbed
    least; the passes are cold because the calls' weights together exceed the caches)."""
    for call in calls[:4]:
        call()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for call in calls:
            call()
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def measure(hidden_size: int = 1024, rotate_bytes: int | None = None, rounds: int = 3) -> dict:
    """Cold µs of one layer's matmuls per dtype and row count: {'float32': {2: us, 16: us}, 'bfloat16': {...}}.

    The weights are copied until the copies cover rotate_bytes (default: 3x the largest cache, at least
    256 MiB) so every matmul reads its weight from memory, as in a decode step of a real model.
    """
    if rotate_bytes is None:
        rotate_bytes = max(3 * last_level_cache_bytes(), 256 * 2**20)
    gen = torch.Generator().manual_seed(0)
    shapes = _layer_shapes(hidden_size)
    layer = [torch.randn(n, k, generator=gen) / k**0.5 for n, k in shapes]
    result: dict[str, dict[int, float]] = {}
    for dtype in CHOICES:
        one = layer if dtype == "float32" else [pack_weight(w, "bf16") for w in layer]
        one_bytes = sum(w.numel() * 4 for w in layer) if dtype == "float32" else sum(p.nbytes for p in one)
        copies = max(2, -(-rotate_bytes // one_bytes))
        weights = [[w.clone() for w in one] for _ in range(copies)]
        result[dtype] = {}
        for rows in ROWS:
            x = torch.randn(rows, hidden_size, generator=gen)
            x4 = torch.randn(rows, 4 * hidden_size, generator=gen)
            if dtype == "bfloat16":
                x, x4 = x.bfloat16(), x4.bfloat16()
            calls = []
            for copy in weights:
                for w, (n, k) in zip(copy, shapes):
                    xin = x4 if k != hidden_size else x
                    calls.append((lambda xin=xin, w=w: F.linear(xin, w)) if dtype == "float32"
                                 else (lambda xin=xin, w=w: linear(xin, w)))
            result[dtype][rows] = _min_round_us(calls, rounds) / copies
        del weights
    return result


def decide(times: dict) -> str:
    """'bfloat16' when the bf16 kernel beats fp32 at every row count (by 10% at the fewest rows), else 'float32'."""
    fp32, bf16 = times["float32"], times["bfloat16"]
    few = min(fp32)
    wins = bf16[few] <= GAIN_AT_FEW_ROWS * fp32[few] and all(bf16[r] <= fp32[r] for r in fp32)
    return "bfloat16" if wins else "float32"


def choose_cpu_dtype(hidden_size: int = 1024, refresh: bool = False, use_disk: bool = True) -> str:
    """The CPU decoder's default dtype on this machine: 'bfloat16' (through enginepy.cpu_linear) or 'float32'.

    Measured once per machine (about a second) and remembered per process and, with use_disk, in
    $ENGINEPY_CACHE/cpu_dtype.json; refresh=True measures again.
    """
    key = machine_key(hidden_size)
    if not refresh and key in _memo:
        return _memo[key]["dtype"]
    path = _cache_file()
    stored: dict = {}
    if use_disk and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                stored = json.load(f)
        except (OSError, ValueError):
            stored = {}  # unreadable cache: measure again and overwrite it
        if not isinstance(stored, dict):
            stored = {}
        entry = stored.get(key)
        if not refresh and isinstance(entry, dict) and entry.get("dtype") in CHOICES:
            _memo[key] = entry
            return entry["dtype"]
    times = measure(hidden_size)
    entry = {"dtype": decide(times), "us": {d: {str(r): t for r, t in v.items()} for d, v in times.items()},
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    _memo[key] = entry
    if use_disk:
        stored[key] = entry
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(stored, f, indent=2)
        os.replace(tmp, path)
    return entry["dtype"]
