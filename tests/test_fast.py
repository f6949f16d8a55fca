"""The fast backend (Triton kernels + C++ ops, static shapes) against the reference and transformers.

Runs on CPU under TRITON_INTERPRET=1 (graphs skipped): slow per step, so durations stay short.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from enginepy import InvalidParameter, MusicGen
from enginepy.generate import NonFiniteLogits
from hf_reference import hf_generate_codes

pytestmark = pytest.mark.triton

PROMPTS = ["lo-fi beat with warm piano", "jazz", "dark techno with deep bass and slow drums"]


@pytest.fixture(scope="module")
def pair(tiny_hf, engine_cache):
    ref = MusicGen.from_pretrained(tiny_hf, device="cpu", dtype="float32", cache_dir=engine_cache)
    fast = MusicGen.from_pretrained(tiny_hf, device="cpu", dtype="float32", cache_dir=engine_cache, backend="fast",
                                    max_batch=4,
                                    max_duration=1.0)
    return ref, fast


@pytest.mark.parametrize("name", ["odd-heads", "stereo"])
def test_greedy_fast_equals_transformers(model_factory, engine_cache, name):
    mg = MusicGen.from_pretrained(model_factory(name), device="cpu", dtype="float32", cache_dir=engine_cache,
                                  backend="fast", max_batch=3, max_duration=1.0)
    mg.set_generation_params(duration=0.14, use_sampling=False)
    for prompts in (PROMPTS[:1], PROMPTS):
        ref, _ = hf_generate_codes(model_factory(name), prompts, mg.frames, guidance_scale=3.0, do_sample=False)
        assert torch.equal(mg.generate_tokens(prompts), ref)


@pytest.mark.parametrize(
    "kwargs",
    [dict(top_k=6, temperature=1.3), dict(top_p=0.8), dict(top_k=0, cfg_coef=1.0), dict(use_sampling=False, cfg_coef=1.0)],
    ids=["top_k", "top_p", "no-cfg-full", "no-cfg-greedy"],
)
def test_sampling_fast_equals_reference(pair, kwargs):
    ref, fast = pair
    for mg in pair:
        mg.set_generation_params(duration=0.12, seed=21, **kwargs)
    assert torch.equal(fast.generate_tokens(PROMPTS), ref.generate_tokens(PROMPTS))


def test_fast_row_i_equals_single_request_with_seed_plus_i(pair):
    _, fast = pair
    fast.set_generation_params(duration=0.1, top_k=8, seed=40)
    batch = fast.generate_tokens(PROMPTS[:2])
    fast.set_generation_params(duration=0.1, top_k=8, seed=41)
    assert torch.equal(fast.generate_tokens([PROMPTS[1]])[0], batch[1])


def test_blocks_return_to_the_pool_after_success_and_failure(pair):
    _, fast = pair
    alloc = fast.fast.cache.allocator
    free = alloc.num_free
    fast.set_generation_params(duration=0.06, seed=0)
    fast.generate_tokens(PROMPTS)
    assert alloc.num_free == free
    weight = fast.decoder.w("layers.0.fc2")
    saved = weight[0, 0].clone()
    weight[0, 0] = float("nan")
    try:
        with pytest.raises(NonFiniteLogits, match="NaN/inf logits"):
            fast.generate_tokens(PROMPTS[:1])
    finally:
        weight[0, 0] = saved
    assert alloc.num_free == free


def test_requests_beyond_the_static_limits_are_refused(pair):
    _, fast = pair
    fast.set_generation_params(duration=0.06, seed=0)
    with pytest.raises(InvalidParameter, match="5 prompts exceed the fast backend's max_batch=4; raise max_batch"):
        fast.generate_tokens(["a"] * 5)
    with pytest.raises(InvalidParameter, match=r"duration must be in \(0, 1\] seconds; got 1.5 \(raise max_duration"):
        fast.set_generation_params(duration=1.5)
    with pytest.raises(InvalidParameter, match="text tokens but the fast backend allows 256; raise max_text_len"):
        fast.generate_tokens([" ".join(["jazz"] * 300)])
    assert fast.fast.cache.allocator.num_free == fast.fast.cache.allocator.num_blocks


def test_cli_fast_backend_matches_transformers_on_an_unseen_config(tmp_path):
    from enginepy.random_model import RandomModelSpec, build_random_hf_model

    spec = RandomModelSpec(hidden_size=20, num_heads=5, num_layers=2, num_codebooks=3, codebook_size=64, seed=31)
    src = build_random_hf_model(str(tmp_path / "hf"), spec)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "enginepy", "generate", *PROMPTS[:2], "--model", src, "--greedy",
                        "--backend", "fast", "--device", "cpu", "--dtype", "float32", "--duration", "0.1",
                        "--max-duration", "1", "--out", str(tmp_path / "o.wav"), "--tokens-out", str(tmp_path / "c.npy")],
                       capture_output=True, text=True, env={**env, "ENGINEPY_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    ref, _ = hf_generate_codes(src, PROMPTS[:2], 5, guidance_scale=3.0, do_sample=False)
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "c.npy")), ref)


def test_fast_on_cpu_without_the_interpreter_is_refused(tiny_hf):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from enginepy import MusicGen\n"
            f"MusicGen.from_pretrained({tiny_hf!r}, device='cpu', backend='fast')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode != 0
    assert "backend 'fast' needs a CUDA device, or TRITON_INTERPRET=1 exported before import" in r.stderr
