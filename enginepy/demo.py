"""The model `enginepy demo` uses: a real checkpoint when one is at hand, else a small built-in random one."""
from __future__ import annotations

import os

from .loading import default_cache_dir
from .random_model import RandomModelSpec, build_random_hf_model

REAL_MODEL = "facebook/musicgen-small"


def _local_hub_copy(repo_id: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not in the local hub cache
        return None


def demo_model(requested: str | None) -> tuple[str, str]:
    """(model path or id, a line telling the user which model this is)."""
    if requested:
        return requested, f"model: {requested}"
    local = _local_hub_copy(REAL_MODEL)
    if local:
        return local, f"model: {REAL_MODEL} (local copy)"
    path = os.path.join(default_cache_dir(), "demo-random-model")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        # Real sample rate and frame rate, so the WAV has the real format; tiny otherwise.
        build_random_hf_model(path, RandomModelSpec(hidden_size=64, num_layers=2, num_heads=4, codebook_size=64,
                                                    sampling_rate=32000, upsampling_ratios=(8, 5, 4, 4)))
    return path, (f"no real checkpoint found locally ({REAL_MODEL} is not in the hub cache and --model was not given): "
                  "using a small built-in random model; it sounds like noise")
