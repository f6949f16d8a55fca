"""Validation of every user-facing generation parameter: one clear message naming the parameter and its range."""
from __future__ import annotations

import math
import numbers

from .errors import InvalidParameter

MAX_SEED = 2**63 - 1
# Sampling computes softmax((l - max l) / temperature) in fp32, where exp() is exactly 0 below about -103:
# at temperature 1e-4 every token more than 0.01 below the best logit already has probability 0, so smaller
# temperatures only add fp32 trouble (1 / T is inf below ~3e-39, l / T overflows for large logits) and no
# musical difference. They are refused, pointing to 0 (greedy), rather than silently turned into greedy.
MIN_TEMPERATURE = 1e-4
# Beyond this the guided logits l_u + cfg·(l_c − l_u) are the scaled difference to within fp32 rounding, and
# larger values only risk overflow: with cfg <= 1e6 and temperature >= 1e-4, logits up to 1e28 stay finite.
MAX_CFG_COEF = 1e6


def _number(name: str, value) -> float:
    """A finite real (not a bool) as a float; Python ints too large for a float are refused, not an OverflowError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidParameter(f"{name} must be a finite number; got {_short(value)}")
    try:
        x = float(value)
    except (OverflowError, ValueError):
        x = math.inf
    if not math.isfinite(x):
        raise InvalidParameter(f"{name} must be a finite number; got {_short(value)}")
    return x


def _short(value) -> str:
    """repr() of a value, shortened when huge (a 400-digit integer makes an unreadable error line)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


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
            f"duration must be in (0, {upper}] seconds; got {_short(duration)}"
            + (" (raise max_duration in from_pretrained for longer audio)" if max_duration is not None and d > max_duration else "")
        )
    frames = int(d * frame_rate)
    if frames < 1:
        raise InvalidParameter(f"duration must be at least one frame (1/{frame_rate} s); got {_short(duration)}")
    return frames


def check_sampling(use_sampling, top_k, top_p, temperature, cfg_coef, seed, vocab_size: int | None = None) -> None:
    """Refuse out-of-range sampling settings: top_k in [0, V], top_p in [0, 1], temperature 0 or in
    [MIN_TEMPERATURE, inf), cfg_coef in [0, MAX_CFG_COEF], seed None or in [0, 2**63 - 1]."""
    if not isinstance(use_sampling, bool):
        raise InvalidParameter(f"use_sampling must be True or False; got {_short(use_sampling)}")
    upper = vocab_size if vocab_size is not None else "vocabulary size"
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0 or (vocab_size is not None and top_k > vocab_size):
        raise InvalidParameter(f"top_k must be an integer in [0, {upper}]; got {_short(top_k)}")
    p = _number("top_p", top_p)
    if not 0.0 <= p <= 1.0:
        raise InvalidParameter(f"top_p must be in [0, 1]; got {_short(top_p)}")
    t = _number("temperature", temperature)
    if t < 0:
        raise InvalidParameter(f"temperature must be >= 0 (0 means greedy); got {_short(temperature)}")
    if 0 < t < MIN_TEMPERATURE:
        raise InvalidParameter(
            f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}; got {_short(temperature)} (below "
            f"{MIN_TEMPERATURE:g} sampling is already greedy in fp32 and logits / temperature can overflow: use 0)"
        )
    c = _number("cfg_coef", cfg_coef)
    if c < 0:
        raise InvalidParameter(f"cfg_coef must be >= 0; got {_short(cfg_coef)}")
    if c > MAX_CFG_COEF:
        raise InvalidParameter(
            f"cfg_coef must be at most {MAX_CFG_COEF:g}; got {_short(cfg_coef)} (larger values overflow fp32 logits; "
            "audiocraft's default is 3)"
        )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED):
        raise InvalidParameter(f"seed must be None or an integer in [0, 2**63 - 1]; got {_short(seed)}")
