"""The command line end to end: convert + generate --tokens-out gives transformers' greedy codes; bad input exits 2."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from enginepy.cli import main
from enginepy.random_model import RandomModelSpec, build_random_hf_model
from hf_reference import hf_generate_codes

PROMPTS = ["slow ambient strings", "fast drums", "warm piano with soft bass and rain at night"]


def _run(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "enginepy", *args], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("seed", [11, 12])
def test_convert_then_generate_matches_transformers_on_unseen_configs(tmp_path, seed):
    """Fresh random shapes, through the real CLI in a subprocess, for one prompt and for a padded batch."""
    rng = np.random.default_rng(seed)
    heads = int(rng.integers(1, 6))
    spec = RandomModelSpec(hidden_size=heads * int(rng.integers(4, 10)), num_heads=heads,
                           num_layers=int(rng.integers(1, 4)), num_codebooks=int(rng.integers(2, 9)),
                           codebook_size=int(2 ** rng.integers(4, 8)), seed=seed)
    src = build_random_hf_model(str(tmp_path / "hf"), spec)
    dst = str(tmp_path / "conv")
    assert _run("convert", src, dst, "--dtype", "float32").returncode == 0
    for prompts in (PROMPTS[:1], PROMPTS):
        out, tokens = str(tmp_path / "out.wav"), str(tmp_path / "codes.npy")
        r = _run("generate", *prompts, "--model", dst, "--greedy", "--backend", "reference", "--device", "cpu",
                 "--dtype", "float32", "--duration", "0.3", "--out", out, "--tokens-out", tokens)
        assert r.returncode == 0, r.stderr
        codes = torch.from_numpy(np.load(tokens))
        ref, ref_wav = hf_generate_codes(src, prompts, 15, guidance_scale=3.0, do_sample=False)
        assert codes.dtype == torch.int64 and torch.equal(codes, ref)
        paths = [out] if len(prompts) == 1 else [str(tmp_path / f"out-{i}.wav") for i in range(len(prompts))]
        for i, path in enumerate(paths):
            audio, rate = sf.read(path, dtype="float32", always_2d=True)
            assert rate == 800 and audio.shape == (15 * 16, 1)
            np.testing.assert_allclose(audio[:, 0], ref_wav[i, 0].clamp(-1, 1).numpy(), atol=1 / 2**14)


def test_generate_in_process_writes_outputs_and_leaves_no_temp_files(tiny_hf, tmp_path, capsys):
    out = str(tmp_path / "a" / "song.wav")
    code = main(["generate", "jazz", "--model", tiny_hf, "--device", "cpu", "--duration", "0.2", "--seed", "4",
                 "--top-k", "5", "--out", out, "--tokens-out", str(tmp_path / "t.npy"), "--quiet"])
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "a")) == ["song.wav"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask
    assert np.load(tmp_path / "t.npy").shape == (1, 4, 10)


def test_convert_errors_exit_2(tmp_path):
    r = _run("convert", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.strip() == f"enginepy: error: model directory {tmp_path / 'missing'} does not exist"
    r = _run("convert", str(tmp_path), str(tmp_path / "out"), "--dtype", "fp8")
    assert r.returncode == 2 and "--dtype must be one of float32, float16, bfloat16; got 'fp8'" in r.stderr


def test_demo_writes_a_wav_and_says_it_is_random(tmp_path):
    r = _run("demo", "--out", str(tmp_path / "demo.wav"), "--duration", "0.5",
             env_extra={"ENGINEPY_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 0, r.stderr
    assert "built-in random model" in r.stdout and "noise" in r.stdout
    audio, rate = sf.read(tmp_path / "demo.wav")
    assert rate == 32000 and audio.shape == (16000,)
