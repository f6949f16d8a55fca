"""Audio longer than the model's window (audiocraft's extended generation, `MusicGen._generate_tokens`).

The first window generates min(duration, max_duration) seconds. Each next window starts `extend_stride` seconds
later: the last (window - stride) frames of the previous window are its audio prompt (re-prefilled, positions
from 0 again), and only the frames after that prompt are appended. The float expressions are audiocraft's, so
the window lengths truncate exactly as there (duration 1.5 s, stride 0.36 s, window 0.6 s at 50 Hz: windows
(prompt, length) = (0, 30), (12, 30), (12, 30), (12, 20), (2, 3): 1.5 - 1.08 = 0.41999... gives 20 frames).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import InvalidParameter
from .params import _number

# Window w > 0 of row i samples with seed (seed + w * this) mod 2**62 + i: every window draws fresh numbers
# (the counter-based draws are keyed by step, which restarts per window), still independent of the batch.
WINDOW_SEED_STRIDE = 0x9E3779B97F4A7C15


def check_extend_stride(extend_stride, max_duration: float, frame_rate: int) -> float:
    """extend_stride in seconds: at least one frame and below the model window (audiocraft asserts the latter)."""
    s = _number("extend_stride", extend_stride)
    if not 1.0 / frame_rate <= s < max_duration:
        raise InvalidParameter(f"extend_stride must be in [{1.0 / frame_rate:g}, {max_duration:g}) seconds (at least one "
                               f"frame, below max_duration); got {extend_stride!r}")
    return s


def window_plan(duration: float, max_duration: float, extend_stride: float, frame_rate: int,
                prompt_frames: int = 0) -> list[tuple[int, int]]:
    """(prompt frames, window frames) of each window, audiocraft's loop restated. A single window when
    duration <= max_duration. InvalidParameter when a window would have nothing to generate."""
    total = int(duration * frame_rate)
    limit = int(min(duration, max_duration) * frame_rate)
    if prompt_frames > limit:
        raise InvalidParameter(f"the audio prompt ({prompt_frames} frames) is longer than the audio to generate in "
                               f"one window ({limit} frames)")
    if duration <= max_duration:
        plan = [(prompt_frames, total)]
    else:
        stride = int(frame_rate * extend_stride)
        offset, plen, plan = 0, prompt_frames, []
        while offset + plen < total:
            time_offset = offset / frame_rate
            chunk = min(duration - time_offset, max_duration)
            frames = int(chunk * frame_rate)
            plan.append((plen, frames))
            plen = max(frames - stride, 0)
            offset += stride
    for plen, frames in plan:
        if plen >= frames:
            raise InvalidParameter(f"a window of {frames} frames would start from a {plen}-frame prompt and generate "
                                   "nothing; shorten the prompt or change duration / extend_stride")
    return plan


def window_seed(seed: int, window: int) -> int:
    return seed if window == 0 else (seed + window * WINDOW_SEED_STRIDE) % 2**62


def melody_window(wav: torch.Tensor, window: int, stride: int, frame_rate: int, sample_rate: int,
                  max_duration: float) -> torch.Tensor:
    """The melody a long-form window conditions on (audiocraft's `_generate_tokens`): wav [..., T] at sample_rate,
    looped, from sample int(t * sample_rate) for int(max_duration * sample_rate) samples, t = window * stride /
    frame_rate the window's start in seconds."""
    start = int(window * stride / frame_rate * sample_rate)
    positions = torch.arange(start, start + int(max_duration * sample_rate))
    return wav[..., positions % wav.shape[-1]]


def generate_windows(run_window: Callable[[list, int, int, int], torch.Tensor], plan: list[tuple[int, int]],
                     stride: int, prompt_codes: list[torch.Tensor | None], seed: int) -> torch.Tensor:
    """Run the plan: run_window(prompt_codes per row, window frames, seed, window index) -> codes int64
    [B, K, frames] (starting with the given prompt). Returns [B, K, total]: the initial prompt, then each window's
    new frames."""
    parts = []
    if plan[0][0]:
        parts.append(torch.stack(prompt_codes))
    prompts = prompt_codes
    for w, (plen, frames) in enumerate(plan):
        codes = run_window(prompts if plen else [None] * len(prompts), frames, window_seed(seed, w), w)
        parts.append(codes[:, :, plen:])
        rest = codes[:, :, stride:]
        prompts = list(rest) if rest.shape[-1] else [None] * codes.shape[0]
    return torch.cat(parts, dim=-1)
