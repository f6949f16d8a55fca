"""bf16 against an fp64 oracle, the FlashAttention way: the engine's bf16 logits may be at most 2x as far from
the oracle as plain torch's bf16 logits on the same weights.

The numerics the engine promises (both backends alike): weights and activations in the model dtype, every
reduction accumulated in fp32 (the codebook-embedding sum, LayerNorm, attention scores and softmax, matmul
accumulators), one rounding to the model dtype per op output. Then its bf16 error is that of bf16 storage,
which is what plain torch in bf16 also pays; an error far above plain torch's means a sum was done in bf16.

Oracle: transformers' MusicGen with its weights rounded to bf16 (so all three share the same weights), run in
fp64. Plain torch: the same transformers model cast to bf16. Engine: the converted bf16 decoder, teacher-forced
through a random token sequence, once as a prefill of all steps and once step by step with the KV cache.
All three read the same T5 states, from the engine's conditioner.
"""
from __future__ import annotations

import copy

import pytest
import torch

from enginepy import MusicGen
from enginepy.model import KVCache
from hf_reference import load_hf

PROMPTS = ["lo-fi beat with warm piano", "jazz with a much longer prompt, so that the batch has padding"]
STEPS = 33
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _errors(logits: torch.Tensor, oracle: torch.Tensor) -> tuple[float, float]:
    diff = (logits.double() - oracle).abs()
    return diff.max().item(), diff.mean().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["wide", "odd-heads", "stereo"])
def test_bf16_logits_error_at_most_twice_plain_torch(model_factory, engine_cache, name, device, record_property):
    path = model_factory(name)
    mg = MusicGen.from_pretrained(path, device=device, dtype="bfloat16", cache_dir=engine_cache)
    cfg = mg.cfg
    hf, _ = load_hf(path)
    oracle_model = copy.deepcopy(hf)
    with torch.no_grad():
        for param in oracle_model.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    oracle_model = oracle_model.double()
    plain = copy.deepcopy(hf).to(device=device, dtype=torch.bfloat16)

    b = len(PROMPTS)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size + 1, (b, cfg.num_codebooks, STEPS), generator=gen)  # [B, K, S]
    ids = tokens.reshape(b * cfg.num_codebooks, STEPS)
    with torch.no_grad():
        states, mask = mg.conditioner.encode(PROMPTS)  # fp32 [B, Tt, Dt], [B, Tt]
        states, mask = states.cpu(), mask.cpu()
        oracle = oracle_model(encoder_outputs=(states.double(),), attention_mask=mask.long(),
                              decoder_input_ids=ids).logits
        torch_bf16 = plain(encoder_outputs=(states.to(device, torch.bfloat16),), attention_mask=mask.to(device).long(),
                           decoder_input_ids=ids.to(device)).logits.cpu()
        shape = (b, cfg.num_codebooks, STEPS, cfg.vocab_size)
        oracle, torch_bf16 = oracle.reshape(shape), torch_bf16.reshape(shape)

        dec = mg.decoder
        cross = dec.precompute_cross(dec.project_text(states.to(device), mask.to(device)), mask.to(device))
        on_device = tokens.to(device)
        prefill = dec(on_device, 0, KVCache.allocate(cfg, b, STEPS, torch.bfloat16, device), cross).cpu()
        cache = KVCache.allocate(cfg, b, STEPS, torch.bfloat16, device)
        stepped = torch.cat([dec(on_device[:, :, i : i + 1], i, cache, cross).cpu() for i in range(STEPS)], dim=2)

    assert prefill.dtype == torch.bfloat16 and prefill.shape == shape
    assert oracle.abs().max() > 1.0, "logits too small to measure errors on"
    reference_max, reference_mean = _errors(torch_bf16, oracle)
    assert reference_max > 0, "plain torch bf16 equals the oracle: the comparison would measure nothing"
    for label, logits in (("prefill", prefill), ("steps", stepped)):
        err_max, err_mean = _errors(logits, oracle)
        record_property(f"{label}_max_error_over_torch_bf16", err_max / reference_max)
        assert err_max <= 2 * reference_max, f"{label}: max error {err_max:.3g} vs plain torch bf16 {reference_max:.3g}"
        assert err_mean <= 2 * reference_mean, f"{label}: mean error {err_mean:.3g} vs plain torch {reference_mean:.3g}"
