"""enginepy.chroma against transformers' MusicgenMelodyFeatureExtractor and MusicGen-Melody's prefix construction.

The oracle is transformers' own extractor class (its __call__: mono mixing, 30 s cut, batch padding, chroma filter
bank, inf-norm, argmax one-hot). Its spectrogram comes from torchaudio, which is not installed with torch 2.13, so
the test binds the module's `torchaudio` name to a stand-in whose `transforms.Spectrogram` is written here with
NumPy in float64 (reflect padding, periodic Hann window, numpy.fft.rfft, divided by sqrt(sum(window^2)), |.|^2):
an independent restatement of torchaudio's Spectrogram(power=2, center=True, normalized=True), not enginepy's code.
"""
from __future__ import annotations

import contextlib
import math
import types

import numpy as np
import pytest
import torch

from enginepy.chroma import CHROMA_BINS, CHROMA_LENGTH, chroma_energy, chroma_features, chroma_prefix, null_chroma
from enginepy.errors import InvalidParameter

SR = 32000


class _NumpySpectrogram:
    """torchaudio.transforms.Spectrogram(n_fft, win_length=n_fft, hop_length, power=2, center=True, pad=0,
    normalized=True) in NumPy float64: [..., T] float32 tensor -> [..., n_fft // 2 + 1, frames] float32 tensor."""

    def __init__(self, n_fft, win_length, hop_length, power, center, pad, normalized):
        assert win_length == n_fft and power == 2 and center and pad == 0 and normalized
        self.n_fft, self.hop = n_fft, hop_length

    def __call__(self, waveform: torch.Tensor) -> torch.Tensor:
        x = waveform.numpy().astype(np.float64)
        half = self.n_fft // 2
        x = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(half, half)], mode="reflect")
        frames = np.lib.stride_tricks.sliding_window_view(x, self.n_fft, axis=-1)[..., :: self.hop, :]
        n = np.arange(self.n_fft)
        window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / self.n_fft)  # periodic Hann
        spec = np.fft.rfft(frames * window, axis=-1) / np.sqrt(np.sum(window**2))
        self.last = (np.abs(spec) ** 2).swapaxes(-1, -2)  # float64 [..., F, frames], kept for test_energy
        return torch.from_numpy(self.last.astype(np.float32))


@contextlib.contextmanager
def _torchaudio_stand_in():
    """Binds the extractor module's `torchaudio` name to the NumPy spectrogram while the block runs; yields the
    module."""
    import transformers.models.musicgen_melody.feature_extraction_musicgen_melody as module

    saved = getattr(module, "torchaudio", None)
    module.torchaudio = types.SimpleNamespace(transforms=types.SimpleNamespace(Spectrogram=_NumpySpectrogram))
    try:
        yield module
    finally:
        if saved is None:
            del module.torchaudio
        else:
            module.torchaudio = saved


@pytest.fixture(scope="module")
def extractor():
    with _torchaudio_stand_in() as module:
        return module.MusicgenMelodyFeatureExtractor()  # the defaults: 32 kHz, n_fft 16384, hop 4096, 30 s


def oracle(extractor, audio) -> torch.Tensor:
    return extractor(audio, sampling_rate=SR, return_tensors="pt")["input_features"]


def tones(gen: torch.Generator, seconds: float, channels: int, notes: int = 3) -> torch.Tensor:
    """float32 [channels, T]: per channel a few sines at random pitches whose set changes every ~0.7 s, plus noise."""
    t = torch.arange(round(seconds * SR), dtype=torch.float64) / SR
    out = torch.zeros(channels, t.shape[0], dtype=torch.float64)
    segment = round(0.7 * SR)
    for c in range(channels):
        for start in range(0, t.shape[0], segment):
            span = slice(start, start + segment)
            for _ in range(notes):
                f = 110.0 * 2.0 ** (float(torch.rand((), generator=gen)) * 4.0)
                out[c, span] += 0.2 * float(torch.rand((), generator=gen)) * torch.sin(2 * math.pi * f * t[span])
    out += 0.01 * torch.randn(out.shape, generator=gen, dtype=torch.float64)
    return out.float()


def noise(gen: torch.Generator, samples: int, channels: int) -> torch.Tensor:
    return (0.3 * torch.randn(channels, samples, generator=gen)).clamp(-1, 1)


def _case(name: str) -> torch.Tensor:
    """[B, C, T] inputs: mono/stereo, shorter than a hop, between a hop and n_fft, a few seconds, longer than 30 s."""
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    if name == "mono-tones-3s":
        return tones(gen, 3.0, 1)[None]
    if name == "stereo-tones-5s":
        return tones(gen, 5.0, 2)[None]
    if name == "mono-noise-shorter-than-hop":
        return noise(gen, 1000, 1)[None]
    if name == "stereo-noise-between-hop-and-nfft":
        return noise(gen, 10001, 2)[None]
    if name == "mono-noise-odd-length":
        return noise(gen, 4096 * 7 + 1, 1)[None]
    if name == "stereo-tones-31s":
        return tones(gen, 31.3, 2, notes=2)[None]
    if name == "batch2-stereo-tones":
        return torch.stack([tones(gen, 4.0, 2), tones(gen, 4.0, 2, notes=1)])
    if name == "batch2-mono-tones-and-noise":
        return torch.stack([tones(gen, 2.5, 1), noise(gen, round(2.5 * SR), 1)])
    raise KeyError(name)


CASES = ["mono-tones-3s", "stereo-tones-5s", "mono-noise-shorter-than-hop", "stereo-noise-between-hop-and-nfft",
         "mono-noise-odd-length", "stereo-tones-31s", "batch2-stereo-tones", "batch2-mono-tones-and-noise"]


@pytest.mark.parametrize("name", CASES)
def test_equals_extractor(extractor, name):
    """Same one-hot frames, bit for bit. No frame of these inputs is a near-tie (the top two bins differ by 0.2 %
    or more), so float32 against the float64 stand-in cannot flip an argmax."""
    wav = _case(name)
    got = chroma_features(wav)
    want = oracle(extractor, wav)
    frames = 1 + max(min(wav.shape[-1], 30 * SR), 16384) // 4096
    assert got.dtype == torch.float32 and got.shape == want.shape == (wav.shape[0], frames, CHROMA_BINS)
    assert torch.equal(got, want)
    assert torch.equal(got.sum(-1), torch.ones(got.shape[:2]))  # one-hot
    if wav.shape[0] == 2:  # different content -> different chroma rows
        assert not torch.equal(got[0], got[1])


@pytest.mark.parametrize("name", ["stereo-tones-5s", "mono-noise-shorter-than-hop", "stereo-noise-between-hop-and-nfft",
                                  "batch2-mono-tones-and-noise"])
def test_energy(extractor, name):
    """The chroma before the argmax, against the filter bank (float64) times the float64 NumPy spectrogram of the
    signal the extractor itself mixed, cut and padded: within 2e-5 of each frame's largest bin (float32 FFT error
    is ~1e-6; a symmetric Hann window or a one-sample shift of the padding is off by 1e-4 or more)."""
    from transformers.audio_utils import chroma_filter_bank

    wav = _case(name)
    oracle(extractor, wav)
    bank = chroma_filter_bank(num_frequency_bins=16384, num_chroma=12, sampling_rate=SR, tuning=0)
    want = np.einsum("cf,bft->btc", bank, extractor.spectrogram.last)  # [B, Nc, 12]
    got = chroma_energy(wav).double().numpy()
    assert got.shape == want.shape
    scale = want.max(axis=-1, keepdims=True)
    assert (scale > 0).all()
    assert np.all(np.abs(got - want) <= 2e-5 * scale)


def test_frame_counts():
    """235 frames for 30 s or more (the model's chroma_length), 5 for anything up to n_fft samples."""
    for samples, frames in [(1, 5), (4096, 5), (16384, 5), (16385, 5), (20480, 6), (30 * SR, 235), (31 * SR, 235)]:
        assert chroma_features(torch.zeros(1, 1, samples)).shape == (1, frames, CHROMA_BINS)


def test_silence_is_bin_zero(extractor):
    """All-zero audio ties on every bin: the extractor's argmax takes the first, C (bin 0), as does enginepy."""
    wav = torch.zeros(2, 2, 3 * SR)
    want = oracle(extractor, wav)
    assert torch.equal(want[..., 0], torch.ones(2, want.shape[1]))
    assert torch.equal(chroma_features(wav), want)


def test_pure_tone_pitch_class():
    """A 440 Hz sine (A) lights bin 9 (the bank starts at C) and 261.63 Hz (C4) bin 0 in every frame."""
    t = torch.arange(2 * SR, dtype=torch.float64) / SR
    wav = torch.stack([0.5 * torch.sin(2 * math.pi * 440.0 * t), 0.5 * torch.sin(2 * math.pi * 261.63 * t)])
    got = chroma_features(wav[:, None].float())
    assert got.argmax(-1)[0].eq(9).all() and got.argmax(-1)[1].eq(0).all()


def test_list_of_different_lengths(extractor):
    """A list is mixed, cut to 30 s and right-padded with zeros to the longest, as the extractor pads a batch."""
    gen = torch.Generator().manual_seed(7)
    melodies = [tones(gen, 1.5, 2), tones(gen, 4.2, 1), noise(gen, 3000, 2)]
    got = chroma_features(melodies)
    want = oracle(extractor, melodies)
    assert got.shape == want.shape == (3, 1 + round(4.2 * SR) // 4096, CHROMA_BINS)
    assert torch.equal(got, want)
    assert got[2, 3:].argmax(-1).eq(0).all()  # padded silence after the short one -> bin 0
    long = [tones(gen, 31.0, 1, notes=1), tones(gen, 2.0, 1)]  # the 31 s one is cut to 30 s, the other padded
    got = chroma_features(long)
    assert got.shape == (2, CHROMA_LENGTH, CHROMA_BINS)
    assert torch.equal(got, oracle(extractor, long))


def test_numpy_input_and_batch_independence():
    gen = torch.Generator().manual_seed(11)
    wav = torch.stack([tones(gen, 2.0, 2), tones(gen, 2.0, 2)])
    both = chroma_features(wav.numpy())
    assert torch.equal(both[1:], chroma_features(wav[1:]))
    assert torch.equal(both[0], chroma_features(wav[0])[0])  # [C, T] is one melody


def test_other_sizes_equal_extractor():
    """n_fft, hop and chunk length are passed to the extractor's constructor the same way."""
    with _torchaudio_stand_in() as module:
        fe = module.MusicgenMelodyFeatureExtractor(n_fft=4096, hop_length=1000, chunk_length=2)
    gen = torch.Generator().manual_seed(3)
    wav = tones(gen, 3.0, 2)[None]
    got = chroma_features(wav, n_fft=4096, hop_length=1000, chunk_length_s=2.0)
    assert got.shape == (1, 1 + 2 * SR // 1000, CHROMA_BINS)
    assert torch.equal(got, fe(wav, sampling_rate=SR, return_tensors="pt")["input_features"])


@pytest.fixture(scope="module")
def tiny_melody_model():
    """A random MusicgenMelodyForConditionalGeneration whose decoder is 12 wide: transformers then has no
    audio_enc_to_dec_proj, so the chroma part of its prefix is the raw (tiled) chroma."""
    from transformers import (EncodecConfig, MusicgenMelodyConfig, MusicgenMelodyDecoderConfig,
                              MusicgenMelodyForConditionalGeneration, T5Config)

    from enginepy.hf import quiet_transformers

    text = T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                    relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    codec = EncodecConfig(sampling_rate=800, audio_channels=1, hidden_size=8, num_filters=4, num_residual_layers=1,
                          upsampling_ratios=[4, 4], codebook_size=32, codebook_dim=8, target_bandwidths=[1.0],
                          num_lstm_layers=1, normalize=False)
    decoder = MusicgenMelodyDecoderConfig(vocab_size=32, hidden_size=CHROMA_BINS, num_hidden_layers=1,
                                          num_attention_heads=2, ffn_dim=48, num_codebooks=4, pad_token_id=32,
                                          bos_token_id=32)
    with quiet_transformers():
        torch.manual_seed(0)
        model = MusicgenMelodyForConditionalGeneration(
            MusicgenMelodyConfig(text_encoder=text, audio_encoder=codec, decoder=decoder,
                                 chroma_length=CHROMA_LENGTH)).eval()
    assert not hasattr(model, "audio_enc_to_dec_proj")
    return model


def _hf_chroma_prefix(model, input_features, guidance_scale):
    from transformers import GenerationConfig

    ids = torch.tensor([[5, 6, 7, 1], [8, 1, 0, 0]])
    kwargs = {"attention_mask": (ids != 0).long()}
    if input_features is not None:
        kwargs["input_features"] = input_features
    with torch.no_grad():
        out = model._prepare_encoder_hidden_states_kwargs_for_generation(
            ids, kwargs, "input_ids", GenerationConfig(guidance_scale=guidance_scale))
    prefix = out["encoder_hidden_states"]  # [B or 2B, chroma_length + 4, 12]
    assert prefix.shape[1] == CHROMA_LENGTH + ids.shape[1]
    return prefix[:, :CHROMA_LENGTH]


def test_null_chroma_is_transformers_no_melody_condition(tiny_melody_model):
    null = null_chroma(2)
    assert null.shape == (2, 1, CHROMA_BINS) and null.dtype == torch.float32
    assert torch.equal(null[:, 0], torch.eye(CHROMA_BINS)[[0, 0]])
    for scale, rows in [(1.0, 2), (3.0, 4)]:
        want = _hf_chroma_prefix(tiny_melody_model, None, scale)
        assert want.shape[0] == rows
        assert torch.equal(chroma_prefix(null, cfg=scale > 1), want)
        assert torch.equal(chroma_prefix(null_chroma(rows)), want)
    assert torch.equal(null_chroma(2), chroma_features(torch.zeros(2, 1, 100))[:, :1])  # silence gives it too


@pytest.mark.parametrize("frames", [1, 100, CHROMA_LENGTH, 250])
def test_chroma_prefix_equals_transformers(tiny_melody_model, frames):
    """Tiled (a melody shorter than 30 s loops) or cut to 235 frames; CFG rows: melody rows, then null rows."""
    gen = torch.Generator().manual_seed(frames)
    chroma = torch.zeros(2, frames, CHROMA_BINS)
    chroma.scatter_(-1, torch.randint(0, CHROMA_BINS, (2, frames, 1), generator=gen), 1.0)
    for scale in (1.0, 3.0):
        want = _hf_chroma_prefix(tiny_melody_model, chroma, scale)
        got = chroma_prefix(chroma, CHROMA_LENGTH, cfg=scale > 1)
        assert got.shape == want.shape == (2 if scale == 1 else 4, CHROMA_LENGTH, CHROMA_BINS)
        assert torch.equal(got, want)
    assert torch.equal(chroma_prefix(chroma, 7), chroma.repeat(1, 7, 1)[:, :7])


def test_chroma_features_errors():
    with pytest.raises(InvalidParameter, match=r"melody\[0\] must be a torch.Tensor \[B, C, T\] or \[C, T\]; got list"):
        chroma_features([[0.0, 0.1]])
    with pytest.raises(InvalidParameter, match=r"melody must be a torch.Tensor .*; got str"):
        chroma_features("melody.wav")
    with pytest.raises(InvalidParameter, match=r"melody must have shape \[B, C, T\] or \[C, T\]; got \[100\]"):
        chroma_features(torch.zeros(100))
    with pytest.raises(InvalidParameter, match=r"melody must have shape .*; got \[1, 1, 1, 100\]"):
        chroma_features(torch.zeros(1, 1, 1, 100))
    with pytest.raises(InvalidParameter, match=r"melody is empty: shape \[1, 1, 0\]"):
        chroma_features(torch.zeros(1, 1, 0))
    with pytest.raises(InvalidParameter, match=r"melody is empty: shape \[0, 2, 100\]"):
        chroma_features(torch.zeros(0, 2, 100))
    with pytest.raises(InvalidParameter, match="melody has NaN or infinite samples"):
        chroma_features(torch.tensor([[[0.0, float("nan")]]]))
    with pytest.raises(InvalidParameter, match="melody has NaN or infinite samples"):
        chroma_features(torch.tensor([[[float("-inf"), 0.0]]]))
    with pytest.raises(InvalidParameter, match=r"melody must hold float samples in \[-1, 1\]; got torch.int16"):
        chroma_features(torch.zeros(1, 1, 100, dtype=torch.int16))
    with pytest.raises(InvalidParameter, match=r"melody is an empty list"):
        chroma_features([])
    with pytest.raises(InvalidParameter, match=r"melody\[1\] has NaN or infinite samples"):
        chroma_features([torch.zeros(1, 100), torch.full((1, 100), float("inf"))])
    with pytest.raises(InvalidParameter, match=r"melody\[0\] must be one waveform \[C, T\]; got shape \[2, 1, 100\]"):
        chroma_features([torch.zeros(2, 1, 100)])


@pytest.mark.parametrize("kwargs, message", [
    ({"sample_rate": 0}, r"sample_rate must be an integer number of Hz in \[100, 768000\]; got 0"),
    ({"sample_rate": 32000.0}, r"sample_rate must be an integer number of Hz .*; got 32000.0"),
    ({"n_fft": 1}, r"n_fft must be an integer >= 2; got 1"),
    ({"n_fft": 16384.0}, r"n_fft must be an integer >= 2; got 16384.0"),
    ({"hop_length": 0}, r"hop_length must be an integer in \[1, 16384\]; got 0"),
    ({"hop_length": 16385}, r"hop_length must be an integer in \[1, 16384\]; got 16385"),
    ({"hop_length": True}, r"hop_length must be an integer in \[1, 16384\]; got True"),
    ({"chunk_length_s": 0.0}, r"chunk_length_s must be a finite number of seconds .* at 32000 Hz; got 0.0"),
    ({"chunk_length_s": -1}, r"chunk_length_s must be a finite number .*; got -1"),
    ({"chunk_length_s": float("inf")}, r"chunk_length_s must be a finite number .*; got inf"),
    ({"chunk_length_s": "30"}, r"chunk_length_s must be a finite number .*; got '30'"),
])
def test_chroma_features_parameter_errors(kwargs, message):
    with pytest.raises(InvalidParameter, match=message):
        chroma_features(torch.zeros(1, 1, 100), **kwargs)


def test_null_chroma_and_prefix_errors():
    for bad in (0, -1, True, 1.0):
        with pytest.raises(InvalidParameter, match=rf"batch must be an integer >= 1; got {bad!r}"):
            null_chroma(bad)
    with pytest.raises(InvalidParameter, match=r"chroma must be a float tensor \[B, Nc, 12\] .*; got \[2, 5, 11\]"):
        chroma_prefix(torch.zeros(2, 5, 11))
    with pytest.raises(InvalidParameter, match=r"chroma must be a float tensor .*; got \[2, 0, 12\]"):
        chroma_prefix(torch.zeros(2, 0, 12))
    with pytest.raises(InvalidParameter, match=r"chroma must be a float tensor .*; got \[5, 12\]"):
        chroma_prefix(torch.zeros(5, 12))
    with pytest.raises(InvalidParameter, match=r"chroma must be a float tensor .*; got list"):
        chroma_prefix([[0.0] * 12])
    with pytest.raises(InvalidParameter, match=r"chroma must be a float tensor .*; got \[1, 1, 12\]"):
        chroma_prefix(torch.zeros(1, 1, 12, dtype=torch.long))
    with pytest.raises(InvalidParameter, match=r"chroma_length must be an integer >= 1; got 0"):
        chroma_prefix(null_chroma(1), 0)
    with pytest.raises(InvalidParameter, match=r"cfg must be True or False; got 1"):
        chroma_prefix(null_chroma(1), cfg=1)
