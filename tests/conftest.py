"""Shared fixtures: tiny random MusicGen models built with transformers' own classes, and marker skips."""
from __future__ import annotations

import os

import pytest
import torch

from enginepy.random_model import RandomModelSpec, build_random_hf_model

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_triton = pytest.mark.skip(reason="needs CUDA or TRITON_INTERPRET=1 exported before import")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "triton" in item.keywords and not (HAS_CUDA or INTERPRET):
            item.add_marker(skip_triton)


# Shapes the parity tests sweep: odd head counts and head dims, 2..8 codebooks, vocabularies other than 2048.
SPECS = {
    "base": RandomModelSpec(),
    "odd-heads": RandomModelSpec(hidden_size=35, num_heads=5, num_layers=3, num_codebooks=2, codebook_size=16, seed=1),
    "k8-v64": RandomModelSpec(hidden_size=32, num_heads=4, num_layers=1, num_codebooks=8, codebook_size=64, seed=2),
    "k3-wide-text": RandomModelSpec(hidden_size=48, num_heads=6, num_layers=2, num_codebooks=3, codebook_size=128,
                                    text_hidden_size=24, text_heads=3, seed=3),
    # T5 as wide as the decoder: transformers then has no enc_to_dec_proj (identity).
    "same-width": RandomModelSpec(hidden_size=16, num_heads=4, num_layers=2, num_codebooks=4, seed=5),
    "stereo": RandomModelSpec(hidden_size=24, num_heads=2, num_layers=2, num_codebooks=4, audio_channels=2, seed=4),
    # Wide enough (D = 256, V = 256) for the order and precision of sums to show in bf16 errors.
    "wide": RandomModelSpec(hidden_size=256, num_heads=4, num_layers=2, num_codebooks=4, codebook_size=256, seed=6),
    # MusicGen-Melody: [chroma ; text] prefix, no cross-attention (the released chroma_length, and a short one
    # that keeps the fast backend's interpreted steps quick).
    "melody": RandomModelSpec(melody=True, seed=7),
    "melody-stereo": RandomModelSpec(melody=True, audio_channels=2, hidden_size=32, num_heads=4, seed=8),
    "melody-short": RandomModelSpec(melody=True, chroma_length=12, seed=9),
}


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """name -> path of a Hugging Face MusicGen directory for SPECS[name], built once per session."""
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = build_random_hf_model(str(tmp_path_factory.mktemp(f"hf-{name}")), SPECS[name])
        return built[name]

    return get


@pytest.fixture(scope="session")
def tiny_hf(model_factory) -> str:
    return model_factory("base")


@pytest.fixture(scope="session")
def engine_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("engine-cache"))


@pytest.fixture(scope="session")
def tiny_engine(tiny_hf, engine_cache):
    from enginepy import MusicGen

    return MusicGen.from_pretrained(tiny_hf, device="cpu", dtype="float32", cache_dir=engine_cache)
