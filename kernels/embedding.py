"""Fused multi-codebook embedding: the decoder input of one step in one kernel.

    x[b, :] = sum_k table[k, tokens[b, k], :] + pos(positions[b])
    pos(p)  = cat([cos(p * f), sin(p * f)])        (cos half first; one trailing 0 when D is odd)
    f_i     = exp(-ln(10000) * i / (half - 1)),    i = 0 .. half - 1,  half = D // 2

This is transformers' `MusicgenSinusoidalPositionalEmbedding`. The angle is the fp32 product p * f_i,
rounded exactly as transformers rounds it; the frequencies f come from the very same torch expression,
evaluated once on the CPU (where transformers builds its table) and cached per (D, device), so they are
bit-identical. cos and sin are evaluated in fp64 on that fp32 angle and rounded to fp32: at positions in
the thousands the angle is large, and this keeps every value within one fp32 rounding of the exact one
whatever the device's fp32 trigonometry does (transformers' own CPU values are within an ulp of it too).
The K table rows and the position are summed in fp32 in codebook order, then cast to the table dtype.

Shapes and dtypes:
    tokens     int64 [B, K], values in [0, V] (V is the pad/start id; not range-checked on the device)
    table      fp32 | fp16 | bf16 [K, V + 1, D], D >= 4, any strides
    positions  int32 | int64 [B], 0 <= p < 2**24 (so p is exact in fp32)
    returns    [B, D] in table dtype
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_devices, check_out, check_shape, check_tensor

_FREQ_CACHE: dict[tuple[int, str], torch.Tensor] = {}


@triton.jit
def _embedding_kernel(
    tok_ptr, table_ptr, pos_ptr, freq_ptr, out_ptr,
    stride_tok_b, stride_tok_k,
    stride_tab_k, stride_tab_v, stride_tab_d,
    stride_pos_b,
    stride_out_b, stride_out_d,
    D, HALF,
    NUM_CODEBOOKS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D

    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(NUM_CODEBOOKS):
        tok = tl.load(tok_ptr + b * stride_tok_b + k * stride_tok_k).to(tl.int64)
        row_ptr = table_ptr + k * stride_tab_k + tok * stride_tab_v
        acc += tl.load(row_ptr + offs_d * stride_tab_d, mask=d_mask, other=0.0).to(tl.float32)

    p = tl.load(pos_ptr + b * stride_pos_b).to(tl.float32)
    is_sin = offs_d >= HALF
    has_pos = offs_d < 2 * HALF  # the extra column of an odd D stays 0
    i = tl.where(is_sin, offs_d - HALF, offs_d)
    f = tl.load(freq_ptr + i, mask=has_pos & d_mask, other=0.0)
    angle = (p * f).to(tl.float64)
    pos = tl.where(is_sin, tl.sin(angle), tl.cos(angle)).to(tl.float32)
    acc += tl.where(has_pos, pos, 0.0)

    tl.store(out_ptr + b * stride_out_b + offs_d * stride_out_d, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


def sinusoid_frequencies(dim: int, device: torch.device | str) -> torch.Tensor:
    """f_i = exp(-ln(10000) * i / (half - 1)), fp32 [dim // 2], computed on the CPU like transformers, cached."""
    half = dim // 2
    key = (half, str(device))
    freq = _FREQ_CACHE.get(key)
    if freq is None:
        scale = math.log(10000) / (half - 1)
        freq = torch.exp(torch.arange(half, dtype=torch.int64).float() * -scale).to(device)
        _FREQ_CACHE[key] = freq
    return freq


def embedding(
    tokens: torch.Tensor,
    table: torch.Tensor,
    positions: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of the K codebook embeddings plus the sinusoid. tokens [B, K], table [K, V+1, D], positions [B] -> [B, D]."""
    check_tensor("tokens", tokens, dtypes=(torch.int64,), ndim=2)
    check_tensor("table", table, dtypes=FLOAT_DTYPES, ndim=3)
    check_tensor("positions", positions, dtypes=INDEX_DTYPES, ndim=1)
    batch, num_codebooks = tokens.shape
    if table.shape[0] != num_codebooks:
        raise ValueError(f"table has {table.shape[0]} codebooks but tokens has {num_codebooks} columns")
    dim = table.shape[2]
    if dim < 4:
        raise ValueError(f"table embedding dim D must be >= 4 (the sinusoid divides by D // 2 - 1), got {dim}")
    check_shape("positions", positions, (batch,))
    device = check_devices(tokens=tokens, table=table, positions=positions)
    out = check_out(out, (batch, dim), table.dtype, device)
    if batch == 0:
        return out

    freq = sinusoid_frequencies(dim, device)
    block_d = min(triton.next_power_of_2(dim), 256)
    grid = (batch, triton.cdiv(dim, block_d))
    _embedding_kernel[grid](
        tokens, table, positions, freq, out,
        tokens.stride(0), tokens.stride(1),
        table.stride(0), table.stride(1), table.stride(2),
        positions.stride(0),
        out.stride(0), out.stride(1),
        dim, dim // 2,
        NUM_CODEBOOKS=num_codebooks,
        BLOCK_D=block_d,
        num_warps=2,
    )
    return out


def sinusoid_ref(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """transformers' `MusicgenSinusoidalPositionalEmbedding.get_embedding` rows at `positions` -> fp32 [B, dim]."""
    half = dim // 2
    scale = math.log(10000) / (half - 1)
    freq = torch.exp(torch.arange(half, dtype=torch.int64).float() * -scale)
    angle = positions.cpu().float()[:, None] * freq[None, :]
    emb = torch.cat([torch.cos(angle), torch.sin(angle)], dim=1)
    if dim % 2 == 1:
        emb = torch.cat([emb, torch.zeros(emb.shape[0], 1)], dim=1)
    return emb.to(positions.device)


def embedding_ref(
    tokens: torch.Tensor,
    table: torch.Tensor,
    positions: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch twin of `embedding` (same summation order, fp32)."""
    batch, num_codebooks = tokens.shape
    acc = torch.zeros(batch, table.shape[2], dtype=torch.float32, device=table.device)
    for k in range(num_codebooks):
        acc = acc + table[k].index_select(0, tokens[:, k]).float()
    acc = acc + sinusoid_ref(positions, table.shape[2])
    result = acc.to(table.dtype)
    if out is not None:
        out.copy_(result)
        return out
    return result
