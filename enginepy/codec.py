"""EnCodec decoding (transformers' EncodecModel, fp32): codes -> waveform."""
from __future__ import annotations

import torch

from .errors import InvalidParameter


class Codec:
    """decode(codes int64 [B, K, T]) -> float32 [B, C, T * hop_length].

    Stereo checkpoints interleave left/right codebooks per level ([1L, 1R, 2L, 2R, ...]); each channel
    is decoded on its own and the two are stacked along C. num_codebooks K (default: every quantizer the
    codec has, per channel) and the codebook size V = the codec's codebook_size bound what decode accepts.
    """

    def __init__(self, model: torch.nn.Module, audio_channels: int, device: torch.device, num_codebooks: int | None = None):
        self.model = model.to(device=device, dtype=torch.float32).eval()
        self.audio_channels = audio_channels
        self.device = device
        self.codebook_size = int(model.config.codebook_size)
        self.num_codebooks = num_codebooks if num_codebooks is not None else audio_channels * model.config.num_quantizers

    def check_codes(self, codes) -> None:
        """InvalidParameter unless codes is an integer tensor [B, K, T] (B, T >= 1) with values in [0, V)."""
        k, v = self.num_codebooks, self.codebook_size
        if not isinstance(codes, torch.Tensor):
            raise InvalidParameter(f"codes must be a torch.Tensor of int64 [B, {k}, T]; got {type(codes).__name__}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise InvalidParameter(f"codes must hold integers (int64 [B, {k}, T]); got {codes.dtype}")
        if codes.dim() != 3 or codes.shape[1] != k or codes.shape[0] < 1 or codes.shape[2] < 1:
            raise InvalidParameter(f"codes must have shape [B, {k}, T] with B, T >= 1; got {list(codes.shape)}")
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= v:
            raise InvalidParameter(f"codes must be in [0, {v - 1}] (the codebook size is {v}); got values in [{low}, {high}]")

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int [B, K, T] (checked by check_codes) -> float32 [B, C, T * hop_length] on the codec's device."""
        self.check_codes(codes)
        codes = codes.to(device=self.device, dtype=torch.int64)
        if self.audio_channels == 1:
            return self._decode_mono(codes)
        return torch.cat([self._decode_mono(codes[:, c :: self.audio_channels]) for c in range(self.audio_channels)], dim=1)

    def _decode_mono(self, codes: torch.Tensor) -> torch.Tensor:
        out = self.model.decode(codes[None], [None] * codes.shape[0]).audio_values
        return out.float()
