"""Streaming EnCodec decoding against the one-shot decode (transformers' EncodecModel via mg.generate_audio /
Codec.decode): any chunking, several rows at different progress, mono and stereo, the tiny test models (causal,
conv shortcut: transformers' defaults) and musicgen's 32 kHz codec shapes (non-causal, reflect, 2-layer LSTM)."""
from __future__ import annotations

import random

import pytest
import torch

from enginepy import InvalidParameter, MusicGen
from enginepy.codec_stream import ENCODEC_32KHZ, StreamingDecoder, random_codec

TOL = 1e-4  # max abs vs the one-shot decode

# The same timing structure with narrow layers: cheap, same lookahead.
NARROW_32KHZ = dict(ENCODEC_32KHZ, hidden_size=8, num_filters=4, codebook_size=64, codebook_dim=8, target_bandwidths=[1.2])
# Odd paddings everywhere (kernel 4 and ratio 3 split their padding unevenly), zero padding, two residual layers
# with dilations 1 and 3, a conv shortcut: paths the 32 kHz codec does not take.
ODD = dict(sampling_rate=600, hidden_size=8, num_filters=4, upsampling_ratios=[3, 2], kernel_size=4, last_kernel_size=5,
           residual_kernel_size=3, dilation_growth_rate=3, num_residual_layers=2, use_causal_conv=False,
           pad_mode="constant", codebook_size=32, codebook_dim=8, num_lstm_layers=2, target_bandwidths=[1.0])


@pytest.fixture(scope="module")
def codec_32k():
    return random_codec()


@pytest.fixture(scope="module")
def stereo_engine(model_factory, engine_cache):
    return MusicGen.from_pretrained(model_factory("stereo"), device="cpu", dtype="float32", cache_dir=engine_cache)


def sizes_of(pattern, seed: int):
    """Chunk sizes: an int repeats; 'random' draws from 1..12."""
    rng = random.Random(seed)
    while True:
        yield rng.randint(1, 12) if pattern == "random" else pattern


def stream_decode(stream: StreamingDecoder, codes: torch.Tensor, patterns: list, starts: list[int] | None = None,
                  emitted: list | None = None) -> list[torch.Tensor]:
    """Decode rows codes[i] [K, T] through `stream`, row i cut by patterns[i] and opened at step starts[i];
    each row is closed right after its last frames while the others go on. Returns each row's audio [C, samples].
    emitted, when given, receives (row, frames pushed so far, samples emitted so far) after every push."""
    rows, _, total = codes.shape
    starts = starts or [0] * rows
    sizes = [sizes_of(p, seed=i) for i, p in enumerate(patterns)]
    pos, pieces, step = [0] * rows, [[] for _ in range(rows)], 0
    while any(p < total for p in pos):
        chunk = {}
        for i in range(rows):
            if step == starts[i]:
                stream.open(i)
            if step >= starts[i] and pos[i] < total:
                n = min(next(sizes[i]), total - pos[i])
                chunk[i] = codes[i, :, pos[i] : pos[i] + n]
                pos[i] += n
        for i, wav in stream.push(chunk).items():
            pieces[i].append(wav)
            if emitted is not None:
                emitted.append((i, pos[i], sum(p.shape[-1] for p in pieces[i])))
        for i in chunk:
            if pos[i] == total:
                pieces[i].append(stream.close(i))
        step += 1
    return [torch.cat(p, dim=-1) for p in pieces]


def max_error(stream, reference, codes, patterns, starts=None) -> float:
    got = stream_decode(stream, codes, patterns, starts)
    for row, wav in enumerate(got):
        assert wav.shape == reference[row].shape and wav.dtype == torch.float32
    return max((wav - ref).abs().max().item() for wav, ref in zip(got, reference))


@pytest.mark.parametrize("patterns", [[1, 1, 1], [2, 7, "random"], [3, 1, 20], ["random", "random", 5]])
@pytest.mark.parametrize("stereo", [False, True], ids=["mono", "stereo"])
def test_tiny_models_match_one_shot(tiny_engine, stereo_engine, stereo, patterns):
    mg = stereo_engine if stereo else tiny_engine
    torch.manual_seed(1)
    codes = torch.randint(0, mg.cfg.vocab_size, (3, mg.cfg.num_codebooks, 41))
    reference = mg.generate_audio(codes)  # [3, C, 41 * hop]
    assert reference.shape[1] == (2 if stereo else 1)
    assert max_error(StreamingDecoder(mg.codec), reference, codes, patterns, starts=[0, 2, 5]) <= TOL


@pytest.mark.slow
def test_32khz_codec_matches_one_shot(codec_32k):
    """Musicgen's 32 kHz shapes, 2 s of frames: one row per frame, one by 7s, one at random, all in one stream."""
    torch.manual_seed(2)
    codes = torch.randint(0, 2048, (3, 4, 100))
    reference = codec_32k.decode(codes)
    assert reference.abs().max() > 1e-2  # a real signal, so that 1e-4 is a real bound
    assert max_error(StreamingDecoder(codec_32k), reference, codes, [1, 7, "random"], starts=[0, 0, 3]) <= TOL


@pytest.mark.slow
def test_32khz_codec_stereo_matches_one_shot():
    codec = random_codec(channels=2, seed=3)
    torch.manual_seed(3)
    codes = torch.randint(0, 2048, (2, 8, 30))
    reference = codec.decode(codes)  # L/R interleaved per level: [2, 2, 30 * 640]
    assert not torch.equal(reference[:, 0], reference[:, 1])
    assert max_error(StreamingDecoder(codec), reference, codes, [3, "random"]) <= TOL


@pytest.mark.parametrize("config", [NARROW_32KHZ, ODD], ids=["32khz-narrow", "odd-paddings"])
@pytest.mark.parametrize("frames", [1, 2, 3, 4, 5, 9])
def test_short_sequences_match_one_shot(config, frames):
    """Sequences shorter than a kernel's padding take transformers' short-input padding rule at the ends."""
    codec = random_codec(channels=2, **config)
    torch.manual_seed(frames)
    k = 2 * len(codec.model.quantizer.layers)
    codes = torch.randint(0, codec.model.config.codebook_size, (3, k, frames))
    reference = codec.decode(codes)
    assert max_error(StreamingDecoder(codec), reference, codes, [1, 2, frames]) <= TOL


def test_odd_paddings_match_one_shot_for_long_rows():
    codec = random_codec(**ODD)
    torch.manual_seed(4)
    codes = torch.randint(0, 32, (3, 2, 60))
    reference = codec.decode(codes)
    assert max_error(StreamingDecoder(codec), reference, codes, [1, "random", 7], starts=[0, 4, 1]) <= TOL


def test_32khz_lookahead_is_2402_samples_and_exact():
    """Documented lookahead: after N frames, exactly max(0, 640 N - 2402) samples are out."""
    codec = random_codec(**NARROW_32KHZ)
    stream = StreamingDecoder(codec)
    assert (stream.lookahead_samples, stream.lookahead_frames, stream.hop_length) == (2402, 4, 640)
    emitted = []
    codes = torch.randint(0, 64, (2, 4, 20))
    stream_decode(stream, codes, [1, 3], emitted=emitted)
    assert len(emitted) > 20
    for _, frames, samples in emitted:
        assert samples == max(0, 640 * frames - 2402)


def test_32khz_lookahead_is_the_true_dependency():
    """Independent of the streaming code: in the one-shot decode, frames >= N leave samples before 640 N - 2402
    unchanged and change sample 640 N - 2402 itself, so the lookahead is neither too small nor too large.
    The prefix is bit-identical (same operations on the same window); the first dependent sample hangs on the
    product of every layer's outermost tap, so its change is small but not zero."""
    codec = random_codec(**NARROW_32KHZ)
    torch.manual_seed(5)
    a = torch.randint(0, 64, (1, 4, 40))
    b = a.clone()
    n = 20
    b[..., n:] = torch.randint(0, 64, (1, 4, 40 - n))
    diff = (codec.decode(a) - codec.decode(b)).abs()[0, 0]
    cut = 640 * n - 2402
    assert diff[:cut].max() == 0
    assert diff[cut] > 0 and diff[cut : cut + 640].max() > 1e-3


def test_causal_codec_has_no_steady_lookahead(tiny_engine):
    """The tiny models' codec is causal: once past its start-up, every frame's audio leaves with the frame."""
    stream = StreamingDecoder(tiny_engine.codec)
    hop = tiny_engine.cfg.hop_length
    assert stream.lookahead_samples == 0 and stream.lookahead_frames == 0
    emitted = []
    stream_decode(stream, torch.randint(0, 32, (1, 4, 30)), [1], emitted=emitted)
    assert [s for _, f, s in emitted if f >= 8] == [hop * f for _, f, _ in emitted if f >= 8]


class WorkCounter:
    """Multiply-adds of the convolutions and GEMMs the streaming decoder runs, recorded through monkeypatch."""

    def __init__(self, monkeypatch):
        self.macs, self.calls = 0, 0
        conv1d, addmm = torch.nn.functional.conv1d, torch.addmm

        def counting_conv1d(x, w, *args, **kwargs):
            out = conv1d(x, w, *args, **kwargs)
            self.macs += out.numel() * w.shape[1] * w.shape[2]
            self.calls += 1
            return out

        def counting_addmm(bias, a, b, *args, **kwargs):
            self.macs += a.shape[0] * a.shape[1] * b.shape[1]
            self.calls += 1
            return addmm(bias, a, b, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "conv1d", counting_conv1d)
        monkeypatch.setattr(torch, "addmm", counting_addmm)


def test_cost_is_linear_and_rows_are_batched(monkeypatch):
    codec = random_codec(**NARROW_32KHZ)
    codes = torch.randint(0, 64, (3, 4, 60))
    counter = WorkCounter(monkeypatch)

    stream = StreamingDecoder(codec)
    stream.open(0)
    stream.push({0: codes[0]})
    stream.close(0)
    whole = counter.macs

    per_push = []
    stream.open(1)
    for t in range(60):
        before = counter.macs
        stream.push({1: codes[1, :, t : t + 1]})
        per_push.append(counter.macs - before)
    stream.close(1)
    # Past the start-up every one-frame push does the same work, wherever it is in the row: no re-decoding.
    assert len(set(per_push[10:])) == 1
    # All frames one at a time cost a bounded multiple of the whole row at once (the per-call context).
    one_by_one = counter.macs - whole
    assert one_by_one < 1.5 * whole

    # Three rows in the same phase with the same number of new frames run as one batch: same number of calls.
    for rid in ("a", "b", "c"):
        stream.open(rid)
        stream.push({rid: codes[0, :, :10]})
    calls = counter.calls
    stream.push({"a": codes[0, :, 10:12]})
    one_row = counter.calls - calls
    calls = counter.calls
    stream.push({rid: codes[i, :, 10:12] for i, rid in enumerate(("b", "c"))})
    assert counter.calls - calls == one_row


def test_empty_pushes_and_rows():
    codec = random_codec(**NARROW_32KHZ)
    stream = StreamingDecoder(codec)
    stream.open("r")
    out = stream.push({"r": torch.zeros(4, 0, dtype=torch.int64)})
    assert out["r"].shape == (1, 0)
    assert stream.close("r").shape == (1, 0)
    stream.open("r")  # closed ids can be reused
    codes = torch.randint(0, 64, (1, 4, 6))
    reference = codec.decode(codes)
    got = torch.cat([stream.push({"r": codes[0, :, :3]})["r"], stream.push({"r": codes[0, :, 3:]})["r"], stream.close("r")], -1)
    assert (got - reference[0]).abs().max() <= TOL


def test_discard_forgets_a_row_and_leaves_others():
    codec = random_codec(**NARROW_32KHZ)
    stream = StreamingDecoder(codec)
    codes = torch.randint(0, 64, (2, 4, 12))
    reference = codec.decode(codes)
    stream.open("keep")
    stream.open("drop")
    first = stream.push({"keep": codes[0, :, :6], "drop": codes[1, :, :6]})
    stream.discard("drop")
    assert stream.rows == ["keep"] and "drop" not in stream
    got = torch.cat([first["keep"], stream.push({"keep": codes[0, :, 6:]})["keep"], stream.close("keep")], -1)
    assert (got - reference[0]).abs().max() <= TOL


def test_bad_input_is_refused():
    codec = random_codec(channels=2, **NARROW_32KHZ)  # 2 channels x up to 4 codebooks of 64
    stream = StreamingDecoder(codec)
    stream.open("r")
    good = torch.zeros(4, 2, dtype=torch.int64)
    cases = [
        (lambda: stream.open("r"), "row_id 'r' is already open"),
        (lambda: stream.push({"x": good}), "row_id 'x' is not open"),
        (lambda: stream.close("x"), "row_id 'x' is not open"),
        (lambda: stream.discard("x"), "row_id 'x' is not open"),
        (lambda: stream.open(["r"]), r"row_id must be hashable; got \['r'\]"),
        (lambda: stream.push([good]), "chunks must be a dict"),
        (lambda: stream.push({"r": good.float()}), "must be an integer tensor"),
        (lambda: stream.push({"r": good[None]}), r"must have shape \[K, n\]; got \[1, 4, 2\]"),
        (lambda: stream.push({"r": good[:3]}), r"K a multiple of 2 in \[1, 8\] codebooks; got 3"),
        (lambda: stream.push({"r": torch.zeros(10, 2, dtype=torch.int64)}), r"in \[1, 8\] codebooks; got 10"),
        (lambda: stream.push({"r": good - 1}), r"must lie in \[0, 63\]; got values in \[-1, -1\]"),
        (lambda: stream.push({"r": good + 64}), r"must lie in \[0, 63\]; got values in \[64, 64\]"),
        (lambda: StreamingDecoder(codec.model), "codec must be an enginepy Codec"),
    ]
    for call, match in cases:
        with pytest.raises(InvalidParameter, match=match):
            call()
    stream.push({"r": good})
    with pytest.raises(InvalidParameter, match="must keep K = 4 codebooks; got 2"):
        stream.push({"r": good[:2]})
    # A refused push leaves every row as it was: nothing is half-applied.
    stream.open("s")
    with pytest.raises(InvalidParameter, match="must lie in"):
        stream.push({"s": good, "r": good + 64})
    assert stream.push({"s": torch.zeros(4, 0, dtype=torch.int64)})["s"].shape == (2, 0)


def test_unstreamable_codec_is_refused():
    codec = random_codec(**dict(ODD, norm_type="time_group_norm"))
    with pytest.raises(InvalidParameter, match="norm_type 'weight_norm'; got 'time_group_norm'"):
        StreamingDecoder(codec)
