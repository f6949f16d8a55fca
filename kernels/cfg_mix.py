"""Classifier-free guidance mix of the step's logits, with the sampling temperature folded in.

    l[b, k, :] = l_u + cfg_coef * (l_c - l_u),   l_c = logits[b], l_u = logits[B + b]   (cond rows first)
    l          = l / temperature                 when temperature > 0 (0 or None: greedy, left unscaled)

Computed in fp32 with exactly the roundings of the plain-torch expression (subtract, multiply, add, then an
IEEE division): the launch disables FMA contraction and the division is `div_rn`, so the result is
bit-identical to `cfg_mix_ref` on the CPU and to the reference backend's fp32 arithmetic.

Shapes and dtypes:
    logits     [2B, K, V], fp32 | fp16 | bf16, any strides
    cfg_coef   float
    returns    fp32 [B, K, V] (or `out`, any strides)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_devices, check_out, check_tensor


@triton.jit
def _cfg_mix_kernel(
    logits_ptr, out_ptr,
    stride_l_b, stride_l_k, stride_l_v,
    stride_o_b, stride_o_k, stride_o_v,
    B, K, V, cfg_coef, temperature,
    SCALE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    b = (row // K).to(tl.int64)
    k = (row % K).to(tl.int64)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs_v < V
    cond_ptr = logits_ptr + b * stride_l_b + k * stride_l_k + offs_v * stride_l_v
    cond = tl.load(cond_ptr, mask=mask, other=0.0).to(tl.float32)
    uncond = tl.load(cond_ptr + B * stride_l_b, mask=mask, other=0.0).to(tl.float32)
    mixed = uncond + cfg_coef * (cond - uncond)
    if SCALE:
        mixed = tl.math.div_rn(mixed, tl.zeros_like(mixed) + temperature)
    tl.store(out_ptr + b * stride_o_b + k * stride_o_k + offs_v * stride_o_v, mixed, mask=mask)


def cfg_mix(
    logits: torch.Tensor,
    cfg_coef: float,
    temperature: float | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Guided logits from [2B, K, V] (cond rows, then null rows) -> fp32 [B, K, V], divided by temperature if > 0."""
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=3)
    rows, num_codebooks, vocab = logits.shape
    if rows % 2:
        raise ValueError(f"logits must have 2B rows (cond, then null), got {rows}")
    if temperature is not None and temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    device = check_devices(logits=logits)
    batch = rows // 2
    out = check_out(out, (batch, num_codebooks, vocab), torch.float32, device)
    if batch * num_codebooks * vocab == 0:
        return out
    block_v = min(triton.next_power_of_2(vocab), 1024)
    grid = (batch * num_codebooks, triton.cdiv(vocab, block_v))
    _cfg_mix_kernel[grid](
        logits, out,
        *logits.stride(), *out.stride(),
        batch, num_codebooks, vocab, float(cfg_coef), float(temperature or 1.0),
        SCALE=bool(temperature),
        BLOCK_V=block_v,
        num_warps=4,
        enable_fp_fusion=False,  # keep u + c * (x - u) as three roundings, like torch
    )
    return out


def cfg_mix_ref(
    logits: torch.Tensor,
    cfg_coef: float,
    temperature: float | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch twin of `cfg_mix`."""
    batch = logits.shape[0] // 2
    cond, uncond = logits[:batch].float(), logits[batch:].float()
    mixed = uncond + cfg_coef * (cond - uncond)
    if temperature:
        mixed = mixed / temperature
    if out is not None:
        out.copy_(mixed)
        return out
    return mixed
