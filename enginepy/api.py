"""The public API, shaped like audiocraft's so that its users can switch by changing an import.

    from enginepy import MusicGen
    mg = MusicGen.from_pretrained(path, device="cpu", dtype="float32")
    mg.set_generation_params(duration=8.0, top_k=250, cfg_coef=3.0, seed=0)
    wav = mg.generate(["lo-fi beat with warm piano"])          # float32 [B, C, samples] at mg.sample_rate
    wav, codes = mg.generate(prompts, return_tokens=True)     # codes int64 [B, K, frames]
"""
from __future__ import annotations

import secrets

import torch

from . import ops
from .convert import dtype_name, parse_dtype
from .errors import InvalidParameter
from .fast import FastDecoder
from .generate import SamplingParams, generate_codes
from .loading import default_dtype, load_components, parse_device, resolve_model_dir
from .params import check_duration, check_prompts, check_sampling

BACKENDS = ("reference", "fast")
DEFAULT_TOP_K = 250


class MusicGen:
    """A loaded MusicGen model. Use `MusicGen.from_pretrained`."""

    def __init__(self, cfg, decoder, conditioner, codec, device: torch.device, backend: str, max_duration: float,
                 fast: FastDecoder | None = None):
        self.cfg = cfg
        self.decoder = decoder
        self.conditioner = conditioner
        self.codec = codec
        self.device = device
        self.backend = backend
        self.max_duration = max_duration
        self.fast = fast
        self._progress_callback = None
        self.set_generation_params(duration=min(15.0, max_duration))

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        backend: str = "reference",
        max_duration: float = 30.0,
        cache_dir: str | None = None,
        max_batch: int = 8,
        max_text_len: int = 256,
    ) -> "MusicGen":
        """Load a converted enginepy directory, a Hugging Face MusicGen directory (converted once into
        `cache_dir`, default $ENGINEPY_CACHE or ~/.cache/enginepy) or a hub id (when the hub is reachable).

        device: 'cpu' | 'cuda' | 'cuda:N' (default: cuda when available); dtype of the decoder:
        'float32' | 'float16' | 'bfloat16' (default bfloat16 on CUDA and on CPUs with native bf16, else
        float32; use float32 for token-exact parity with transformers' fp32 model); backend: 'reference'
        (plain PyTorch, any device) or 'fast' (Triton + C++ + CUDA graphs; on CPU only under TRITON_INTERPRET=1);
        max_duration: the longest audio (seconds) a call may ask for. The fast backend sizes its static buffers
        and KV cache for max_batch prompts of max_duration seconds with prompts of up to max_text_len tokens.
        """
        if backend not in BACKENDS:
            raise InvalidParameter(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        dev = parse_device(device)
        torch_dtype = parse_dtype(dtype if dtype is not None else default_dtype(dev))
        if isinstance(max_duration, bool) or not isinstance(max_duration, (int, float)) or not 0 < max_duration < float("inf"):
            raise InvalidParameter(f"max_duration must be a positive number of seconds; got {max_duration!r}")
        for name, value in (("max_batch", max_batch), ("max_text_len", max_text_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameter(f"{name} must be a positive integer; got {value!r}")
        if backend == "fast" and not ops.triton_usable(dev):
            raise InvalidParameter(
                "backend 'fast' needs a CUDA device, or TRITON_INTERPRET=1 exported before import to run its "
                "Triton kernels on CPU (slow: for tests); use backend='reference' on CPU"
            )
        directory = resolve_model_dir(path, dtype_name(torch_dtype), cache_dir)
        cfg, decoder, conditioner, codec = load_components(directory, torch_dtype, dev)
        fast = None
        if backend == "fast":
            fast = FastDecoder(decoder, max_batch, int(max_duration * cfg.frame_rate), max_text_len=max_text_len)
        return cls(cfg, decoder, conditioner, codec, dev, backend, float(max_duration), fast)

    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    @property
    def frame_rate(self) -> int:
        return self.cfg.frame_rate

    @property
    def audio_channels(self) -> int:
        return self.cfg.audio_channels

    def set_generation_params(
        self,
        duration: float = 30.0,
        use_sampling: bool = True,
        top_k: int | None = None,
        top_p: float = 0.0,
        temperature: float = 1.0,
        cfg_coef: float = 3.0,
        seed: int | None = None,
    ) -> None:
        """Settings for the next `generate` calls (audiocraft's defaults). Row i of a call uses seed + i;
        seed None draws a fresh random seed per call. Greedy when use_sampling is False or temperature is 0.
        top_k None means audiocraft's 250 (or the whole vocabulary when it is smaller than that)."""
        if top_k is None:
            top_k = min(DEFAULT_TOP_K, self.cfg.vocab_size)
        frames = check_duration(duration, self.frame_rate, self.max_duration)
        check_sampling(use_sampling, top_k, top_p, temperature, cfg_coef, seed, self.cfg.vocab_size)
        self.duration = float(duration)
        self.frames = frames
        self.seed = seed
        self.params = SamplingParams(
            use_sampling=use_sampling, top_k=int(top_k), top_p=float(top_p),
            temperature=float(temperature), cfg_coef=float(cfg_coef),
        )

    def set_custom_progress_callback(self, callback=None) -> None:
        """callback(generated_steps, total_steps), called after every decode step (None to remove)."""
        if callback is not None and not callable(callback):
            raise InvalidParameter(f"callback must be callable or None; got {type(callback).__name__}")
        self._progress_callback = callback

    def generate_tokens(self, descriptions, progress: bool = False) -> torch.Tensor:
        """Prompts -> codes int64 [B, K, frames] (natural layout, on CPU)."""
        prompts = check_prompts(descriptions)
        seed = self.seed if self.seed is not None else secrets.randbits(62)
        if seed + len(prompts) - 1 > 2**63 - 1:
            raise InvalidParameter(f"seed + number of prompts must stay below 2**63; got seed {seed}")
        seeds = torch.arange(len(prompts), dtype=torch.int64) + seed
        states, mask = self.conditioner.encode(prompts)
        cond = self.decoder.project_text(states, mask)
        if self.fast is not None:
            codes = self.fast.generate(cond, mask, self.frames, self.params, seeds, progress=progress,
                                       on_step=self._progress_callback)
        else:
            codes = generate_codes(self.decoder, cond, mask, self.frames, self.params, seeds, progress=progress,
                                   on_step=self._progress_callback)
        return codes.cpu()

    def generate_audio(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int64 [B, K, T] -> float32 [B, C, T * hop_length] on CPU."""
        return self.codec.decode(codes).cpu()

    def generate(self, descriptions, progress: bool = False, return_tokens: bool = False):
        """Prompts (a list of strings, or one string) -> waveform float32 [B, C, samples]; with
        return_tokens=True, (waveform, codes int64 [B, K, frames])."""
        codes = self.generate_tokens(descriptions, progress=progress)
        wav = self.generate_audio(codes)
        return (wav, codes) if return_tokens else wav
