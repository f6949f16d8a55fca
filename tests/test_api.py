"""The public API: loading paths, output shapes, and every refusal of bad input."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from enginepy import InvalidParameter, ModelFileError, MusicGen
from enginepy.convert import convert_hf
from enginepy.generate import NonFiniteLogits


def test_wav_length_is_frames_times_hop(tiny_engine):
    mg = tiny_engine
    mg.set_generation_params(duration=0.5, seed=0)
    wav, codes = mg.generate(["jazz", "rock"], return_tokens=True)
    assert codes.shape == (2, 4, 25) and codes.dtype == torch.int64
    assert wav.shape == (2, 1, 25 * mg.cfg.hop_length) and wav.dtype == torch.float32
    assert ((codes >= 0) & (codes < mg.cfg.vocab_size)).all()
    assert wav.abs().max() > 0


def test_bare_string_is_one_prompt(tiny_engine):
    tiny_engine.set_generation_params(duration=0.1, seed=3)
    assert torch.equal(tiny_engine.generate_tokens("lo-fi beat"), tiny_engine.generate_tokens(["lo-fi beat"]))


def test_stereo_decodes_two_channels(model_factory, engine_cache):
    mg = MusicGen.from_pretrained(model_factory("stereo"), device="cpu", cache_dir=engine_cache)
    mg.set_generation_params(duration=0.2, seed=0)
    wav = mg.generate(["jazz"])
    assert wav.shape == (1, 2, 10 * mg.cfg.hop_length)
    assert not torch.equal(wav[:, 0], wav[:, 1])


def test_loads_converted_directory_and_caches_conversion(tiny_hf, tmp_path):
    convert_hf(tiny_hf, str(tmp_path / "conv"))
    a = MusicGen.from_pretrained(str(tmp_path / "conv"), device="cpu")
    cache = tmp_path / "cache"
    b = MusicGen.from_pretrained(tiny_hf, device="cpu", cache_dir=str(cache))
    (entry,) = os.listdir(cache)
    stamp = os.stat(cache / entry / "enginepy.json").st_mtime_ns
    MusicGen.from_pretrained(tiny_hf, device="cpu", cache_dir=str(cache))
    assert os.stat(cache / entry / "enginepy.json").st_mtime_ns == stamp  # reused, not converted again
    for mg in (a, b):
        mg.set_generation_params(duration=0.2, seed=9)
    assert torch.equal(a.generate_tokens(["jazz"]), b.generate_tokens(["jazz"]))


def test_low_precision_decoder_runs_close_to_fp32(tiny_hf, engine_cache):
    ref = MusicGen.from_pretrained(tiny_hf, device="cpu", dtype="float32", cache_dir=engine_cache)
    low = MusicGen.from_pretrained(tiny_hf, device="cpu", dtype="bfloat16", cache_dir=engine_cache)
    assert low.decoder.dtype == torch.bfloat16
    for mg in (ref, low):
        mg.set_generation_params(duration=0.3, use_sampling=False)
    same = (ref.generate_tokens(["jazz"]) == low.generate_tokens(["jazz"])).float().mean()
    assert same > 0.5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(duration=0), r"duration must be in \(0, 30\] seconds; got 0"),
        (dict(duration=-1.0), r"duration must be in \(0, 30\]"),
        (dict(duration=31.0), r"duration must be in \(0, 30\] seconds; got 31.0 \(raise max_duration"),
        (dict(duration=0.001), r"duration must be at least one frame \(1/50 s\)"),
        (dict(duration=float("nan")), "duration must be a finite number"),
        (dict(duration="8"), "duration must be a finite number"),
        (dict(top_k=-1), r"top_k must be an integer in \[0, 32\]; got -1"),
        (dict(top_k=33), r"top_k must be an integer in \[0, 32\]; got 33"),
        (dict(top_k=2.5), r"top_k must be an integer in \[0, 32\]"),
        (dict(top_p=-0.1), r"top_p must be in \[0, 1\]; got -0.1"),
        (dict(top_p=1.5), r"top_p must be in \[0, 1\]; got 1.5"),
        (dict(temperature=-0.5), r"temperature must be >= 0 \(0 means greedy\); got -0.5"),
        (dict(temperature=float("inf")), "temperature must be a finite number"),
        (dict(cfg_coef=-1), "cfg_coef must be >= 0; got -1"),
        (dict(use_sampling="yes"), "use_sampling must be True or False"),
        (dict(seed=-3), r"seed must be None or an integer in \[0, 2\*\*63 - 1\]; got -3"),
        (dict(seed=1.5), "seed must be None or an integer"),
    ],
)
def test_generation_params_are_validated(tiny_engine, kwargs, match):
    before = (tiny_engine.frames, tiny_engine.params)
    with pytest.raises(InvalidParameter, match=match):
        tiny_engine.set_generation_params(**kwargs)
    assert (tiny_engine.frames, tiny_engine.params) == before  # nothing half-applied


@pytest.mark.parametrize(
    "descriptions,match",
    [
        ([], "descriptions must hold at least one prompt; got an empty list"),
        (None, "descriptions must be a string or a list of strings; got NoneType"),
        (["ok", 3], r"descriptions\[1\] must be a string; got int"),
        (("ok", None), r"descriptions\[1\] must be a string; got NoneType"),
    ],
)
def test_prompts_are_validated(tiny_engine, descriptions, match):
    with pytest.raises(InvalidParameter, match=match):
        tiny_engine.generate(descriptions)


def test_seed_overflow_is_refused(tiny_engine):
    tiny_engine.set_generation_params(duration=0.1, seed=2**63 - 1)
    with pytest.raises(InvalidParameter, match=r"seed \+ number of prompts must stay below 2\*\*63"):
        tiny_engine.generate(["a", "b"])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(backend="turbo"), InvalidParameter, "backend must be one of reference, fast; got 'turbo'"),
        (dict(device="tpu"), InvalidParameter, "device must be 'cpu', 'cuda' or 'cuda:N'; got 'tpu'"),
        (dict(dtype="float64"), InvalidParameter, "dtype must be one of float32, float16, bfloat16; got 'float64'"),
        (dict(max_duration=0), InvalidParameter, "max_duration must be a positive number of seconds; got 0"),
    ],
)
def test_from_pretrained_arguments_are_validated(tiny_hf, kwargs, error, match):
    with pytest.raises(error, match=match):
        MusicGen.from_pretrained(tiny_hf, **{"device": "cpu", **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is absent")
def test_cuda_without_gpu_is_refused(tiny_hf):
    with pytest.raises(InvalidParameter, match="CUDA is not available on this machine; use device='cpu'"):
        MusicGen.from_pretrained(tiny_hf, device="cuda")


def test_missing_or_broken_model_directories(tiny_hf, tmp_path):
    with pytest.raises(ModelFileError, match="model directory .*nowhere does not exist"):
        MusicGen.from_pretrained(str(tmp_path / "nowhere"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="is not a model directory: expected enginepy.json .* or config.json"):
        MusicGen.from_pretrained(str(tmp_path / "empty"), device="cpu")
    (tmp_path / "ac").mkdir()
    (tmp_path / "ac" / "state_dict.bin").write_bytes(b"")
    with pytest.raises(ModelFileError, match="audiocraft directory"):
        MusicGen.from_pretrained(str(tmp_path / "ac"), device="cpu")
    conv = str(tmp_path / "conv")
    convert_hf(tiny_hf, conv)
    shutil.rmtree(os.path.join(conv, "codec"))
    with pytest.raises(ModelFileError, match="the codec/ directory is missing"):
        MusicGen.from_pretrained(conv, device="cpu")
    convert_hf(tiny_hf, conv)
    from safetensors.torch import load_file, save_file

    weights = load_file(os.path.join(conv, "decoder.safetensors"))
    del weights["layers.1.fc1"]
    save_file(weights, os.path.join(conv, "decoder.safetensors"))
    with pytest.raises(ModelFileError, match=r"decoder.safetensors: missing keys: layers\.1\.fc1"):
        MusicGen.from_pretrained(conv, device="cpu")


def test_non_finite_logits_are_detected(tiny_hf, engine_cache):
    mg = MusicGen.from_pretrained(tiny_hf, device="cpu", dtype="float32", cache_dir=engine_cache)
    mg.decoder.w("layers.0.fc2")[0, 0] = float("nan")
    mg.set_generation_params(duration=0.1, seed=0)
    with pytest.raises(NonFiniteLogits, match="NaN/inf logits at step 0"):
        mg.generate(["jazz"])


def test_progress_bar_is_silent_without_a_terminal(tiny_engine, capsys):
    tiny_engine.set_generation_params(duration=0.2, seed=0)
    tiny_engine.generate(["jazz"], progress=True)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_progress_callback_sees_every_step(tiny_engine):
    seen = []
    tiny_engine.set_custom_progress_callback(lambda done, total: seen.append((done, total)))
    try:
        tiny_engine.set_generation_params(duration=0.1, seed=0)
        tiny_engine.generate(["jazz"])
    finally:
        tiny_engine.set_custom_progress_callback(None)
    steps = 5 + tiny_engine.cfg.max_delay
    assert seen == [(i, steps) for i in range(1, steps + 1)]
    with pytest.raises(InvalidParameter, match="callback must be callable or None; got int"):
        tiny_engine.set_custom_progress_callback(3)


def test_default_dtype_follows_the_hardware(monkeypatch):
    """bf16 on CUDA; on CPU the measured choice (tests/test_cpu_dtypes.py), or the CPU flag without the extension."""
    import builtins

    from enginepy import loading

    assert loading.default_dtype(torch.device("cuda")) == "bfloat16"
    real_import = builtins.__import__

    def no_extension(name, *args, **kwargs):
        if name.endswith("cpu_dtype") or (args and args[2] and "cpu_dtype" in args[2]):
            raise ImportError("no extension")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_extension)
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: False)
    assert loading.default_dtype(torch.device("cpu")) == "float32"
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: True)
    assert loading.default_dtype(torch.device("cpu")) == "bfloat16"


def test_progress_bar_on_a_terminal_and_only_when_asked(tiny_engine, monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tiny_engine.set_generation_params(duration=0.1, seed=0)
    for progress, shown in ((True, True), (False, False)):
        term = Terminal()
        monkeypatch.setattr(sys, "stderr", term)
        tiny_engine.generate(["jazz"], progress=progress)
        assert ("generating" in term.getvalue() and "/8 " in term.getvalue()) == shown


def test_unreachable_hub_id_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelFileError, match="facebook/musicgen-tiny-nonexistent is not a local directory and could not "
                                             "be fetched from the hub"):
        MusicGen.from_pretrained("facebook/musicgen-tiny-nonexistent", device="cpu")
