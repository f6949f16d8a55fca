"""Counter-based random numbers for sampling.

Every draw is a pure function of (row seed, decode step, codebook): no generator state is carried
between steps or shared between rows. That is what makes row i of a batch call equal a single call
with seed + i, and what lets every backend (plain torch, Triton, inside a CUDA graph) draw the very
same numbers: they all call `uniforms` with the same counters.

The hash is the 32-bit "lowbias32" integer mixer (Chris Wellons' hash-prospector), chained over the
counters. Arithmetic is done in int64 tensors holding uint32 values; the multiply is split into
16-bit halves so that no intermediate product passes 2**63 (int64 overflow is not portable).
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # separates the counters so that (seed, step, k) and (seed, k, step) differ


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for uint32 values held in int64, without overflow."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(seeds: torch.Tensor, step: torch.Tensor | int, num_codebooks: int) -> torch.Tensor:
    """Uniform numbers in [0, 1) for one decode step.

    seeds: int64 [B] (any int64; both 32-bit halves are used); step: int or int64 [B];
    returns float32 [B, K] with u[b, k] = hash(seeds[b], step, k) / 2**24 (24 bits: exact in fp32).
    """
    seeds = seeds.to(torch.int64)
    device = seeds.device
    step = torch.as_tensor(step, dtype=torch.int64, device=device).expand_as(seeds)
    k = torch.arange(num_codebooks, dtype=torch.int64, device=device)
    h = _mix32(seeds & _MASK32)
    h = _mix32(h ^ ((seeds >> 32) & _MASK32) ^ _GOLDEN)
    h = _mix32(h ^ ((step & _MASK32) + _GOLDEN) & _MASK32)
    h = _mix32(h[:, None] ^ ((k[None, :] + 2 * _GOLDEN) & _MASK32))  # [B, K]
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))
