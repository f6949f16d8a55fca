"""Audio inputs (continuation prompts, melodies): read, checked, converted to the model's rate and channels,
and EnCodec-encoded to codes.

Resampling is scipy.signal.resample_poly (polyphase FIR, Kaiser window): audiocraft uses julius and transformers'
melody extractor torchaudio, so a prompt given at another rate than the model's matches neither bit for bit (the
three agree to about 1e-3 of full scale on band-limited audio away from the edges). At the model's own rate no
resampling happens and the codes equal transformers' `generate(input_values=...)` exactly.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .errors import InvalidParameter

# Below 100 Hz there is no audio to speak of; above 768 kHz no converter or file format goes.
MIN_SAMPLE_RATE = 100
MAX_SAMPLE_RATE = 768_000


def check_sample_rate(sample_rate, name: str = "sample_rate") -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) \
            or not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise InvalidParameter(f"{name} must be an integer number of Hz in [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}]; "
                               f"got {sample_rate!r}")
    return int(sample_rate)


def check_waveforms(wav, name: str = "prompt") -> torch.Tensor:
    """A float waveform [C, T] or [B, C, T] (tensor or NumPy array) -> float32 [B, C, T] on CPU; refuses other
    ranks, integer samples, empty ones and NaN/inf samples."""
    if isinstance(wav, np.ndarray):
        wav = torch.from_numpy(np.ascontiguousarray(wav))
    if not isinstance(wav, torch.Tensor):
        raise InvalidParameter(f"{name} must be a torch.Tensor [B, C, T] or [C, T]; got {type(wav).__name__}")
    if not wav.is_floating_point():
        raise InvalidParameter(f"{name} must hold float samples in [-1, 1]; got {wav.dtype}")
    if wav.dim() == 2:
        wav = wav[None]
    if wav.dim() != 3:
        raise InvalidParameter(f"{name} must have shape [B, C, T] or [C, T]; got {list(wav.shape)}")
    if wav.shape[0] < 1 or wav.shape[1] < 1 or wav.shape[2] < 1:
        raise InvalidParameter(f"{name} is empty: shape {list(wav.shape)} (needs B, C, T >= 1)")
    if not bool(torch.isfinite(wav).all()):
        raise InvalidParameter(f"{name} has NaN or infinite samples")
    return wav.detach().to(device="cpu", dtype=torch.float32)


def check_optional_prompts(descriptions, batch: int) -> list[str | None]:
    """None -> [None] * batch (unconditional); else a list of `batch` entries, each a string or None."""
    if descriptions is None:
        return [None] * batch
    if isinstance(descriptions, str):
        descriptions = [descriptions]
    if not isinstance(descriptions, (list, tuple)):
        raise InvalidParameter(f"descriptions must be None or a list of strings / None; got {type(descriptions).__name__}")
    if len(descriptions) != batch:
        raise InvalidParameter(f"descriptions has {len(descriptions)} entries but the audio has {batch} (one each)")
    for i, d in enumerate(descriptions):
        if d is not None and not isinstance(d, str):
            raise InvalidParameter(f"descriptions[{i}] must be a string or None; got {type(d).__name__}")
    return list(descriptions)


def read_audio(path, name: str) -> tuple[torch.Tensor, int]:
    """A sound file (WAV, FLAC, Ogg: what libsndfile reads) -> (float32 [C, T], sample rate), checked."""
    import soundfile as sf

    try:
        data, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)  # [T, C]
    except Exception as e:  # soundfile raises RuntimeError/LibsndfileError/OSError by case
        raise InvalidParameter(f"{name} {path} cannot be read as audio ({e})") from None
    check_sample_rate(sample_rate, f"{name} {path}: sample rate")
    wav = check_waveforms(torch.from_numpy(data.T.copy()), f"{name} {path}")
    return wav[0], int(sample_rate)


def convert_audio(wav: torch.Tensor, sample_rate: int, target_rate: int, channels: int) -> torch.Tensor:
    """float32 [B, C, T] at sample_rate -> [B, channels, T'] at target_rate (audiocraft's channel rules: mean to
    mono, a mono input repeated to stereo, extra channels dropped)."""
    c = wav.shape[1]
    if channels == 1 and c != 1:
        wav = wav.mean(dim=1, keepdim=True)
    elif c == 1 and channels > 1:
        wav = wav.expand(-1, channels, -1)
    elif c >= channels:
        wav = wav[:, :channels]
    if sample_rate != target_rate:
        from scipy.signal import resample_poly

        g = math.gcd(sample_rate, target_rate)
        out = resample_poly(wav.numpy().astype(np.float64), target_rate // g, sample_rate // g, axis=-1)
        wav = torch.from_numpy(out.astype(np.float32))
    return wav.contiguous()


@torch.no_grad()
def encode_audio(codec, wav: torch.Tensor) -> torch.Tensor:
    """float32 [B, C, T] at the codec's rate and channel count -> codes int64 [B, K, frames] on CPU, as transformers
    encodes an audio prompt (stereo: each channel on its own, codebooks interleaved [1L, 1R, 2L, 2R, ...])."""
    model = codec.model
    x = wav.to(device=codec.device, dtype=torch.float32)
    per_channel = [model.encode(x[:, c : c + 1]).audio_codes[0] for c in range(codec.audio_channels)]  # [B, Kc, T]
    codes = torch.stack(per_channel, dim=2).flatten(1, 2) if len(per_channel) > 1 else per_channel[0]
    return codes.to(device="cpu", dtype=torch.int64)
