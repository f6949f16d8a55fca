"""Decode self-attention over the paged KV cache: one query per (row, head).

    out[b, h, :] = sum_{n < L_b} softmax_n(scale * q[b, h, :] . K_b[n, h, :]) V_b[n, h, :],   L_b = seq_lens[b]
    K_b[n] = k_cache[block_tables[b, n // block_size], n % block_size]                     (V_b likewise)

A row with L_b = 0 gives zeros, not NaN. Softmax is online (running max and sum) in fp32; K/V are loaded in
their storage dtype and accumulated in fp32; the output is cast to q's dtype.

Work split (flash-decoding): at small batch the B * H programs cannot fill the GPU, so the positions of a row
can be cut into `num_splits` chunks, each program writing an unnormalised fp32 partial (acc, running max m,
running sum l), and a second kernel merging them: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
The number of splits depends only on static shapes (block table capacity, B, H), never on seq_lens, so the
launch is the same at every step and can be captured in a CUDA graph.

Shapes and dtypes:
    q                    [B, H, Dh], fp32 | fp16 | bf16, any strides, Dh <= 256
    k_cache, v_cache     [num_blocks, block_size, H, Dh], q's dtype, any strides
    block_tables         int32 [B, max_blocks]
    seq_lens             int32 | int64 [B], 0 <= L_b <= max_blocks * block_size
    scale                float (default Dh ** -0.5)
    returns              [B, H, Dh] in q's dtype
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import (
    FLOAT_DTYPES, INDEX_DTYPES, INTERPRET, check_devices, check_paged_cache,
    check_out, check_shape, check_tensor,
)

_SM_COUNT: dict[int, int] = {}


@triton.jit
def _paged_attention_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, seq_lens_ptr, acc_ptr, m_ptr, l_ptr,
    stride_q_b, stride_q_h, stride_q_d,
    stride_kc_n, stride_kc_s, stride_kc_h, stride_kc_d,
    stride_vc_n, stride_vc_s, stride_vc_h, stride_vc_d,
    stride_bt_b, stride_bt_m, stride_sl,
    stride_acc_b, stride_acc_h, stride_acc_s, stride_acc_d,
    stride_ml_b, stride_ml_h, stride_ml_s,
    scale, DH, BLOCK_SIZE, CHUNK,
    SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DH: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b * stride_sl).to(tl.int32)

    offs_d = tl.arange(0, BLOCK_DH)
    d_mask = offs_d < DH
    q = tl.load(q_ptr + b * stride_q_b + h * stride_q_h + offs_d * stride_q_d, mask=d_mask, other=0.0)
    q = q.to(tl.float32)

    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_DH], dtype=tl.float32)
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, seq_len)
    k_base = k_cache_ptr + h * stride_kc_h + offs_d[None, :] * stride_kc_d
    v_base = v_cache_ptr + h * stride_vc_h + offs_d[None, :] * stride_vc_d
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        block = tl.load(bt_ptr + b * stride_bt_b + (offs_n // BLOCK_SIZE) * stride_bt_m, mask=n_mask, other=0)
        block = block.to(tl.int64)
        slot = (offs_n % BLOCK_SIZE).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + block[:, None] * stride_kc_n + slot[:, None] * stride_kc_s, mask=kv_mask, other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale  # [BLOCK_N]
        scores = tl.where(n_mask, scores, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new)
        v = tl.load(v_base + block[:, None] * stride_vc_n + slot[:, None] * stride_vc_s, mask=kv_mask, other=0.0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m_i = m_new

    acc_out = acc_ptr + b * stride_acc_b + h * stride_acc_h + split * stride_acc_s + offs_d * stride_acc_d
    if SPLIT:
        tl.store(acc_out, acc, mask=d_mask)
        tl.store(m_ptr + b * stride_ml_b + h * stride_ml_h + split * stride_ml_s, m_i)
        tl.store(l_ptr + b * stride_ml_b + h * stride_ml_h + split * stride_ml_s, l_i)
    else:
        # l_i == 0 only for an empty row, whose acc is 0: dividing by 1 gives the required zeros.
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)
        tl.store(acc_out, out.to(acc_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _paged_attention_combine_kernel(
    acc_ptr, m_ptr, l_ptr, out_ptr,
    stride_acc_b, stride_acc_h, stride_acc_s, stride_acc_d,
    stride_ml_b, stride_ml_h, stride_ml_s,
    stride_o_b, stride_o_h, stride_o_d,
    NUM_SPLITS, DH,
    BLOCK_S: tl.constexpr,
    BLOCK_DH: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_DH)
    s_mask = offs_s < NUM_SPLITS
    d_mask = offs_d < DH
    ml_off = b * stride_ml_b + h * stride_ml_h + offs_s * stride_ml_s
    m = tl.load(m_ptr + ml_off, mask=s_mask, other=-float("inf"))
    l = tl.load(l_ptr + ml_off, mask=s_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    # Empty splits carry m = -inf; an all-empty row must not compute -inf - -inf.
    w = tl.exp(m - tl.where(m_max == -float("inf"), 0.0, m_max))
    total = tl.sum(l * w, axis=0)
    acc = tl.load(acc_ptr + b * stride_acc_b + h * stride_acc_h + offs_s[:, None] * stride_acc_s
                  + offs_d[None, :] * stride_acc_d, mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b * stride_o_b + h * stride_o_h + offs_d * stride_o_d,
             out.to(out_ptr.dtype.element_ty), mask=d_mask)


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _pick_num_splits(device: torch.device, programs: int, capacity: int, block_n: int) -> int:
    """Enough (row, head, split) programs to cover the GPU about twice, chunks of at least 4 tiles."""
    if INTERPRET or device.type != "cuda":
        return 1
    target = 2 * _sm_count(device)
    if programs >= target:
        return 1
    return max(1, min(triton.cdiv(target, programs), capacity // (4 * block_n), 64))


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    *,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One-query attention over the paged cache. q [B, H, Dh] -> [B, H, Dh] (q's dtype).

    num_splits: chunks per row (flash-decoding); default: enough (row, head, chunk) programs to cover the
    GPU about twice, from static shapes only (1 under the interpreter). out: optional [B, H, Dh] in q's dtype.
    """
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    batch, heads, head_dim = q.shape
    check_paged_cache(k_cache, v_cache, block_tables, batch=batch, heads=heads, head_dim=head_dim,
                      like="q", like_dtype=q.dtype)
    if head_dim > 256:
        raise ValueError(f"q head dim must be <= 256, got {head_dim}")
    check_tensor("seq_lens", seq_lens, dtypes=INDEX_DTYPES, ndim=1)
    check_shape("seq_lens", seq_lens, (batch,))
    device = check_devices(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, seq_lens=seq_lens)
    out = check_out(out, (batch, heads, head_dim), q.dtype, device)
    if batch * heads == 0:
        return out
    scale = head_dim ** -0.5 if scale is None else float(scale)

    block_n = 64
    block_dh = max(triton.next_power_of_2(head_dim), 16)
    capacity = block_tables.shape[1] * k_cache.shape[1]
    if num_splits is None:
        num_splits = _pick_num_splits(device, batch * heads, capacity, block_n)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    chunk = triton.cdiv(triton.cdiv(max(capacity, 1), num_splits), block_n) * block_n
    num_splits = max(1, triton.cdiv(capacity, chunk))

    split = num_splits > 1
    if split:
        acc = torch.empty(batch, heads, num_splits, head_dim, dtype=torch.float32, device=device)
        m = torch.empty(batch, heads, num_splits, dtype=torch.float32, device=device)
        l = torch.empty_like(m)
        acc_strides = acc.stride()
        ml_strides = m.stride()
    else:
        acc, m, l = out, out, out  # the kernel writes the normalised result straight into out
        acc_strides = (out.stride(0), out.stride(1), 0, out.stride(2))
        ml_strides = (0, 0, 0)

    _paged_attention_decode_kernel[(batch, heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, acc, m, l,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        block_tables.stride(0), block_tables.stride(1), seq_lens.stride(0),
        *acc_strides, *ml_strides,
        scale, head_dim, k_cache.shape[1], chunk,
        SPLIT=split,
        BLOCK_N=block_n,
        BLOCK_DH=block_dh,
        num_warps=8,  # a [64, 64] fp32 K/V tile per step: ~160 registers a thread with 8 warps, ~230 with 4
    )
    if split:
        _paged_attention_combine_kernel[(batch, heads)](
            acc, m, l, out,
            *acc.stride(), *m.stride(), *out.stride(),
            num_splits, head_dim,
            BLOCK_S=max(triton.next_power_of_2(num_splits), 2),
            BLOCK_DH=block_dh,
            num_warps=2,
        )
    return out


def gather_paged(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """Dense view of every row's cache capacity: [num_blocks, BS, H, Dh] -> [B, max_blocks * BS, H, Dh]."""
    block_size = cache.shape[1]
    pos = torch.arange(block_tables.shape[1] * block_size, device=cache.device)
    blocks = block_tables.long()[:, pos // block_size]  # [B, L]
    return cache[blocks, pos % block_size]


def paged_attention_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    *,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch twin of `paged_attention_decode`, computed in fp32 (num_splits is ignored)."""
    head_dim = q.shape[-1]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    k = gather_paged(k_cache, block_tables).float()  # [B, L, H, Dh]
    v = gather_paged(v_cache, block_tables).float()
    valid = torch.arange(k.shape[1], device=q.device)[None, :] < seq_lens[:, None].to(q.device)  # [B, L]
    k = k.masked_fill(~valid[:, :, None, None], 0.0)  # slots past seq_len may hold anything, NaN included
    v = v.masked_fill(~valid[:, :, None, None], 0.0)
    scores = torch.einsum("bhd,blhd->bhl", q.float(), k) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty rows: all -inf -> NaN -> 0
    result = torch.einsum("bhl,blhd->bhd", probs, v).to(q.dtype)
    if out is not None:
        out.copy_(result)
        return out
    return result
