"""paged_attention_decode against a float64 oracle built position by position from the block tables.

Tolerance rule (flash-attention's): the kernel's max error vs the float64 oracle must be at most twice the
error of plain torch computing the same attention in the input dtype, plus a small absolute epsilon:

    dtype      epsilon    (torch's own error at these shapes, for scale)
    float32    1e-6       ~1e-7
    float16    1e-4       ~1e-3
    bfloat16   1e-3       ~1e-2
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from enginepy.kernels import paged_attention

from hopper_compile import compile_for_hopper

pytestmark = pytest.mark.triton

EPS = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Inputs are made on the CPU (seeded), the kernel runs where Triton runs, the oracles run on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def make_paged_cache(seq_lens, max_blocks, block_size, heads, head_dim, dtype, gen, head_major=False):
    """Shuffled block pool with random K/V in every slot a row owns below its length, NaN everywhere else."""
    batch = len(seq_lens)
    num_blocks = batch * max_blocks + 3  # a few blocks nobody owns
    block_tables = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks].view(batch, max_blocks).int()
    if head_major:  # [num_blocks, H, BS, Dh] storage seen as [num_blocks, BS, H, Dh]: a strided view
        k_cache = torch.full((num_blocks, heads, block_size, head_dim), float("nan"), dtype=dtype).transpose(1, 2)
        v_cache = torch.full((num_blocks, heads, block_size, head_dim), float("nan"), dtype=dtype).transpose(1, 2)
    else:
        k_cache = torch.full((num_blocks, block_size, heads, head_dim), float("nan"), dtype=dtype)
        v_cache = torch.full((num_blocks, block_size, heads, head_dim), float("nan"), dtype=dtype)
    for b, length in enumerate(seq_lens):
        for pos in range(length):
            block, slot = int(block_tables[b, pos // block_size]), pos % block_size
            k_cache[block, slot] = torch.randn(heads, head_dim, generator=gen).to(dtype)
            v_cache[block, slot] = torch.randn(heads, head_dim, generator=gen).to(dtype)
    return k_cache, v_cache, block_tables


def dense_rows(cache, block_tables, seq_lens):
    """Row b's first seq_lens[b] cached vectors, read one position at a time: list of [L_b, H, Dh]."""
    block_size = cache.shape[1]
    rows = []
    for b, length in enumerate(seq_lens):
        rows.append(torch.stack([cache[int(block_tables[b, p // block_size]), p % block_size] for p in range(length)])
                    if length else cache.new_zeros(0, *cache.shape[2:]))
    return rows


def torch_decode(q, k_rows, v_rows, scale, dtype):
    """Plain torch attention of q [B, H, Dh] over per-row dense K/V, computed in `dtype`."""
    out = torch.zeros(q.shape, dtype=dtype)
    for b, (k, v) in enumerate(zip(k_rows, v_rows)):
        if k.shape[0] == 0:
            continue
        scores = torch.einsum("hd,nhd->hn", q[b].to(dtype), k.to(dtype)) * scale
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), v.to(dtype))
    return out


def assert_within_rule(out, q, k_rows, v_rows, scale, dtype):
    oracle = torch_decode(q, k_rows, v_rows, scale, torch.float64)
    err = (out.double() - oracle).abs().max().item()
    torch_err = (torch_decode(q, k_rows, v_rows, scale, dtype).double() - oracle).abs().max().item()
    assert err <= 2 * torch_err + EPS[dtype], f"error {err:.3g} vs torch {dtype} error {torch_err:.3g}"


CASES = [
    # (seq_lens, max_blocks, block_size, heads, head_dim): empty row, length 1, exact multiples of the block
    # size, a full table, a non-power-of-two block size, the odd head dim 24 and the real 64.
    ([1], 1, 16, 1, 64),
    ([0, 1, 16, 37], 3, 16, 3, 24),
    ([5, 10, 7], 3, 5, 2, 64),
    ([33, 64], 4, 16, 1, 24),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: "L{}-bs{}-H{}-Dh{}".format(*CASES[i][:1], *CASES[i][2:]))
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_oracle(case, dtype, num_splits):
    seq_lens, max_blocks, block_size, heads, head_dim = CASES[case]
    gen = torch.Generator().manual_seed(100 + case)
    k_cache, v_cache, block_tables = make_paged_cache(seq_lens, max_blocks, block_size, heads, head_dim, dtype, gen)
    q = torch.randn(len(seq_lens), heads, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    args = [t.to(DEVICE) for t in (q, k_cache, v_cache, block_tables, lens)]
    out = torch.full_like(args[0], float("nan"))
    paged_attention.paged_attention_decode(*args, num_splits=num_splits, out=out)
    out = out.cpu()

    k_rows, v_rows = dense_rows(k_cache, block_tables, seq_lens), dense_rows(v_cache, block_tables, seq_lens)
    scale = head_dim ** -0.5
    assert_within_rule(out, q, k_rows, v_rows, scale, dtype)
    for b, length in enumerate(seq_lens):
        if length == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b])), "an empty row must give zeros"
    ref = paged_attention.paged_attention_decode_ref(*args).cpu()
    assert_within_rule(ref, q, k_rows, v_rows, scale, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_long_rows_strided(dtype):
    """~1000 cached positions, head-major pool (strided), q a view into a fused qkv buffer, explicit scale."""
    gen = torch.Generator().manual_seed(7)
    seq_lens, heads, head_dim, block_size = [1000, 77], 2, 64, 16
    k_cache, v_cache, block_tables = make_paged_cache(seq_lens, 64, block_size, heads, head_dim, dtype, gen,
                                                      head_major=True)
    qkv = torch.randn(2, 3, heads, head_dim, generator=gen).to(dtype)
    q = qkv[:, 0]
    lens = torch.tensor(seq_lens, dtype=torch.int64)
    scale = 1.0 / math.sqrt(32.0)
    k_dev, v_dev, bt_dev, lens_dev = (t.to(DEVICE) for t in (k_cache, v_cache, block_tables, lens))
    q_dev = qkv.to(DEVICE)[:, 0]
    assert not k_dev.is_contiguous() and not q_dev.is_contiguous()
    k_rows, v_rows = dense_rows(k_cache, block_tables, seq_lens), dense_rows(v_cache, block_tables, seq_lens)
    for num_splits in (None, 4):
        out = paged_attention.paged_attention_decode(q_dev, k_dev, v_dev, bt_dev, lens_dev, scale,
                                                     num_splits=num_splits)
        assert_within_rule(out.cpu(), q, k_rows, v_rows, scale, dtype)


def test_decode_all_empty_rows_give_zeros():
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache, block_tables = make_paged_cache([0, 0], 2, 4, 2, 24, torch.float32, gen)
    q = torch.randn(2, 2, 24, generator=gen)
    args = [t.to(DEVICE) for t in (q, k_cache, v_cache, block_tables, torch.zeros(2, dtype=torch.int32))]
    for num_splits in (1, 2):
        out = paged_attention.paged_attention_decode(*args, num_splits=num_splits)
        assert torch.equal(out, torch.zeros_like(out))


def _args():
    k_cache = torch.randn(6, 4, 3, 24, device=DEVICE)
    return dict(q=torch.randn(2, 3, 24, device=DEVICE), k_cache=k_cache, v_cache=k_cache.clone(),
                block_tables=torch.zeros(2, 2, dtype=torch.int32, device=DEVICE),
                seq_lens=torch.ones(2, dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("name, value", [
    ("q", torch.zeros(2, 3, 24, dtype=torch.int32)),
    ("q", torch.zeros(2, 3, 4, 24)),
    ("k_cache", torch.zeros(6, 4, 3, 25)),
    ("v_cache", torch.zeros(6, 4, 3, 24, dtype=torch.float16)),
    ("block_tables", torch.zeros(2, 2, dtype=torch.int64)),
    ("block_tables", torch.zeros(3, 2, dtype=torch.int32)),
    ("seq_lens", torch.ones(3, dtype=torch.int32)),
    ("seq_lens", torch.ones(2)),
])
def test_decode_rejects_bad_input(name, value):
    args = _args()
    args[name] = value.to(DEVICE)
    with pytest.raises(ValueError, match=name):
        paged_attention.paged_attention_decode(**args)


def test_decode_rejects_bad_out():
    args = _args()
    with pytest.raises(ValueError, match="out"):
        paged_attention.paged_attention_decode(**args, out=torch.empty(2, 3, 24, dtype=torch.float16, device=DEVICE))


def test_decode_compiles_for_hopper():
    """Every launch configuration lowers to PTX and a cubin for sm_90 (no GPU needed)."""
    compile_for_hopper("paged_attention")
