"""The packed CPU decoder through the public API: dtype='int8' and bf16 on the CPU, against the fp32 oracle."""
from __future__ import annotations

import pytest
import torch

from enginepy import InvalidParameter, MusicGen
from enginepy import loading


@pytest.mark.parametrize("dtype,floor", [("bfloat16", 0.5), ("int8", 0.5)])
def test_packed_cpu_decoder_agrees_with_fp32(tiny_hf, engine_cache, dtype, floor):
    ref = MusicGen.from_pretrained(tiny_hf, device="cpu", dtype="float32", cache_dir=engine_cache)
    low = MusicGen.from_pretrained(tiny_hf, device="cpu", dtype=dtype, cache_dir=engine_cache)
    assert low.decoder.linear_impl is not None  # the matmuls go through enginepy.cpu_linear
    for mg in (ref, low):
        mg.set_generation_params(duration=0.3, use_sampling=False)
    a, b = ref.generate_tokens(["jazz"]), low.generate_tokens(["jazz"])
    agreement = (a == b).float().mean().item()
    print(f"{dtype}: greedy agreement with fp32 {agreement:.3f}")
    assert agreement > floor


def test_int8_is_refused_off_the_cpu_reference_path(tiny_hf, engine_cache):
    with pytest.raises(InvalidParameter, match="dtype 'int8' .* needs device='cpu' and backend='reference'"):
        MusicGen.from_pretrained(tiny_hf, device="cpu", dtype="int8", backend="fast", cache_dir=engine_cache)


def test_cpu_default_dtype_is_measured_and_never_slower_than_fp32(monkeypatch):
    from enginepy import cpu_dtype

    monkeypatch.setattr(cpu_dtype, "choose_cpu_dtype", lambda *a, **k: "float32")
    assert loading.default_dtype(torch.device("cpu")) == "float32"
    monkeypatch.setattr(cpu_dtype, "choose_cpu_dtype", lambda *a, **k: "bfloat16")
    assert loading.default_dtype(torch.device("cpu")) == "bfloat16"
    assert cpu_dtype.decide({"float32": {2: 100.0, 16: 300.0}, "bfloat16": {2: 95.0, 16: 290.0}}) == "float32"
