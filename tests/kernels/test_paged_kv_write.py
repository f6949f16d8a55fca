"""paged_kv_write: every written slot bit-exact, every other slot untouched (the pool starts NaN-poisoned).

Tolerance: none. The kernel copies values, so the cache must equal the reference's cache exactly
(NaN where nothing was written) in every dtype.
"""
from __future__ import annotations

import os

import pytest
import torch

from enginepy.kernels import paged_kv_write

from hopper_compile import compile_for_hopper

pytestmark = pytest.mark.triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Inputs are made on the CPU (seeded), the kernel runs where Triton runs, expectations are built on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def make_pool(num_blocks, block_size, heads, head_dim, dtype, head_major=False):
    if head_major:  # [num_blocks, H, BS, Dh] storage seen as [num_blocks, BS, H, Dh]
        return torch.full((num_blocks, heads, block_size, head_dim), float("nan"), dtype=dtype).transpose(1, 2)
    return torch.full((num_blocks, block_size, heads, head_dim), float("nan"), dtype=dtype)


def expected_pool(pool, k, block_tables, positions, lengths):
    """Written slot by slot with plain indexing, independent of the module."""
    pool = pool.clone()
    k4 = k.unsqueeze(1) if k.dim() == 3 else k
    block_size = pool.shape[1]
    for b in range(k4.shape[0]):
        if positions[b] < 0:
            continue
        steps = k4.shape[1] if lengths is None else int(lengths[b])
        for t in range(steps):
            pos = int(positions[b]) + t
            pool[int(block_tables[b, pos // block_size]), pos % block_size] = k4[b, t]
    return pool


CASES = [
    # (batch, steps or None for [B, H, Dh], heads, head_dim, block_size, max_blocks, positions)
    (1, None, 1, 64, 16, 1, [0]),
    (4, None, 3, 24, 16, 3, [0, 15, 16, 47]),  # first slot, last slot of a block, block boundary, last slot
    (3, None, 2, 24, 5, 4, [-1, 4, 19]),  # -1: a padding row, skipped
    (3, 7, 2, 64, 5, 4, [0, 3, 13]),  # 7 steps crossing block boundaries
    (2, 33, 1, 24, 16, 4, [0, 30]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("with_lengths", [False, True])
def test_write_matches_reference(case, dtype, with_lengths):
    batch, steps, heads, head_dim, block_size, max_blocks, positions = CASES[case]
    gen = torch.Generator().manual_seed(case)
    num_blocks = batch * max_blocks + 2
    block_tables = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks].view(batch, max_blocks).int()
    shape = (batch, heads, head_dim) if steps is None else (batch, steps, heads, head_dim)
    k = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(dtype)
    pos = torch.tensor(positions, dtype=torch.int64)
    lengths = None
    if with_lengths:
        lengths = torch.randint(0, (steps or 1) + 1, (batch,), generator=gen, dtype=torch.int32)
        lengths[-1] = steps or 1  # at least one row writes something
    k_cache, v_cache = make_pool(num_blocks, block_size, heads, head_dim, dtype), make_pool(num_blocks, block_size, heads, head_dim, dtype, True)
    want_k = expected_pool(k_cache, k, block_tables, pos, lengths)
    want_v = expected_pool(v_cache, v, block_tables, pos, lengths)

    k_dev, v_dev = k_cache.to(DEVICE), v_cache.to(DEVICE)
    paged_kv_write.paged_kv_write(k.to(DEVICE), v.to(DEVICE), k_dev, v_dev, block_tables.to(DEVICE), pos.to(DEVICE),
                                  None if lengths is None else lengths.to(DEVICE))
    torch.testing.assert_close(k_dev.cpu(), want_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_dev.cpu(), want_v, rtol=0, atol=0, equal_nan=True)
    assert not torch.isnan(want_k).all(), "nothing was written"

    ref_k, ref_v = make_pool(num_blocks, block_size, heads, head_dim, dtype), make_pool(num_blocks, block_size, heads, head_dim, dtype)
    paged_kv_write.paged_kv_write_ref(k, v, ref_k, ref_v, block_tables, pos, lengths)
    torch.testing.assert_close(ref_k, want_k, rtol=0, atol=0, equal_nan=True)


def test_write_strided_inputs():
    """k, v are views into a fused [B, 3, H, Dh] projection; positions and the block table are strided."""
    gen = torch.Generator().manual_seed(11)
    qkv = torch.randn(3, 3, 2, 24, generator=gen)
    tables = torch.randperm(12, generator=gen).view(3, 4).int()
    positions = torch.tensor([[2, 0], [9, 0], [15, 0]])
    k_cache, v_cache = make_pool(12, 4, 2, 24, torch.float32), make_pool(12, 4, 2, 24, torch.float32)
    want_k = expected_pool(k_cache, qkv[:, 1], tables, positions[:, 0], None)
    want_v = expected_pool(v_cache, qkv[:, 2], tables, positions[:, 0], None)
    qkv_dev, k_dev, v_dev = qkv.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE)
    block_tables = tables.to(DEVICE).t().contiguous().t()  # same values, column-major strides
    paged_kv_write.paged_kv_write(qkv_dev[:, 1], qkv_dev[:, 2], k_dev, v_dev, block_tables,
                                  positions.to(DEVICE)[:, 0])
    torch.testing.assert_close(k_dev.cpu(), want_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_dev.cpu(), want_v, rtol=0, atol=0, equal_nan=True)


def _args():
    return dict(k=torch.randn(2, 3, 24), v=torch.randn(2, 3, 24), k_cache=torch.zeros(6, 4, 3, 24),
                v_cache=torch.zeros(6, 4, 3, 24), block_tables=torch.zeros(2, 2, dtype=torch.int32),
                positions=torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("name, value", [
    ("k", torch.zeros(2, 3, 24, dtype=torch.int64)),
    ("k", torch.zeros(2, 24)),
    ("v", torch.zeros(2, 3, 25)),
    ("k_cache", torch.zeros(6, 4, 2, 24)),
    ("k_cache", torch.zeros(6, 4, 3, 24, dtype=torch.float16)),
    ("v_cache", torch.zeros(6, 4, 3, 23)),
    ("block_tables", torch.zeros(2, 2, dtype=torch.int64)),
    ("positions", torch.zeros(3, dtype=torch.int64)),
    ("positions", torch.zeros(2)),
])
def test_write_rejects_bad_input(name, value):
    args = {key: t.to(DEVICE) for key, t in _args().items()}
    args[name] = value.to(DEVICE)
    with pytest.raises(ValueError, match=name):
        paged_kv_write.paged_kv_write(**args)


def test_write_compiles_for_hopper():
    """Every launch configuration lowers to PTX and a cubin for sm_90 (no GPU needed)."""
    compile_for_hopper("paged_kv_write")
