"""Parameter validation at the numeric edges: every refusal is InvalidParameter with a readable message, and
what is accepted samples finite probabilities in fp32."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from enginepy.errors import InvalidParameter, non_finite_logits_message
from enginepy.params import MAX_CFG_COEF, MIN_TEMPERATURE, check_duration, check_sampling

ANY = st.one_of(st.none(), st.booleans(), st.integers(min_value=-10**500, max_value=10**500), st.floats(),
                st.text(max_size=3), st.just(10**400), st.just(-10**400), st.just(5e-324), st.just(float("nan")))


@settings(max_examples=400, deadline=None)
@given(use_sampling=st.one_of(st.booleans(), ANY), top_k=ANY, top_p=ANY, temperature=ANY, cfg_coef=ANY, seed=ANY)
def test_check_sampling_accepts_or_raises_invalid_parameter_only(use_sampling, top_k, top_p, temperature, cfg_coef, seed):
    try:
        check_sampling(use_sampling, top_k, top_p, temperature, cfg_coef, seed, vocab_size=2048)
    except InvalidParameter as e:
        assert len(str(e).splitlines()) == 1 and len(str(e)) < 400
        return
    # Accepted: then the sampler's fp32 arithmetic is finite for any logits the decoder can produce.
    t, c = float(temperature), float(cfg_coef)
    assert t == 0 or t >= MIN_TEMPERATURE
    assert 0 <= c <= MAX_CFG_COEF


@settings(max_examples=200, deadline=None)
@given(duration=ANY)
def test_check_duration_accepts_or_raises_invalid_parameter_only(duration):
    try:
        frames = check_duration(duration, 50, 30.0)
    except InvalidParameter as e:
        assert len(str(e)) < 400
        return
    assert 1 <= frames <= 1500


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=1e-40), "temperature must be 0 (greedy) or at least 0.0001; got 1e-40"),
        (dict(temperature=5e-324), "temperature must be 0 (greedy) or at least 0.0001; got 5e-324"),
        (dict(cfg_coef=1e39), "cfg_coef must be at most 1e+06; got 1e+39"),
        (dict(top_p=10**400), "top_p must be a finite number; got 10000000000000000000...(401 characters)"),
        (dict(seed=10**400), "seed must be None or an integer in [0, 2**63 - 1]; got 10000000000000000000...(401 characters)"),
        (dict(top_k=10**400), "top_k must be an integer in [0, 2048]; got 10000000000000000000...(401 characters)"),
    ],
)
def test_edge_values_are_refused_with_a_message(kwargs, message):
    args = dict(use_sampling=True, top_k=250, top_p=0.0, temperature=1.0, cfg_coef=3.0, seed=0, vocab_size=2048)
    with pytest.raises(InvalidParameter) as e:
        check_sampling(**{**args, **kwargs})
    assert str(e.value).startswith(message)


def test_duration_overflowing_a_float_is_refused():
    with pytest.raises(InvalidParameter, match=r"duration must be a finite number; got 1000000000"):
        check_duration(10**400, 50, 30.0)


def test_the_smallest_accepted_temperature_samples_finite_probabilities():
    """The threshold is where the sampler's arithmetic is still exact enough: (l - max l) / T in fp32 is finite
    for logits as large as fp16/bf16 activations can make them, and softmax then sums to 1 (greedy-like)."""
    logits = torch.tensor([[3.0e4, 3.0e4 - 1e-3, -6.0e4, 0.0]], dtype=torch.float32) * 3.0  # cfg 3 on large logits
    p = torch.softmax((logits - logits.max()) / torch.tensor(MIN_TEMPERATURE, dtype=torch.float32), dim=-1)
    assert torch.isfinite(p).all() and math.isclose(float(p.sum()), 1.0, rel_tol=1e-6)
    # Below it, 1 / T leaves fp32 (the failure the threshold prevents):
    assert not torch.isfinite(logits / torch.tensor(1e-40, dtype=torch.float32)).all()


def test_non_finite_logits_message_names_the_likely_cause():
    bf16 = non_finite_logits_message(7, torch.bfloat16, 3.0, request_id="r1")
    assert bf16.startswith("the decoder produced NaN/inf logits at step 7 of request 'r1': bfloat16 likely overflowed")
    assert "dtype='float32'" in bf16
    fp32 = non_finite_logits_message(7, torch.float32, 3.0)
    assert "in float32" in fp32 and "weights probably hold NaN/inf" in fp32 and "dtype='float32'" not in fp32
    assert "cfg_coef 500 also amplifies" in non_finite_logits_message(0, "float32", 500.0)
