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
    cfg_coef_beta: float | None = None
    two_step_cfg: bool = False

    @property
    def greedy(self) -> bool:
        return not self.use_sampling or self.temperature == 0.0

    @property
    def use_cfg(self) -> bool:
        """cfg_coef 1 makes the null rows irrelevant (l_u + 1·(l_c − l_u) = l_c): they are not computed (double
        CFG still needs them: u + 1·(u + β(c − u) − u) is not c)."""
        return self.cfg_coef != 1.0 or self.cfg_coef_beta is not None


def make_params(vocab_size: int, use_sampling=True, top_k=None, top_p=0.0, temperature=1.0, cfg_coef=3.0,
                seed=None, cfg_coef_beta=None, two_step_cfg=False) -> SamplingParams:
    """Validated SamplingParams (the messages of `set_generation_params`); top_k None = min(250, V).

    cfg_coef_beta (None or a number in [0, 1e6]): audiocraft's double CFG, l = u + α·(w + β·(c − w) − u) with
    α = cfg_coef, w the logits with the text dropped. two_step_cfg: cond and null rows as separate forwards with
    their own KV state; every row here already is one (rows never mix), so for text-conditioned models it is the
    batched function; for MusicGen-Melody the null forward's text is one masked zero vector (a shorter prefix)
    instead of Tt of them. Unlike audiocraft's two-step path, which uses the model's trained coefficient (3), the
    given cfg_coef applies; like it, two-step is plain CFG, so it does not combine with cfg_coef_beta."""
    if top_k is None:
        top_k = min(DEFAULT_TOP_K, vocab_size)
    check_sampling(use_sampling, top_k, top_p, temperature, cfg_coef, seed, vocab_size)
    if cfg_coef_beta is not None:
        beta = check_cfg_coef(cfg_coef_beta, "cfg_coef_beta")
        cfg_coef_beta = float(beta)
    if not isinstance(two_step_cfg, bool):
        raise InvalidParameter(f"two_step_cfg must be True or False; got {two_step_cfg!r}")
    if two_step_cfg and cfg_coef_beta is not None:
        raise InvalidParameter("two_step_cfg and cfg_coef_beta cannot be combined (two-step CFG is plain CFG over "
                               "two forwards, as in audiocraft); set one of them")
    return SamplingParams(use_sampling=use_sampling, top_k=int(top_k), top_p=float(top_p),
                          temperature=float(temperature), cfg_coef=float(cfg_coef), cfg_coef_beta=cfg_coef_beta,
                          two_step_cfg=two_step_cfg)


def check_cfg_coef(value, name: str) -> float:
    """A guidance coefficient: a finite number in [0, MAX_CFG_COEF] (the checks of cfg_coef, named `name`)."""
    try:
        check_sampling(True, 0, 0.0, 1.0, value, None)
    except InvalidParameter as e:
        raise InvalidParameter(str(e).replace("cfg_coef", name, 1)) from None
    return float(value)


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"


@dataclass
class Request:
    """One prompt to `frames` frames of codes. `step` counts the decode steps done (the delay pattern needs
    frames + max_delay of them); frame t is complete once step t + max_delay has run.

    prompt None is unconditional (one masked zero text vector). prompt_codes int64 [K, Tp] (0 < Tp < frames)
    are the first Tp frames of an audio continuation: prefilled at admission (decode steps 0 .. Tp-1, whose
    predictions are all prompt frames), so `step` starts at Tp. text: precomputed T5 output (states fp32
    [1, Tt, Dt], mask bool [1, Tt]) of `prompt`, reused instead of running T5 again (long form windows).
    Prefix-conditioned models (MusicGen-Melody): melody, one-hot chroma fp32 [1, Nc, 12] (None: no melody, the
    null chroma); text_len, the text part's length when it is padded with zero vectors beyond the prompt's
    tokens (a batch padded to its longest prompt, as transformers and audiocraft run one: the prefix attends
    to the padding, so it changes the result).
    """

    request_id: str
    prompt: str | None
    frames: int
    seed: int
    params: SamplingParams
    arrival: int  # admission order (FIFO)
    prompt_codes: torch.Tensor | None = None
    text: tuple[torch.Tensor, torch.Tensor] | None = None
    melody: torch.Tensor | None = None
    text_len: int | None = None
    text_tokens: int = 1  # positions of its T5 output before padding (counted once, when it is added)
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


def prompt_frames(request: Request) -> int:
    """Frames of audio prompt the request starts from (0 without one)."""
    return 0 if request.prompt_codes is None else int(request.prompt_codes.shape[1])


def request_text(conditioner, request: Request, text_hidden_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The request's T5 output: states fp32 [1, Tt, Dt], mask bool [1, Tt]. Unconditional requests get one zero
    vector with mask False (transformers' get_unconditional_inputs; audiocraft's None -> "" with its mask
    zeroed projects to the same zero conditioning)."""
    if request.text is not None:
        states, mask = request.text
    elif request.prompt is None:
        states, mask = (torch.zeros((1, 1, text_hidden_size), dtype=torch.float32),
                        torch.zeros((1, 1), dtype=torch.bool))
    else:
        states, mask = conditioner.encode([request.prompt])
    pad = (request.text_len or 0) - mask.shape[1]
    if pad > 0:  # zero states, masked: what a padded batch gives the shorter prompts
        states = torch.cat([states, states.new_zeros(1, pad, states.shape[2])], dim=1)
        mask = torch.cat([mask, mask.new_zeros(1, pad)], dim=1)
    return states, mask


def prefix_rows(decoder, request: Request, states: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """A prefix-conditioned request's conditioning rows, each fp32 [1, P_r, D] (decoder.project_prefix): the cond
    row [chroma ; text]; with CFG the null row [null chroma ; zeros], and with double CFG (cfg_coef_beta) before it
    the melody-only row [chroma ; zeros] — rows cond, (melody-only,) null. The null rows keep the text length,
    except with two_step_cfg, where the null row's text is one masked zero vector (audiocraft's separate null
    forward)."""
    from ..chroma import null_chroma

    dev = states.device
    chroma = (request.melody if request.melody is not None else null_chroma(1)).to(dev)
    none = null_chroma(1).to(dev)
    rows = [(chroma, states, mask)]
    if request.params.use_cfg:
        zeros, unmasked = torch.zeros_like(states), torch.zeros_like(mask)
        if request.params.two_step_cfg:
            zeros, unmasked = zeros[:, :1], unmasked[:, :1]
        if request.params.cfg_coef_beta is not None:
            rows.append((chroma, zeros, unmasked))
        rows.append((none, zeros, unmasked))
    return [decoder.project_prefix(c, s, m) for c, s, m in rows]


def request_rows(cfg, params: SamplingParams) -> int:
    """Decoder rows of one request: 1 without CFG; cond and null with it; prefix models with double CFG add the
    melody-only row (text models' text-dropped logits are the null row's)."""
    if not params.use_cfg:
        return 1
    return 3 if cfg.prefix and params.cfg_coef_beta is not None else 2


def check_prompt_codes(codes, num_codebooks: int, vocab_size: int, frames: int) -> torch.Tensor | None:
    """Audio-prompt codes int [K, Tp] with 0 <= code < V and 1 <= Tp < frames, as int64 on CPU (None passes)."""
    if codes is None:
        return None
    if not isinstance(codes, torch.Tensor):
        raise InvalidParameter(f"prompt_codes must be a torch.Tensor of int64 [{num_codebooks}, Tp]; "
                               f"got {type(codes).__name__}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise InvalidParameter(f"prompt_codes must hold integers; got {codes.dtype}")
    if codes.dim() != 2 or codes.shape[0] != num_codebooks or codes.shape[1] < 1:
        raise InvalidParameter(f"prompt_codes must have shape [{num_codebooks}, Tp] with Tp >= 1; "
                               f"got {list(codes.shape)}")
    if codes.shape[1] >= frames:
        raise InvalidParameter(f"the audio prompt ({codes.shape[1]} frames) must be shorter than the audio to "
                               f"generate ({frames} frames): the output includes the prompt")
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= vocab_size:
        raise InvalidParameter(f"prompt_codes must be in [0, {vocab_size - 1}]; got values in [{low}, {high}]")
    return codes.detach().to(device="cpu", dtype=torch.int64).contiguous()


def check_melody(melody, cfg) -> torch.Tensor | None:
    """None, or a chroma float [Nc, 12] / [1, Nc, 12] for a MusicGen-Melody model -> fp32 [1, Nc, 12] on CPU."""
    if melody is None:
        return None
    if not cfg.prefix:
        raise InvalidParameter("melody needs a MusicGen-Melody model (this one is conditioned on text only)")
    if not isinstance(melody, torch.Tensor) or not melody.is_floating_point():
        raise InvalidParameter(f"melody must be a float torch.Tensor [Nc, {cfg.num_chroma}] of chroma "
                               f"(enginepy.chroma.chroma_features); got {type(melody).__name__}")
    if melody.dim() == 3 and melody.shape[0] == 1:
        melody = melody[0]
    if melody.dim() != 2 or melody.shape[0] < 1 or melody.shape[1] != cfg.num_chroma:
        raise InvalidParameter(f"melody must have shape [Nc, {cfg.num_chroma}] with Nc >= 1; got {list(melody.shape)}")
    if not bool(torch.isfinite(melody).all()):
        raise InvalidParameter("melody has NaN or infinite values")
    return melody.detach().to(device="cpu", dtype=torch.float32)[None]


def check_text_len(text_len, cfg, max_tokens: int | None) -> int | None:
    """None, or the padded text length of a MusicGen-Melody prefix: an integer in [1, max_tokens]."""
    if text_len is None:
        return None
    if not cfg.prefix:
        raise InvalidParameter("text_len applies to MusicGen-Melody models only (a padded text is masked otherwise)")
    high = max_tokens or 512
    if isinstance(text_len, bool) or not isinstance(text_len, int) or not 1 <= text_len <= high:
        raise InvalidParameter(f"text_len must be an integer in [1, {high}]; got {text_len!r}")
    return text_len


def draw_seed() -> int:
    return secrets.randbits(62)


def request_frames(duration, frame_rate: int, max_duration: float) -> int:
    return check_duration(duration, frame_rate, max_duration)


def check_request_id(request_id) -> str:
    if not isinstance(request_id, str) or not request_id:
        raise InvalidParameter(f"request_id must be a non-empty string; got {request_id!r}")
    return request_id
