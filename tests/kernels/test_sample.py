"""sample (greedy / top-k / top-p + inverse-CDF draw) against sample_ref and the engine's reference.

Tolerance: tokens must be identical to `sample_ref` and to `enginepy.sampling.sample_tokens`. The kernel's
softmax may differ from torch's in the last bit, so a draw may legitimately differ where u * sum(w) lies
within float rounding of a CDF step; `assert_same_tokens` allows a mismatch only there (relative distance
below 1e-5 in float64) and at most one per call. With the seeded inputs below none occurs.
The empirical distribution of 2000 kernel draws per filter must pass a chi-square test (p > 1e-3) against
the exact top-k / top-p distribution computed in float64.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from scipy import stats

from enginepy import sampling
from enginepy.kernels import sample

from hopper_compile import compile_for_hopper

pytestmark = pytest.mark.triton

# Inputs are made on the CPU (seeded), the kernel runs where Triton runs, the references run on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
VOCABS = [1, 7, 33, 1000, 2048]
SETTINGS = [
    dict(use_sampling=False),
    dict(temperature=0.0, top_k=5),  # temperature 0 is greedy too
    dict(top_k=0, top_p=0.0),  # no filter
    dict(top_k=1),
    dict(top_k=5, temperature=0.8),
    dict(top_k=250),
    dict(top_k=4000),  # more than V: everything
    dict(top_p=1e-6),  # only the most likely token (and its ties)
    dict(top_p=0.5, top_k=3),  # top_p wins over top_k
    dict(top_p=0.95, temperature=1.3),
    dict(top_p=1.0),
]


def reference_weights(logits, settings):
    """The engine reference's kept, unnormalised fp32 weights, as float64. [N, V]."""
    temperature = settings.get("temperature", 1.0)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return sampling.filter_probs(probs, settings.get("top_k", 250), settings.get("top_p", 0.0)).double()


def assert_same_tokens(got, want, logits, u, settings):
    """Equal, except where u falls within float rounding of the CDF step between the two tokens."""
    diff = (got != want).nonzero().flatten().tolist()
    assert len(diff) <= 1, f"{len(diff)} rows differ: {diff}"
    greedy = not settings.get("use_sampling", True) or settings.get("temperature", 1.0) == 0.0
    for n in diff:
        assert not greedy, f"greedy row {n}: {int(got[n])} != {int(want[n])}"
        w = reference_weights(logits[n : n + 1], settings)[0]
        cdf = w.cumsum(0) / w.sum()
        step = cdf[min(int(got[n]), int(want[n]))].item()
        assert abs(step - float(u[n])) <= 1e-5, f"row {n}: {int(got[n])} != {int(want[n])} away from a CDF step"


def check_all(logits, u, settings, *, logits_dev=None, **kernel_kwargs):
    """Kernel (on DEVICE; `logits_dev` overrides the copy of logits) vs sample_ref vs the engine reference."""
    logits_dev = logits.to(DEVICE) if logits_dev is None else logits_dev
    out = torch.full((logits.shape[0],), -7, dtype=torch.int64, device=DEVICE)
    got = sample.sample(logits_dev, u.to(DEVICE), out=out, **settings, **kernel_kwargs)
    assert got is out
    got = got.cpu()
    engine = sampling.sample_tokens(logits, u, **settings)
    ref = sample.sample_ref(logits, u, **settings)
    assert torch.equal(ref, engine), "sample_ref disagrees with enginepy.sampling"
    assert_same_tokens(got, engine, logits, u, settings)
    assert ((got >= 0) & (got < logits.shape[-1])).all()
    return got


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("vocab", VOCABS)
def test_sample_matches_references(vocab, settings):
    gen = torch.Generator().manual_seed(vocab)
    rows = 6
    logits = 3 * torch.randn(rows, vocab, generator=gen)
    u = torch.rand(rows, generator=gen)
    u[0] = 0.0
    u[1] = 1.0 - 2**-24  # the largest value enginepy.rng produces
    check_all(logits, u, settings)


@pytest.mark.parametrize("digit_bits", [1, 2, 3, 5])
@pytest.mark.parametrize("settings", [dict(top_k=5), dict(top_k=250), dict(top_p=0.5), dict(top_p=0.95)],
                         ids=str)
def test_sample_every_digit_width(settings, digit_bits):
    """The radix search gives the same tokens for every digit width (3 is the GPU default, 1 is bisection)."""
    gen = torch.Generator().manual_seed(digit_bits)
    logits = 3 * torch.randn(4, 2048, generator=gen)
    u = torch.rand(4, generator=gen)
    check_all(logits, u, settings, digit_bits=digit_bits)


def test_sample_ties():
    """Integer logits: many exact ties, at the top-k cut and at the top-p cut; a fine u grid covers every CDF step."""
    vocab, rows = 33, 96
    gen = torch.Generator().manual_seed(0)
    row = torch.randint(0, 4, (vocab,), generator=gen).float()
    logits = row.expand(rows, vocab)
    logits_dev = row.to(DEVICE).expand(rows, vocab)  # a stride-0 view
    u = (torch.arange(rows) + 0.5) / rows
    probs = torch.softmax(row.double(), dim=0)
    top = row.max()
    n_top = int((row == top).sum())
    for settings, kept in [
        (dict(top_k=1), row == top),  # k = 1 keeps every copy of the maximum
        (dict(top_k=n_top + 1), row >= top - 1),  # the cut falls inside the next tie group: all of it kept
        (dict(top_p=1e-3), row == top),
        (dict(top_p=float(probs[row == top].sum()) + 1e-3), row >= top - 1),
    ]:
        got = check_all(logits, u, settings, logits_dev=logits_dev)
        assert set(got.tolist()) == set(kept.nonzero().flatten().tolist()), settings


def test_sample_greedy_first_index_on_ties():
    logits = torch.tensor([[0.0, 2.0, 2.0, -1.0], [float("-inf"), 1.0, float("-inf"), 1.0], [5.0, 5.0, 5.0, 5.0]])
    u = torch.zeros(3)
    for settings in (dict(use_sampling=False), dict(temperature=0.0)):
        assert sample.sample(logits.to(DEVICE), u.to(DEVICE), **settings).tolist() == [1, 1, 0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_sample_strided_low_precision(dtype):
    """Half-precision logits read as fp32, vocabulary-strided, and a strided out."""
    gen = torch.Generator().manual_seed(3)
    wide = (3 * torch.randn(5, 2 * 1000, generator=gen)).to(dtype)
    u_wide = torch.rand(10, generator=gen)
    logits, u = wide[:, 1::2], u_wide[::2]
    for settings in (dict(top_k=250), dict(top_p=0.9), dict(use_sampling=False)):
        out_buf = torch.full((10,), -7, dtype=torch.int64, device=DEVICE)
        sample.sample(wide.to(DEVICE)[:, 1::2], u_wide.to(DEVICE)[::2], out=out_buf[::2], **settings)
        out_buf = out_buf.cpu()
        assert_same_tokens(out_buf[::2], sampling.sample_tokens(logits, u, **settings), logits, u, settings)
        assert (out_buf[1::2] == -7).all(), "wrote outside out"


def exact_distribution(logits64, temperature, top_k, top_p):
    """Top-k / top-p distribution in float64 (numpy), the definition written out with a sort."""
    z = logits64 / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    desc = np.sort(p)[::-1]
    if top_p > 0:
        before = np.cumsum(desc) - desc
        threshold = desc[before <= top_p].min()
    else:
        threshold = desc[min(top_k, len(p)) - 1]
    w = np.where(p >= threshold, p, 0.0)
    return w / w.sum()


def chi_square_pvalue(counts, probs):
    """Pearson chi-square over the kept tokens, the least likely pooled until every bin expects >= 5."""
    kept = np.nonzero(probs)[0]
    order = kept[np.argsort(probs[kept])]
    expected = probs[order] * counts.sum()
    observed = counts[order].astype(np.float64)
    obs_bins, exp_bins, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(observed, expected):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= 5:
            obs_bins.append(acc_o)
            exp_bins.append(acc_e)
            acc_o = acc_e = 0.0
    obs_bins[-1] += acc_o
    exp_bins[-1] += acc_e
    assert len(obs_bins) >= 3, "too few bins for a meaningful test"
    return stats.chisquare(obs_bins, exp_bins).pvalue


@pytest.mark.parametrize("settings", [dict(top_k=7, top_p=0.0, temperature=1.0),
                                      dict(top_k=0, top_p=0.8, temperature=1.5)], ids=str)
def test_sample_distribution_chi_square(settings):
    draws, vocab = 2000, 40
    gen = torch.Generator().manual_seed(1234)
    row = 2 * torch.randn(vocab, generator=gen)
    u = torch.rand(draws, generator=gen)
    tokens = sample.sample(row.to(DEVICE).expand(draws, vocab), u.to(DEVICE), **settings).cpu().numpy()
    probs = exact_distribution(row.double().numpy(), settings["temperature"], settings["top_k"], settings["top_p"])
    assert probs[tokens].min() > 0, "drew a token the filter removes"
    counts = np.bincount(tokens, minlength=vocab)
    pvalue = chi_square_pvalue(counts, probs)
    assert pvalue > 1e-3, f"chi-square p-value {pvalue:.2e}"


def _args():
    return dict(logits=torch.zeros(3, 10), u=torch.zeros(3))


@pytest.mark.parametrize("kwargs, name", [
    (dict(logits=torch.zeros(3, 10, dtype=torch.int64)), "logits"),
    (dict(logits=torch.zeros(3, 2, 10)), "logits"),
    (dict(logits=torch.zeros(3, 0)), "logits"),
    (dict(logits=torch.zeros(3, 16385)), "logits"),
    (dict(u=torch.zeros(3, dtype=torch.float64)), "u"),
    (dict(u=torch.zeros(4)), "u"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.1), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(digit_bits=4), "digit_bits"),
    (dict(out=torch.zeros(3, dtype=torch.int32)), "out"),
])
def test_sample_rejects_bad_input(kwargs, name):
    args = {key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value
            for key, value in {**_args(), **kwargs}.items()}
    with pytest.raises(ValueError, match=name):
        sample.sample(**args)


def test_sample_compiles_for_hopper():
    """Every launch configuration lowers to PTX and a cubin for sm_90 (no GPU needed)."""
    compile_for_hopper("sample")


def test_sample_rows_mixes_settings_in_one_launch():
    """Each row with its own greedy flag / temperature / top-k / top-p equals the reference with that row's settings."""
    gen = torch.Generator().manual_seed(21)
    per_row = [dict(use_sampling=False), dict(top_k=5, temperature=0.8), dict(top_p=0.6, temperature=1.2),
               dict(top_k=0, top_p=0.0), dict(top_k=3000, top_p=0.0), dict(top_k=1), dict(top_p=1.0),
               dict(use_sampling=True, temperature=0.0)] * 3
    n, vocab = len(per_row), 1000
    logits = 3 * torch.randn(n, vocab, generator=gen)
    u = torch.rand(n, generator=gen)
    full = [dict(dict(use_sampling=True, temperature=1.0, top_k=0, top_p=0.0), **s) for s in per_row]
    greedy = torch.tensor([not s["use_sampling"] or s["temperature"] == 0.0 for s in full])
    settings = sample.row_settings(greedy, torch.tensor([s["temperature"] for s in full]),
                                   torch.tensor([s["top_k"] for s in full]), torch.tensor([s["top_p"] for s in full]),
                                   vocab)
    out = torch.full((n,), -7, dtype=torch.int64, device=DEVICE)
    sample.sample_rows(logits.to(DEVICE), u.to(DEVICE), {k: v.to(DEVICE) for k, v in settings.items()}, out=out)
    want = torch.stack([sampling.sample_tokens(logits[i : i + 1], u[i : i + 1],
                                               **dict(s, top_k=min(s["top_k"], vocab)))[0]
                        for i, s in enumerate(full)])
    got = out.cpu()
    for i, s in enumerate(full):
        assert_same_tokens(got[i : i + 1], want[i : i + 1], logits[i : i + 1], u[i : i + 1], s)


def test_sample_rows_refuses_bad_settings():
    logits, u = torch.zeros(2, 4, device=DEVICE), torch.zeros(2, device=DEVICE)
    good = sample.row_settings(torch.zeros(2, dtype=torch.bool), torch.ones(2), torch.zeros(2, dtype=torch.int64),
                               torch.zeros(2), 4)
    good = {k: v.to(DEVICE) for k, v in good.items()}
    with pytest.raises(ValueError, match=r"settings\['limit'\] must have shape \(2,\), got \(3,\)"):
        sample.sample_rows(logits, u, dict(good, limit=torch.zeros(3, device=DEVICE)))
    with pytest.raises(ValueError, match=r"settings\['greedy'\] must be a torch.Tensor, got NoneType"):
        sample.sample_rows(logits, u, {k: v for k, v in good.items() if k != "greedy"})
