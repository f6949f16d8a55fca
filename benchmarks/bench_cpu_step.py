"""Whole decode steps on the CPU: enginepy's reference backend with its matmuls in fp32 (F.linear), bf16 and
int8 (enginepy.cpu_linear), against transformers' fp32 MusicGen on the same random weights, in one run.

Each round times every configuration back to back with enginepy.bench (ms per step p50/p99 from a timestamp
per step, render time of the whole clip, GB/s of weights + KV cache per step against the copy bandwidth); the
summary holds medians over rounds and speedups against transformers in the same round. The bf16 and int8 rows
load with from_pretrained(dtype=...), which packs every decoder matmul for enginepy.cpu_linear (the heads as one
[K*V, D] matrix). The CPU default dtype (enginepy.cpu_dtype's measured choice) is recorded with the results.

    python benchmarks/bench_cpu_step.py [--model small] [--batches 1 8] [--duration 1] [--rounds 3]
                                        [--threads N] [--configs ...] [--out FILE]

configs: fp32 (plain F.linear), bf16 (decoder bf16, matmuls through the op), int8 (dtype='int8': int8 weights,
fp32 activations in two int8 passes), int8-1pass (the same with one 8-bit activation pass).
Writes benchmarks/results/cpu_step-<model>-<cpu>.json naming the CPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _cpu_results import write_cpu_result  # noqa: E402
from enginepy import MusicGen  # noqa: E402
from enginepy.cpu_dtype import choose_cpu_dtype  # noqa: E402
from enginepy.bench import (  # noqa: E402
    bench_enginepy,
    bench_model_dir,
    bench_transformers,
    copy_bandwidth_gbps,
    environment,
)

# config -> (decoder dtype, packed kind or None, int8 activation passes)
CONFIGS = {
    "fp32": ("float32", None, 2),
    "bf16": ("bfloat16", "bf16", 2),
    "int8": ("int8", "int8", 2),
    "int8-1pass": ("int8", "int8", 1),
}


def summarize(rows: list[dict]) -> list[dict]:
    """Per (config, batch): medians over rounds of ms/step p50 and render time, and of the speedups against
    transformers' fp32 row of the same round and batch."""
    out = []
    for config, batch in dict.fromkeys((r["config"], r["batch"]) for r in rows):
        mine = [r for r in rows if r["config"] == config and r["batch"] == batch]
        entry = dict(config=config, batch=batch, rounds=len(mine),
                     ms_step_p50=statistics.median(r["ms_step_p50"] for r in mine),
                     ms_step_p99=statistics.median(r["ms_step_p99"] for r in mine),
                     render_s=statistics.median(r["render_s"] for r in mine),
                     achieved_gbps=statistics.median(r["achieved_gbps"] for r in mine))
        refs = {r["round"]: r for r in rows if r["config"] == "transformers-fp32" and r["batch"] == batch}
        pairs = [(refs[r["round"]], r) for r in mine if r["round"] in refs and config != "transformers-fp32"]
        if pairs:
            entry["step_speedup_vs_transformers"] = statistics.median(h["ms_step_p50"] / r["ms_step_p50"] for h, r in pairs)
            entry["render_speedup_vs_transformers"] = statistics.median(h["render_s"] / r["render_s"] for h, r in pairs)
        out.append(entry)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--duration", type=float, default=1.0)
    parser.add_argument("--configs", nargs="+", default=["fp32", "bf16", "int8"], choices=list(CONFIGS))
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--repeats", type=int, default=1, help="render timings per configuration and round")
    parser.add_argument("--rounds", type=int, default=3, help="passes over all configurations")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    hf_dir = bench_model_dir(args.model, args.cache_dir)
    copy_gbps = copy_bandwidth_gbps(cpu)
    env = environment(cpu)
    print(f"# {env['device']} | torch {env['torch']} | copy {copy_gbps:.1f} GB/s | model {args.model} | "
          f"{args.duration:g} s of audio | CFG 3, top-k 250")
    engines, frames = {}, None
    for config in args.configs:
        dtype, kind, passes = CONFIGS[config]
        mg = MusicGen.from_pretrained(hf_dir, device=cpu, dtype=dtype, backend="reference",
                                      max_batch=max(args.batches), max_duration=max(args.duration, 1.0),
                                      cache_dir=args.cache_dir)
        if kind is not None:  # from_pretrained packs bf16 and int8 on the CPU itself (layers and heads)
            assert mg.decoder.linear_impl is not None and "heads" in mg.decoder.linear_impl.weights
            mg.decoder.linear_impl.x_passes = passes
        engines[config] = mg
    # Rounds run every configuration back to back, so a change in the machine's load between rounds hits all of
    # them alike; speedups are taken within a round, then the median over rounds is reported.
    rows = []
    for rnd in range(args.rounds):
        for batch in args.batches:
            for config, mg in engines.items():
                row = asdict(bench_enginepy(mg, batch, args.duration, copy_gbps, args.repeats))
                frames = mg.frames
                rows.append(dict(row, config=config, round=rnd))
                print(f"round {rnd} {config:<18} batch {batch:>2}: {row['ms_step_p50']:8.2f} ms/step p50 "
                      f"{row['ms_step_p99']:8.2f} p99  render {row['render_s']:7.3f} s  {row['achieved_gbps']:6.1f} GB/s",
                      flush=True)
            if not args.no_transformers:
                row = asdict(bench_transformers(hf_dir, cpu, torch.float32, batch, frames, copy_gbps, args.repeats))
                rows.append(dict(row, config="transformers-fp32", round=rnd))
                print(f"round {rnd} {'transformers-fp32':<18} batch {batch:>2}: {row['ms_step_p50']:8.2f} ms/step p50 "
                      f"{row['ms_step_p99']:8.2f} p99  render {row['render_s']:7.3f} s", flush=True)
    summary = summarize(rows)
    print(f"\n{'config':<18} {'batch':>5} {'ms/step':>8} {'render s':>9} {'vs hf step':>10} {'vs hf render':>12}")
    for s in summary:
        step, render = s.get("step_speedup_vs_transformers"), s.get("render_speedup_vs_transformers")
        print(f"{s['config']:<18} {s['batch']:>5} {s['ms_step_p50']:>8.2f} {s['render_s']:>9.3f} "
              f"{f'{step:.2f}x' if step else '-':>10} {f'{render:.2f}x' if render else '-':>12}")
    result = dict(environment=env, copy_gbps=copy_gbps, threads=torch.get_num_threads(),
                  default_dtype=choose_cpu_dtype(), load_average=os.getloadavg(),
                  config=dict(model=args.model, duration_s=args.duration, frames=frames, batches=args.batches,
                              cfg_coef=3.0, top_k=250, repeats=args.repeats, rounds=args.rounds),
                  summary=summary, rows=rows)
    path = write_cpu_result("cpu_step", args.model, result, args.out)
    print(f"wrote {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
