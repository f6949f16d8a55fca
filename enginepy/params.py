"""Validation of every user-facing generation parameter: one clear message naming the parameter and its range."""
from __future__ import annotations

import math
import numbers

from .errors import InvalidParameter

MAX_SEED = 2**63 - 1


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise InvalidParameter(f"{name} must be a finite number; got {value!r}")
    return float(value)


def check_prompts(descriptions) -> list[str]:
    """A bare string is one prompt (never a list of characters); otherwise a non-empty list of strings."""
    if isinstance(descriptions, str):
        return [descriptions]
    if not isinstance(descriptions, (list, tuple)):
        raise InvalidParameter(f"descriptions must be a string or a list of strings; got {type(descriptions).__name__}")
    if not descriptions:
        raise InvalidParameter("descriptions must hold at least one prompt; got an empty list")
    for i, d in enumerate(descriptions):
        if not isinstance(d, str):
            raise InvalidParameter(f"descriptions[{i}] must be a string; got {type(d).__name__}")
    return list(descriptions)


def check_duration(duration, frame_rate: int, max_duration: float | None) -> int:
    """Seconds -> frames (int(duration * frame_rate), as audiocraft), refusing what cannot be generated."""
    d = _number("duration", duration)
    upper = f"{max_duration:g}" if max_duration is not None else "inf"
    if d <= 0 or (max_duration is not None and d > max_duration):
        raise InvalidParameter(
            f"duration must be in (0, {upper}] seconds; got {duration!r}"
            + (" (raise max_duration in from_pretrained for longer audio)" if max_duration is not None and d > max_duration else "")
        )
    frames = int(d * frame_rate)
    if frames < 1:
        raise InvalidParameter(f"duration must be at least one frame (1/{frame_rate} s); got {duration!r}")
    return frames


def check_sampling(use_sampling, top_k, top_p, temperature, cfg_coef, seed, vocab_size: int | None = None) -> None:
    """Refuse out-of-range sampling settings. top_k in [0, V], top_p in [0, 1], temperature >= 0, cfg_coef >= 0."""
    if not isinstance(use_sampling, bool):
        raise InvalidParameter(f"use_sampling must be True or False; got {use_sampling!r}")
    upper = vocab_size if vocab_size is not None else "vocabulary size"
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0 or (vocab_size is not None and top_k > vocab_size):
        raise InvalidParameter(f"top_k must be an integer in [0, {upper}]; got {top_k!r}")
    p = _number("top_p", top_p)
    if not 0.0 <= p <= 1.0:
        raise InvalidParameter(f"top_p must be in [0, 1]; got {top_p!r}")
    if _number("temperature", temperature) < 0:
        raise InvalidParameter(f"temperature must be >= 0 (0 means greedy); got {temperature!r}")
    if _number("cfg_coef", cfg_coef) < 0:
        raise InvalidParameter(f"cfg_coef must be >= 0; got {cfg_coef!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED):
        raise InvalidParameter(f"seed must be None or an integer in [0, 2**63 - 1]; got {seed!r}")
