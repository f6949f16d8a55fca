"""paged_prefill (causal, many queries per row) against a float64 oracle over the paged cache.

The chunk's own K/V go into the cache through paged_kv_write, on top of random earlier context, as the
engine does; every slot past a row's last query position is NaN, so reading one fails the test.

Tolerance rule (flash-attention's): the kernel's max error vs the float64 oracle must be at most twice the
error of plain torch computing the same attention in the input dtype, plus a small absolute epsilon:

    dtype      epsilon
    float32    1e-6
    float16    1e-4
    bfloat16   1e-3
"""
from __future__ import annotations

import os

import pytest
import torch

from enginepy.kernels import paged_kv_write, paged_prefill

from hopper_compile import compile_for_hopper

pytestmark = pytest.mark.triton

EPS = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Inputs are made on the CPU (seeded), the kernels run where Triton runs, the oracles run on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def build(starts, q_lens, tq, heads, head_dim, block_size, max_blocks, dtype, gen):
    """Cache with random context below start[b], the chunk's K/V written by paged_kv_write, NaN elsewhere.

    Returns (q, k_cache, v_cache, block_tables, start, q_lens), all on DEVICE.
    """
    batch = len(starts)
    num_blocks = batch * max_blocks + 2
    block_tables = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks].view(batch, max_blocks).int()
    k_cache = torch.full((num_blocks, block_size, heads, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    for b, start in enumerate(starts):
        for pos in range(start):
            block, slot = int(block_tables[b, pos // block_size]), pos % block_size
            k_cache[block, slot] = torch.randn(heads, head_dim, generator=gen).to(dtype)
            v_cache[block, slot] = torch.randn(heads, head_dim, generator=gen).to(dtype)
    k_new = torch.randn(batch, tq, heads, head_dim, generator=gen).to(dtype)
    v_new = torch.randn(batch, tq, heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(batch, tq, heads, head_dim, generator=gen).to(dtype)
    start_t = torch.tensor(starts, dtype=torch.int32)
    len_t = torch.tensor(q_lens, dtype=torch.int32)
    q, k_new, v_new, k_cache, v_cache, block_tables, start_t, len_t = (
        t.to(DEVICE) for t in (q, k_new, v_new, k_cache, v_cache, block_tables, start_t, len_t))
    paged_kv_write.paged_kv_write(k_new, v_new, k_cache, v_cache, block_tables, start_t, len_t)
    return q, k_cache, v_cache, block_tables, start_t, len_t


def torch_prefill(q, k_cache, v_cache, block_tables, starts, q_lens, scale, dtype):
    """Plain torch in `dtype` on the CPU, query by query, reading the cache one position at a time."""
    q, k_cache, v_cache, block_tables = q.cpu(), k_cache.cpu(), v_cache.cpu(), block_tables.cpu()
    block_size = k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=dtype)
    for b, start in enumerate(starts):
        for i in range(q_lens[b]):
            keys = range(start + i + 1)
            k = torch.stack([k_cache[int(block_tables[b, p // block_size]), p % block_size] for p in keys]).to(dtype)
            v = torch.stack([v_cache[int(block_tables[b, p // block_size]), p % block_size] for p in keys]).to(dtype)
            scores = torch.einsum("hd,nhd->hn", q[b, i].to(dtype), k) * scale
            out[b, i] = torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), v)
    return out


def assert_within_rule(out, q, k_cache, v_cache, block_tables, starts, q_lens, scale, dtype):
    oracle = torch_prefill(q, k_cache, v_cache, block_tables, starts, q_lens, scale, torch.float64)
    err = (out.cpu().double() - oracle).abs().max().item()
    low = torch_prefill(q, k_cache, v_cache, block_tables, starts, q_lens, scale, dtype)
    torch_err = (low.double() - oracle).abs().max().item()
    assert err <= 2 * torch_err + EPS[dtype], f"error {err:.3g} vs torch {dtype} error {torch_err:.3g}"


CASES = [
    # (starts, q_lens, tq, heads, head_dim, block_size, max_blocks)
    ([0], [1], 1, 1, 64, 16, 1),
    ([0, 5, 16], [7, 3, 7], 7, 3, 24, 16, 2),  # ragged chunk, start on a block boundary
    ([9, 0], [17, 0], 17, 2, 64, 5, 6),  # a row with no valid query, non-power-of-two block size
    ([3, 30], [33, 20], 33, 1, 24, 16, 4),  # two query tiles
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_prefill_matches_oracle(case, dtype):
    starts, q_lens, tq, heads, head_dim, block_size, max_blocks = CASES[case]
    gen = torch.Generator().manual_seed(20 + case)
    q, k_cache, v_cache, block_tables, start_t, len_t = build(starts, q_lens, tq, heads, head_dim, block_size,
                                                              max_blocks, dtype, gen)
    out = torch.full_like(q, float("nan"))
    paged_prefill.paged_prefill(q, k_cache, v_cache, block_tables, start_t, len_t, out=out)
    scale = head_dim ** -0.5
    assert_within_rule(out, q, k_cache, v_cache, block_tables, starts, q_lens, scale, dtype)
    out = out.cpu()
    for b, n in enumerate(q_lens):
        assert torch.equal(out[b, n:], torch.zeros_like(out[b, n:])), "padding queries must give zeros"
    ref = paged_prefill.paged_prefill_ref(q, k_cache, v_cache, block_tables, start_t, len_t)
    assert_within_rule(ref, q, k_cache, v_cache, block_tables, starts, q_lens, scale, dtype)


def test_prefill_without_q_lens_equals_full_lengths():
    gen = torch.Generator().manual_seed(3)
    q, k_cache, v_cache, block_tables, start_t, _ = build([2, 11], [7, 7], 7, 2, 24, 4, 5, torch.float32, gen)
    with_lens = paged_prefill.paged_prefill(q, k_cache, v_cache, block_tables, start_t,
                                            torch.tensor([7, 7], device=DEVICE))
    without = paged_prefill.paged_prefill(q, k_cache, v_cache, block_tables, start_t)
    assert torch.equal(with_lens, without)
    assert_within_rule(without, q, k_cache, v_cache, block_tables, [2, 11], [7, 7], 24 ** -0.5, torch.float32)


def test_prefill_last_query_equals_decode():
    """The last query of a chunk sees exactly what a decode step at that position sees."""
    from enginepy.kernels import paged_attention

    gen = torch.Generator().manual_seed(4)
    q, k_cache, v_cache, block_tables, start_t, len_t = build([4, 12], [5, 5], 5, 2, 64, 8, 3, torch.float32, gen)
    pre = paged_prefill.paged_prefill(q, k_cache, v_cache, block_tables, start_t, len_t)
    dec = paged_attention.paged_attention_decode(q[:, -1], k_cache, v_cache, block_tables, start_t + 5)
    torch.testing.assert_close(pre[:, -1], dec, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prefill_strided_long(dtype):
    """A 1000-position row: q a view into a fused projection, a non-contiguous out."""
    gen = torch.Generator().manual_seed(8)
    q, k_cache, v_cache, block_tables, start_t, len_t = build([960], [40], 40, 1, 64, 16, 63, dtype, gen)
    qkv = torch.stack([q, q, q], dim=2)  # [B, Tq, 3, H, Dh]
    q_view = qkv[:, :, 1]
    out_buf = torch.full((1, 40, 1, 128), float("nan"), dtype=dtype, device=DEVICE)
    out = out_buf[..., 64:]
    paged_prefill.paged_prefill(q_view, k_cache, v_cache, block_tables, start_t, len_t, out=out)
    assert_within_rule(out, q, k_cache, v_cache, block_tables, [960], [40], 64 ** -0.5, dtype)
    assert torch.isnan(out_buf[..., :64]).all(), "wrote outside out"


def _args():
    return dict(q=torch.randn(2, 3, 2, 24), k_cache=torch.zeros(6, 4, 2, 24), v_cache=torch.zeros(6, 4, 2, 24),
                block_tables=torch.zeros(2, 3, dtype=torch.int32), start=torch.zeros(2, dtype=torch.int32))


@pytest.mark.parametrize("name, value", [
    ("q", torch.zeros(2, 3, 2, 24, dtype=torch.int64)),
    ("q", torch.zeros(2, 2, 24)),
    ("k_cache", torch.zeros(6, 4, 3, 24)),
    ("v_cache", torch.zeros(6, 4, 2, 24, dtype=torch.bfloat16)),
    ("block_tables", torch.zeros(2, 3)),
    ("start", torch.zeros(3, dtype=torch.int32)),
    ("q_lens", torch.zeros(2, 1, dtype=torch.int32)),
])
def test_prefill_rejects_bad_input(name, value):
    args = {key: t.to(DEVICE) for key, t in _args().items()}
    args[name] = value.to(DEVICE)
    with pytest.raises(ValueError, match=name):
        paged_prefill.paged_prefill(**args)


def test_prefill_compiles_for_hopper():
    """Every launch configuration lowers to PTX and a cubin for sm_90 (no GPU needed)."""
    compile_for_hopper("paged_prefill")
