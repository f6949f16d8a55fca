"""Render jobs on one step engine: keep every slot busy, decode and write each job the moment it finishes.

The engine gets new jobs only as slots free up (its queue holds at most max_batch waiting ones), and each
finished request is decoded (one-shot EnCodec, batch of 1) and written at once, so memory stays flat however
many jobs there are. A job's codes equal `mg.generate_tokens([prompt])[0]` with its seed and settings, and its
decode and file writing are those of `enginepy generate`, so each file is byte-identical to
`enginepy generate PROMPT --seed SEED ... --out FILE`.

Audio inputs are read where the job runs (on a Ray cluster: the actor's machine, which must see the same paths)
and turned into what `add_request` takes exactly as the API does: a melody into its chroma
(`MusicGen.generate_with_chroma`), a continuation into EnCodec codes (`MusicGen.generate_continuation`), so the
file equals `enginepy generate PROMPT --melody FILE / --continue FILE`. A file whose content is no longer the
one the job file was checked against fails its job (the rerun picks the new content up).
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator

import torch

from ..audio_io import write_audio
from ..audio_prompt import read_audio
from ..errors import EnginepyError, InvalidParameter
from ..precision import fp32_matmul_exact
from .jobs import Job
from .outdir import OutputKey, done_entry, failed_entry, file_sha256, writing

# Conditioning computed from audio inputs, kept by content hash: a melody shared by many jobs is read once.
# Each entry is small (a chroma [Nc, 12], or codes [K, Tp]).
CONDITIONING_CACHE = 32


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
        self._conditioning: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()

    def audio_inputs(self, job: Job) -> dict:
        """The job's audio inputs as keyword arguments of add_request: melody (chroma float32 [Nc, 12]) and
        prompt_codes (int64 [K, Tp], Tp < job.frames). Raises InvalidParameter naming the file."""
        extra = {}
        for kind, given in job.audio.items():
            path, sha256 = given["path"], given["sha256"]
            value = self._conditioning.get((kind, sha256))
            if value is None:
                value = self._read_input(kind, path, sha256)
                self._conditioning[kind, sha256] = value
                while len(self._conditioning) > CONDITIONING_CACHE:
                    self._conditioning.popitem(last=False)
            elif _current_sha256(path) != sha256:
                raise _changed(kind, path)
            self._conditioning.move_to_end((kind, sha256))
            if kind == "continue" and value.shape[-1] >= job.frames:
                raise InvalidParameter(f"continue {path} gives {value.shape[-1]} frames of codes; it must be shorter "
                                       f"than the job's duration ({job.frames} frames), which includes it")
            extra["melody" if kind == "melody" else "prompt_codes"] = value
        return extra

    def _read_input(self, kind: str, path: str, sha256: str) -> torch.Tensor:
        wav, rate = read_audio(path, kind)  # [C, T]
        # Hashed after decoding: the audio used is the content the job file was checked against.
        if _current_sha256(path) != sha256:
            raise _changed(kind, path)
        mg = self.mg
        if kind == "melody":
            return mg._melody_chroma([wav], rate)[0]  # [Nc, 12], as generate_with_chroma computes it
        return mg._prompt_codes(wav[None], rate)[0]  # [K, Tp], as generate_continuation encodes it

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
                        engine.add_request(job.id, job.prompt, seed=job.seed, **job.settings,
                                           **self.audio_inputs(job))
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


def _changed(kind: str, path: str) -> InvalidParameter:
    return InvalidParameter(f"{kind} {path} changed after the job file was read; run the command again")


def _current_sha256(path: str) -> str | None:
    """The file's sha256 now, or None when it cannot be read (it is then no longer the content checked)."""
    try:
        return file_sha256(path)
    except OSError:
        return None
