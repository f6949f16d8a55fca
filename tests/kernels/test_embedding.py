"""embedding (Σ_k table[k, tok_k] + sinusoid) against embedding_ref and transformers' positional table.

Tolerance (kernel vs embedding_ref). Both sum in fp32 in the same order; they differ only in the last
bit of a sinusoid value, which can move the final rounding to the table dtype by one unit:

    dtype      rtol        atol
    float32    1e-6        1e-6
    float16    2**-10      1e-5      (one fp16 unit in the last place, relative)
    bfloat16   2**-7       1e-5      (one bf16 unit in the last place, relative)
"""
from __future__ import annotations

import os

import pytest
import torch

from enginepy.kernels import embedding

from hopper_compile import compile_for_hopper

pytestmark = pytest.mark.triton

TOL = {
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.float16: dict(rtol=2**-10, atol=1e-5),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
}
DTYPES = list(TOL)
# Inputs are made on the CPU (seeded), the kernel runs where Triton runs, comparisons happen on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

CASES = [
    # (batch, codebooks, vocab V (table has V + 1 rows), dim D)
    (1, 1, 1, 4),
    (3, 4, 7, 33),  # odd D: the last column carries no sinusoid
    (7, 8, 33, 64),
    (2, 4, 2048, 1024),  # musicgen-small's K, V and D
]


def make_inputs(batch, codebooks, vocab, dim, dtype, gen):
    table = torch.randn(codebooks, vocab + 1, dim, generator=gen).to(dtype)
    tokens = torch.randint(0, vocab + 1, (batch, codebooks), generator=gen)
    tokens[0] = vocab  # the pad/start row is a real row of the table
    positions = torch.randint(0, 3000, (batch,), generator=gen)
    positions[0] = 0
    return tokens, table, positions


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_embedding_matches_ref(case, dtype):
    batch, codebooks, vocab, dim = CASES[case]
    gen = torch.Generator().manual_seed(case)
    tokens, table, positions = make_inputs(batch, codebooks, vocab, dim, dtype, gen)
    args = [t.to(DEVICE) for t in (tokens, table, positions)]
    out = torch.full((batch, dim), float("nan"), dtype=dtype, device=DEVICE)
    embedding.embedding(*args, out=out)
    out = out.cpu()
    torch.testing.assert_close(out, embedding.embedding_ref(*args).cpu(), **TOL[dtype])
    # independent of the module: the definition written out, in float64
    want = torch.zeros(batch, dim, dtype=torch.float64)
    for k in range(codebooks):
        want += table[k, tokens[:, k]].double()
    want += transformers_positions(positions, dim).double()
    assert (out.double() - want).abs().max().item() <= 8 * torch.finfo(dtype).eps * (want.abs().max().item() + 1)


def transformers_positions(positions, dim):
    """Rows of transformers' own MusicGen sinusoidal table, when transformers is installed."""
    modeling = pytest.importorskip("transformers.models.musicgen.modeling_musicgen")
    table = modeling.MusicgenSinusoidalPositionalEmbedding(int(positions.max()) + 1, dim).weights
    return table[positions]


@pytest.mark.parametrize("dim", [4, 7, 64, 1024, 1536])
def test_sinusoid_matches_transformers(dim):
    """With all-zero tables the output is the position embedding alone: within 1 fp32 ulp of transformers'.

    The kernel's values are correctly rounded (fp64 trigonometry); torch's fp32 cos/sin are within an ulp.
    """
    positions = torch.tensor([0, 1, 2, 17, 500, 1502, 2999, 4095])
    table = torch.zeros(1, 2, dim)
    tokens = torch.zeros(len(positions), 1, dtype=torch.int64)
    out = embedding.embedding(tokens.to(DEVICE), table.to(DEVICE), positions.to(DEVICE)).cpu()
    want = transformers_positions(positions, dim)
    ulps = (out.view(torch.int32).long() - want.view(torch.int32).long()).abs()
    assert ulps.max().item() <= 1, f"{ulps.max().item()} ulps from transformers"
    assert torch.equal(out[0], want[0]), "position 0 is exactly cos 0 = 1, sin 0 = 0"
    torch.testing.assert_close(embedding.sinusoid_ref(positions, dim), transformers_positions(positions, dim),
                               rtol=0, atol=0)


def test_embedding_strided():
    """Non-contiguous tokens, table (D-major storage), positions (int32) and out."""
    gen = torch.Generator().manual_seed(9)
    batch, codebooks, vocab, dim = 5, 3, 11, 40
    table = torch.randn(codebooks, dim, vocab + 1, generator=gen).to(DEVICE).transpose(1, 2)  # [K, V+1, D]
    tokens = torch.randint(0, vocab + 1, (batch, 2 * codebooks), generator=gen).to(DEVICE)[:, ::2]
    positions = torch.randint(0, 100, (2 * batch,), generator=gen, dtype=torch.int32).to(DEVICE)[::2]
    out_buf = torch.full((batch, 2 * dim), float("nan"), device=DEVICE)
    out = out_buf[:, 1::2]
    embedding.embedding(tokens, table, positions, out=out)
    torch.testing.assert_close(out, embedding.embedding_ref(tokens, table, positions), **TOL[torch.float32])
    assert torch.isnan(out_buf[:, ::2]).all(), "wrote outside out"


def _args():
    return dict(tokens=torch.zeros(2, 4, dtype=torch.int64, device=DEVICE), table=torch.zeros(4, 9, 16, device=DEVICE),
                positions=torch.zeros(2, dtype=torch.int64, device=DEVICE))


@pytest.mark.parametrize("name, value", [
    ("tokens", torch.zeros(2, 4, dtype=torch.int32)),
    ("tokens", torch.zeros(2, 4, 1, dtype=torch.int64)),
    ("table", torch.zeros(4, 9, 16, dtype=torch.int64)),
    ("table", torch.zeros(3, 9, 16)),
    ("table", torch.zeros(4, 9, 3)),
    ("positions", torch.zeros(3, dtype=torch.int64)),
    ("positions", torch.zeros(2)),
])
def test_embedding_rejects_bad_input(name, value):
    args = _args()
    args[name] = value.to(DEVICE)
    with pytest.raises(ValueError, match=name):
        embedding.embedding(**args)


def test_embedding_rejects_bad_out():
    with pytest.raises(ValueError, match="out"):
        embedding.embedding(**_args(), out=torch.zeros(2, 16, dtype=torch.float16, device=DEVICE))


def test_embedding_compiles_for_hopper():
    """Every launch configuration lowers to PTX and a cubin for sm_90 (no GPU needed)."""
    compile_for_hopper("embedding")
