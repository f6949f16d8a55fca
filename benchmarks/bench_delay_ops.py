"""Times the delay-pattern ops of enginepy._C against their plain-torch twins in enginepy.pattern.

Per-step ops (delay_step_input, delay_step_write) run once per decode step. On CUDA each is captured
alone in a CUDA graph and timed per replay with CUDA events, as the decoder runs them; on CPU they are
timed eagerly. Whole-sequence ops (delay_scatter, delay_gather) run once per request and are timed eagerly.
Prints one line per case and writes JSON under benchmarks/results/ naming the device and torch version.

    python benchmarks/bench_delay_ops.py [--device cpu|cuda] [--threads N] [--out FILE]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from enginepy import delay_ops, pattern

SPECIAL = 2048
RESULTS = Path(__file__).resolve().parent / "results"
# (rows B' = 2B with CFG, delays); Tmax = 1503 is 30 s of codes.
STEP_CASES = [(2, "mono4"), (8, "mono4"), (32, "mono4"), (128, "mono4"), (2, "stereo8"), (32, "stereo8")]
SEQUENCE_CASES = [(1, "mono4", 1500), (8, "mono4", 1500), (32, "mono4", 1500), (8, "stereo8", 1500)]
DELAYS = {"mono4": pattern.mono_delays(4), "stereo8": pattern.stereo_delays(8)}
T_MAX = 1503


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def time_cpu_us(fn: Callable[[], object], min_seconds: float = 0.2) -> float:
    """Median µs per call over 5 rounds, each long enough to swamp timer resolution."""
    fn()
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if time.perf_counter() - start > min_seconds / 5 or calls >= 1 << 20:
            break
        calls *= 2
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(rounds)


def time_cuda_eager_us(fn: Callable[[], object], iters: int = 200) -> float:
    """Median µs per call from CUDA events around single calls (warmed up)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def time_cuda_graph_us(fn: Callable[[], object], replays: int = 2000) -> float:
    """µs per replay of a CUDA graph holding one call of fn (warmed up on a side stream first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        rounds.append(start.elapsed_time(end) * 1e3 / replays)
    return statistics.median(rounds)


def step_inputs(rows: int, delays: list[int], device: torch.device):
    gen = torch.Generator().manual_seed(0)
    k = len(delays)
    codes = torch.randint(0, SPECIAL, (rows, k, T_MAX), generator=gen).to(device)  # [B', K, Tmax]
    step = torch.randint(0, T_MAX + max(delays), (rows,), generator=gen).to(device)  # [B']
    lengths = torch.full((rows,), T_MAX, dtype=torch.int64, device=device)
    prompt_lengths = torch.zeros(rows, dtype=torch.int64, device=device)
    tokens = torch.randint(0, SPECIAL, (rows, k), generator=gen).to(device)  # [B', K]
    return codes, step, lengths, prompt_lengths, torch.tensor(delays, device=device), tokens


def run(device: torch.device) -> list[dict]:
    per_step = time_cuda_graph_us if device.type == "cuda" else time_cpu_us
    per_call = time_cuda_eager_us if device.type == "cuda" else time_cpu_us
    timing = "CUDA graph, µs per replay" if device.type == "cuda" else "eager, µs per call"
    rows_out = []

    def report(op: str, shape: str, fast_us: float, ref_us: float, how: str) -> None:
        row = {"op": op, "shape": shape, "fast_us": round(fast_us, 3), "reference_us": round(ref_us, 3),
               "speedup": round(ref_us / fast_us, 2), "timing": how}
        rows_out.append(row)
        print(f"{device_name(device):>28}  {op:<17} {shape:<36} fast {fast_us:9.2f} µs  "
              f"reference {ref_us:9.2f} µs  speedup {row['speedup']:6.2f}x  ({how})")

    for rows, name in STEP_CASES:
        codes, step, lengths, prompt, d, tokens = step_inputs(rows, DELAYS[name], device)
        shape = f"B'={rows} K={len(d)} Tmax={T_MAX} {name}"
        step_ops = {
            "delay_step_input": (lambda: delay_ops.delay_step_input(codes, step, lengths, d, SPECIAL),
                                 lambda: pattern.delay_step_input(codes, step, lengths, d, SPECIAL)),
            "delay_step_write": (lambda: delay_ops.delay_step_write(codes, tokens, step, lengths, prompt, d),
                                 lambda: pattern.delay_step_write(codes, tokens, step, lengths, prompt, d)),
        }
        for op, (fast, reference) in step_ops.items():
            report(op, shape, per_step(fast), per_step(reference), timing)

    how = "eager, µs per call" + (" (CUDA events)" if device.type == "cuda" else "")
    for batch, name, frames in SEQUENCE_CASES:
        d = torch.tensor(DELAYS[name], device=device)
        codes = torch.randint(0, SPECIAL, (batch, len(d), frames), generator=torch.Generator().manual_seed(1)).to(device)
        pat = delay_ops.delay_scatter(codes, d, SPECIAL)
        shape = f"B={batch} K={len(d)} T={frames} {name}"
        report("delay_scatter", shape, per_call(lambda: delay_ops.delay_scatter(codes, d, SPECIAL)),
               per_call(lambda: pattern.delay_scatter(codes, d, SPECIAL)), how)
        report("delay_gather", shape, per_call(lambda: delay_ops.delay_gather(pat, d)),
               per_call(lambda: pattern.delay_gather(pat, d)), how)
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/bench_delay_ops-<device>.json)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rows = run(device)
    name = device_name(device)
    result = {
        "benchmark": "bench_delay_ops",
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }
    tag = "cpu" if device.type == "cpu" else re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    out = args.out or RESULTS / f"bench_delay_ops-{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
