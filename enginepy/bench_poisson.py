"""`enginepy bench --scenario poisson`: continuous batching vs static batching on the same random arrivals.

Requests arrive as a Poisson process of rate λ (requests per wall-clock second) with durations drawn uniformly
from [lo, hi] seconds and random seeds (all seeded, so both policies see the very same arrivals). Two policies
drive the same step engine:
  continuous  a request is queued the moment it arrives and joins at the next decode step (the engine's policy);
  static      the engine runs one batch at a time: it waits until max_batch requests have arrived (or no more
              will), runs them until the longest is done, then takes the next batch.
Reported per policy: throughput (audio seconds per wall second), per-step time p50/p99, queueing delay
(arrival to admission), time to first frame and request latency (arrival to last frame), p50/p99.
"""
from __future__ import annotations

import random
import time

from .bench import _percentile as percentile


def arrivals(rate: float, count: int, durations: tuple[float, float], seed: int) -> list[tuple[float, float, int]]:
    """(arrival time s, duration s, seed) for `count` requests of a Poisson process of `rate` per second."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        out.append((t, round(rng.uniform(*durations), 2), rng.randrange(2**31)))
    return out


def _summary(values: list[float]) -> dict:
    return {"p50": percentile(values, 0.5), "p99": percentile(values, 0.99)} if values else {"p50": None, "p99": None}


def run_policy(mg, jobs: list[tuple[float, float, int]], max_batch: int, static: bool, prompt: str = "jazz") -> dict:
    """Drive one engine through `jobs` under one policy; returns the measurements (seconds)."""
    engine = mg.engine(max_batch=max_batch)
    pending = list(enumerate(jobs))
    arrived: dict[str, float] = {}
    admitted: dict[str, float] = {}
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    audio_s, step_s = 0.0, []
    start = time.perf_counter()

    def now() -> float:
        return time.perf_counter() - start

    queue: list[tuple[str, float, int]] = []
    while pending or queue or engine.has_unfinished_requests():
        while pending and pending[0][1][0] <= now():
            i, (t, duration, seed) = pending.pop(0)
            arrived[f"q{i}"] = t
            queue.append((f"q{i}", duration, seed))
        ready = not static or (not engine.has_unfinished_requests() and (len(queue) >= max_batch or not pending))
        if ready:
            take = queue if not static else queue[:max_batch]
            for rid, duration, seed in take:
                engine.add_request(rid, prompt, duration=duration, seed=seed)
            queue = [] if not static else queue[max_batch:]
        if not engine.has_unfinished_requests():
            if pending:
                time.sleep(max(0.0, min(pending[0][1][0] - now(), 0.05)))
            continue
        t0 = time.perf_counter()
        outputs = engine.step()
        step_s.append(time.perf_counter() - t0)
        t = now()
        for rid in engine.running:
            admitted.setdefault(rid, t)
        for out in outputs:
            admitted.setdefault(out.request_id, t)
            if out.new_frames.shape[1]:
                first.setdefault(out.request_id, t)
            if out.finished:
                done[out.request_id] = t
                audio_s += out.codes.shape[1] / mg.frame_rate
    wall = now()
    ids = sorted(done)
    return dict(
        policy="static" if static else "continuous", requests=len(ids), wall_s=wall, audio_s=audio_s,
        audio_s_per_s=audio_s / wall if wall else None, steps=len(step_s),
        step_ms={k: v * 1e3 if v is not None else None for k, v in _summary(step_s).items()},
        queue_s=_summary([admitted[r] - arrived[r] for r in ids]),
        first_frame_s=_summary([first[r] - arrived[r] for r in ids if r in first]),
        latency_s=_summary([done[r] - arrived[r] for r in ids]),
    )


def run_poisson(mg, rate: float, count: int, durations: tuple[float, float], max_batch: int, seed: int = 0) -> dict:
    """Both policies on the same arrivals; a short warm-up first (allocations, kernel compilation)."""
    warm = mg.engine(max_batch=1)
    warm.add_request("warm-up", "jazz", duration=min(durations[0], 0.1), seed=0)
    while warm.has_unfinished_requests():
        warm.step()
    jobs = arrivals(rate, count, durations, seed)
    return dict(rate=rate, requests=count, durations=list(durations), max_batch=max_batch, seed=seed,
                continuous=run_policy(mg, jobs, max_batch, static=False),
                static=run_policy(mg, jobs, max_batch, static=True))
