"""Load test of `enginepy serve`: Poisson arrivals at several rates, measured from the client side.

    python benchmarks/load.py --model small --rates 0.05,0.1,0.2,0.4 --requests 16 --audio 2
    python benchmarks/load.py --url http://127.0.0.1:8000 --rates 1,2 ...   # a server that is already running

For each arrival rate (requests per second) it sends `--requests` requests at exponential gaps (seeded), each
asking for `--audio` seconds, streamed by default (16-bit PCM chunks as they are generated), and reports:
time to first audio (send -> first audio byte; non-streamed: the whole body) p50/p99, request latency (send ->
last byte) p50/p99, audio-s/s (seconds of audio delivered per wall-clock second, first send to last byte),
refusals (503) and failures, and the server's mean step time and mean running requests (from /metrics).
Without --url it starts `python -m enginepy.serve` itself (and stops it). Writes JSON and a plot under
benchmarks/results/ (load-<device>-<model>.json/.png); the device is named in the JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import httpx
import numpy as np
import torch

from enginepy.bench import bench_model_dir, environment
from enginepy.serve.metrics import parse_samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
GEN = "/v1/audio/generations"
PROMPTS = ["lo-fi beat with warm piano", "dark techno with deep bass", "ambient pads", "folk guitar",
           "epic orchestral strings", "funk bass groove", "retro 80s synth", "jazz"]


@dataclass
class Sample:
    status: int
    ttfa_s: float | None = None
    latency_s: float | None = None
    audio_bytes: int = 0


@dataclass
class RateRow:
    rate_rps: float
    requests: int
    ok: int
    refused_503: int
    failed: int
    wall_s: float
    ttfa_p50_s: float | None
    ttfa_p99_s: float | None
    latency_p50_s: float | None
    latency_p99_s: float | None
    audio_s_per_s: float
    offered_audio_s_per_s: float
    server_step_ms_mean: float | None
    server_running_mean: float | None


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def _one(client: httpx.AsyncClient, body: dict) -> Sample:
    start = time.perf_counter()
    try:
        async with client.stream("POST", GEN, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Sample(r.status_code)
            first, size = None, 0
            async for chunk in r.aiter_raw():
                if chunk and first is None:
                    first = time.perf_counter()
                size += len(chunk)
            end = time.perf_counter()
    except httpx.HTTPError:
        return Sample(-1)
    return Sample(200, first - start, end - start, size)


async def _sample_running(client: httpx.AsyncClient, out: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        out.append(parse_samples((await client.get("/metrics")).text)["enginepy_requests_running"])
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        except asyncio.TimeoutError:
            pass


async def run_rate(url: str, rate: float, count: int, audio_s: float, stream: bool, seed: int,
                   timeout_s: float, frame_rate: int) -> RateRow:
    """`count` requests at Poisson arrivals of `rate` per second; every wait is bounded by `timeout_s`."""
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout_s),
                                 limits=httpx.Limits(max_connections=count + 8)) as client:
        before = parse_samples((await client.get("/metrics")).text)
        running: list[float] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_running(client, running, stop))
        tasks = []
        start = time.perf_counter()
        for i in range(count):
            body = dict(prompt=PROMPTS[i % len(PROMPTS)], duration=audio_s, seed=seed * 100_000 + i, stream=stream,
                        response_format="pcm")
            tasks.append(asyncio.create_task(_one(client, body)))
            if i + 1 < count:
                await asyncio.sleep(rng.expovariate(rate))
        samples = await asyncio.wait_for(asyncio.gather(*tasks), timeout=timeout_s)
        wall = time.perf_counter() - start
        stop.set()
        await sampler
        after = parse_samples((await client.get("/metrics")).text)
    ok = [s for s in samples if s.status == 200]
    delivered = len(ok) * int(audio_s * frame_rate) / frame_rate
    steps = after["enginepy_engine_steps_total"] - before["enginepy_engine_steps_total"]
    step_sum = after["enginepy_step_seconds_sum"] - before["enginepy_step_seconds_sum"]
    return RateRow(
        rate_rps=rate, requests=count, ok=len(ok), refused_503=sum(s.status == 503 for s in samples),
        failed=sum(s.status not in (200, 503) for s in samples), wall_s=wall,
        ttfa_p50_s=_percentile([s.ttfa_s for s in ok], 50), ttfa_p99_s=_percentile([s.ttfa_s for s in ok], 99),
        latency_p50_s=_percentile([s.latency_s for s in ok], 50),
        latency_p99_s=_percentile([s.latency_s for s in ok], 99),
        audio_s_per_s=delivered / wall, offered_audio_s_per_s=rate * audio_s,
        server_step_ms_mean=1000 * step_sum / steps if steps else None,
        server_running_mean=float(np.mean(running)) if running else None,
    )


def start_server(args) -> tuple[subprocess.Popen, str]:
    """`python -m enginepy.serve` on a free port; returns (process, base URL) once it listens."""
    cmd = [sys.executable, "-m", "enginepy.serve", "--model", args.model_dir, "--port", "0", "--log-level", "warning",
           "--max-batch", str(args.max_batch), "--max-waiting", str(args.max_waiting),
           "--max-duration", str(max(args.audio, 1.0))]
    for name in ("device", "backend", "dtype"):
        if getattr(args, name) is not None:
            cmd += [f"--{name}", getattr(args, name)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + args.start_timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    raise SystemExit("the server did not start:\n" + "".join(lines))


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    rates = [r["rate_rps"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label, style in (("ttfa_p50_s", "time to first audio p50", "o-"),
                              ("ttfa_p99_s", "time to first audio p99", "o--"),
                              ("latency_p50_s", "latency p50", "s-"), ("latency_p99_s", "latency p99", "s--")):
        left.plot(rates, [r[key] for r in rows], style, label=label)
    left.set_xlabel("arrival rate (requests/s)")
    left.set_ylabel("seconds")
    left.set_yscale("log")
    left.legend(fontsize=8)
    right.plot(rates, [r["audio_s_per_s"] for r in rows], "o-", label="delivered")
    right.plot(rates, [r["offered_audio_s_per_s"] for r in rows], ":", color="gray", label="offered")
    right.set_xlabel("arrival rate (requests/s)")
    right.set_ylabel("audio seconds per second")
    right.legend(fontsize=8)
    c = result["config"]
    fig.suptitle(f"enginepy serve, {c['model']} ({c['backend'] or 'default'} backend), {c['audio_s']:g} s requests, "
                 f"max batch {c['max_batch']} — {result['environment']['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny | small | medium | large (random weights) or a model directory")
    p.add_argument("--url", default=None, help="an enginepy server already running (default: start one)")
    p.add_argument("--device", default=None)
    p.add_argument("--backend", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-waiting", type=int, default=256)
    p.add_argument("--rates", default="1,2,4", help="comma-separated arrival rates, requests/s")
    p.add_argument("--requests", type=int, default=16, help="requests per rate")
    p.add_argument("--audio", type=float, default=2.0, help="seconds of audio per request")
    p.add_argument("--no-stream", action="store_true", help="whole responses (time to first audio = latency)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0, help="bound on each rate's run, seconds")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/load-<device>-<model>.json)")
    args = p.parse_args(argv)
    rates = [float(x) for x in args.rates.split(",")]
    if not rates or min(rates) <= 0 or args.requests < 1 or args.audio <= 0:
        p.error("--rates must be positive numbers; --requests >= 1; --audio > 0")
    args.model_dir = bench_model_dir(args.model)
    load_start = list(os.getloadavg())
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            info = client.get("/v1/models").json()["data"][0]
            # Warm-up: the first request pays one-time costs (allocations, lazy initialisation).
            client.post(GEN, json=dict(prompt="warm up", duration=min(args.audio, 1.0), seed=0), timeout=args.timeout)
        rows = []
        for i, rate in enumerate(rates):
            row = asyncio.run(run_rate(url, rate, args.requests, args.audio, not args.no_stream, args.seed + i,
                                       args.timeout, info["frame_rate"]))
            rows.append(asdict(row))
            fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            print(f"{info['device']} {args.model} rate {rate:g}/s: ok {row.ok}/{row.requests} (503: {row.refused_503}, "
                  f"failed {row.failed}) | ttfa p50 {fmt(row.ttfa_p50_s)} s p99 {fmt(row.ttfa_p99_s)} s | latency p50 "
                  f"{fmt(row.latency_p50_s)} s p99 {fmt(row.latency_p99_s)} s | {row.audio_s_per_s:.3f} audio-s/s "
                  f"(offered {row.offered_audio_s_per_s:.3f}) | step {fmt(row.server_step_ms_mean)} ms, "
                  f"running {fmt(row.server_running_mean)}", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    device = torch.device(info["device"])
    result = {
        # Other work on the machine slows the server down: the load averages (1, 5, 15 min) say how much there was.
        "environment": {**environment(device), "load_average_start": load_start, "load_average_end": list(os.getloadavg())},
        "config": {"model": args.model, "backend": info["backend"], "dtype": info["dtype"], "device": info["device"],
                   "max_batch": info["max_batch"], "max_waiting": info["max_waiting"], "audio_s": args.audio,
                   "requests_per_rate": args.requests, "stream": not args.no_stream, "response_format": "pcm",
                   "seed": args.seed, "sample_rate": info["sample_rate"],
                   "note": "server and load generator on the same machine"},
        "rows": rows,
    }
    out = args.out or os.path.join(RESULTS, f"load-{device.type}-{os.path.basename(os.path.normpath(args.model))}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    plot(result, os.path.splitext(out)[0] + ".png")
    print(f"wrote {out} and {os.path.splitext(out)[0]}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
