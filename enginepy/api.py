"""The public API, shaped like audiocraft's so that its users can switch by changing an import.

    from enginepy import MusicGen
    mg = MusicGen.from_pretrained(path, device="cpu", dtype="float32")
    mg.set_generation_params(duration=8.0, top_k=250, cfg_coef=3.0, seed=0)
    wav = mg.generate(["lo-fi beat with warm piano"])          # float32 [B, C, samples] at mg.sample_rate
    wav, codes = mg.generate(prompts, return_tokens=True)     # codes int64 [B, K, frames]
"""
from __future__ import annotations

import secrets
import threading

import torch

from . import ops
from .conditioning import check_max_text_len
from .convert import dtype_name, parse_dtype
from .errors import InvalidParameter
from .engine import Engine, ReferenceRunner
from .engine.fast import FastRunner
from .engine.request import make_params
from .codec_stream import StreamingDecoder
from .generate import StepReporter, generate_tokens
from .precision import fp32_matmul_exact
from .loading import default_dtype, load_components, parse_device, resolve_model_dir
from .params import check_duration, check_prompts
from .audio_prompt import check_optional_prompts, check_sample_rate, check_waveforms, convert_audio, encode_audio
from .longform import check_extend_stride, generate_windows, melody_window, window_plan

BACKENDS = ("reference", "fast")


def default_backend(device: torch.device) -> str:
    """'fast' on CUDA (the reference backend is the oracle, slower than transformers there), else 'reference'."""
    return "fast" if device.type == "cuda" else "reference"


def _cpu_packing(dtype, device: torch.device, backend: str) -> str | None:
    """'bf16' | 'int8' when the decoder's matmuls run through the packed CPU matmul (enginepy.cpu_linear): bf16
    and int8 weights on the CPU with the reference backend; None otherwise. dtype 'int8' exists only there."""
    if dtype == "int8":
        if device.type != "cpu" or backend != "reference":
            raise InvalidParameter(f"dtype 'int8' (int8 weight-only decoder) needs device='cpu' and backend='reference'; "
                                   f"got device {str(device)!r}, backend {backend!r}")
        return "int8"
    if device.type == "cpu" and backend == "reference" and dtype in ("bfloat16", torch.bfloat16):
        try:
            from . import cpu_linear  # noqa: F401  (needs the C++ extension)
        except ImportError:
            return None
        return "bf16"
    return None


class MusicGen:
    """A loaded MusicGen model. Use `MusicGen.from_pretrained`."""

    def __init__(self, cfg, decoder, conditioner, codec, device: torch.device, backend: str, max_duration: float,
                 max_batch: int = 8, max_text_len: int = 256):
        self.cfg = cfg
        self.decoder = decoder
        self.conditioner = conditioner
        self.codec = codec
        self.device = device
        self.backend = backend
        self.max_duration = max_duration
        self.max_batch = max_batch
        self.max_text_len = max_text_len
        self._progress_callback = None
        self._lock = threading.Lock()
        # The fast backend's engine owns static buffers and CUDA graphs: built once, reused by every generate call.
        self._engine = self.engine(max_batch) if backend == "fast" else None
        self.set_generation_params(duration=min(15.0, max_duration))

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        backend: str | None = None,
        max_duration: float = 30.0,
        cache_dir: str | None = None,
        max_batch: int = 8,
        max_text_len: int = 256,
    ) -> "MusicGen":
        """Load a converted enginepy directory, a Hugging Face MusicGen directory (converted once into
        `cache_dir`, default $ENGINEPY_CACHE or ~/.cache/enginepy) or a hub id (when the hub is reachable).

        device: 'cpu' | 'cuda' | 'cuda:N' (default: cuda when available); dtype of the decoder:
        'float32' | 'float16' | 'bfloat16' (default bfloat16 on CUDA and on CPUs with native bf16, else
        float32; use float32 for token-exact parity with transformers' fp32 model); backend: 'fast' (Triton +
        C++ + CUDA graphs; the default on CUDA; on CPU only under TRITON_INTERPRET=1) or 'reference' (plain
        PyTorch, any device; the default elsewhere); max_duration: the longest audio (seconds) a request may ask
        for; max_batch: requests decoded together by `generate` (more prompts queue and join as others finish;
        the fast backend sizes its static buffers and KV cache for it); max_text_len: the longest prompt in T5
        tokens (both backends refuse longer prompts before encoding them).
        """
        dev = parse_device(device)
        if backend is None:
            backend = default_backend(dev)
        if backend not in BACKENDS:
            raise InvalidParameter(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        if dtype is None:
            dtype = default_dtype(dev)
        packed = _cpu_packing(dtype, dev, backend)
        # int8 is a packing of the fp32 weights (the most faithful per-channel scales); activations stay fp32.
        torch_dtype = torch.float32 if packed == "int8" else parse_dtype(dtype)
        if isinstance(max_duration, bool) or not isinstance(max_duration, (int, float)) or not 0 < max_duration < float("inf"):
            raise InvalidParameter(f"max_duration must be a positive number of seconds; got {max_duration!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InvalidParameter(f"max_batch must be a positive integer; got {max_batch!r}")
        check_max_text_len(max_text_len)
        if backend == "fast" and not ops.triton_usable(dev):
            raise InvalidParameter(
                "backend 'fast' needs a CUDA device, or TRITON_INTERPRET=1 exported before import to run its "
                "Triton kernels on CPU (slow: for tests); use backend='reference' on CPU"
            )
        directory = resolve_model_dir(path, dtype_name(torch_dtype), cache_dir)
        cfg, decoder, conditioner, codec = load_components(directory, torch_dtype, dev, max_text_len)
        if packed is not None:
            from .cpu_linear import pack_for_cpu

            pack_for_cpu(decoder, packed)
        return cls(cfg, decoder, conditioner, codec, dev, backend, float(max_duration), max_batch, max_text_len)

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
        extend_stride: float | None = None,
        cfg_coef_beta: float | None = None,
        two_step_cfg: bool = False,
    ) -> None:
        """Settings for the next `generate` calls (audiocraft's defaults). Row i of a call uses seed + i;
        seed None draws a fresh random seed per call. Greedy when use_sampling is False or temperature is 0.
        top_k None means audiocraft's 250 (or the whole vocabulary when it is smaller than that).
        extend_stride (seconds, audiocraft uses 18): with it, a duration above max_duration is generated in
        windows of max_duration seconds, each next one starting extend_stride seconds later from the previous
        one's tail (audiocraft's long form, see longform.py); without it (None) such a duration is refused.
        cfg_coef_beta: double CFG (None: off); two_step_cfg: see engine.request.make_params."""
        frames = check_duration(duration, self.frame_rate, None if extend_stride is not None else self.max_duration)
        if extend_stride is not None and duration > self.max_duration:
            extend_stride = check_extend_stride(extend_stride, self.max_duration, self.frame_rate)
        self.params = make_params(self.cfg.vocab_size, use_sampling, top_k, top_p, temperature, cfg_coef, seed,
                                  cfg_coef_beta, two_step_cfg)
        self.extend_stride = extend_stride
        self.duration = float(duration)
        self.frames = frames
        self.seed = seed

    def set_custom_progress_callback(self, callback=None) -> None:
        """callback(generated_steps, total_steps), called after every decode step (None to remove)."""
        if callback is not None and not callable(callback):
            raise InvalidParameter(f"callback must be callable or None; got {type(callback).__name__}")
        self._progress_callback = callback

    def generate_tokens(self, descriptions, progress: bool = False) -> torch.Tensor:
        """Prompts -> codes int64 [B, K, frames] (natural layout, on CPU). Prompt i uses seed + i."""
        return self._generate_codes(check_prompts(descriptions), None, progress)

    def _generate_codes(self, prompts: list[str | None], prompt_codes: list[torch.Tensor] | None,
                        progress: bool, melody_waves: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """prompts (None: unconditional) and optional audio-prompt codes [K, Tp] per row -> codes int64
        [B, K, frames] on CPU, in windows when the duration exceeds max_duration (T5 runs once per prompt).
        melody_waves (MusicGen-Melody): per row a waveform [C, T] at the chroma's rate, or None; in long form each
        window conditions on the melody looped from the window's start (audiocraft). A melody model's text
        prefixes are padded to the call's longest prompt, as one padded batch of transformers or audiocraft is."""
        texts = [p for p in prompts if p is not None]
        text_len = None
        if texts:  # before any work, naming descriptions[i]
            lengths = self.conditioner.check_lengths(
                texts, [f"descriptions[{i}]" for i, p in enumerate(prompts) if p is not None])
            text_len = max(lengths) if self.cfg.prefix else None
        seed = self.seed if self.seed is not None else secrets.randbits(62)
        if seed + len(prompts) - 1 > 2**63 - 1:
            raise InvalidParameter(f"seed + number of prompts must stay below 2**63; got seed {seed}")
        tp = 0 if prompt_codes is None else prompt_codes[0].shape[-1]
        plan = window_plan(self.duration, self.max_duration, self.extend_stride, self.frame_rate, tp)
        melodies = None
        if melody_waves is not None and len(plan) == 1:
            melodies = self._chroma_of(melody_waves)
        with self._lock, fp32_matmul_exact(self.decoder.dtype):
            engine = self._engine if self._engine is not None else self.engine(min(len(prompts), self.max_batch))
            states = None
            if len(plan) > 1:  # every window reuses one T5 run per prompt
                states = [None if p is None else self.conditioner.encode_one(p, f"descriptions[{i}]")
                          for i, p in enumerate(prompts)]

            def run_window(codes, frames, window_seed, window):
                chroma = melodies
                if melody_waves is not None and len(plan) > 1:
                    chroma = self._chroma_of([None if w is None else melody_window(
                        w, window, stride, self.frame_rate, self.cfg.chroma["sampling_rate"], self.max_duration)
                        for w in melody_waves])
                return generate_tokens(engine, prompts, self.duration, self.params, window_seed, progress=progress,
                                       on_step=self._progress_callback, prompt_codes=codes, frames=frames,
                                       texts=states, melodies=chroma, text_len=text_len)

            stride = int(self.frame_rate * self.extend_stride) if len(plan) > 1 else 0
            return generate_windows(run_window, plan, stride, prompt_codes or [None] * len(prompts), seed)

    def generate_unconditional(self, num_samples: int, progress: bool = False, return_tokens: bool = False):
        """num_samples pieces with no condition (transformers' get_unconditional_inputs: one masked zero text
        vector; guidance is moot, so only the conditional rows run) -> float32 [B, C, samples] (and codes)."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise InvalidParameter(f"num_samples must be a positive integer; got {num_samples!r}")
        codes = self._generate_codes([None] * num_samples, None, progress)
        wav = self.generate_audio(codes)
        return (wav, codes) if return_tokens else wav

    def generate_continuation(self, prompt, prompt_sample_rate: int, descriptions=None, progress: bool = False,
                              return_tokens: bool = False, melody_wavs=None, melody_sample_rate: int | None = None):
        """Continue audio prompts: prompt float [B, C, T] or [C, T] at prompt_sample_rate (converted to the
        model's rate and channels, then EnCodec-encoded); descriptions: None (unconditional) or B entries, each a
        string or None. The output starts with the prompt's codes, which count toward the duration ->
        float32 [B, C, samples] (and codes int64 [B, K, frames]). MusicGen-Melody models also take melody_wavs
        and melody_sample_rate as generate_with_chroma does (default: no melody)."""
        wav = check_waveforms(prompt, "prompt")
        rate = check_sample_rate(prompt_sample_rate, "prompt_sample_rate")
        waves = None
        if melody_wavs is not None:
            if not self.cfg.prefix:
                raise InvalidParameter("melody_wavs needs a MusicGen-Melody model (this one is conditioned on text only)")
            waves = self._melody_waves(melody_wavs, melody_sample_rate)
            if len(waves) != wav.shape[0]:
                raise InvalidParameter(f"melody_wavs has {len(waves)} melodies but the prompt has "
                                       f"{wav.shape[0]} (one each)")
        prompt_codes = self._prompt_codes(wav, rate)
        prompts = check_optional_prompts(descriptions, prompt_codes.shape[0])
        codes = self._generate_codes(prompts, list(prompt_codes), progress, melody_waves=waves)
        wav = self.generate_audio(codes)
        return (wav, codes) if return_tokens else wav

    def generate_with_chroma(self, descriptions, melody_wavs, melody_sample_rate: int, progress: bool = False,
                             return_tokens: bool = False):
        """MusicGen-Melody: prompts conditioned on melodies (audiocraft's name and arguments). descriptions: B
        entries, strings or None; melody_wavs: float [B, C, T] or [C, T], or a list of B waveforms [C, T_i] (None
        entries: no melody), at melody_sample_rate (resampled to the chroma's rate). The chroma is transformers'
        (enginepy.chroma; no stem separation) -> float32 [B, C, samples] (and codes int64 [B, K, frames])."""
        if not self.cfg.prefix:
            raise InvalidParameter("generate_with_chroma needs a MusicGen-Melody model (this one is conditioned on "
                                   "text only)")
        waves = self._melody_waves(melody_wavs, melody_sample_rate)
        prompts = check_optional_prompts(descriptions, len(waves))
        codes = self._generate_codes(prompts, None, progress, melody_waves=waves)
        wav = self.generate_audio(codes)
        return (wav, codes) if return_tokens else wav

    def _prompt_codes(self, wav: torch.Tensor, rate: int) -> torch.Tensor:
        """An audio prompt float32 [B, C, T] at `rate` -> its EnCodec codes int64 [B, K, Tp] on CPU, converted to
        the model's rate and channels first (what generate_continuation continues)."""
        return encode_audio(self.codec, convert_audio(wav, rate, self.sample_rate, self.audio_channels))

    def _melody_chroma(self, melody_wavs, melody_sample_rate) -> torch.Tensor:
        """melody_wavs (float [B, C, T] or [C, T], or a list of [C, T_i] / None) at melody_sample_rate -> chroma
        float32 [B, Nc, 12] (see _melody_waves and _chroma_of)."""
        return self._chroma_of(self._melody_waves(melody_wavs, melody_sample_rate))

    def _melody_waves(self, melody_wavs, melody_sample_rate) -> list[torch.Tensor | None]:
        """melody_wavs (float [B, C, T] or [C, T], or a list of [C, T_i] / None) at melody_sample_rate, checked ->
        per row float32 [C, T'] resampled to the chroma's rate, or None."""
        rate = check_sample_rate(melody_sample_rate, "melody_sample_rate")
        if isinstance(melody_wavs, (list, tuple)):
            if not melody_wavs:
                raise InvalidParameter("melody_wavs is an empty list (one waveform or None per description)")
            wavs = [None if w is None else check_waveforms(w, f"melody_wavs[{i}]") for i, w in enumerate(melody_wavs)]
            for i, w in enumerate(wavs):
                if w is not None and w.shape[0] != 1:
                    raise InvalidParameter(f"melody_wavs[{i}] must be one waveform [C, T]; got {list(w.shape)}")
        else:
            wavs = list(check_waveforms(melody_wavs, "melody_wavs")[:, None])
        chroma_rate = self.cfg.chroma["sampling_rate"]
        return [None if w is None else convert_audio(w, rate, chroma_rate, w.shape[1])[0] for w in wavs]

    def _chroma_of(self, waves: list[torch.Tensor | None]) -> torch.Tensor:
        """Per row a waveform [C, T] at the chroma's rate or None -> chroma float32 [B, Nc, 12]: the given melodies
        as one padded batch (as the feature extractor computes them), None rows the null chroma."""
        from .chroma import chroma_features, null_chroma

        given = [i for i, w in enumerate(waves) if w is not None]
        melodies = null_chroma(len(waves))
        if given:
            c = self.cfg.chroma
            feats = chroma_features([waves[i] for i in given], c["sampling_rate"], n_fft=c["n_fft"],
                                    hop_length=c["hop_length"], chunk_length_s=float(c["chunk_length"]))
            melodies = melodies.expand(len(waves), feats.shape[1], -1).clone()
            melodies[given] = feats
        return melodies

    def engine(self, max_batch: int | None = None, max_waiting: int | None = None,
               stream_audio: bool = False) -> Engine:
        """A step engine (continuous batching) on this model: up to max_batch requests decode together (default:
        from_pretrained's max_batch), up to max_waiting more queue (None: unbounded). With stream_audio, each
        RequestOutput carries new_audio float32 [C, n]: the request's audio decoded as its frames complete
        (streaming EnCodec, `StreamingDecoder.lookahead_frames` behind; the pieces join to `generate_audio`).
        See enginepy.engine.Engine. With the fast backend each engine owns its own static buffers, KV pools and
        CUDA graphs."""
        if not isinstance(stream_audio, bool):
            raise InvalidParameter(f"stream_audio must be True or False; got {stream_audio!r}")
        if max_batch is None:
            max_batch = self.max_batch
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InvalidParameter(f"max_batch must be a positive integer; got {max_batch!r}")
        if self.backend == "fast":
            runner = FastRunner(self.decoder, self.conditioner, max_batch, int(self.max_duration * self.frame_rate),
                                max_text_len=self.max_text_len)
        else:
            runner = ReferenceRunner(self.decoder, self.conditioner, max_batch)
        streamer = StreamingDecoder(self.codec) if stream_audio else None
        return Engine(runner, self.cfg, self.max_duration, max_waiting=max_waiting, streamer=streamer)

    def generate_stream(self, description: str, progress: bool = False):
        """Yield the audio of one prompt as it is generated: float32 [C, n] chunks on CPU (n > 0) that join to
        `generate(description)[0]` (within 1e-4), with the current generation params (seed None: a random seed,
        then in `last_seed`). The first chunk comes once a few frames exist (the delay pattern plus the codec's
        lookahead); each later step adds one frame (hop_length samples)."""
        if not isinstance(description, str):
            raise InvalidParameter(f"description must be a string; got {type(description).__name__}")
        seed = self.seed if self.seed is not None else secrets.randbits(62)
        self.last_seed = seed
        p = self.params
        with self._lock, fp32_matmul_exact(self.decoder.dtype):
            engine = self._stream_engine()
            engine.add_request("stream", description, duration=self.duration, seed=seed, use_sampling=p.use_sampling,
                               top_k=p.top_k, top_p=p.top_p, temperature=p.temperature, cfg_coef=p.cfg_coef)
            steps = self.frames + self.cfg.max_delay
            try:
                with StepReporter(steps, progress, self._progress_callback) as report:
                    while engine.has_unfinished_requests():
                        for out in engine.step():
                            if out.error is not None:
                                raise out.error
                            if out.new_audio is not None and out.new_audio.shape[-1]:
                                yield out.new_audio.cpu()
                        report()
            finally:
                engine.abort_request("stream")

    def _stream_engine(self) -> Engine:
        """A one-slot streaming engine, built once (the fast backend's holds static buffers and graphs)."""
        if getattr(self, "_streaming", None) is None:
            self._streaming = self.engine(max_batch=1, stream_audio=True)
        return self._streaming

    def generate_audio(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int64 [B, K, T] -> float32 [B, C, T * hop_length] on CPU."""
        return self.codec.decode(codes).cpu()

    def generate(self, descriptions, progress: bool = False, return_tokens: bool = False):
        """Prompts (a list of strings, or one string) -> waveform float32 [B, C, samples]; with
        return_tokens=True, (waveform, codes int64 [B, K, frames])."""
        codes = self.generate_tokens(descriptions, progress=progress)
        wav = self.generate_audio(codes)
        return (wav, codes) if return_tokens else wav
