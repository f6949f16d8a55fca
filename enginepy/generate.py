"""The one generation loop: a batch of prompts run to completion on the step engine.

`MusicGen.generate` is this loop; a server or a bulk renderer drives the same engine step by step. Prompt i of
a call uses seed + i, so a prompt's codes do not depend on the other prompts of the call (or on any other
request the engine runs).
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch

from .engine import Engine, NonFiniteLogits, SamplingParams  # noqa: F401  (NonFiniteLogits: public from here too)


class StepReporter:
    """Reports decode progress: a tqdm bar on stderr (when asked and stderr is a terminal) and on_step(done,
    total) after every step. Use as a context manager; call it once per finished step."""

    def __init__(self, total: int, progress: bool, on_step: Callable[[int, int], None] | None):
        self.total, self.done, self.on_step = total, 0, on_step
        self.bar = None
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", desc="generating", leave=False)

    def __call__(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        if self.on_step is not None:
            self.on_step(self.done, self.total)

    def __enter__(self) -> "StepReporter":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def generate_tokens(engine: Engine, prompts: list[str | None], duration: float, params: SamplingParams, seed: int,
                    progress: bool = False, on_step: Callable[[int, int], None] | None = None,
                    prompt_codes: list[torch.Tensor | None] | None = None, frames: int | None = None,
                    texts: list | None = None, melodies: torch.Tensor | None = None,
                    text_len: int | None = None) -> torch.Tensor:
    """prompts -> codes int64 [B, K, frames] (CPU). Prompt i runs as a request with seed + i; the engine must be
    idle (this loop owns it until every prompt is done). Raises the first request's error, if any.

    A None prompt is unconditional; prompt_codes[i] int64 [K, Tp] continues an audio prompt (the codes start
    with it); frames overrides `duration` with an exact frame count; texts[i] is prompt i's T5 output, reused;
    melodies[i] chroma [Nc, 12] and text_len: MusicGen-Melody conditioning (see Engine.add_request)."""
    if engine.has_unfinished_requests():
        raise RuntimeError("generate_tokens needs an idle engine")
    n = len(prompts)
    prompt_codes = prompt_codes if prompt_codes is not None else [None] * n
    texts = texts if texts is not None else [None] * n
    ids = [f"generate-{i}" for i in range(n)]
    settings = dict(use_sampling=params.use_sampling, top_k=params.top_k, top_p=params.top_p,
                    temperature=params.temperature, cfg_coef=params.cfg_coef, cfg_coef_beta=params.cfg_coef_beta,
                    two_step_cfg=params.two_step_cfg)
    try:
        for i, (rid, prompt) in enumerate(zip(ids, prompts)):
            engine.add_request(rid, prompt, duration=duration, seed=seed + i, prompt_codes=prompt_codes[i],
                               frames=frames, text=texts[i], text_len=text_len,
                               melody=None if melodies is None else melodies[i], **settings)
        total = engine.requests[ids[0]].frames
        prefilled = min(0 if c is None else c.shape[-1] for c in prompt_codes)
        rounds = math.ceil(n / engine.max_batch)
        results: dict[str, torch.Tensor] = {}
        with StepReporter(rounds * (total - prefilled + engine.cfg.max_delay), progress, on_step) as report:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.error is not None:
                        raise out.error
                    if out.finished:
                        results[out.request_id] = out.codes
                report()
    finally:
        for rid in ids:
            engine.abort_request(rid)
    return torch.stack([results[rid] for rid in ids])
