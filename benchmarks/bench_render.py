"""Bulk-render throughput: `enginepy render`'s loop on the step engine against one static batch per call, on the
same job list with mixed durations, the same model and the same process.

    python benchmarks/bench_render.py [--model small] [--jobs 24] [--max-batch 4] [--durations 0.5,2,1,3]
                                      [--rounds 2] [--threads N] [--methods engine,static,...] [--out FILE]

Methods (each writes every job's 16-bit WAV into a fresh directory, so decode and file writing are counted):
  engine          enginepy.render's worker: jobs enter free slots as others finish, each decoded when done
                  (plus the manifest journal with fsync per job: the real command's loop, model already loaded),
                  longest job first as the command submits them
  engine-fifo     the same in file order (what longest-first saves: the tail where few slots are busy)
  static          jobs in file order, max-batch at a time, one `generate_tokens` call per batch at the batch's
                  longest duration, each row cut to its own length before decoding
  static-sorted   the same with jobs sorted by duration first (the best a static batcher can do without a queue)
Audio-s/s = requested audio seconds / wall seconds; cpu_s (process CPU time) is reported beside wall time
because on a machine shared with other work the wall time of a round swings with their load. The slot-step
columns count decode steps x occupied rows: `useful` are those a job needed, the rest is padding. Methods run
back to back in each round; medians over rounds. Writes benchmarks/results/render-<model>-<cpu>.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _cpu_results import write_cpu_result  # noqa: E402
from enginepy import MusicGen  # noqa: E402
from enginepy.audio_io import write_audio  # noqa: E402
from enginepy.bench import bench_model_dir, environment  # noqa: E402
from enginepy.render.jobs import Job  # noqa: E402
from enginepy.render.outdir import OutputDir, OutputKey  # noqa: E402
from enginepy.render.worker import Renderer, longest_first  # noqa: E402

PROMPTS = ["lo-fi beat with warm piano", "fast techno with deep bass", "calm ambient strings at night",
           "upbeat funk guitar groove"]


def make_jobs(count: int, durations: list[float], frame_rate: int, vocab: int) -> list[Job]:
    settings = dict(use_sampling=True, top_k=min(250, vocab), top_p=0.0, temperature=1.0, cfg_coef=3.0)
    return [Job(line=i + 1, id=f"job{i:03d}", prompt=PROMPTS[i % len(PROMPTS)], seed=i,
                settings={"duration": durations[i % len(durations)], **settings},
                frames=int(durations[i % len(durations)] * frame_rate)) for i in range(count)]


def run_engine(mg, jobs: list[Job], out: str, max_batch: int) -> dict:
    key = OutputKey("bench", str(mg.decoder.dtype).replace("torch.", ""), "wav")
    renderer = Renderer(mg, out, key, max_batch)
    steps_before = renderer.engine.steps_done
    with OutputDir(out) as directory:
        for entry in renderer.render(jobs):
            directory.append(entry)
    steps = renderer.engine.steps_done - steps_before
    return {"steps": steps, "slot_steps": None}


def run_static(mg, jobs: list[Job], out: str, max_batch: int) -> dict:
    steps = slot_steps = 0
    for start in range(0, len(jobs), max_batch):
        batch = jobs[start:start + max_batch]
        longest = max(batch, key=lambda j: j.frames)
        s = longest.settings
        mg.set_generation_params(duration=s["duration"], use_sampling=s["use_sampling"], top_k=s["top_k"],
                                 top_p=s["top_p"], temperature=s["temperature"], cfg_coef=s["cfg_coef"],
                                 seed=batch[0].seed)
        codes = mg.generate_tokens([j.prompt for j in batch])  # [B, K, frames of the longest]
        batch_steps = longest.frames + mg.cfg.max_delay
        steps += batch_steps
        slot_steps += batch_steps * len(batch)
        for job, row in zip(batch, codes):
            wav = mg.generate_audio(row[None, :, :job.frames])[0]
            write_audio(os.path.join(out, f"{job.id}.wav"), wav, mg.sample_rate)
    return {"steps": steps, "slot_steps": slot_steps}


METHODS = {
    "engine": lambda mg, jobs, out, b: run_engine(mg, longest_first(jobs), out, b),
    "engine-fifo": lambda mg, jobs, out, b: run_engine(mg, jobs, out, b),
    "static": lambda mg, jobs, out, b: run_static(mg, jobs, out, b),
    "static-sorted": lambda mg, jobs, out, b: run_static(mg, sorted(jobs, key=lambda j: j.frames), out, b),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small", help="tiny | small | medium | large (random weights) or a directory")
    p.add_argument("--dtype", default=None, help="decoder dtype (default: the engine's default for the CPU)")
    p.add_argument("--jobs", type=int, default=24)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--durations", default="0.5,2,1,3", help="seconds, cycled over the jobs")
    p.add_argument("--rounds", type=int, default=2, help="rounds of all methods back to back; medians reported")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default torch's choice; 1 is steadier on a machine shared with other work)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    durations = [float(x) for x in args.durations.split(",")]
    device = torch.device("cpu")
    start = time.perf_counter()
    mg = MusicGen.from_pretrained(bench_model_dir(args.model), device=device, dtype=args.dtype,
                                  max_batch=args.max_batch, max_duration=max(durations))
    load_s = time.perf_counter() - start
    jobs = make_jobs(args.jobs, durations, mg.frame_rate, mg.cfg.vocab_size)
    audio_s = sum(j.frames for j in jobs) / mg.frame_rate
    useful = sum(j.frames + mg.cfg.max_delay for j in jobs)  # slot-steps the jobs need, each in its own slot
    env = environment(device)
    env["loadavg_start"] = os.getloadavg()
    print(f"{env['device']} | model {args.model} | dtype {str(mg.decoder.dtype).replace('torch.', '')} | "
          f"{args.jobs} jobs, {audio_s:.1f} audio-s, durations {durations} | max batch {args.max_batch} | "
          f"load {load_s:.1f} s", flush=True)
    # Warm-up: the first calls allocate and initialise kernels.
    with tempfile.TemporaryDirectory() as warm:
        run_engine(mg, make_jobs(args.max_batch, [0.1], mg.frame_rate, mg.cfg.vocab_size), warm, args.max_batch)

    rows = []
    for r in range(args.rounds):
        for method in args.methods.split(","):
            out = tempfile.mkdtemp(prefix="bench-render-")
            try:
                t0, c0 = time.perf_counter(), time.process_time()
                counts = METHODS[method](mg, jobs, out, args.max_batch)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                written = sorted(n for n in os.listdir(out) if n.endswith(".wav"))
                assert len(written) == len(jobs), (method, len(written))
            finally:
                shutil.rmtree(out)
            slot_steps = counts["slot_steps"] if counts["slot_steps"] is not None else useful
            row = {"round": r, "method": method, "wall_s": wall, "cpu_s": cpu, "audio_s": audio_s,
                   "audio_s_per_s": audio_s / wall, "loadavg_1min": os.getloadavg()[0],
                   "decode_steps": counts["steps"], "slot_steps": slot_steps, "useful_slot_steps": useful,
                   "padding_fraction": 1 - useful / slot_steps}
            rows.append(row)
            print(f"round {r} | {method:13s} | {wall:7.2f} s (cpu {cpu:7.2f} s) | {row['audio_s_per_s']:.3f} audio-s/s | "
                  f"{counts['steps']} steps | padding {row['padding_fraction']:.0%}", flush=True)

    summary = []
    for method in args.methods.split(","):
        mine = [r for r in rows if r["method"] == method]
        summary.append({"method": method, "wall_s": statistics.median(r["wall_s"] for r in mine),
                        "cpu_s": statistics.median(r["cpu_s"] for r in mine),
                        "audio_s_per_s": statistics.median(r["audio_s_per_s"] for r in mine)})
    base = {s["method"]: s for s in summary}.get("static")
    for s in summary:
        s["speedup_vs_static"] = s["audio_s_per_s"] / base["audio_s_per_s"] if base else None
        s["cpu_speedup_vs_static"] = base["cpu_s"] / s["cpu_s"] if base else None
        print(f"median | {s['method']:13s} | {s['audio_s_per_s']:.3f} audio-s/s | cpu {s['cpu_s']:.1f} s"
              + (f" | {s['speedup_vs_static']:.2f}x static (wall), {s['cpu_speedup_vs_static']:.2f}x (cpu)"
                 if base else ""))
    env["loadavg_end"] = os.getloadavg()
    result = {"environment": env,
              "config": {"model": args.model, "dtype": str(mg.decoder.dtype).replace("torch.", ""), "jobs": args.jobs,
                         "max_batch": args.max_batch, "durations": durations, "rounds": args.rounds,
                         "threads": torch.get_num_threads(),
                         "top_k": min(250, mg.cfg.vocab_size), "cfg_coef": 3.0, "load_s": load_s},
              "rows": rows, "summary": summary}
    print(f"wrote {write_cpu_result('render', args.model, result, args.out)}")


if __name__ == "__main__":
    main()
