"""Cross-attention over dense, precomputed text K/V (computed once per request, reused at every step).

    out[b, i, h, :] = sum_{n valid for b} softmax_n(scale * q[b, i, h, :] . k[b, n, h, :]) v[b, n, h, :]

Key n of row b is valid when n < lengths[b] (per-row lengths), or when mask[b, n] != 0 (a key mask, e.g.
the tokenizer's attention mask), or always (neither given). A row with no valid key gives zeros, not NaN:
that is the CFG null condition (zero text states, all-zero mask).

Online softmax in fp32 over key tiles; both products use tl.dot with fp32 accumulation. fp32 inputs use
IEEE fp32 products (no TF32), fp16/bf16 inputs multiply in their own dtype, with the probabilities rounded
to that dtype before the second product (as flash attention does). The Triton interpreter computes bf16
dots wrongly, so bf16 operands are upcast to fp32 when it runs.

Shapes and dtypes:
    q        [B, H, Dh] (one decode step) or [B, Tq, H, Dh]; fp32 | fp16 | bf16; any strides; Dh <= 256
    k, v     [B, Tk, H, Dh], q's dtype, any strides
    lengths  optional int32 | int64 [B], clipped to [0, Tk]
    mask     optional [B, Tk], bool or integer (non-zero = attend); not together with lengths
    scale    float (default Dh ** -0.5)
    returns  q's shape and dtype
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, INDEX_DTYPES, INTERPRET, check_devices, check_out, check_shape, check_tensor

_KEYS_ALL, _KEYS_LENGTHS, _KEYS_MASK = 0, 1, 2


@triton.jit
def _cross_attention_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, mask_ptr, out_ptr,
    stride_q_b, stride_q_t, stride_q_h, stride_q_d,
    stride_k_b, stride_k_t, stride_k_h, stride_k_d,
    stride_v_b, stride_v_t, stride_v_h, stride_v_d,
    stride_len, stride_mask_b, stride_mask_t,
    stride_o_b, stride_o_t, stride_o_h, stride_o_d,
    TQ, TK, H, DH, scale,
    KEY_RULE: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DH: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DH)
    m_mask = offs_m < TQ
    d_mask = offs_d < DH

    q = tl.load(q_ptr + b * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_t + offs_d[None, :] * stride_q_d,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    n_end = TK
    if KEY_RULE == 1:
        n_end = tl.maximum(tl.minimum(tl.load(len_ptr + b * stride_len).to(tl.int32), TK), 0)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DH], dtype=tl.float32)
    k_base = k_ptr + b * stride_k_b + h * stride_k_h + offs_d[None, :] * stride_k_d
    v_base = v_ptr + b * stride_v_b + h * stride_v_h + offs_d[None, :] * stride_v_d
    for start in range(0, n_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        in_range = offs_n < n_end
        valid = in_range
        if KEY_RULE == 2:
            keep = tl.load(mask_ptr + b * stride_mask_b + offs_n * stride_mask_t, mask=in_range, other=0)
            valid = in_range & (keep != 0)
        # Masked keys are never read, so whatever the padding holds (even NaN) cannot reach the output.
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_k_t, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_v_t, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s * scale, -float("inf"))  # [BLOCK_M, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # While a row has seen no valid key, m_new is -inf; shift by 0 so that exp gives 0, not NaN.
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
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q ([B, H, Dh] or [B, Tq, H, Dh]) over k, v [B, Tk, H, Dh] -> q's shape and dtype."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=(3, 4))
    check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor("v", v, dtypes=FLOAT_DTYPES, ndim=4)
    q4 = q.unsqueeze(1) if q.dim() == 3 else q
    batch, tq, heads, head_dim = q4.shape
    tk = k.shape[1]
    check_shape("k", k, (batch, tk, heads, head_dim))
    check_shape("v", v, (batch, tk, heads, head_dim))
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but q has {q.dtype}")
    if head_dim > 256:
        raise ValueError(f"q head dim must be <= 256, got {head_dim}")
    if lengths is not None and mask is not None:
        raise ValueError("give lengths or mask, not both")
    key_rule = _KEYS_ALL
    if lengths is not None:
        check_tensor("lengths", lengths, dtypes=INDEX_DTYPES, ndim=1)
        check_shape("lengths", lengths, (batch,))
        key_rule = _KEYS_LENGTHS
    if mask is not None:
        check_tensor("mask", mask, dtypes=(torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64), ndim=2)
        check_shape("mask", mask, (batch, tk))
        key_rule = _KEYS_MASK
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
    device = check_devices(q=q, k=k, v=v, lengths=lengths, mask=mask)
    out = check_out(out, tuple(q.shape), q.dtype, device)
    if batch * tq * heads == 0:
        return out
    out4 = out.unsqueeze(1) if q.dim() == 3 else out
    scale = head_dim ** -0.5 if scale is None else float(scale)

    upcast = INTERPRET and q.dtype == torch.bfloat16
    # 64-query tiles need 8 warps to stay clear of register spills (ptxas, sm_90, Dh = 64).
    block_m, num_warps = (16, 4) if tq <= 16 else (64, 8)
    grid = (batch * heads, triton.cdiv(tq, block_m))
    len_arg = lengths if lengths is not None else q
    mask_arg = mask if mask is not None else q
    _cross_attention_kernel[grid](
        q4, k, v, len_arg, mask_arg, out4,
        *q4.stride(), *k.stride(), *v.stride(),
        lengths.stride(0) if lengths is not None else 0,
        mask.stride(0) if mask is not None else 0,
        mask.stride(1) if mask is not None else 0,
        *out4.stride(),
        tq, tk, heads, head_dim, scale,
        KEY_RULE=key_rule,
        IEEE=q.dtype == torch.float32 or upcast,
        UPCAST=upcast,
        BLOCK_M=block_m,
        BLOCK_N=32,
        BLOCK_DH=max(triton.next_power_of_2(head_dim), 16),
        num_warps=num_warps,
    )
    return out


def cross_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch twin of `cross_attention`, computed in fp32."""
    q4 = q.unsqueeze(1) if q.dim() == 3 else q
    head_dim = q4.shape[-1]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    tk = k.shape[1]
    if lengths is not None:
        valid = torch.arange(tk, device=k.device)[None, :] < lengths[:, None].to(k.device)
    elif mask is not None:
        valid = mask != 0
    else:
        valid = torch.ones(k.shape[0], tk, dtype=torch.bool, device=k.device)
    hidden = ~valid[:, :, None, None]  # masked keys may hold anything, NaN included: never use them
    k = k.float().masked_fill(hidden, 0.0)
    v = v.float().masked_fill(hidden, 0.0)
    scores = torch.einsum("bihd,bnhd->bhin", q4.float(), k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no valid key -> zeros
    result = torch.einsum("bhin,bnhd->bihd", probs, v).to(q.dtype).reshape(q.shape)
    if out is not None:
        out.copy_(result)
        return out
    return result
