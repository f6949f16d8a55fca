"""Unconditional generation, audio continuation, long form and double / two-step CFG.

Oracles: transformers' generate with get_unconditional_inputs (unconditional) and with input_values (continuation),
token for token (greedy, fp32); transformers' decoder forward, teacher-forced, for the double-CFG formula; a plain
restatement of audiocraft's window loop over the (transformers-checked) continuation for long form.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from enginepy import InvalidParameter, MusicGen
from enginepy.audio_prompt import encode_audio
from enginepy.longform import window_plan, window_seed
from conftest import HAS_CUDA, INTERPRET
from hf_reference import load_hf

DEVICE = "cuda" if HAS_CUDA else "cpu"


def capture_codes(model, call):
    """Run call() (a transformers generate) and return the codes it hands its EnCodec decoder, [B, K, T]."""
    captured = []
    decode = model.audio_encoder.decode

    def spy(codes, *args, **kw):
        captured.append(codes)
        return decode(codes, *args, **kw)

    model.audio_encoder.decode = spy
    try:
        call()
    finally:
        model.audio_encoder.decode = decode
    if len(captured) == 1:
        return captured[0][0]
    left, right = captured[0][0], captured[1][0]
    return torch.stack([left, right], dim=2).reshape(left.shape[0], -1, left.shape[-1])


def max_delay(model) -> int:
    return model.decoder.config.num_codebooks // model.decoder.config.audio_channels - 1


def load(path, cache, backend="reference", **kw):
    if backend == "fast" and not (HAS_CUDA or INTERPRET):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 exported before import")
    return MusicGen.from_pretrained(path, device=DEVICE if backend == "fast" else "cpu", dtype="float32",
                                    cache_dir=cache, backend=backend, **kw)


BACKENDS = ["reference", pytest.param("fast", marks=pytest.mark.triton)]


def prompt_wave(model, seconds: float, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rate = model.config.audio_encoder.sampling_rate
    channels = model.decoder.config.audio_channels
    return 0.5 * torch.randn(batch, channels, int(seconds * rate), generator=g)


# -- unconditional -------------------------------------------------------------------------------------------
FAST = pytest.mark.triton


@pytest.mark.parametrize("backend,name", [("reference", "base"), ("reference", "stereo"),
                                          pytest.param("fast", "base", marks=FAST)])
def test_unconditional_equals_transformers(model_factory, engine_cache, backend, name):
    path = model_factory(name)
    model, _ = load_hf(path)
    frames = 13
    inputs = model.get_unconditional_inputs(num_samples=2)
    expected = capture_codes(model, lambda: model.generate(**inputs, do_sample=False,
                                                           max_new_tokens=frames + max_delay(model)))
    mg = load(path, engine_cache, backend)
    mg.set_generation_params(duration=frames / 50, use_sampling=False, cfg_coef=3.0)
    wav, codes = mg.generate_unconditional(2, return_tokens=True)
    assert torch.equal(codes, expected)
    assert wav.shape == (2, mg.audio_channels, frames * mg.cfg.hop_length)
    if backend == "fast":
        return
    # Guidance is moot without a condition: any cfg_coef gives the same codes.
    mg.set_generation_params(duration=frames / 50, use_sampling=False, cfg_coef=7.0)
    assert torch.equal(mg.generate_unconditional(2, return_tokens=True)[1], expected)


# -- continuation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,name", [("reference", "base"), ("reference", "stereo"), ("reference", "k3-wide-text"),
                                          pytest.param("fast", "stereo", marks=FAST)])
def test_continuation_equals_transformers(model_factory, engine_cache, backend, name):
    path = model_factory(name)
    model, tokenizer = load_hf(path)
    prompts = ["lo-fi beat with warm piano", "dark techno"]
    wav = prompt_wave(model, 0.34, batch=2, seed=3)  # 17 frames: not a multiple of the paged block size
    frames = 30
    expected = []
    for i, text in enumerate(prompts):  # one call per prompt: transformers pads batched prompts
        inputs = tokenizer([text], return_tensors="pt")
        expected.append(capture_codes(model, lambda: model.generate(
            **inputs, input_values=wav[i : i + 1], guidance_scale=3.0, do_sample=False,
            max_new_tokens=frames - 17 + max_delay(model))))
    expected = torch.cat(expected)
    mg = load(path, engine_cache, backend)
    mg.set_generation_params(duration=frames / 50, use_sampling=False, cfg_coef=3.0)
    out, codes = mg.generate_continuation(wav, mg.sample_rate, descriptions=prompts, return_tokens=True)
    assert codes.shape == expected.shape
    assert torch.equal(codes, expected)
    assert torch.equal(codes[:, :, :17], encode_audio(mg.codec, wav))  # the output starts with the prompt
    assert out.shape == (2, mg.audio_channels, frames * mg.cfg.hop_length)


def test_unconditional_continuation_equals_transformers(tiny_hf, engine_cache, backend="reference"):
    model, _ = load_hf(tiny_hf)
    wav = prompt_wave(model, 0.2, seed=5)
    inputs = model.get_unconditional_inputs(num_samples=1)
    expected = capture_codes(model, lambda: model.generate(**inputs, input_values=wav, do_sample=False,
                                                           max_new_tokens=24 - 10 + max_delay(model)))
    mg = load(tiny_hf, engine_cache, backend)
    mg.set_generation_params(duration=24 / 50, use_sampling=False)
    assert torch.equal(mg.generate_continuation(wav[0], mg.sample_rate, return_tokens=True)[1], expected)


def test_continuation_in_the_engine_is_independent_of_neighbours(tiny_engine):
    codes = torch.randint(0, tiny_engine.cfg.vocab_size, (tiny_engine.cfg.num_codebooks, 7))
    tiny_engine.set_generation_params(duration=0.3, top_k=5, seed=21)
    alone = tiny_engine._generate_codes(["jazz"], [codes], False)[0]
    engine = tiny_engine.engine(max_batch=3)
    engine.add_request("a", "rock", duration=0.2, seed=1)
    for _ in range(4):
        engine.step()
    engine.add_request("b", "jazz", duration=0.3, seed=21, top_k=5, prompt_codes=codes)
    engine.add_request("c", None, duration=0.1, seed=3)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.codes
    assert torch.equal(done["b"], alone)
    assert torch.equal(done["b"][:, :7], codes)


def test_resampled_and_downmixed_prompt(tiny_engine):
    from scipy.signal import resample_poly

    rate = tiny_engine.sample_rate
    g = torch.Generator().manual_seed(0)
    stereo = 0.3 * torch.randn(2, int(0.2 * 3 * rate), generator=g)  # at 3x the model rate, two channels
    tiny_engine.set_generation_params(duration=0.3, use_sampling=False)
    _, codes = tiny_engine.generate_continuation(stereo, 3 * rate, return_tokens=True)
    mono = resample_poly(stereo.mean(0).double().numpy(), 1, 3).astype(np.float32)
    expected = encode_audio(tiny_engine.codec, torch.from_numpy(mono)[None, None])
    assert torch.equal(codes[:, :, : expected.shape[-1]], expected)


# -- long form -----------------------------------------------------------------------------------------------
def test_window_plan_matches_audiocraft_arithmetic():
    # audiocraft truncates int((1.5 - 1.08) * 50) = int(20.999...) to 20.
    assert window_plan(1.5, 0.6, 0.36, 50) == [(0, 30), (12, 30), (12, 30), (12, 20), (2, 3)]
    assert window_plan(0.5, 0.6, 0.36, 50) == [(0, 25)]
    assert window_plan(1.0, 0.6, 0.36, 50, prompt_frames=10) == [(10, 30), (12, 30), (12, 14)]
    with pytest.raises(InvalidParameter, match="longer than the audio to generate in one window"):
        window_plan(1.0, 0.6, 0.36, 50, prompt_frames=31)


def restated_long_form(mg, prompts, duration, stride_s, seed, prompt_codes=None):
    """audiocraft's window loop, written out over MusicGen's continuation (one window = one generate call)."""
    fr, max_frames = mg.frame_rate, int(mg.max_duration * mg.frame_rate)
    total, stride = int(duration * fr), int(fr * stride_s)
    out = [] if prompt_codes is None else [prompt_codes]
    prompt, offset, window = prompt_codes, 0, 0
    while offset + (0 if prompt is None else prompt.shape[-1]) < total:
        n = int(min(duration - offset / fr, mg.max_duration) * fr)
        assert n <= max_frames
        mg.set_generation_params(duration=mg.max_duration, use_sampling=True, top_k=4, seed=window_seed(seed, window))
        rows = [None] * len(prompts) if prompt is None else list(prompt)
        from enginepy.generate import generate_tokens

        gen = generate_tokens(mg.engine(len(prompts)), prompts, 0.0, mg.params, window_seed(seed, window),
                              prompt_codes=rows, frames=n)
        out.append(gen if prompt is None else gen[:, :, prompt.shape[-1]:])
        prompt = gen[:, :, stride:]
        offset += stride
        window += 1
    return torch.cat(out, dim=-1)


def test_long_form_equals_the_window_loop(tiny_hf, engine_cache):
    mg = load(tiny_hf, engine_cache, max_duration=0.6, max_batch=2)
    prompts = ["lo-fi beat", "jazz"]
    mg.set_generation_params(duration=1.5, use_sampling=True, top_k=4, seed=9, extend_stride=0.36)
    codes = mg.generate_tokens(prompts)
    assert codes.shape == (2, 4, 75)
    expected = restated_long_form(mg, prompts, 1.5, 0.36, 9)
    assert torch.equal(codes, expected)
    # The first window is the plain generation of its 30 frames.
    mg.set_generation_params(duration=0.6, use_sampling=True, top_k=4, seed=9)
    assert torch.equal(codes[:, :, :30], mg.generate_tokens(prompts))


@pytest.mark.triton
def test_long_form_fast_equals_reference(tiny_hf, engine_cache):
    fast = load(tiny_hf, engine_cache, "fast", max_duration=0.3, max_batch=1)
    ref = load(tiny_hf, engine_cache, max_duration=0.3)
    for mg in (fast, ref):  # windows (0, 15), (5, 15), (5, 15): prompts re-prefilled into the paged cache
        mg.set_generation_params(duration=0.5, use_sampling=True, top_k=4, seed=3, extend_stride=0.2)
    codes = fast.generate_tokens(["jazz"])
    assert codes.shape == (1, 4, 25)
    assert torch.equal(codes, ref.generate_tokens(["jazz"]))


def test_long_form_continuation_equals_the_window_loop(tiny_hf, engine_cache):
    mg = load(tiny_hf, engine_cache, max_duration=0.6)
    model, _ = load_hf(tiny_hf)
    wav = prompt_wave(model, 0.2, seed=7)
    mg.set_generation_params(duration=1.0, use_sampling=True, top_k=4, seed=2, extend_stride=0.36)
    _, codes = mg.generate_continuation(wav, mg.sample_rate, descriptions=["jazz"], return_tokens=True)
    expected = restated_long_form(mg, ["jazz"], 1.0, 0.36, 2, prompt_codes=encode_audio(mg.codec, wav))
    assert codes.shape == (1, 4, 50)
    assert torch.equal(codes, expected)


def test_long_form_runs_t5_once_per_prompt(tiny_hf, engine_cache):
    mg = load(tiny_hf, engine_cache, max_duration=0.6)
    calls = []
    encode = mg.conditioner.encode

    def counting(prompts, names=None):
        calls.append(list(prompts))
        return encode(prompts, names)

    mg.conditioner.encode = counting
    try:
        mg.set_generation_params(duration=1.5, use_sampling=False, extend_stride=0.36)
        mg.generate_tokens(["jazz", "rock"])
    finally:
        mg.conditioner.encode = encode
    assert calls == [["jazz"], ["rock"]]


# -- double and two-step CFG ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_cfg_beta_one_and_two_step_equal_plain_cfg(tiny_hf, engine_cache, backend):
    mg = load(tiny_hf, engine_cache, backend)
    duration = 0.3 if backend == "reference" else 0.1
    mg.set_generation_params(duration=duration, use_sampling=False, cfg_coef=3.0)
    plain = mg.generate_tokens(["lo-fi beat", "jazz"])
    mg.set_generation_params(duration=duration, use_sampling=False, cfg_coef=3.0, cfg_coef_beta=1.0)
    assert torch.equal(mg.generate_tokens(["lo-fi beat", "jazz"]), plain)
    mg.set_generation_params(duration=duration, use_sampling=False, cfg_coef=3.0, two_step_cfg=True)
    assert torch.equal(mg.generate_tokens(["lo-fi beat", "jazz"]), plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_cfg_is_audiocrafts_formula_on_transformers_logits(tiny_hf, engine_cache, backend):
    """Teacher-forced: transformers' decoder on the engine's own codes, cond and null (text dropped = null for a
    text model); u + α(w + β(c − w) − u) must pick every generated token."""
    model, tokenizer = load_hf(tiny_hf)
    mg = load(tiny_hf, engine_cache, backend)
    alpha, beta, frames = 2.0, 4.0, 15
    mg.set_generation_params(duration=frames / 50, use_sampling=False, cfg_coef=alpha, cfg_coef_beta=beta)
    codes = mg.generate_tokens(["dark techno"])
    k, special = mg.cfg.num_codebooks, mg.cfg.special_token
    steps = frames + k - 1
    seq = torch.full((1, k, steps + 1), special)
    for i in range(k):
        seq[0, i, 1 + i : 1 + i + frames] = codes[0, i]
    inputs = tokenizer(["dark techno"], return_tensors="pt")
    with torch.no_grad():
        enc = model.text_encoder(**inputs).last_hidden_state
        states = torch.cat([enc, torch.zeros_like(enc)])
        mask = torch.cat([inputs["attention_mask"], torch.zeros_like(inputs["attention_mask"])])
        ids = seq[:, :, :steps].repeat(2, 1, 1).reshape(2 * k, steps)
        logits = model(encoder_outputs=(states,), attention_mask=mask, decoder_input_ids=ids).logits
    logits = logits.view(2, k, steps, -1).float()
    c, u = logits[0], logits[1]
    mixed = u + alpha * (u + beta * (c - u) - u)
    picked = mixed.argmax(-1)  # [K, steps]: step s predicts frame s - k of codebook k
    for i in range(k):
        assert torch.equal(picked[i, i : i + frames], codes[0, i])


# -- bad input -----------------------------------------------------------------------------------------------
def test_bad_audio_and_settings_are_refused(tiny_engine, tmp_path):
    mg = tiny_engine
    mg.set_generation_params(duration=0.3)
    rate = mg.sample_rate
    ok = torch.zeros(1, 160)
    cases = [
        (dict(prompt=torch.zeros(2, 2, 2, 2), prompt_sample_rate=rate), r"prompt must have shape \[B, C, T\] or \[C, T\]"),
        (dict(prompt=torch.zeros(1, 0), prompt_sample_rate=rate), "prompt is empty"),
        (dict(prompt=torch.full((1, 160), float("nan")), prompt_sample_rate=rate), "prompt has NaN or infinite"),
        (dict(prompt=torch.zeros(1, 160, dtype=torch.int16), prompt_sample_rate=rate), "must hold float samples"),
        (dict(prompt="x.wav", prompt_sample_rate=rate), "prompt must be a torch.Tensor"),
        (dict(prompt=ok, prompt_sample_rate=10**9), r"prompt_sample_rate must be an integer number of Hz in \[100, 768000\]"),
        (dict(prompt=ok, prompt_sample_rate=0), "prompt_sample_rate must be"),
        (dict(prompt=ok, prompt_sample_rate=44100.0), "prompt_sample_rate must be"),
        (dict(prompt=ok, prompt_sample_rate=rate, descriptions=["a", "b"]), "descriptions has 2 entries but the audio has 1"),
        (dict(prompt=ok, prompt_sample_rate=rate, descriptions=[3]), r"descriptions\[0\] must be a string or None"),
        (dict(prompt=torch.zeros(1, 400), prompt_sample_rate=rate), "must be shorter than the audio to generate|longer than"),
    ]
    for kwargs, match in cases:
        with pytest.raises(InvalidParameter, match=match):
            mg.generate_continuation(**kwargs)
    with pytest.raises(InvalidParameter, match="num_samples must be a positive integer; got 0"):
        mg.generate_unconditional(0)
    with pytest.raises(InvalidParameter, match=r"extend_stride must be in \[0.02, 30\) seconds"):
        mg.set_generation_params(duration=40.0, extend_stride=30)
    with pytest.raises(InvalidParameter, match="cfg_coef_beta must be >= 0"):
        mg.set_generation_params(duration=0.3, cfg_coef_beta=-1.0)
    with pytest.raises(InvalidParameter, match="two_step_cfg must be True or False"):
        mg.set_generation_params(duration=0.3, two_step_cfg="yes")
    mg.set_generation_params(duration=0.3)


def test_read_audio_refuses_bad_files(tmp_path):
    import soundfile as sf

    from enginepy.audio_prompt import read_audio

    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    with pytest.raises(InvalidParameter, match="--continue .*bad.wav cannot be read as audio"):
        read_audio(bad, "--continue")
    with pytest.raises(InvalidParameter, match="cannot be read as audio"):
        read_audio(tmp_path / "missing.wav", "--continue")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 1), dtype=np.float32), 8000)
    with pytest.raises(InvalidParameter, match="is empty"):
        read_audio(empty, "--continue")
    good = tmp_path / "good.flac"
    data = (np.sin(np.arange(800) / 5.0) * 0.5).astype(np.float32)
    sf.write(good, np.stack([data, -data], axis=1), 8000)
    wav, rate = read_audio(good, "--continue")
    assert rate == 8000 and wav.shape == (2, 800)
    assert torch.allclose(wav[0], torch.from_numpy(data), atol=1e-4)  # 16-bit FLAC
    assert os.path.exists(good)


def test_cli_continue_writes_the_continuation(tiny_hf, tmp_path, capsys):
    import soundfile as sf

    from enginepy.cli import main

    model, _ = load_hf(tiny_hf)
    wav = prompt_wave(model, 0.2, seed=11)[0]  # [1, 160] at the model's rate
    src = tmp_path / "prompt.wav"
    sf.write(src, wav.numpy().T, model.config.audio_encoder.sampling_rate, subtype="FLOAT")
    tokens = tmp_path / "codes.npy"
    code = main(["generate", "jazz", "--model", tiny_hf, "--device", "cpu", "--dtype", "float32", "--duration", "0.4",
                 "--greedy", "--continue", str(src), "--out", str(tmp_path / "out.wav"), "--tokens-out", str(tokens),
                 "--quiet"])
    assert code == 0
    codes = torch.from_numpy(np.load(tokens))
    inputs = load_hf(tiny_hf)[1](["jazz"], return_tensors="pt")
    expected = capture_codes(model, lambda: model.generate(**inputs, input_values=wav[None], guidance_scale=3.0,
                                                           do_sample=False, max_new_tokens=20 - 10 + max_delay(model)))
    assert torch.equal(codes, expected)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF????")
    assert main(["generate", "jazz", "--model", tiny_hf, "--continue", str(bad), "--out", str(tmp_path / "x.wav")]) == 2
    assert "--continue" in capsys.readouterr().err and not (tmp_path / "x.wav").exists()


def test_cli_long_form_equals_the_api(tiny_hf, engine_cache, tmp_path):
    """`enginepy generate --duration D --extend-stride S` beyond --max-duration == the API's long form."""
    import subprocess
    import sys

    env = {**os.environ, "ENGINEPY_CACHE": engine_cache}
    base = [sys.executable, "-m", "enginepy", "generate", "jazz", "--model", tiny_hf, "--device", "cpu",
            "--backend", "reference", "--dtype", "float32", "--max-duration", "0.6", "--quiet"]
    npy = tmp_path / "t.npy"
    r = subprocess.run(base + ["--duration", "1.5", "--extend-stride", "0.36", "--seed", "9", "--top-k", "4",
                               "--out", str(tmp_path / "o.wav"), "--tokens-out", str(npy)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    mg = load(tiny_hf, engine_cache, max_duration=0.6)
    mg.set_generation_params(duration=1.5, use_sampling=True, top_k=4, seed=9, extend_stride=0.36)
    assert np.array_equal(np.load(npy), mg.generate_tokens(["jazz"]).numpy())
    for extra, message in (
        (["--duration", "1.5", "--extend-stride", "0.6"], "--extend-stride must be in (0, 0.6) seconds (below "
                                                         "--max-duration); got 0.6"),
        (["--duration", "1.5"], "--duration must be in (0, 0.6] seconds; got 1.5 (--extend-stride S generates "
                                "longer audio in windows)"),
    ):
        r = subprocess.run(base + extra + ["--out", str(tmp_path / "x.wav")], capture_output=True, text=True, env=env)
        assert r.returncode == 2 and r.stderr.strip() == f"enginepy: error: {message}", r.stderr
