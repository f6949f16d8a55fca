"""transformers' MusicGen as the independent reference: its generate() and forward(), with codes captured."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def load_hf(path: str):
    """(model, tokenizer): MusicgenForConditionalGeneration, or MusicgenMelodyForConditionalGeneration for a
    musicgen_melody directory."""
    import json
    import os

    from transformers import AutoTokenizer, MusicgenForConditionalGeneration, MusicgenMelodyForConditionalGeneration

    from enginepy.hf import quiet_transformers

    with open(os.path.join(path, "config.json")) as f:
        melody = json.load(f)["model_type"] == "musicgen_melody"
    cls = MusicgenMelodyForConditionalGeneration if melody else MusicgenForConditionalGeneration
    with quiet_transformers():
        model = cls.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


@torch.no_grad()
def hf_generate_codes(path: str, prompts: list[str], frames: int, guidance_scale: float = 3.0, **kwargs):
    """(codes int64 [B, K, frames], waveform [B, C, samples]) from transformers' generate.

    transformers returns only audio; the codes are read from the call it makes to its EnCodec decoder.
    max_new_tokens = frames + max_delay gives exactly `frames` frames.
    """
    model, tokenizer = load_hf(path)
    inputs = tokenizer(prompts, padding=True, return_tensors="pt")
    captured = []
    decode = model.audio_encoder.decode

    def spy(codes, *args, **kw):
        captured.append(codes)
        return decode(codes, *args, **kw)

    k = model.decoder.config.num_codebooks
    channels = model.decoder.config.audio_channels
    max_delay = k // channels - 1
    model.audio_encoder.decode = spy
    try:
        wav = model.generate(**inputs, guidance_scale=guidance_scale, max_new_tokens=frames + max_delay, **kwargs)
    finally:
        model.audio_encoder.decode = decode
    if channels == 1:
        codes = captured[0][0]
    else:  # decoded per channel: interleave back to [1L, 1R, 2L, 2R, ...]
        left, right = captured[0][0], captured[1][0]
        codes = torch.stack([left, right], dim=2).reshape(left.shape[0], k, -1)
    return codes, wav
