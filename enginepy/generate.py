"""The reference generation loop: conditioning -> decode steps over the delay pattern -> codes.

One request of B prompts runs B' = 2B rows with classifier-free guidance (cond rows, then null rows),
or B rows when cfg_coef == 1 (the null rows cannot change the result then). Step s feeds pattern column s
(built from the codes written so far) and writes the tokens it predicts for frame s - delays[k].
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import pattern
from .errors import EnginepyError
from .model import KVCache, MusicGenDecoder
from .rng import uniforms
from .sampling import cfg_mix, sample_tokens


class NonFiniteLogits(EnginepyError, RuntimeError):
    """The decoder produced NaN or inf logits; sampling them would give garbage."""


@dataclass
class SamplingParams:
    """Per-call generation settings (audiocraft's names and defaults)."""

    use_sampling: bool = True
    top_k: int = 250
    top_p: float = 0.0
    temperature: float = 1.0
    cfg_coef: float = 3.0


class StepReporter:
    """Reports decode progress for both backends: a tqdm bar on stderr (when asked and stderr is a terminal)
    and on_step(done, total) after every step. Use as a context manager; call it once per finished step."""

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


@torch.no_grad()
def generate_codes(
    decoder: MusicGenDecoder,
    cond: torch.Tensor,
    cond_mask: torch.Tensor,
    frames: int,
    params: SamplingParams,
    seeds: torch.Tensor,
    progress: bool = False,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Generate `frames` frames for each of B conditions.

    cond [B, Tt, D] and cond_mask bool [B, Tt] (projected text, zero on padding), seeds int64 [B]
    -> codes int64 [B, K, frames] in natural layout. on_step(done, total) is called after every step.
    """
    cfg = decoder.cfg
    device = decoder.device
    b = cond.shape[0]
    use_cfg = params.cfg_coef != 1.0
    if use_cfg:
        cond = torch.cat([cond, torch.zeros_like(cond)])
        cond_mask = torch.cat([cond_mask, torch.zeros_like(cond_mask)])
    rows = cond.shape[0]
    steps = frames + cfg.max_delay
    delays = torch.tensor(cfg.delays, dtype=torch.int64, device=device)
    lengths = torch.full((b,), frames, dtype=torch.int64, device=device)
    no_prompt = torch.zeros(b, dtype=torch.int64, device=device)
    seeds = seeds.to(device)

    cross = decoder.precompute_cross(cond.to(device), cond_mask.to(device))
    cache = KVCache.allocate(cfg, rows, steps, decoder.dtype, device)
    codes = torch.full((b, cfg.num_codebooks, frames), cfg.special_token, dtype=torch.int64, device=device)
    with StepReporter(steps, progress, on_step) as report:
        for s in range(steps):
            step = torch.full((b,), s, dtype=torch.int64, device=device)
            tokens = pattern.delay_step_input(codes, step, lengths, delays, cfg.special_token)  # [B, K]
            if use_cfg:
                tokens = torch.cat([tokens, tokens])
            logits = decoder(tokens[:, :, None], s, cache, cross)[:, :, 0]  # [B', K, V]
            mixed = cfg_mix(logits, b, params.cfg_coef)  # fp32 [B, K, V]
            if not torch.isfinite(mixed).all():
                raise NonFiniteLogits(f"the decoder produced NaN/inf logits at step {s}; try dtype='float32'")
            u = uniforms(seeds, s, cfg.num_codebooks)  # [B, K]
            picked = sample_tokens(
                mixed.reshape(b * cfg.num_codebooks, -1),
                u.reshape(-1),
                use_sampling=params.use_sampling,
                temperature=params.temperature,
                top_k=params.top_k,
                top_p=params.top_p,
            ).view(b, cfg.num_codebooks)
            pattern.delay_step_write(codes, picked, step, lengths, no_prompt, delays)
            report()
    return codes
