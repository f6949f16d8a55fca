"""cfg_mix against cfg_mix_ref and the engine's own reference (`enginepy.sampling.cfg_mix`).

Tolerance: the output is fp32 whatever the input dtype (inputs are upcast exactly), and the kernel performs
the reference's roundings in the reference's order (no FMA contraction, IEEE division):

    input dtype          rtol       atol
    float32/16, bf16     2**-23     0       (one fp32 unit in the last place of slack; the kernel
                                             matches the CPU reference bit for bit)
"""
from __future__ import annotations

import os

import pytest
import torch

from enginepy import sampling
from enginepy.kernels import cfg_mix

from hopper_compile import compile_for_hopper

pytestmark = pytest.mark.triton

TOL = dict(rtol=2**-23, atol=0.0)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 1), (3, 3, 33), (2, 4, 2048), (1, 8, 1000)]  # (B, K, V)
# Inputs are made on the CPU (seeded), the kernel runs where Triton runs, comparisons happen on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("cfg_coef, temperature", [(3.0, None), (3.3, 0.7), (1.0, 0.0), (0.0, 1.3)])
def test_cfg_mix_matches_ref(shape, dtype, cfg_coef, temperature):
    batch, codebooks, vocab = shape
    gen = torch.Generator().manual_seed(batch * 100 + vocab)
    logits = (4 * torch.randn(2 * batch, codebooks, vocab, generator=gen)).to(dtype)
    out = torch.full((batch, codebooks, vocab), float("nan"), device=DEVICE)
    cfg_mix.cfg_mix(logits.to(DEVICE), cfg_coef, temperature, out=out)
    out = out.cpu()
    ref = cfg_mix.cfg_mix_ref(logits, cfg_coef, temperature)
    torch.testing.assert_close(out, ref, **TOL)
    engine = sampling.cfg_mix(logits, batch, cfg_coef)
    if temperature:
        engine = engine / temperature
    torch.testing.assert_close(out, engine, **TOL)
    # the guidance really is applied: cond rows alone differ from the mix unless cfg_coef == 1
    if cfg_coef != 1.0:
        assert not torch.equal(out, logits[:batch].float() / (temperature or 1.0))


def test_cfg_mix_strided():
    """Vocabulary-strided input (a slice of a wider buffer) and a codebook-major out view."""
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(6, 4, 2 * 77, generator=gen, dtype=torch.float16)
    out_buf = torch.full((4, 3, 77), float("nan"), device=DEVICE)
    out = out_buf.transpose(0, 1)  # [3, 4, 77], non-contiguous
    result = cfg_mix.cfg_mix(wide.to(DEVICE)[..., ::2], 2.5, 0.9, out=out)
    assert result is out
    torch.testing.assert_close(out.cpu(), cfg_mix.cfg_mix_ref(wide[..., ::2], 2.5, 0.9), **TOL)


def test_cfg_mix_default_is_unscaled():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 2, 9, generator=gen)
    torch.testing.assert_close(cfg_mix.cfg_mix(logits.to(DEVICE), 3.0).cpu(),
                               logits[1:] + 3.0 * (logits[:1] - logits[1:]), **TOL)


@pytest.mark.parametrize("kwargs, name", [
    (dict(logits=torch.zeros(3, 4, 8)), "logits"),
    (dict(logits=torch.zeros(4, 8)), "logits"),
    (dict(logits=torch.zeros(2, 4, 8, dtype=torch.int64)), "logits"),
    (dict(logits=torch.zeros(2, 4, 8), temperature=-1.0), "temperature"),
    (dict(logits=torch.zeros(2, 4, 8), out=torch.zeros(1, 4, 8, dtype=torch.float16)), "out"),
    (dict(logits=torch.zeros(2, 4, 8), out=torch.zeros(2, 4, 8)), "out"),
])
def test_cfg_mix_rejects_bad_input(kwargs, name):
    kwargs = {key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for key, value in kwargs.items()}
    with pytest.raises(ValueError, match=name):
        cfg_mix.cfg_mix(cfg_coef=3.0, **kwargs)


def test_cfg_mix_compiles_for_hopper():
    """Every launch configuration lowers to PTX and a cubin for sm_90 (no GPU needed)."""
    compile_for_hopper("cfg_mix")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cfg_mix_rows_per_request_settings(dtype):
    """Requests with and without null rows, each with its own coefficient and temperature, in one launch."""
    gen = torch.Generator().manual_seed(7)
    rows, codebooks, vocab = 7, 3, 1000
    logits = (4 * torch.randn(rows, codebooks, vocab, generator=gen)).to(dtype)
    cond = torch.tensor([4, 0, 2, 6, 0])
    null = torch.tensor([5, 1, -1, 3, -1])
    coef = torch.tensor([3.0, 1.5, 7.0, 0.0, 1.0])
    temperature = torch.tensor([1.0, 0.7, 1.3, 1.0, 2.0])
    out = torch.full((5, codebooks, vocab), float("nan"), device=DEVICE)
    cfg_mix.cfg_mix_rows(*(t.to(DEVICE) for t in (logits, cond, null, coef, temperature)), out=out)
    out = out.cpu()
    ref = cfg_mix.cfg_mix_rows_ref(logits, cond, null, coef, temperature)
    torch.testing.assert_close(out, ref, **TOL)
    # the engine's reference, request by request: CFG mix then the sampler's division by the temperature
    for s in range(5):
        pair = logits[[int(cond[s]), int(null[s])]] if null[s] >= 0 else logits[[int(cond[s])]]
        expected = sampling.cfg_mix(pair, 1, float(coef[s]))[0] / float(temperature[s])
        torch.testing.assert_close(out[s], expected, **TOL)


def test_cfg_mix_rows_refuses_bad_inputs():
    logits = torch.zeros(2, 1, 4, device=DEVICE)
    idx, f = torch.zeros(2, dtype=torch.int64, device=DEVICE), torch.ones(2, device=DEVICE)
    with pytest.raises(ValueError, match=r"null_rows must have shape \(2,\), got \(3,\)"):
        cfg_mix.cfg_mix_rows(logits, idx, torch.zeros(3, dtype=torch.int64, device=DEVICE), f, f)
    with pytest.raises(ValueError, match="cfg_coef must have dtype in \\(float32\\), got float64"):
        cfg_mix.cfg_mix_rows(logits, idx, idx, f.double(), f)
