"""EnCodec decoding (transformers' EncodecModel, fp32): codes -> waveform."""
from __future__ import annotations

import torch


class Codec:
    """decode(codes int64 [B, K, T]) -> float32 [B, C, T * hop_length].

    Stereo checkpoints interleave left/right codebooks per level ([1L, 1R, 2L, 2R, ...]); each channel
    is decoded on its own and the two are stacked along C.
    """

    def __init__(self, model: torch.nn.Module, audio_channels: int, device: torch.device):
        self.model = model.to(device=device, dtype=torch.float32).eval()
        self.audio_channels = audio_channels
        self.device = device

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes = codes.to(self.device)
        if self.audio_channels == 1:
            return self._decode_mono(codes)
        return torch.cat([self._decode_mono(codes[:, c :: self.audio_channels]) for c in range(self.audio_channels)], dim=1)

    def _decode_mono(self, codes: torch.Tensor) -> torch.Tensor:
        out = self.model.decode(codes[None], [None] * codes.shape[0]).audio_values
        return out.float()
