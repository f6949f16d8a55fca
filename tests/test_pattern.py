"""The plain-torch delay pattern against transformers' build_delay_pattern_mask (mono and stereo)."""
from __future__ import annotations

import pytest
import torch

from enginepy import pattern


def _hf_pattern(codes: torch.Tensor, channels: int, special: int) -> torch.Tensor:
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

    from enginepy.hf import quiet_transformers

    b, k, t = codes.shape
    with quiet_transformers():
        dec = MusicgenForCausalLM(MusicgenDecoderConfig(
            vocab_size=special, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, ffn_dim=8,
            num_codebooks=k, audio_channels=channels, pad_token_id=special, bos_token_id=special))
    start = torch.full((b, k, 1), special)
    prompt = torch.cat([start, codes], dim=2).reshape(b * k, t + 1)
    max_delay = k // channels - 1
    _, mask = dec.build_delay_pattern_mask(prompt, pad_token_id=special, max_length=t + 1 + max_delay)
    return mask.reshape(b, k, -1)


@pytest.mark.parametrize("channels,k,t", [(1, 4, 6), (1, 2, 1), (1, 7, 9), (2, 8, 5), (2, 4, 3)])
def test_scatter_equals_transformers_pattern(channels, k, t):
    special = 50
    codes = torch.randint(0, special, (3, k, t), generator=torch.Generator().manual_seed(k * t))
    delays = torch.tensor(pattern.stereo_delays(k) if channels == 2 else pattern.mono_delays(k))
    got = pattern.delay_scatter(codes, delays, special)
    assert torch.equal(got, _hf_pattern(codes, channels, special))
    assert torch.equal(pattern.delay_gather(got, delays), codes)


@pytest.mark.parametrize("delays", [[0, 1, 2, 3], [0, 0, 1, 1, 2, 2, 3, 3], [2, 0, 5]])
def test_stepping_rebuilds_the_pattern_with_ragged_rows(delays):
    """Per-row steps and lengths: reading step inputs and writing step outputs walks the pattern exactly."""
    special, b, t_max = 99, 3, 7
    d = torch.tensor(delays)
    k = len(delays)
    full = torch.randint(0, special, (b, k, t_max), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([7, 4, 1])
    prompt = torch.tensor([0, 2, 0])
    codes = torch.full((b, k, t_max), -1)
    for row in range(b):
        codes[row, :, : prompt[row]] = full[row, :, : prompt[row]]
    offsets = torch.tensor([0, 3, 1])  # rows at different progress share one batch
    for s in range(t_max + max(delays) + 3):
        step = (s - offsets).clamp(min=0)
        inp = pattern.delay_step_input(codes, step, lengths, d, special)
        for row in range(b):
            ref = pattern.delay_scatter(full[row : row + 1, :, : lengths[row]], d, special)[0]
            col = int(step[row])
            want = ref[:, col] if col < ref.shape[1] else torch.full((k,), special)
            assert torch.equal(inp[row], want)
        predicted = full.gather(2, (step[:, None] - d[None]).clamp(0, t_max - 1)[..., None])[..., 0]
        pattern.delay_step_write(codes, predicted, step, lengths, prompt, d)
    for row in range(b):
        n = int(lengths[row])
        assert torch.equal(codes[row, :, :n], full[row, :, :n])
        assert (codes[row, :, n:] == -1).all()
