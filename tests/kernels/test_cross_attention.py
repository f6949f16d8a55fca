"""cross_attention against a float64 oracle, with per-row lengths, key masks (bool / int) or no mask.

Tolerance rule (flash-attention's): the kernel's max error vs the float64 oracle must be at most twice the
error of plain torch computing the same attention in the input dtype, plus a small absolute epsilon:

    dtype      epsilon
    float32    1e-6
    float16    1e-4
    bfloat16   1e-3

Masked keys hold NaN in these tests: a kernel that lets a masked key reach the output fails.
"""
from __future__ import annotations

import os

import pytest
import torch

from enginepy.kernels import cross_attention

from hopper_compile import compile_for_hopper

pytestmark = pytest.mark.triton

EPS = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Inputs are made on the CPU (seeded), the kernel runs where Triton runs, the oracles run on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def torch_cross(q4, k, v, valid, scale, dtype):
    """Plain torch, row by row over the valid keys only, in `dtype`. q4 [B, Tq, H, Dh] -> [B, Tq, H, Dh]."""
    out = torch.zeros(q4.shape, dtype=dtype)
    for b in range(q4.shape[0]):
        keys = valid[b].nonzero().flatten()
        if keys.numel() == 0:
            continue
        scores = torch.einsum("ihd,nhd->hin", q4[b].to(dtype), k[b, keys].to(dtype)) * scale
        out[b] = torch.einsum("hin,nhd->ihd", torch.softmax(scores, dim=-1), v[b, keys].to(dtype))
    return out


def assert_within_rule(out, q, k, v, valid, scale, dtype):
    q4 = q.unsqueeze(1) if q.dim() == 3 else q
    out4 = out.unsqueeze(1) if out.dim() == 3 else out
    oracle = torch_cross(q4, k, v, valid, scale, torch.float64)
    err = (out4.double() - oracle).abs().max().item()
    torch_err = (torch_cross(q4, k, v, valid, scale, dtype).double() - oracle).abs().max().item()
    assert err <= 2 * torch_err + EPS[dtype], f"error {err:.3g} vs torch {dtype} error {torch_err:.3g}"


def make_inputs(batch, tq, tk, heads, head_dim, dtype, keys, gen):
    """q ([B, H, Dh] when tq is None), k, v, the kernel's key arguments and the [B, Tk] validity they mean."""
    q_shape = (batch, heads, head_dim) if tq is None else (batch, tq, heads, head_dim)
    q = torch.randn(q_shape, generator=gen).to(dtype)
    k = torch.randn(batch, tk, heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, tk, heads, head_dim, generator=gen).to(dtype)
    if keys == "lengths":
        lengths = torch.randint(0, tk + 1, (batch,), generator=gen)
        lengths[0] = 0  # the null condition: no key at all
        lengths[-1] = tk
        valid = torch.arange(tk)[None, :] < lengths[:, None]
        kwargs = dict(lengths=lengths.to(torch.int32))
    elif keys in ("bool", "int64"):
        valid = torch.rand(batch, tk, generator=gen) < 0.6
        valid[0] = False
        valid[-1, 0] = True
        kwargs = dict(mask=valid if keys == "bool" else valid.to(torch.int64))
    else:
        valid = torch.ones(batch, tk, dtype=torch.bool)
        kwargs = {}
    k[~valid] = float("nan")
    v[~valid] = float("nan")
    return q, k, v, kwargs, valid


CASES = [
    # (batch, tq, tk, heads, head_dim); tq None = the decode shape [B, H, Dh]
    (1, None, 1, 1, 64),
    (3, None, 7, 3, 24),
    (4, 1, 37, 2, 64),
    (2, 33, 13, 2, 24),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("keys", ["none", "lengths", "bool", "int64"])
def test_cross_matches_oracle(case, dtype, keys):
    batch, tq, tk, heads, head_dim = CASES[case]
    if batch == 1 and keys != "none":
        batch = 2  # room for one empty and one non-empty row
    gen = torch.Generator().manual_seed(case)
    q, k, v, kwargs, valid = make_inputs(batch, tq, tk, heads, head_dim, dtype, keys, gen)
    q_dev, k_dev, v_dev = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    kwargs = {name: t.to(DEVICE) for name, t in kwargs.items()}
    out = torch.full_like(q_dev, float("nan"))
    cross_attention.cross_attention(q_dev, k_dev, v_dev, out=out, **kwargs)
    out = out.cpu()
    scale = head_dim ** -0.5
    assert_within_rule(out, q, k, v, valid, scale, dtype)
    if keys != "none":
        assert torch.equal(out[0], torch.zeros_like(out[0])), "a row without keys must give zeros"
    ref = cross_attention.cross_attention_ref(q_dev, k_dev, v_dev, **kwargs).cpu()
    assert_within_rule(ref, q, k, v, valid, scale, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cross_strided_long(dtype):
    """1000 text positions; q, k, v are views into fused projections; out is a strided view; explicit scale."""
    gen = torch.Generator().manual_seed(5)
    batch, tk, heads, head_dim = 2, 1000, 2, 64
    qx = torch.randn(batch, 3, heads, head_dim, generator=gen).to(dtype)
    kv = torch.randn(batch, tk, 2, heads, head_dim, generator=gen).to(dtype)
    lengths = torch.tensor([1000, 999])
    valid = torch.arange(tk)[None, :] < lengths[:, None]
    qx_dev, kv_dev = qx.to(DEVICE), kv.to(DEVICE)
    out_buf = torch.full((batch, heads, 2 * head_dim), float("nan"), dtype=dtype, device=DEVICE)
    cross_attention.cross_attention(qx_dev[:, 1], kv_dev[:, :, 0], kv_dev[:, :, 1], lengths=lengths.to(DEVICE),
                                    scale=0.2, out=out_buf[..., ::2])
    out_buf = out_buf.cpu()
    assert_within_rule(out_buf[..., ::2], qx[:, 1], kv[:, :, 0], kv[:, :, 1], valid, 0.2, dtype)
    assert torch.isnan(out_buf[..., 1::2]).all(), "wrote outside out"


def _args():
    return dict(q=torch.randn(2, 3, 24, device=DEVICE), k=torch.randn(2, 5, 3, 24, device=DEVICE),
                v=torch.randn(2, 5, 3, 24, device=DEVICE))


@pytest.mark.parametrize("name, value", [
    ("q", torch.zeros(2, 3, 24, dtype=torch.int32)),
    ("q", torch.zeros(3, 24)),
    ("k", torch.zeros(2, 5, 3, 25)),
    ("v", torch.zeros(2, 4, 3, 24)),
    ("v", torch.zeros(2, 5, 3, 24, dtype=torch.float16)),
    ("lengths", torch.ones(3, dtype=torch.int32)),
    ("lengths", torch.ones(2)),
    ("mask", torch.ones(2, 4, dtype=torch.bool)),
    ("mask", torch.ones(2, 5)),
])
def test_cross_rejects_bad_input(name, value):
    args = _args()
    args[name] = value.to(DEVICE)
    with pytest.raises(ValueError, match=name):
        cross_attention.cross_attention(**args)


def test_cross_rejects_lengths_with_mask():
    with pytest.raises(ValueError, match="lengths or mask"):
        cross_attention.cross_attention(**_args(), lengths=torch.ones(2, dtype=torch.int32, device=DEVICE),
                                        mask=torch.ones(2, 5, dtype=torch.bool, device=DEVICE))


def test_cross_compiles_for_hopper():
    """Every launch configuration lowers to PTX and a cubin for sm_90 (no GPU needed)."""
    compile_for_hopper("cross_attention")
