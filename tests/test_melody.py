"""MusicGen-Melody: chroma + text as a prefix of the self-attention sequence (no cross-attention).

Oracle: transformers' MusicgenMelodyForConditionalGeneration.generate(input_ids, attention_mask,
input_features=chroma, guidance_scale, do_sample=False), token for token (greedy, fp32), on random checkpoints
built with its own config classes; the chroma is enginepy.chroma's, itself checked equal to transformers' feature
extractor in test_chroma.py. The fast backend is checked against the reference one (under the Triton interpreter
on CPU), including requests joining a running engine.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from enginepy import InvalidParameter, ModelFileError, MusicGen
from enginepy.chroma import chroma_features
from enginepy.config import ModelConfig
from enginepy.convert import convert_hf
from conftest import HAS_CUDA, INTERPRET
from hf_reference import load_hf
from test_variants import capture_codes, max_delay

DEVICE = "cuda" if HAS_CUDA else "cpu"
RATE = 32000  # the chroma's rate (the feature extractor's), whatever the codec's
PROMPTS = ["lo-fi beat with warm piano and soft drums", "jazz"]


def melody(seconds: float, freq: float, seed: int = 0, channels: int = 1) -> torch.Tensor:
    """A two-note melody with a little noise, float32 [C, T] at 32 kHz."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * RATE)) / RATE
    f = torch.where(t < seconds / 2, torch.tensor(freq), torch.tensor(freq * 1.5))
    tone = 0.5 * torch.sin(2 * math.pi * f * t) + 0.05 * torch.randn(t.shape, generator=g)
    return tone.expand(channels, -1).contiguous()


def load(path, cache, backend="reference", **kw):
    if backend == "fast" and not (HAS_CUDA or INTERPRET):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 exported before import")
    return MusicGen.from_pretrained(path, device=DEVICE if backend == "fast" else "cpu", dtype="float32",
                                    cache_dir=cache, backend=backend, **kw)


def hf_codes(path, prompts, frames, guidance_scale=3.0, **kwargs):
    model, tokenizer = load_hf(path)
    inputs = tokenizer(prompts, padding=True, return_tensors="pt")
    return capture_codes(model, lambda: model.generate(**inputs, guidance_scale=guidance_scale, do_sample=False,
                                                       max_new_tokens=frames + max_delay(model), **kwargs))


# ---------------------------------------------------------------------------------------------------------------
# Conversion


def test_convert_melody_checkpoint(model_factory, tmp_path):
    src = model_factory("melody")
    cfg = convert_hf(src, str(tmp_path / "m"))
    assert cfg.prefix and cfg.conditioning == "prefix" and cfg.chroma_length == 235 and cfg.num_chroma == 12
    assert cfg.chroma == {"sampling_rate": 32000, "n_fft": 16384, "hop_length": 4096, "chunk_length": 30}
    assert ModelConfig.load(str(tmp_path / "m")) == cfg
    from safetensors.torch import load_file

    from enginepy.weights import read_state_dict

    packed = load_file(str(tmp_path / "m" / "decoder.safetensors"))
    state = read_state_dict(src)
    assert torch.equal(packed["audio_proj.weight"], state["audio_enc_to_dec_proj.weight"])
    assert torch.equal(packed["audio_proj.bias"], state["audio_enc_to_dec_proj.bias"])
    assert not any("cross" in k for k in packed)


def test_convert_melody_refuses_damaged_configs(model_factory, tmp_path):
    import shutil

    src = str(tmp_path / "src")
    shutil.copytree(model_factory("melody"), src)
    config = json.load(open(os.path.join(src, "config.json")))
    broken = dict(config)
    del broken["chroma_length"]
    json.dump(broken, open(os.path.join(src, "config.json"), "w"))
    with pytest.raises(ModelFileError, match="the 'chroma_length' entry is missing"):
        convert_hf(src, str(tmp_path / "a"))
    json.dump(dict(config, model_type="musicgen_style"), open(os.path.join(src, "config.json"), "w"))
    with pytest.raises(ModelFileError, match="supported: 'musicgen' .* and 'musicgen_melody'"):
        convert_hf(src, str(tmp_path / "b"))
    json.dump(config, open(os.path.join(src, "config.json"), "w"))
    json.dump({"sampling_rate": "fast"}, open(os.path.join(src, "preprocessor_config.json"), "w"))
    with pytest.raises(ModelFileError, match="preprocessor_config.json.*sampling_rate must be an integer"):
        convert_hf(src, str(tmp_path / "c"))


# ---------------------------------------------------------------------------------------------------------------
# Token-exact against transformers


@pytest.mark.parametrize("name", ["melody", "melody-stereo"])
def test_melody_matches_transformers_padded_batch(model_factory, engine_cache, name):
    """Two prompts of different token counts (the shorter one's prefix attends its padding) and two melodies of
    different lengths (the shorter one's chroma padded with silence), guidance 3."""
    src = model_factory(name)
    mg = load(src, engine_cache)
    frames = 10
    melodies = [melody(3.0, 440.0, seed=1), melody(1.3, 261.6, seed=2, channels=2)]
    ref = hf_codes(src, PROMPTS, frames, input_features=chroma_features(melodies, RATE))
    mg.set_generation_params(duration=frames / mg.frame_rate, use_sampling=False, cfg_coef=3.0)
    _, codes = mg.generate_with_chroma(PROMPTS, melodies, RATE, return_tokens=True)
    assert codes.shape == ref.shape
    assert torch.equal(codes, ref)
    # alone, the short prompt attends no padding: a different function, so different codes
    _, alone = mg.generate_with_chroma(PROMPTS[1:], melodies[1:], RATE, return_tokens=True)
    assert not torch.equal(alone[0], ref[1])
    assert torch.equal(alone[0], hf_codes(src, PROMPTS[1:], frames,
                                          input_features=chroma_features(melodies[1:], RATE))[0])


@pytest.mark.triton
def test_fast_backend_matches_transformers_padded_batch(model_factory, engine_cache):
    """The fast backend (Triton kernels; interpreted on CPU) against the same oracle, directly."""
    src = model_factory("melody-short")
    mg = load(src, engine_cache, backend="fast", max_duration=0.5)
    frames = 8
    melodies = [melody(1.0, 440.0, seed=13), melody(2.0, 293.7, seed=14)]
    ref = hf_codes(src, PROMPTS, frames, input_features=chroma_features(melodies, RATE))
    mg.set_generation_params(duration=frames / mg.frame_rate, use_sampling=False, cfg_coef=3.0)
    _, codes = mg.generate_with_chroma(PROMPTS, melodies, RATE, return_tokens=True)
    assert torch.equal(codes, ref)


def test_melody_model_without_melody_matches_transformers(model_factory, engine_cache):
    """generate(descriptions) on a melody model: the null chroma (one-hot C) in the prefix, as transformers."""
    src = model_factory("melody")
    mg = load(src, engine_cache)
    frames = 9
    mg.set_generation_params(duration=frames / mg.frame_rate, use_sampling=False, cfg_coef=3.0)
    assert torch.equal(mg.generate_tokens(PROMPTS), hf_codes(src, PROMPTS, frames))
    # a None melody entry is the same thing
    _, codes = mg.generate_with_chroma(PROMPTS, [melody(2.0, 330.0), None], RATE, return_tokens=True)
    assert torch.equal(codes[1], hf_codes(src, PROMPTS, frames,
                                         input_features=chroma_features([melody(2.0, 330.0), torch.zeros(1, 4096)],
                                                                        RATE))[1])


def test_unconditional_on_a_melody_model_matches_transformers(model_factory, engine_cache):
    """generate_unconditional: the null prefix [null chroma ; one masked zero text vector], guidance off; the
    oracle is transformers' generate with no inputs at all (its text encoder then sees one masked start token)."""
    src = model_factory("melody")
    model, _ = load_hf(src)
    mg = load(src, engine_cache)
    frames = 10
    ref = capture_codes(model, lambda: model.generate(guidance_scale=1.0, do_sample=False,
                                                      max_new_tokens=frames + max_delay(model)))
    mg.set_generation_params(duration=frames / mg.frame_rate, use_sampling=False)
    _, codes = mg.generate_unconditional(1, return_tokens=True)
    assert torch.equal(codes, ref)


def test_melody_continuation_matches_transformers(model_factory, engine_cache):
    """Audio continuation on a melody model: the prompt's pattern columns prefilled after the prefix. transformers'
    melody generate takes no input_values: the oracle gets the prompt's EnCodec codes as decoder_input_ids
    ([B*K, Tp], what its MusicGen generate builds from input_values), with a melody."""
    from enginepy.audio_prompt import encode_audio

    src = model_factory("melody")
    mg = load(src, engine_cache)
    g = torch.Generator().manual_seed(3)
    wav = 0.3 * torch.randn(2, 1, int(0.12 * mg.sample_rate), generator=g)
    prompt = encode_audio(mg.codec, wav)  # [2, K, Tp]
    tp, frames = prompt.shape[-1], 14
    melodies = [melody(3.0, 440.0, seed=1), melody(2.0, 349.2, seed=2)]
    ref = hf_codes(src, PROMPTS, frames - tp, input_features=chroma_features(melodies, RATE),
                   decoder_input_ids=prompt.reshape(-1, tp))
    mg.set_generation_params(duration=frames / mg.frame_rate, use_sampling=False, cfg_coef=3.0)
    _, codes = mg.generate_continuation(wav, mg.sample_rate, PROMPTS, return_tokens=True, melody_wavs=melodies,
                                        melody_sample_rate=RATE)
    assert torch.equal(codes[..., :tp], prompt)  # the prompt's own codes
    assert torch.equal(codes, ref)
    with pytest.raises(InvalidParameter, match="melody_wavs has 1 melodies but the prompt has 2"):
        mg.generate_continuation(wav, mg.sample_rate, PROMPTS, melody_wavs=melodies[:1], melody_sample_rate=RATE)


# ---------------------------------------------------------------------------------------------------------------
# Double CFG, backends, the engine


def test_double_cfg_beta_one_is_plain_cfg_and_beta_changes_it(model_factory, engine_cache):
    mg = load(model_factory("melody-short"), engine_cache)
    melodies = [melody(2.0, 440.0, seed=4), melody(2.5, 392.0, seed=5)]
    runs = {}
    for beta in (None, 1.0, 3.0):
        mg.set_generation_params(duration=0.2, use_sampling=False, cfg_coef=3.0, cfg_coef_beta=beta)
        runs[beta] = mg.generate_with_chroma(PROMPTS, melodies, RATE, return_tokens=True)[1]
    assert torch.equal(runs[None], runs[1.0])
    assert not torch.equal(runs[None], runs[3.0])


def test_two_step_cfg_is_cfg_over_two_prefixes_on_transformers_logits(model_factory, engine_cache):
    """Teacher-forced: transformers' melody decoder on the engine's own codes, once under the cond prefix
    [chroma ; text] and once under two-step CFG's null prefix [null chroma ; one zero vector], both built with
    transformers' own projections; u + α(c − u) must pick every generated token."""
    from enginepy.chroma import null_chroma

    src = model_factory("melody-short")
    model, tokenizer = load_hf(src)
    mg = load(src, engine_cache)
    alpha, frames, prompt, wave = 3.0, 8, "lo-fi beat with warm piano", melody(2.0, 440.0, seed=12)
    mg.set_generation_params(duration=frames / mg.frame_rate, use_sampling=False, cfg_coef=alpha, two_step_cfg=True)
    codes = mg.generate_with_chroma([prompt], [wave], RATE, return_tokens=True)[1]
    mg.set_generation_params(duration=frames / mg.frame_rate, use_sampling=False, cfg_coef=alpha)
    assert not torch.equal(codes, mg.generate_with_chroma([prompt], [wave], RATE, return_tokens=True)[1])
    k, special, n = mg.cfg.num_codebooks, mg.cfg.special_token, model.config.chroma_length
    steps = frames + k - 1
    seq = torch.full((1, k, steps + 1), special)
    for i in range(k):
        seq[0, i, 1 + i : 1 + i + frames] = codes[0, i]
    with torch.no_grad():
        inputs = tokenizer([prompt], return_tensors="pt")
        text = model.enc_to_dec_proj(model.text_encoder(**inputs).last_hidden_state)
        text = text * inputs["attention_mask"][..., None]

        def audio(chroma):
            a = model.audio_enc_to_dec_proj(chroma)
            return a.repeat(1, math.ceil(n / a.shape[1]), 1)[:, :n]

        cond = torch.cat([audio(chroma_features([wave], RATE)), text], dim=1)
        null = torch.cat([audio(null_chroma(1)), torch.zeros(1, 1, text.shape[-1])], dim=1)
        ids = seq[:, :, :steps].reshape(k, steps)

        def logits(prefix):
            out = model.decoder(input_ids=ids, encoder_hidden_states=prefix).logits
            return out.reshape(k, -1, out.shape[-1])[:, -steps:].float()

        c, u = logits(cond), logits(null)
    picked = (u + alpha * (c - u)).argmax(-1)  # [K, steps]: step s predicts frame s - k of codebook k
    for i in range(k):
        assert torch.equal(picked[i, i : i + frames], codes[0, i])


@pytest.mark.triton
def test_fast_equals_reference_with_requests_joining(model_factory, engine_cache):
    """Melody, no melody, double CFG, sampling and a continuation join one running fast engine at different
    steps: each request's codes equal the reference engine's for it alone."""
    src = model_factory("melody-short")
    ref = load(src, engine_cache, max_duration=0.5)
    fast = load(src, engine_cache, backend="fast", max_duration=0.5)
    chroma = chroma_features([melody(2.0, 440.0, seed=6), melody(1.0, 523.3, seed=7)], RATE)
    g = torch.Generator().manual_seed(8)
    prompt_codes = torch.randint(0, ref.cfg.vocab_size, (ref.cfg.num_codebooks, 3), generator=g)
    requests = [  # (step to join at, id, prompt, settings)
        (0, "melody", PROMPTS[0], dict(melody=chroma[0], use_sampling=False)),
        (0, "plain", PROMPTS[1], dict(use_sampling=False, text_len=9)),
        (2, "double", PROMPTS[1], dict(melody=chroma[1], cfg_coef_beta=2.0, use_sampling=False)),
        (3, "sampled", PROMPTS[0], dict(melody=chroma[1], top_k=5, seed=11)),
        (4, "melody-only", None, dict(melody=chroma[0], use_sampling=False)),
        (5, "continued", PROMPTS[0], dict(melody=chroma[0], prompt_codes=prompt_codes, use_sampling=False)),
        (6, "two-step", PROMPTS[0], dict(melody=chroma[1], two_step_cfg=True, use_sampling=False)),
    ]
    engine = fast.engine(max_batch=4)
    done, step = {}, 0
    pending = list(requests)
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, rid, prompt, kw = pending.pop(0)
            engine.add_request(rid, prompt, duration=0.2, **{"seed": 1, **kw})
        for out in engine.step():
            assert out.error is None, out.error
            if out.finished:
                done[out.request_id] = out.codes
        step += 1
    for _, rid, prompt, kw in requests:
        alone = ref.engine(max_batch=1)
        alone.add_request(rid, prompt, duration=0.2, **{"seed": 1, **kw})
        while alone.has_unfinished_requests():
            for out in alone.step():
                assert out.error is None, out.error
                if out.finished:
                    assert torch.equal(done[rid], out.codes), rid
    assert engine.num_free_blocks == fast.engine(max_batch=4).num_free_blocks  # every block came back


def test_long_form_with_a_melody_equals_the_window_loop(model_factory, engine_cache):
    """Beyond max_duration, every window conditions on the melody looped from the window's start for
    max_duration seconds (audiocraft's _generate_tokens), restated here over the step engine."""
    from enginepy.generate import generate_tokens
    from enginepy.longform import window_seed

    mg = load(model_factory("melody-short"), engine_cache, max_duration=0.4, max_batch=2)
    prompts, seed, duration, stride_s = ["lo-fi beat with piano", "jazz"], 5, 0.9, 0.24
    waves = [melody(0.7, 440.0, seed=3), melody(0.25, 330.0, seed=4)]
    mg.set_generation_params(duration=duration, use_sampling=True, top_k=4, seed=seed, extend_stride=stride_s)
    codes = mg.generate_with_chroma(prompts, waves, RATE, return_tokens=True)[1]
    fr = mg.frame_rate
    total, stride = int(duration * fr), int(fr * stride_s)
    text_len = max(len(ids) for ids in mg.conditioner.tokenizer(prompts)["input_ids"])
    out, prompt, offset, window = [], None, 0, 0
    while offset + (0 if prompt is None else prompt.shape[-1]) < total:
        n = int(min(duration - offset / fr, mg.max_duration) * fr)
        start = int(offset / fr * RATE)
        looped = [torch.cat([w] * 8, dim=-1)[:, start : start + int(mg.max_duration * RATE)] for w in waves]
        mg.set_generation_params(duration=mg.max_duration, use_sampling=True, top_k=4)
        gen = generate_tokens(mg.engine(2), prompts, 0.0, mg.params, window_seed(seed, window),
                              prompt_codes=[None, None] if prompt is None else list(prompt), frames=n,
                              melodies=chroma_features(looped, RATE), text_len=text_len)
        out.append(gen if prompt is None else gen[:, :, prompt.shape[-1]:])
        prompt, offset, window = gen[:, :, stride:], offset + stride, window + 1
    assert window == 4 and codes.shape == (2, mg.cfg.num_codebooks, total)
    assert torch.equal(codes, torch.cat(out, dim=-1))


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_melody_errors(model_factory, engine_cache, tiny_engine):
    mg = load(model_factory("melody-short"), engine_cache)
    mg.set_generation_params(duration=0.1)
    good = melody(1.0, 440.0)
    cases = [
        (lambda: tiny_engine.generate_with_chroma(["a"], good, RATE), "generate_with_chroma needs a MusicGen-Melody"),
        (lambda: mg.generate_with_chroma(["a"], torch.full((1, 100), float("nan")), RATE), "NaN or infinite"),
        (lambda: mg.generate_with_chroma(["a"], torch.zeros(100), RATE), r"must have shape \[B, C, T\] or \[C, T\]"),
        (lambda: mg.generate_with_chroma(["a"], torch.zeros(1, 0), RATE), "is empty"),
        (lambda: mg.generate_with_chroma(["a"], good, 10**9), "melody_sample_rate must be an integer number of Hz"),
        (lambda: mg.generate_with_chroma(["a"], [], RATE), "melody_wavs is an empty list"),
        (lambda: mg.generate_with_chroma(["a", "b"], good, RATE), "descriptions has 2 entries but the audio has 1"),
        (lambda: mg.generate_with_chroma(["a"], [torch.stack([good, good])], RATE), r"melody_wavs\[0\] must be one waveform"),
        (lambda: mg.generate_with_chroma(["a"], good.int(), RATE), "must hold float samples"),
    ]
    for call, message in cases:
        with pytest.raises(InvalidParameter, match=message):
            call()
    engine = mg.engine(max_batch=1)
    chroma = torch.zeros(5, 12)
    chroma[:, 3] = 1
    for kw, message in [
        (dict(melody=torch.zeros(5, 7)), r"melody must have shape \[Nc, 12\]"),
        (dict(melody=chroma.long()), "melody must be a float torch.Tensor"),
        (dict(melody=chroma * float("inf")), "melody has NaN or infinite values"),
        (dict(text_len=0), r"text_len must be an integer in \[1, 256\]"),
        (dict(two_step_cfg=True, cfg_coef_beta=2.0), "two_step_cfg and cfg_coef_beta cannot be combined"),
    ]:
        with pytest.raises(InvalidParameter, match=message):
            engine.add_request("r", "a", duration=0.1, **kw)
    text_engine = tiny_engine.engine(max_batch=1)
    with pytest.raises(InvalidParameter, match="melody needs a MusicGen-Melody model"):
        text_engine.add_request("r", "a", duration=0.1, melody=chroma)
    with pytest.raises(InvalidParameter, match="text_len applies to MusicGen-Melody models only"):
        text_engine.add_request("r", "a", duration=0.1, text_len=4)


def test_cli_melody_equals_the_api_and_refuses_bad_files(model_factory, engine_cache, tmp_path):
    """`enginepy generate --melody FILE` (a 44.1 kHz stereo file: resampled) == generate_with_chroma on the same
    audio; an unreadable melody file and a text-only model are one line each, exit status 2."""
    import subprocess
    import sys

    import numpy as np
    import soundfile as sf

    from enginepy.audio_prompt import read_audio

    src = model_factory("melody-short")
    path = tmp_path / "melody.wav"
    t = np.arange(int(1.5 * 44100)) / 44100
    sf.write(path, np.stack([0.4 * np.sin(2 * np.pi * 440 * t), 0.4 * np.sin(2 * np.pi * 660 * t)], axis=1), 44100)
    env = {**os.environ, "ENGINEPY_CACHE": engine_cache}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "enginepy", "generate", *args, "--device", "cpu",
                               "--backend", "reference", "--dtype", "float32", "--quiet"],
                              capture_output=True, text=True, env=env)

    r = run("piano", "jazz", "--model", src, "--melody", str(path), "--greedy", "--duration", "0.2",
            "--out", str(tmp_path / "o.wav"), "--tokens-out", str(tmp_path / "t.npy"))
    assert r.returncode == 0, r.stderr
    mg = load(src, engine_cache)
    mg.set_generation_params(duration=0.2, use_sampling=False)
    audio, rate = read_audio(path, "--melody")
    _, codes = mg.generate_with_chroma(["piano", "jazz"], [audio, audio], rate, return_tokens=True)
    assert np.array_equal(np.load(tmp_path / "t.npy"), codes.numpy())
    _, no_melody = mg.generate_with_chroma(["piano", "jazz"], [None, None], rate, return_tokens=True)
    assert not torch.equal(codes, no_melody)  # the melody is heard

    (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
    r = run("piano", "--model", src, "--melody", str(tmp_path / "bad.wav"), "--out", str(tmp_path / "b.wav"))
    assert r.returncode == 2 and r.stderr.strip().startswith("enginepy: error: --melody ")
    assert "cannot be read as audio" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run("piano", "--model", model_factory("base"), "--melody", str(path), "--out", str(tmp_path / "c.wav"))
    assert r.returncode == 2
    assert r.stderr.strip() == ("enginepy: error: generate_with_chroma needs a MusicGen-Melody model (this one is "
                                "conditioned on text only)")
