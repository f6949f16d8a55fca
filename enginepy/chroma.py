"""Melody chroma for MusicGen-Melody: a waveform -> one-hot pitch-class frames, exactly as transformers'
`MusicgenMelodyFeatureExtractor` computes `input_features` (audiocraft's ChromaExtractor, without demucs).

Per melody, at the model's rate (32 kHz):
  1. channels averaged to mono (float32 mean), cut to the first chunk_length_s (30 s = 960000 samples);
     a batch of different lengths is right-padded with zeros to its longest (after the cut);
  2. shorter than n_fft: zero-padded to n_fft, half on the left, the odd sample on the right;
  3. power spectrogram: STFT with n_fft = win_length = 16384, hop 4096, periodic Hann window, centred with
     reflect padding, divided by sqrt(sum(window^2)), |.|^2                                 # [B, F, Nc]
  4. chroma: `chroma_filter_bank(sampling_rate, num_frequency_bins=n_fft, tuning=0, num_chroma=12)` (float32,
     C first) times the spectrogram, normalised by its max over the 12 bins (eps 1e-6)    # [B, 12, Nc]
  5. one-hot of the argmax over the bins (the first bin on ties: silence gives bin 0, C).  # [B, Nc, 12]
Nc = 1 + max(min(T, 30 s), n_fft) // hop: 235 frames for 30 s, 5 for anything up to n_fft samples.

Steps 3-5 make the same torch calls, in the same order and dtype (float32), as torchaudio's `Spectrogram` and the
extractor (read from their sources), so on the same torch the one-hot should be the extractor's bit for bit, without
torchaudio; near-ties between two bins are where a float64 computation could pick the other one.
Resampling is not done here: callers convert to the model's rate first (`audio_prompt.convert_audio`), which
differs slightly from transformers' torchaudio resampler (see audio_prompt).

`chroma_energy` gives the chroma before the normalisation of step 4 and the argmax; how the one-hot chroma
conditions the decoder is described in `chroma_prefix`.
"""
from __future__ import annotations

import functools
import math

import torch

from .audio_prompt import check_sample_rate, check_waveforms
from .errors import InvalidParameter

CHROMA_BINS = 12
# Prefix frames of the released melody checkpoints (MusicgenMelodyConfig.chroma_length): 30 s of chroma.
CHROMA_LENGTH = 235
_NORM_EPS = 1e-6  # torch.nn.functional.normalize's eps in the extractor


@functools.lru_cache(maxsize=8)
def _chroma_filters(sample_rate: int, n_fft: int) -> torch.Tensor:
    """float32 [12, n_fft // 2 + 1], the extractor's filter bank (computed in float64 by transformers, then cast)."""
    from transformers.audio_utils import chroma_filter_bank

    bank = chroma_filter_bank(sampling_rate=sample_rate, num_frequency_bins=n_fft, tuning=0,
                              num_chroma=CHROMA_BINS)
    return torch.from_numpy(bank).float()


def _check_int(value, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidParameter(f"{name} must be an integer {bound}; got {value!r}")
    return value


def _mono_batch(wav, n_samples: int) -> torch.Tensor:
    """[B, C, T] tensor or list of [C, T_i] -> float32 mono [B, T'], cut to n_samples and right-padded with zeros
    to the longest melody (the extractor's `pad(padding=True, truncation=True, max_length=n_samples)`)."""
    if isinstance(wav, (list, tuple)):
        if len(wav) == 0:
            raise InvalidParameter("melody is an empty list (needs at least one waveform [C, T])")
        melodies = []
        for i, item in enumerate(wav):
            one = check_waveforms(item, f"melody[{i}]")
            if one.shape[0] != 1:
                raise InvalidParameter(f"melody[{i}] must be one waveform [C, T]; got shape {list(one.shape)}")
            melodies.append(one[0].mean(dim=0)[:n_samples])  # [T_i]
        out = torch.zeros(len(melodies), max(m.shape[0] for m in melodies))  # [B, T']
        for i, m in enumerate(melodies):
            out[i, : m.shape[0]] = m
        return out
    return check_waveforms(wav, "melody").mean(dim=1)[:, :n_samples].contiguous()  # [B, T']


def _check_sizes(sample_rate, n_fft, hop_length, chunk_length_s) -> tuple[int, int, int, int]:
    """-> (sample_rate, n_fft, hop_length, samples kept per melody), checked."""
    sample_rate = check_sample_rate(sample_rate)
    n_fft = _check_int(n_fft, "n_fft", 2)
    hop_length = _check_int(hop_length, "hop_length", 1, n_fft)
    if isinstance(chunk_length_s, bool) or not isinstance(chunk_length_s, (int, float)) \
            or not math.isfinite(chunk_length_s) or round(chunk_length_s * sample_rate) < 1:
        raise InvalidParameter(f"chunk_length_s must be a finite number of seconds holding at least one sample at "
                               f"{sample_rate} Hz; got {chunk_length_s!r}")
    return sample_rate, n_fft, hop_length, round(chunk_length_s * sample_rate)


@torch.no_grad()
def chroma_energy(wav, sample_rate: int = 32000, *, n_fft: int = 16384, hop_length: int = 4096,
                  chunk_length_s: float = 30.0) -> torch.Tensor:
    """The chroma before normalisation and argmax: float32 [B, Nc, 12], the power spectrogram of each frame summed
    through the chroma filter bank (steps 1-4 of the module docstring, without the max-normalisation).
    Arguments as `chroma_features`."""
    sample_rate, n_fft, hop_length, n_samples = _check_sizes(sample_rate, n_fft, hop_length, chunk_length_s)
    x = _mono_batch(wav, n_samples)  # [B, T']
    if x.shape[-1] < n_fft:
        pad = n_fft - x.shape[-1]
        x = torch.nn.functional.pad(x, (pad // 2, pad // 2 + pad % 2), "constant", 0)
    window = torch.hann_window(n_fft)  # periodic, float32: torchaudio's default window_fn
    spec = torch.stft(x, n_fft=n_fft, hop_length=hop_length, win_length=n_fft, window=window, center=True,
                      pad_mode="reflect", normalized=False, onesided=True, return_complex=True)  # [B, F, Nc]
    spec /= window.pow(2.0).sum().sqrt()
    power = spec.abs().pow(2.0)
    return torch.einsum("cf, ...ft->...ct", _chroma_filters(sample_rate, n_fft), power).transpose(1, 2)


@torch.no_grad()
def chroma_features(wav, sample_rate: int = 32000, *, n_fft: int = 16384, hop_length: int = 4096,
                    chunk_length_s: float = 30.0) -> torch.Tensor:
    """float32 waveforms [B, C, T] (or [C, T], or a list of [C, T_i] of different lengths), any number of channels,
    at `sample_rate` Hz, which must be the model's rate (callers resample with `audio_prompt.convert_audio`)
    -> one-hot chroma float32 [B, Nc, 12], Nc = 1 + max(min(T, chunk_length_s * sample_rate), n_fft) // hop_length,
    on CPU: what transformers' `MusicgenMelodyFeatureExtractor(sampling_rate=sample_rate, n_fft=n_fft,
    hop_length=hop_length, chunk_length=chunk_length_s)(wav, sampling_rate=sample_rate)["input_features"]` is.

    A list is padded as the extractor pads a batch: each melody mixed to mono and cut to chunk_length_s, then
    zeros on the right up to the longest; the padded frames come out as bin 0 (C), like silence.
    """
    raw = chroma_energy(wav, sample_rate, n_fft=n_fft, hop_length=hop_length, chunk_length_s=chunk_length_s)
    # Dividing by the frame's max cannot reorder bins but can round two close ones to a tie, which moves the
    # argmax to the first of them: kept so the one-hot matches the extractor's in that case too.
    norm = torch.nn.functional.normalize(raw, p=float("inf"), dim=-1, eps=_NORM_EPS)  # [B, Nc, 12]
    one_hot = torch.zeros_like(norm)
    one_hot.scatter_(-1, norm.argmax(-1, keepdim=True), 1.0)
    return one_hot


def null_chroma(batch: int) -> torch.Tensor:
    """The 'no melody' chroma: float32 [batch, 1, 12], one-hot at bin 0 (C), which is also what silence gives.

    transformers builds it in `_prepare_encoder_hidden_states_kwargs_for_generation` (zeros with `[:, :, 0] = 1`),
    both for prompts without a melody and for the classifier-free-guidance null rows; after tiling to
    `chroma_length` frames (`chroma_prefix`) one frame or many give the same prefix.
    """
    _check_int(batch, "batch", 1)
    out = torch.zeros(batch, 1, CHROMA_BINS)
    out[:, :, 0] = 1.0
    return out


def chroma_prefix(chroma: torch.Tensor, chroma_length: int = CHROMA_LENGTH, *, cfg: bool = False) -> torch.Tensor:
    """one-hot chroma float32 [B, Nc, 12] -> the chroma part of MusicGen-Melody's decoder prefix, before the
    projection: [B, chroma_length, 12], or [2B, chroma_length, 12] with cfg (B condition rows, then B null rows).

    What transformers' `MusicgenMelodyForConditionalGeneration.generate` does with it
    (`_prepare_encoder_hidden_states_kwargs_for_generation`):
      * no melody given: the chroma is `null_chroma(B)`. With guidance_scale > 1 the rows are
        [melody rows ; null rows], the null rows one-hot at bin 0 (`null_chroma`) whatever the melody.
      * `audio_enc_to_dec_proj` (Linear 12 -> D, with bias) is applied per frame, then the frames are tiled
        (`repeat(1, ceil(chroma_length / Nc), 1)`) and cut to the first chroma_length (235): a melody shorter than
        30 s loops, a longer one is truncated. Tiling copies frames, so tiling before projecting (here) gives the
        same prefix. The null chroma projects to W[:, 0] + b, not to zeros.
      * the text part: T5 states -> `enc_to_dec_proj` -> times the attention mask (after the projection, so padded
        positions are exact zeros); the CFG null text is all zeros with an all-zero mask.
      * prefix = cat([chroma (chroma_length frames), text (T_text tokens)], dim=1), prepended to the decoder input
        embeddings at the first step only, positions 0 .. chroma_length + T_text - 1 (sinusoids added to all of
        them, zeros included); the first audio step is at position chroma_length + T_text. Self-attention is
        plain causal over prefix and audio: no padding mask on the prefix during generate.
      * logits: rows [cond ; null], l = l_null + guidance_scale * (l_cond - l_null).
    """
    if not isinstance(chroma, torch.Tensor) or not chroma.is_floating_point() or chroma.dim() != 3 \
            or chroma.shape[0] < 1 or chroma.shape[1] < 1 or chroma.shape[2] != CHROMA_BINS:
        shape = list(chroma.shape) if isinstance(chroma, torch.Tensor) else type(chroma).__name__
        raise InvalidParameter(f"chroma must be a float tensor [B, Nc, {CHROMA_BINS}] with B, Nc >= 1; got {shape}")
    chroma_length = _check_int(chroma_length, "chroma_length", 1)
    if not isinstance(cfg, bool):
        raise InvalidParameter(f"cfg must be True or False; got {cfg!r}")
    if cfg:
        chroma = torch.cat([chroma, null_chroma(chroma.shape[0]).to(chroma).expand_as(chroma)], dim=0)
    repeats = math.ceil(chroma_length / chroma.shape[1])
    return chroma.repeat(1, repeats, 1)[:, :chroma_length].contiguous()
