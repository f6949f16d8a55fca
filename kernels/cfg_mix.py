"""Classifier-free guidance mix of the step's logits, with the sampling temperature folded in.

    l[b, k, :] = l_u + cfg_coef * (l_c - l_u),   l_c = logits[b], l_u = logits[B + b]   (cond rows first)
    l          = l / temperature                 when temperature > 0 (0 or None: greedy, left unscaled)

Computed in fp32 with exactly the roundings of the plain-torch expression (subtract, multiply, add, then an
IEEE division): the launch disables FMA contraction and the division is `div_rn`, so the result is
bit-identical to `cfg_mix_ref` on the CPU and to the reference backend's fp32 arithmetic.

Per request (`cfg_mix_rows`, what the step engine uses): request s reads its cond row cond_rows[s] and its
null row null_rows[s] (-1: no null row, as with cfg_coef 1, and the cond logits pass through), with its own
cfg_coef[s] and temperature[s] (1 where greedy: the division by 1 is exact), so any mix of settings shares one
launch. `cfg_mix` is the same kernel with rows [0, B) cond and [B, 2B) null and one setting for all.

Shapes and dtypes:
    logits     [R, K, V], fp32 | fp16 | bf16, any strides ([2B, K, V] for `cfg_mix`)
    cond_rows, null_rows   int32 | int64 [S];  cfg_coef, temperature   fp32 [S]
    returns    fp32 [S, K, V] (or `out`, any strides)
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_devices, check_out, check_shape, check_tensor


@triton.jit
def _cfg_mix_kernel(
    logits_ptr, out_ptr, cond_rows_ptr, null_rows_ptr, coef_ptr, temperature_ptr,
    stride_l_r, stride_l_k, stride_l_v,
    stride_o_s, stride_o_k, stride_o_v,
    K, V,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    s = row // K
    k = (row % K).to(tl.int64)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs_v < V
    c = tl.load(cond_rows_ptr + s).to(tl.int64)
    u = tl.load(null_rows_ptr + s).to(tl.int64)
    has_null = (tl.zeros([BLOCK_V], dtype=tl.int64) + u) >= 0  # a vector: the interpreter masks only with those
    cond = tl.load(logits_ptr + c * stride_l_r + k * stride_l_k + offs_v * stride_l_v, mask=mask, other=0.0)
    cond = cond.to(tl.float32)
    uncond = tl.load(logits_ptr + tl.maximum(u, 0) * stride_l_r + k * stride_l_k + offs_v * stride_l_v,
                     mask=mask & has_null, other=0.0).to(tl.float32)
    coef = tl.load(coef_ptr + s)
    mixed = tl.where(has_null, uncond + coef * (cond - uncond), cond)
    # Division by 1 is exact, so rows without a temperature (greedy) pass through unchanged.
    mixed = tl.math.div_rn(mixed, tl.zeros_like(mixed) + tl.load(temperature_ptr + s))
    tl.store(out_ptr + s.to(tl.int64) * stride_o_s + k * stride_o_k + offs_v * stride_o_v, mixed, mask=mask)


def cfg_mix_rows(
    logits: torch.Tensor,
    cond_rows: torch.Tensor,
    null_rows: torch.Tensor,
    cfg_coef: torch.Tensor,
    temperature: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-request guided logits: logits [R, K, V]; for each request s, cond_rows[s] and null_rows[s] (int, -1 =
    no null row: the cond logits pass through), cfg_coef fp32 [S], temperature fp32 [S] (1 = unscaled)
    -> fp32 [S, K, V]: (l_u + cfg·(l_c − l_u)) / temperature, or l_c / temperature without a null row."""
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=3)
    rows, num_codebooks, vocab = logits.shape
    check_tensor("cond_rows", cond_rows, dtypes=INDEX_DTYPES, ndim=1)
    requests = cond_rows.shape[0]
    for name, x, dtypes in (("null_rows", null_rows, INDEX_DTYPES), ("cfg_coef", cfg_coef, (torch.float32,)),
                            ("temperature", temperature, (torch.float32,))):
        check_tensor(name, x, dtypes=dtypes, ndim=1)
        check_shape(name, x, (requests,))
    for name, x in (("cond_rows", cond_rows), ("null_rows", null_rows), ("cfg_coef", cfg_coef),
                    ("temperature", temperature)):
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    device = check_devices(logits=logits, cond_rows=cond_rows, null_rows=null_rows, cfg_coef=cfg_coef,
                           temperature=temperature)
    out = check_out(out, (requests, num_codebooks, vocab), torch.float32, device)
    if requests * num_codebooks * vocab == 0:
        return out
    if rows == 0:
        raise ValueError("logits must have at least one row")
    block_v = min(triton.next_power_of_2(vocab), 1024)
    grid = (requests * num_codebooks, triton.cdiv(vocab, block_v))
    _cfg_mix_kernel[grid](
        logits, out, cond_rows, null_rows, cfg_coef, temperature,
        *logits.stride(), *out.stride(),
        num_codebooks, vocab,
        BLOCK_V=block_v,
        num_warps=4,
        enable_fp_fusion=False,  # keep u + c * (x - u) as three roundings, like torch
    )
    return out


def cfg_mix(
    logits: torch.Tensor,
    cfg_coef: float,
    temperature: float | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Guided logits from [2B, K, V] (cond rows, then null rows) -> fp32 [B, K, V], divided by temperature if > 0."""
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=3)
    rows = logits.shape[0]
    if rows % 2:
        raise ValueError(f"logits must have 2B rows (cond, then null), got {rows}")
    if temperature is not None and temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    batch = rows // 2
    index = torch.arange(batch, dtype=torch.int64, device=logits.device)
    full = functools.partial(torch.full, (batch,), dtype=torch.float32, device=logits.device)
    return cfg_mix_rows(logits, index, index + batch, full(float(cfg_coef)), full(float(temperature or 1.0)), out=out)


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


def cfg_mix_rows_ref(
    logits: torch.Tensor,
    cond_rows: torch.Tensor,
    null_rows: torch.Tensor,
    cfg_coef: torch.Tensor,
    temperature: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch twin of `cfg_mix_rows`."""
    cond = logits.float()[cond_rows.long()]
    uncond = logits.float()[null_rows.long().clamp(min=0)]
    coef = cfg_coef[:, None, None]
    mixed = torch.where((null_rows >= 0)[:, None, None], uncond + coef * (cond - uncond), cond)
    mixed = mixed / temperature[:, None, None]
    if out is not None:
        out.copy_(mixed)
        return out
    return mixed
