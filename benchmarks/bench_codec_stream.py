"""Streaming EnCodec decode (enginepy.codec_stream) vs one-shot Codec.decode, musicgen's 32 kHz codec shapes.

For each (rows, frames per push) the same random codes are decoded once in one shot and once pushed a chunk at a
time into a StreamingDecoder (rows pushed together, as the engine does every step), then closed. Reports wall
time, real-time factor (seconds of audio per wall second, all rows counted), push latency (median, p99) and the
max abs difference from the one-shot decode. Random weights: the cost does not depend on their values.
Writes benchmarks/results/codec_stream-<device>.json naming the CPU, threads and load average.

    python benchmarks/bench_codec_stream.py [--seconds 4] [--rows 1 4] [--chunks 1 5 25] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from enginepy.bench import environment
from enginepy.codec_stream import StreamingDecoder, random_codec

RESULTS = Path(__file__).resolve().parent / "results"


def one_shot(codec, codes: torch.Tensor) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    wav = codec.decode(codes)
    return time.perf_counter() - t0, wav


def streamed(codec, codes: torch.Tensor, chunk: int) -> tuple[float, list[float], torch.Tensor]:
    stream = StreamingDecoder(codec)
    rows, _, frames = codes.shape
    pieces = [[] for _ in range(rows)]
    pushes = []
    t0 = time.perf_counter()
    for r in range(rows):
        stream.open(r)
    for start in range(0, frames, chunk):
        t = time.perf_counter()
        out = stream.push({r: codes[r, :, start : start + chunk] for r in range(rows)})
        pushes.append(time.perf_counter() - t)
        for r, wav in out.items():
            pieces[r].append(wav)
    for r in range(rows):
        pieces[r].append(stream.close(r))
    wall = time.perf_counter() - t0
    return wall, pushes, torch.stack([torch.cat(p, dim=-1) for p in pieces])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="audio per row")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 5, 25], help="frames per push")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    codec = random_codec()
    stream = StreamingDecoder(codec)
    hop, rate = stream.hop_length, codec.model.config.sampling_rate
    frames = int(args.seconds * rate / hop)
    env = environment(torch.device("cpu"))
    env.update(threads=torch.get_num_threads(), load_average=os.getloadavg())
    print(f"{env['device']} | EnCodec 32 kHz shapes, {frames} frames per row, lookahead "
          f"{stream.lookahead_samples} samples = {stream.lookahead_frames} frames | load {env['load_average'][0]:.1f}")
    results = []
    for rows in args.rows:
        codes = torch.randint(0, 2048, (rows, 4, frames), generator=torch.Generator().manual_seed(rows))
        audio_s = rows * frames * hop / rate
        one_shot(codec, codes[:, :, :10])  # warm-up
        base_s, reference = one_shot(codec, codes)
        results.append(dict(mode="one-shot", rows=rows, frames=frames, chunk=frames, wall_s=base_s,
                            realtime_factor=audio_s / base_s))
        print(f"rows {rows:2d} | one-shot          | {base_s:7.2f} s | {audio_s / base_s:6.2f}x real time")
        for chunk in args.chunks:
            wall, pushes, wav = streamed(codec, codes, chunk)
            err = (wav - reference).abs().max().item()
            p99 = sorted(pushes)[min(len(pushes) - 1, int(0.99 * len(pushes)))]
            results.append(dict(mode="stream", rows=rows, frames=frames, chunk=chunk, wall_s=wall,
                                realtime_factor=audio_s / wall, push_ms_p50=1e3 * statistics.median(pushes),
                                push_ms_p99=1e3 * p99, chunk_audio_ms=1e3 * chunk * hop / rate,
                                max_abs_err=err, vs_one_shot=base_s / wall))
            print(f"rows {rows:2d} | stream chunk {chunk:4d} | {wall:7.2f} s | {audio_s / wall:6.2f}x real time | "
                  f"push p50 {1e3 * statistics.median(pushes):7.1f} ms p99 {1e3 * p99:7.1f} ms "
                  f"(chunk = {1e3 * chunk * hop / rate:.0f} ms of audio) | max err {err:.1e}")
    RESULTS.mkdir(exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in env["device"].lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    path = args.out or RESULTS / f"codec_stream-{slug}.json"
    path.write_text(json.dumps(dict(op="codec_stream", lookahead_samples=stream.lookahead_samples,
                                    lookahead_frames=stream.lookahead_frames, **env, results=results), indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
