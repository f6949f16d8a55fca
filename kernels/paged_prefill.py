"""Causal self-attention of many queries per row over the paged KV cache (prompt prefill, chunked decode).

Query i of row b sits at position s_b + i (s_b = start[b]) and attends to every cached position <= its own:

    out[b, i, h, :] = sum_{n <= s_b + i} softmax_n(scale * q[b, i, h, :] . K_b[n, h, :]) V_b[n, h, :]
    K_b[n] = k_cache[block_tables[b, n // block_size], n % block_size]                    (V_b likewise)

The K/V of the queries' own positions must already be in the cache (`paged_kv_write` first). Queries
i >= q_lens[b] (padding of a ragged batch) give zeros. Online softmax in fp32, tl.dot with fp32
accumulation: IEEE fp32 products for fp32 inputs (no TF32); fp16/bf16 inputs multiply in their own dtype,
the probabilities rounded to it before the second product. Under the Triton interpreter bf16 operands are
upcast to fp32 (its bf16 dot is wrong).

Shapes and dtypes:
    q                    [B, Tq, H, Dh], fp32 | fp16 | bf16, any strides, Dh <= 256
    k_cache, v_cache     [num_blocks, block_size, H, Dh], q's dtype, any strides
    block_tables         int32 [B, max_blocks]
    start                int32 | int64 [B], s_b >= 0, s_b + q_lens[b] <= max_blocks * block_size
    q_lens               optional int32 | int64 [B] (default: Tq for every row)
    scale                float (default Dh ** -0.5)
    returns              [B, Tq, H, Dh] in q's dtype
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import (
    FLOAT_DTYPES, INDEX_DTYPES, INTERPRET, check_devices, check_paged_cache,
    check_out, check_shape, check_tensor,
)
from .paged_attention import gather_paged


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, start_ptr, qlen_ptr, out_ptr,
    stride_q_b, stride_q_t, stride_q_h, stride_q_d,
    stride_kc_n, stride_kc_s, stride_kc_h, stride_kc_d,
    stride_vc_n, stride_vc_s, stride_vc_h, stride_vc_d,
    stride_bt_b, stride_bt_m, stride_start, stride_qlen,
    stride_o_b, stride_o_t, stride_o_h, stride_o_d,
    TQ, H, DH, BLOCK_SIZE, scale,
    HAS_QLEN: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DH: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    first_m = tl.program_id(1) * BLOCK_M
    offs_m = first_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DH)
    d_mask = offs_d < DH

    start = tl.load(start_ptr + b * stride_start).to(tl.int32)
    q_len = TQ
    if HAS_QLEN:
        q_len = tl.minimum(tl.load(qlen_ptr + b * stride_qlen).to(tl.int32), TQ)
    m_valid = offs_m < q_len
    q_pos = start + offs_m

    q = tl.load(q_ptr + b * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_t + offs_d[None, :] * stride_q_d,
                mask=m_valid[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # Keys up to the last valid query of this tile; none at all when the tile holds only padding.
    last_m = tl.minimum(first_m + BLOCK_M, q_len) - 1
    n_end = tl.where(last_m >= first_m, start + last_m + 1, 0)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DH], dtype=tl.float32)
    k_base = k_cache_ptr + h * stride_kc_h + offs_d[None, :] * stride_kc_d
    v_base = v_cache_ptr + h * stride_vc_h + offs_d[None, :] * stride_vc_d
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_range = offs_n < n_end
        block = tl.load(bt_ptr + b * stride_bt_b + (offs_n // BLOCK_SIZE) * stride_bt_m, mask=in_range, other=0)
        block = block.to(tl.int64)
        slot = (offs_n % BLOCK_SIZE).to(tl.int64)
        kv_mask = in_range[:, None] & d_mask[None, :]
        k = tl.load(k_base + block[:, None] * stride_kc_n + slot[:, None] * stride_kc_s, mask=kv_mask, other=0.0)
        v = tl.load(v_base + block[:, None] * stride_vc_n + slot[:, None] * stride_vc_s, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        valid = (offs_n[None, :] <= q_pos[:, None]) & m_valid[:, None] & in_range[None, :]
        s = tl.where(valid, s * scale, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Padding queries never see a valid key: shift by 0 there so that exp gives 0, not NaN.
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + b * stride_o_b + h * stride_o_h + offs_m[:, None] * stride_o_t + offs_d[None, :] * stride_o_d,
             out.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < TQ) & d_mask[None, :])


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    start: torch.Tensor,
    q_lens: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of q [B, Tq, H, Dh] (query i at position start[b] + i) over the paged cache -> [B, Tq, H, Dh]."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4)
    batch, tq, heads, head_dim = q.shape
    check_paged_cache(k_cache, v_cache, block_tables, batch=batch, heads=heads, head_dim=head_dim,
                      like="q", like_dtype=q.dtype)
    if head_dim > 256:
        raise ValueError(f"q head dim must be <= 256, got {head_dim}")
    check_tensor("start", start, dtypes=INDEX_DTYPES, ndim=1)
    check_shape("start", start, (batch,))
    if q_lens is not None:
        check_tensor("q_lens", q_lens, dtypes=INDEX_DTYPES, ndim=1)
        check_shape("q_lens", q_lens, (batch,))
    device = check_devices(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, start=start, q_lens=q_lens)
    out = check_out(out, (batch, tq, heads, head_dim), q.dtype, device)
    if batch * tq * heads == 0:
        return out
    scale = head_dim ** -0.5 if scale is None else float(scale)

    upcast = INTERPRET and q.dtype == torch.bfloat16
    # Register budget (ptxas, sm_90, Dh = 64): 64-query tiles need 8 warps, and fp32 operands with the
    # gathered block offsets only fit without spills in 16-query tiles.
    block_m, num_warps = (16, 4) if tq <= 16 or q.dtype == torch.float32 else (64, 8)
    grid = (batch * heads, triton.cdiv(tq, block_m))
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, start, start if q_lens is None else q_lens, out,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        block_tables.stride(0), block_tables.stride(1),
        start.stride(0), 0 if q_lens is None else q_lens.stride(0),
        *out.stride(),
        tq, heads, head_dim, k_cache.shape[1], scale,
        HAS_QLEN=q_lens is not None,
        IEEE=q.dtype == torch.float32 or upcast,
        UPCAST=upcast,
        BLOCK_M=block_m,
        BLOCK_N=32,
        BLOCK_DH=max(triton.next_power_of_2(head_dim), 16),
        num_warps=num_warps,
    )
    return out


def paged_prefill_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    start: torch.Tensor,
    q_lens: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch twin of `paged_prefill`, computed in fp32."""
    batch, tq, _, head_dim = q.shape
    scale = head_dim ** -0.5 if scale is None else float(scale)
    k = gather_paged(k_cache, block_tables).float()  # [B, L, H, Dh]
    v = gather_paged(v_cache, block_tables).float()
    steps = torch.arange(tq, device=q.device)
    q_pos = start.to(q.device)[:, None] + steps[None, :]  # [B, Tq]
    key_pos = torch.arange(k.shape[1], device=q.device)
    valid = key_pos[None, None, :] <= q_pos[:, :, None]  # [B, Tq, L]
    if q_lens is not None:
        valid = valid & (steps[None, :] < q_lens.to(q.device)[:, None])[:, :, None]
    seen = valid.any(dim=1)[:, :, None, None]  # [B, L, 1, 1]: slots no query reads may hold anything
    k = k.masked_fill(~seen, 0.0)
    v = v.masked_fill(~seen, 0.0)
    scores = torch.einsum("bihd,bnhd->bhin", q.float(), k) * scale
    scores = scores.masked_fill(~valid[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    result = torch.einsum("bhin,bnhd->bihd", probs, v).to(q.dtype)
    if out is not None:
        out.copy_(result)
        return out
    return result
