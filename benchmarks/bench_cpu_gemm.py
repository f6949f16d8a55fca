"""Times enginepy's CPU skinny GEMM (torch.ops.enginepy.cpu_linear, bf16 and int8 weights) against torch's
F.linear in fp32 and bf16, on the weight shapes of a MusicGen decoder, for M = 2, 8, 16 rows.

A decode step reads every weight once, so each case is timed cold: a pass walks through enough copies of the
weight (at least --rotate-mib, default 768 MiB, and 4x the last-level cache) that no copy is still cached when
it comes round again; a CPU may report a last-level cache of a few hundred MiB. Each round makes one pass per
method in turn (so a shared machine's changing load hits them alike); µs per call is the median over rounds of
(pass time / copies), and the least one is reported too. GB/s is the bytes of the weight as stored (packed,
with padding and scales, for cpu_linear) over that time, next to the copy bandwidth (bytes read + written per
second of a 256 MiB copy, as `enginepy bench` reports it; here the fastest of 7, same clock and threads).

    python benchmarks/bench_cpu_gemm.py [--model small|medium|large] [--rows 2 8 16] [--threads N]
                                        [--rounds 7] [--clock wall|thread] [--isas] [--out FILE]

--isas also times every ISA path of cpu_linear this CPU runs (not only the automatic choice).
Writes benchmarks/results/cpu_gemm-<model>-<cpu>.json naming the CPU, its flags, the thread count and torch.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _cpu_results import write_cpu_result  # noqa: E402
from enginepy.bench import device_name, environment  # noqa: E402
from enginepy.cpu_linear import KINDS, isas, last_level_cache_bytes, linear, pack_weight  # noqa: E402
from enginepy.random_model import released_spec  # noqa: E402


def model_shapes(model: str) -> list[tuple[str, int, int]]:
    """(name, N out, K in) of the matmuls of one decoder layer, plus the heads as one [K*V, D] matrix."""
    spec = released_spec(model)
    d, ffn = spec.hidden_size, 4 * spec.hidden_size  # MusicGen's FFN is 4x the model width
    return [("qkv", 3 * d, d), ("out", d, d), ("fc1", ffn, d), ("fc2", d, ffn),
            ("heads", spec.num_codebooks * spec.codebook_size, d)]


@dataclass
class Method:
    """One way to compute x @ W.T: its copies of W (enough to rotate through), bytes per copy and the call."""

    name: str
    weights: list
    nbytes: int
    dtype: torch.dtype
    call: object  # (x, weight) -> y


def copy_gbps_with(clock, megabytes: int = 256, rounds: int = 7) -> float:
    """Copy bandwidth (bytes read + written per second) of a 256 MiB tensor copy, timed with `clock` and the
    current torch thread count like the matmuls; the fastest of `rounds` copies."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(rounds):
        start = clock()
        dst.copy_(src)
        best = min(best, clock() - start)
    return 2 * src.numel() * 4 / best / 1e9


def copies_for(nbytes: int, rotate_bytes: int) -> int:
    return max(2, -(-rotate_bytes // nbytes))


def build_methods(n: int, k: int, rotate_bytes: int, every_isa: bool) -> list[Method]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(n, k, generator=gen) / k**0.5
    methods = []
    for name, w in (("torch-fp32", base), ("torch-bf16", base.bfloat16())):
        nbytes = w.numel() * w.element_size()
        methods.append(Method(name, [w.clone() for _ in range(copies_for(nbytes, rotate_bytes))], nbytes, w.dtype,
                              F.linear))
    for kind in KINDS:
        packed = pack_weight(base, kind)
        copies = [packed.clone() for _ in range(copies_for(packed.nbytes, rotate_bytes))]
        for isa in ["auto"] + (isas(kind) if every_isa else []):
            label = f"cpu_linear-{kind}" + ("" if isa == "auto" else f"[{isa}]")
            methods.append(Method(label, copies, packed.nbytes, torch.bfloat16,
                                  lambda x, w, isa=isa: linear(x, w, isa=isa)))
    return methods


def one_pass_us(method: Method, x: torch.Tensor, clock) -> float:
    """Mean µs per call while walking once through every copy of the weight (each one cold)."""
    start = clock()
    for w in method.weights:
        method.call(x, w)
    return (clock() - start) / len(method.weights) * 1e6


def time_shape(methods: list[Method], k: int, rows: list[int], rounds: int, clock) -> list[dict]:
    """For each M, `rounds` rounds in which every method makes one pass in turn: a change in the machine's load
    between rounds then hits all methods alike. Reports the median and the least µs per call."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for m in rows:
        x = torch.randn(m, k, generator=gen)
        inputs = {meth.name: x.to(meth.dtype) for meth in methods}
        for meth in methods:  # warm-up: code, page tables, the thread pool
            for w in meth.weights[:4]:
                meth.call(inputs[meth.name], w)
        samples = {meth.name: [] for meth in methods}
        for _ in range(rounds):
            for meth in methods:
                samples[meth.name].append(one_pass_us(meth, inputs[meth.name], clock))
        for meth in methods:
            us, best = statistics.median(samples[meth.name]), min(samples[meth.name])
            out.append(dict(method=meth.name, m=m, us=us, us_min=best, weight_bytes=meth.nbytes,
                            gb_s=meth.nbytes / us / 1e3, gb_s_best=meth.nbytes / best / 1e3,
                            copies=len(meth.weights), rounds=rounds))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small", choices=["small", "medium", "large"])
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 8, 16])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rotate-mib", type=int, default=768)
    parser.add_argument("--isas", action="store_true", help="also time every ISA path this CPU runs")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="thread: CPU time of the calling thread (with --threads 1 only), less sensitive to "
                             "other processes on a shared machine")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        parser.error("--clock thread measures one thread: use it with --threads 1")
    rotate = max(args.rotate_mib * 2**20, 4 * last_level_cache_bytes())
    cpu = torch.device("cpu")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    copy_gbps = copy_gbps_with(clock)
    env = environment(cpu)
    flags = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
             if f in Path("/proc/cpuinfo").read_text().split()] if Path("/proc/cpuinfo").exists() else []
    print(f"# {device_name(cpu)} | flags {' '.join(flags)} | copy {copy_gbps:.1f} GB/s | rotate "
          f"{rotate / 2**20:.0f} MiB | torch {torch.__version__}")
    print(f"{'method':<28} {'shape NxK':>11} {'M':>3} {'us p50':>9} {'us min':>9} {'GB/s':>7} {'best':>7} "
          f"{'% copy':>7} {'vs fp32':>8}   (GB/s best and % copy from the least time)")
    rows = []
    for name, n, k in model_shapes(args.model):
        methods = build_methods(n, k, rotate, args.isas)
        measured = time_shape(methods, k, args.rows, args.rounds, clock)
        del methods
        fp32 = {r["m"]: r for r in measured if r["method"] == "torch-fp32"}
        for r in measured:
            r.update(matrix=name, n=n, k=k, speedup_vs_fp32=fp32[r["m"]]["us"] / r["us"],
                     speedup_vs_fp32_best=fp32[r["m"]]["us_min"] / r["us_min"],
                     fraction_of_copy=r["gb_s"] / copy_gbps, fraction_of_copy_best=r["gb_s_best"] / copy_gbps)
            rows.append(r)
            print(f"{r['method']:<28} {n:>5}x{k:<5} {r['m']:>3} {r['us']:>9.1f} {r['us_min']:>9.1f} {r['gb_s']:>7.1f} "
                  f"{r['gb_s_best']:>7.1f} {100 * r['fraction_of_copy_best']:>6.0f}% {r['speedup_vs_fp32']:>7.2f}x",
                  flush=True)
    result = dict(environment=env, cpu_flags=flags, threads=torch.get_num_threads(), copy_gbps=copy_gbps,
                  rotate_mib=rotate / 2**20, model=args.model, clock=args.clock,
                  isa={kind: isas(kind)[0] for kind in KINDS},
                  rows=rows)
    path = write_cpu_result("cpu_gemm", args.model, result, args.out)
    print(f"wrote {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
