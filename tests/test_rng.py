"""Counter-based uniforms: deterministic, uniform, and independent of batch neighbours."""
from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from enginepy.rng import uniforms


def test_uniform_and_in_range():
    u = uniforms(torch.arange(50_000), 3, 4)
    assert u.dtype == torch.float32 and u.shape == (50_000, 4)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    for k in range(4):
        assert stats.kstest(u[:, k].numpy(), "uniform").pvalue > 1e-3


def test_counters_are_decorrelated():
    seeds = torch.arange(20_000)
    a, b = uniforms(seeds, 0, 2), uniforms(seeds, 1, 2)
    for x, y in ((a[:, 0], a[:, 1]), (a[:, 0], b[:, 0]), (a[:, 0], uniforms(seeds + 1, 0, 1)[:, 0])):
        assert abs(np.corrcoef(x.numpy(), y.numpy())[0, 1]) < 0.03
        assert not torch.equal(x, y)


def test_row_does_not_depend_on_neighbours_or_step_tensor_form():
    seeds = torch.tensor([7, 2**40 + 3, 0, 123456789])
    batch = uniforms(seeds, 11, 8)
    for i in range(4):
        assert torch.equal(uniforms(seeds[i : i + 1], 11, 8)[0], batch[i])
    assert torch.equal(uniforms(seeds, torch.full((4,), 11), 8), batch)


def _lowbias32(x: int) -> int:
    """The published lowbias32 mixer on Python ints (independent of the tensor implementation)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _python_uniform(seed: int, step: int, k: int) -> float:
    golden, mask = 0x9E3779B9, 0xFFFFFFFF
    h = _lowbias32(seed & mask)
    h = _lowbias32(h ^ ((seed >> 32) & mask) ^ golden)
    h = _lowbias32(h ^ ((step + golden) & mask))
    h = _lowbias32(h ^ ((k + 2 * golden) & mask))
    return (h >> 8) / 2**24


def test_matches_plain_python_hash():
    """The scheme is part of the engine's contract (same seed, same music in every backend and version)."""
    seeds = [0, 5, 2**31 + 7, 2**40 + 3, 2**63 - 1]
    for step in (0, 7, 1502):
        got = uniforms(torch.tensor(seeds), step, 5)
        want = torch.tensor([[_python_uniform(s, step, k) for k in range(5)] for s in seeds], dtype=torch.float32)
        assert torch.equal(got, want)
    assert not torch.equal(uniforms(torch.tensor([5]), 0, 4), uniforms(torch.tensor([5 + 2**32]), 0, 4))
