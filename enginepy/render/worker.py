"""Render jobs on one step engine: keep every slot busy, decode and write each job the moment it finishes.

The engine gets new jobs only as slots free up (its queue holds at most max_batch waiting ones), and each
finished request is decoded (one-shot EnCodec, batch of 1) and written at once, so memory stays flat however
many jobs there are. A job's codes equal `mg.generate_tokens([prompt])[0]` with its seed and settings, and its
decode and file writing are those of `enginepy generate`, so each file is byte-identical to
`enginepy generate PROMPT --seed SEED ... --out FILE`.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator

from ..audio_io import write_audio
from ..errors import EnginepyError
from ..precision import fp32_matmul_exact
from .jobs import Job
from .outdir import OutputKey, done_entry, failed_entry, file_sha256, writing


def longest_first(jobs: list[Job]) -> list[Job]:
    """The order jobs enter the engine: longest first (file order among equals). Outputs do not depend on it
    (every job has its own seed), but the tail does: with the long jobs started early, the short ones fill the
    slots they leave, instead of a long job started last running almost alone (LPT scheduling)."""
    return sorted(jobs, key=lambda job: -job.frames)


class Renderer:
    """One loaded MusicGen and one step engine writing jobs' audio into `out_dir` (a directory that exists)."""

    def __init__(self, mg, out_dir: str, key: OutputKey, max_batch: int):
        self.mg, self.out_dir, self.key = mg, out_dir, key
        # The fast backend's MusicGen already holds an engine (static buffers, KV pool, CUDA graphs) sized for its
        # max_batch: a renderer owns its model, so it drives that one rather than allocating a second set.
        own = getattr(mg, "_engine", None)
        self.engine = own if own is not None and own.max_batch == max_batch else mg.engine(max_batch=max_batch)

    def render(self, jobs: Iterable[Job]) -> Iterator[dict]:
        """Yield one manifest line (`done_entry` or `failed_entry`) per job, in the order jobs finish. A job whose
        request the engine refuses (a prompt longer than max_text_len, NaN logits) yields a failed line; the
        others go on. Closing the generator early aborts what is still in the engine."""
        engine = self.engine
        pending = iter(jobs)
        started: dict[str, tuple[Job, float]] = {}
        exhausted = False
        try:
            while True:
                while not exhausted and engine.num_running + engine.num_waiting < engine.max_batch:
                    job = next(pending, None)
                    if job is None:
                        exhausted = True
                        break
                    try:
                        engine.add_request(job.id, job.prompt, seed=job.seed, **job.settings)
                    except EnginepyError as e:
                        yield failed_entry(job.line, job.id, str(e))
                        continue
                    started[job.id] = (job, time.perf_counter())
                if not engine.has_unfinished_requests():
                    return
                # Only the decoder runs under exact fp32 matmuls, as in `MusicGen.generate`; the codec does not.
                with fp32_matmul_exact(self.mg.decoder.dtype):
                    outputs = engine.step()
                for out in outputs:
                    if not out.finished:
                        continue
                    job, t0 = started.pop(out.request_id)
                    if out.error is not None:
                        yield failed_entry(job.line, job.id, str(out.error))
                    else:
                        yield self._write(job, out.codes, t0)
        finally:
            for job_id in started:
                engine.abort_request(job_id)

    def _write(self, job: Job, codes, t0: float) -> dict:
        """codes int64 [K, frames] -> DIR/<id>.<fmt> (atomic) -> its manifest line."""
        wav = self.mg.generate_audio(codes[None])[0]  # [C, frames * hop]
        path = os.path.join(self.out_dir, self.key.file_name(job))
        with writing(path):
            write_audio(path, wav, self.mg.sample_rate)
            sha256 = file_sha256(path)
        return done_entry(job, self.key, sha256, time.perf_counter() - t0)
