"""Write new K/V steps into the paged KV cache, in place.

The cache is a pool of fixed-size blocks; row b's position `pos` lives in block
block_tables[b, pos // block_size] at slot pos % block_size:

    k_cache[block_tables[b, (p + t) // BS], (p + t) % BS, h, :] = k[b, t, h, :]     p = positions[b]
    (same for v), for t < lengths[b] (all T steps when lengths is None); rows with p < 0 write nothing.

Shapes and dtypes:
    k, v                 [B, H, Dh] (one decode step) or [B, T, H, Dh] (T consecutive steps), cache dtype
    k_cache, v_cache     [num_blocks, block_size, H, Dh], fp32 | fp16 | bf16, any strides
    block_tables         int32 [B, max_blocks]; every position written must have a block
    positions            int32 | int64 [B], the position of step t = 0 (negative: skip the row, e.g. padding)
    lengths              optional int32 | int64 [B], steps to write per row (<= T)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_devices, check_paged_cache, check_shape, check_tensor


@triton.jit
def _paged_kv_write_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, pos_ptr, len_ptr,
    stride_k_b, stride_k_t, stride_k_h, stride_k_d,
    stride_v_b, stride_v_t, stride_v_h, stride_v_d,
    stride_kc_n, stride_kc_s, stride_kc_h, stride_kc_d,
    stride_vc_n, stride_vc_s, stride_vc_h, stride_vc_d,
    stride_bt_b, stride_bt_m, stride_pos, stride_len,
    T, H, DH, BLOCK_SIZE,
    HAS_LENGTHS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_DH: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = pid % T
    start = tl.load(pos_ptr + b * stride_pos).to(tl.int64)
    limit = T
    if HAS_LENGTHS:
        limit = tl.load(len_ptr + b * stride_len).to(tl.int32)
    if (start >= 0) & (t < limit):
        pos = start + t
        block = tl.load(bt_ptr + b * stride_bt_b + (pos // BLOCK_SIZE) * stride_bt_m).to(tl.int64)
        slot = pos % BLOCK_SIZE
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_DH)
        mask = (offs_h[:, None] < H) & (offs_d[None, :] < DH)
        k = tl.load(k_ptr + b * stride_k_b + t * stride_k_t
                    + offs_h[:, None] * stride_k_h + offs_d[None, :] * stride_k_d, mask=mask)
        v = tl.load(v_ptr + b * stride_v_b + t * stride_v_t
                    + offs_h[:, None] * stride_v_h + offs_d[None, :] * stride_v_d, mask=mask)
        tl.store(k_cache_ptr + block * stride_kc_n + slot * stride_kc_s
                 + offs_h[:, None] * stride_kc_h + offs_d[None, :] * stride_kc_d, k, mask=mask)
        tl.store(v_cache_ptr + block * stride_vc_n + slot * stride_vc_s
                 + offs_h[:, None] * stride_vc_h + offs_d[None, :] * stride_vc_d, v, mask=mask)


def _as_steps(name: str, x: torch.Tensor) -> torch.Tensor:
    """[B, H, Dh] -> [B, 1, H, Dh] view; [B, T, H, Dh] unchanged."""
    check_tensor(name, x, dtypes=FLOAT_DTYPES, ndim=(3, 4))
    return x.unsqueeze(1) if x.dim() == 3 else x


def _check_cache_args(k, v, k_cache, v_cache, block_tables, positions, lengths):
    k4, v4 = _as_steps("k", k), _as_steps("v", v)
    check_shape("v", v, tuple(k.shape))
    if v.dtype != k.dtype:
        raise ValueError(f"v has dtype {v.dtype} but k has {k.dtype}")
    batch, _, heads, head_dim = k4.shape
    check_paged_cache(k_cache, v_cache, block_tables, batch=batch, heads=heads, head_dim=head_dim,
                      like="k", like_dtype=k.dtype)
    check_tensor("positions", positions, dtypes=INDEX_DTYPES, ndim=1)
    check_shape("positions", positions, (batch,))
    if lengths is not None:
        check_tensor("lengths", lengths, dtypes=INDEX_DTYPES, ndim=1)
        check_shape("lengths", lengths, (batch,))
    return k4, v4


def paged_kv_write(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    positions: torch.Tensor,
    lengths: torch.Tensor | None = None,
) -> None:
    """Scatter k, v ([B, H, Dh] or [B, T, H, Dh]) into their cache slots, in place."""
    k4, v4 = _check_cache_args(k, v, k_cache, v_cache, block_tables, positions, lengths)
    check_devices(k=k, v=v, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                  positions=positions, lengths=lengths)
    batch, steps, heads, head_dim = k4.shape
    if head_dim > 256:
        raise ValueError(f"k head dim must be <= 256, got {head_dim}")
    if batch * steps == 0:
        return
    _paged_kv_write_kernel[(batch * steps,)](
        k4, v4, k_cache, v_cache, block_tables, positions, positions if lengths is None else lengths,
        *k4.stride(), *v4.stride(), *k_cache.stride(), *v_cache.stride(),
        block_tables.stride(0), block_tables.stride(1),
        positions.stride(0), 0 if lengths is None else lengths.stride(0),
        steps, heads, head_dim, k_cache.shape[1],
        HAS_LENGTHS=lengths is not None,
        BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_DH=max(triton.next_power_of_2(head_dim), 16),
        num_warps=4,
    )


def paged_kv_write_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    positions: torch.Tensor,
    lengths: torch.Tensor | None = None,
) -> None:
    """Plain-torch twin of `paged_kv_write` (loops on the host; for tests)."""
    k4 = k.unsqueeze(1) if k.dim() == 3 else k
    v4 = v.unsqueeze(1) if v.dim() == 3 else v
    block_size = k_cache.shape[1]
    for b in range(k4.shape[0]):
        start = int(positions[b])
        if start < 0:
            continue
        steps = k4.shape[1] if lengths is None else int(lengths[b])
        for t in range(steps):
            pos = start + t
            block = int(block_tables[b, pos // block_size])
            k_cache[block, pos % block_size] = k4[b, t]
            v_cache[block, pos % block_size] = v4[b, t]
