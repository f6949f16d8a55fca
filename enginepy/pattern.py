"""The delay pattern in plain torch: the reference layout code and the oracle of the C++ ops.

Codebook k is delayed by delays[k] steps after one start column of the special token
(mono: delays = [0, 1, ..., K-1]; stereo: [0, 0, 1, 1, ...]). With T frames and D = max(delays):

  pattern[b, k, 0]                  = special
  pattern[b, k, 1 + t + delays[k]]  = codes[b, k, t]          for 0 <= t < T
  every other pattern entry          = special                 pattern: [B, K, S], S = T + D + 1

Decode step s reads pattern column s and predicts column s + 1, i.e. frame t = s - delays[k] of
codebook k; T frames take T + D steps (s = 0 .. T + D - 1).
"""
from __future__ import annotations

import torch


def mono_delays(num_codebooks: int) -> list[int]:
    """Codebook k delayed by k steps."""
    return list(range(num_codebooks))


def stereo_delays(num_codebooks: int) -> list[int]:
    """Left/right codebooks of one level share a delay: [0, 0, 1, 1, ...]."""
    return [k // 2 for k in range(num_codebooks)]


def delay_scatter(codes: torch.Tensor, delays: torch.Tensor, special: int) -> torch.Tensor:
    """Natural layout -> pattern layout. codes int64 [B, K, T], delays int64 [K] -> int64 [B, K, T + max(delays) + 1]."""
    b, k, t = codes.shape
    max_delay = int(delays.max()) if delays.numel() else 0
    pattern = torch.full((b, k, t + max_delay + 1), special, dtype=codes.dtype, device=codes.device)
    for i in range(k):
        d = int(delays[i])
        pattern[:, i, 1 + d : 1 + d + t] = codes[:, i]
    return pattern


def delay_gather(pattern: torch.Tensor, delays: torch.Tensor) -> torch.Tensor:
    """Pattern layout -> natural layout. pattern int64 [B, K, S], delays int64 [K] -> int64 [B, K, S - 1 - max(delays)]."""
    b, k, s = pattern.shape
    max_delay = int(delays.max()) if delays.numel() else 0
    t = s - 1 - max_delay
    codes = torch.empty((b, k, t), dtype=pattern.dtype, device=pattern.device)
    for i in range(k):
        d = int(delays[i])
        codes[:, i] = pattern[:, i, 1 + d : 1 + d + t]
    return codes


def delay_step_input(
    codes: torch.Tensor, step: torch.Tensor, lengths: torch.Tensor, delays: torch.Tensor, special: int
) -> torch.Tensor:
    """Input tokens of decode step s (pattern column s) for each row, read from the natural-layout codes.

    codes int64 [B, K, Tmax] (prompt frames and frames generated so far), step int64 [B] (per row),
    lengths int64 [B] (frames T[b] of each row), delays int64 [K] -> int64 [B, K]:
    tokens[b, k] = codes[b, k, t] with t = step[b] - 1 - delays[k] when 0 <= t < lengths[b], else special.
    """
    t = step[:, None] - 1 - delays[None, :]  # [B, K]
    fill = torch.full_like(t, special)
    if codes.shape[2] == 0:
        return fill
    valid = (t >= 0) & (t < lengths[:, None]) & (t < codes.shape[2])
    gathered = codes.gather(2, t.clamp(0, codes.shape[2] - 1)[..., None])[..., 0]
    return torch.where(valid, gathered, fill)


def delay_step_write(
    codes: torch.Tensor,
    tokens: torch.Tensor,
    step: torch.Tensor,
    lengths: torch.Tensor,
    prompt_lengths: torch.Tensor,
    delays: torch.Tensor,
) -> None:
    """Write the tokens predicted at decode step s into the natural-layout codes, in place.

    codes int64 [B, K, Tmax], tokens int64 [B, K], step/lengths/prompt_lengths int64 [B], delays int64 [K]:
    codes[b, k, t] = tokens[b, k] with t = step[b] - delays[k], only where prompt_lengths[b] <= t < lengths[b].
    """
    if codes.shape[2] == 0:
        return
    t = step[:, None] - delays[None, :]  # [B, K]
    valid = (t >= prompt_lengths[:, None]) & (t < lengths[:, None]) & (t < codes.shape[2])
    # Static shapes (no nonzero()): every (b, k) writes one slot of its own row, the old value where invalid,
    # so the op can run inside a CUDA graph.
    idx = t.clamp(0, codes.shape[2] - 1)[..., None]
    current = codes.gather(2, idx)[..., 0]
    codes.scatter_(2, idx, torch.where(valid, tokens, current)[..., None])
