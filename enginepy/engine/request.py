"""Requests of the step engine: their settings, their state between steps, and what a step reports."""
from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field

import torch

from ..errors import EnginepyError, InvalidParameter
from ..params import check_duration, check_sampling

DEFAULT_TOP_K = 250


class NonFiniteLogits(EnginepyError, RuntimeError):
    """The decoder produced NaN or inf logits; sampling them would give garbage."""


class EngineFull(EnginepyError, RuntimeError):
    """The engine's waiting queue is full; retry later (a server answers 503)."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings (audiocraft's names and defaults). Greedy when use_sampling is False or
    temperature is 0; top_p > 0 means nucleus sampling, else top_k > 0 keeps the k most likely tokens."""

    use_sampling: bool = True
    top_k: int = DEFAULT_TOP_K
    top_p: float = 0.0
    temperature: float = 1.0
    cfg_coef: float = 3.0

    @property
    def greedy(self) -> bool:
        return not self.use_sampling or self.temperature == 0.0

    @property
    def use_cfg(self) -> bool:
        """cfg_coef 1 makes the null rows irrelevant (l_u + 1·(l_c − l_u) = l_c): they are not computed."""
        return self.cfg_coef != 1.0


def make_params(vocab_size: int, use_sampling=True, top_k=None, top_p=0.0, temperature=1.0, cfg_coef=3.0,
                seed=None) -> SamplingParams:
    """Validated SamplingParams (the messages of `set_generation_params`); top_k None = min(250, V)."""
    if top_k is None:
        top_k = min(DEFAULT_TOP_K, vocab_size)
    check_sampling(use_sampling, top_k, top_p, temperature, cfg_coef, seed, vocab_size)
    return SamplingParams(use_sampling=use_sampling, top_k=int(top_k), top_p=float(top_p),
                          temperature=float(temperature), cfg_coef=float(cfg_coef))


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"


@dataclass
class Request:
    """One prompt to `frames` frames of codes. `step` counts the decode steps done (the delay pattern needs
    frames + max_delay of them); frame t is complete once step t + max_delay has run."""

    request_id: str
    prompt: str
    frames: int
    seed: int
    params: SamplingParams
    arrival: int  # admission order (FIFO)
    state: RequestState = RequestState.WAITING
    slot: int = -1
    step: int = 0
    frames_out: int = 0  # frames already reported in RequestOutput.new_frames
    chunks: list = field(default_factory=list)  # completed frames, int64 [K, n] each, in order
    closed: bool = False  # its audio stream was flushed


@dataclass
class RequestOutput:
    """What one engine step reports for a request.

    new_frames: int64 [K, n] codes of the frames completed since the last output (n may be 0);
    finished: True once the request is done (or failed: then `error` says why);
    codes: on finish, int64 [K, frames] — exactly `mg.generate_tokens([prompt])[0]` for the same seed and settings;
    new_audio: float32 [C, samples] of decoded audio when the engine streams audio, else None.
    """

    request_id: str
    finished: bool
    new_frames: torch.Tensor
    codes: torch.Tensor | None = None
    new_audio: torch.Tensor | None = None
    error: Exception | None = None
    seed: int | None = None


def draw_seed() -> int:
    return secrets.randbits(62)


def request_frames(duration, frame_rate: int, max_duration: float) -> int:
    return check_duration(duration, frame_rate, max_duration)


def check_request_id(request_id) -> str:
    if not isinstance(request_id, str) or not request_id:
        raise InvalidParameter(f"request_id must be a non-empty string; got {request_id!r}")
    return request_id
