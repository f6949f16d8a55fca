"""pytest-benchmark suite over the same cases as `enginepy bench` (run: pytest benchmarks/test_bench_engine.py).

ENGINEPY_BENCH_MODEL picks the model (tiny | small | medium | large | a directory; default tiny),
ENGINEPY_BENCH_DURATION the seconds of audio (default 0.5).
"""
from __future__ import annotations

import os

import pytest
import torch

from enginepy import MusicGen, ops
from enginepy.bench import PROMPT, bench_model_dir

MODEL = os.environ.get("ENGINEPY_BENCH_MODEL", "tiny")
DURATION = float(os.environ.get("ENGINEPY_BENCH_DURATION", "0.5"))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["reference"] + (["fast"] if ops.triton_usable(DEVICE) else [])


@pytest.fixture(scope="module")
def model_dir():
    return bench_model_dir(MODEL)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_render(benchmark, model_dir, backend, batch):
    mg = MusicGen.from_pretrained(model_dir, device=DEVICE, backend=backend, max_batch=batch, max_duration=max(DURATION, 1))
    mg.set_generation_params(duration=DURATION, seed=0)
    prompts = [PROMPT] * batch
    mg.generate(prompts)  # warm-up (compilation, graph capture)

    def render():
        wav = mg.generate(prompts)
        _sync()
        return wav

    wav = benchmark.pedantic(render, rounds=3, iterations=1)
    benchmark.extra_info.update(device=str(DEVICE), model=MODEL, frames=mg.frames, dtype=str(mg.decoder.dtype))
    assert wav.shape[0] == batch


@pytest.mark.parametrize("batch", [1, 4])
def test_render_transformers(benchmark, model_dir, batch):
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration

    model = MusicgenForConditionalGeneration.from_pretrained(model_dir).to(DEVICE).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = tokenizer([PROMPT] * batch, return_tensors="pt").to(DEVICE)
    frames = int(DURATION * model.config.audio_encoder.frame_rate)
    kwargs = dict(do_sample=True, top_k=min(250, model.decoder.config.vocab_size), guidance_scale=3.0,
                  max_new_tokens=frames + model.decoder.config.num_codebooks - 1)

    def render():
        with torch.no_grad():
            wav = model.generate(**inputs, **kwargs)
        _sync()
        return wav

    render()
    wav = benchmark.pedantic(render, rounds=3, iterations=1)
    benchmark.extra_info.update(device=str(DEVICE), model=MODEL, frames=frames)
    assert wav.shape[0] == batch
