"""Command line: `enginepy convert | generate | bench | demo | cache` (also `python -m enginepy ...`).

Bad input is refused with one line naming the parameter and exit code 2. Everything that can be checked
without the model (parameters, output paths) is checked before the model is loaded, so a typo never costs
a load or a generation. SIGTERM and Ctrl-C remove temporary files before exiting (143, 130).
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import threading
import time

DEFAULT_MODEL = "facebook/musicgen-small"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (and exit code 2), like every other refusal."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="enginepy", description="Fast, faithful MusicGen inference.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a Hugging Face MusicGen directory to the enginepy format")
    c.add_argument("src", help="Hugging Face MusicGen directory (config.json, model.safetensors, tokenizer files)")
    c.add_argument("dst", help="output directory (new, empty, or an enginepy directory to replace)")
    c.add_argument("--dtype", default="float32", help="decoder dtype: float32 | float16 | bfloat16 (default float32)")

    g = sub.add_parser("generate", help="generate music from text prompts")
    g.add_argument("prompts", nargs="+", metavar="PROMPT")
    _model_args(g)
    g.add_argument("--duration", type=float, default=8.0, help="seconds of audio (default 8)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of row 0; row i uses seed + i (default: a random seed, printed so it can be reused)")
    g.add_argument("--greedy", action="store_true", help="argmax decoding (no sampling)")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default 250; 0 = off)")
    g.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling mass; > 0 overrides top-k (default 0)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature: 0 (greedy) or >= 1e-4 (default 1)")
    g.add_argument("--cfg-coef", type=float, default=3.0,
                   help="classifier-free guidance coefficient in [0, 1e6] (default 3)")
    g.add_argument("--out", default="out.wav",
                   help="audio file, .wav | .flac | .ogg (the extension picks the format; default out.wav); "
                        "several prompts write FILE-0.wav, FILE-1.wav, ...")
    g.add_argument("--tokens-out", default=None, help="also write the codes, int64 [B, K, frames], to this .npy file")
    g.add_argument("--continue", dest="continue_from", default=None, metavar="FILE",
                   help="continue this audio file (WAV/FLAC/Ogg; resampled and mixed to the model's rate and "
                        "channels): every prompt starts from it, and it counts toward --duration")
    g.add_argument("--extend-stride", type=float, default=None, metavar="S",
                   help="long form: allow --duration beyond --max-duration, generated in windows of --max-duration "
                        "seconds, each starting S seconds after the previous one (audiocraft uses 18)")
    g.add_argument("--melody", default=None, metavar="FILE",
                   help="MusicGen-Melody models: condition every prompt on the chroma of this audio file (WAV/FLAC/Ogg)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")

    b = sub.add_parser("bench", help="enginepy vs transformers on the same weights: step latency, render time, throughput")
    b.add_argument("--model", default="small",
                   help="tiny | small | medium | large (random weights, real shapes) or a model directory (default small)")
    b.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    b.add_argument("--dtype", default=None, help="enginepy decoder dtype: float32 | float16 | bfloat16 | int8 (CPU) "
                   "(default: the engine's default for the device)")
    b.add_argument("--hf-dtype", default=None, help="transformers dtype (default float32 on CPU, --dtype on CUDA)")
    b.add_argument("--backends", default="reference", help="comma-separated: reference,fast (default reference)")
    b.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    b.add_argument("--duration", type=float, default=1.0, help="seconds of audio per prompt (default 1)")
    b.add_argument("--repeats", type=int, default=1, help="render-time repeats, median reported (default 1)")
    b.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    b.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench-<device>-<model>.json)")
    b.add_argument("--scenario", default="steps", choices=("steps", "poisson"),
                   help="steps: per-step latency and render time vs transformers (default); poisson: random arrivals "
                        "served by continuous batching vs static batching (one backend, --backends' first)")
    b.add_argument("--rate", type=float, default=2.0, help="poisson: arrivals per second (default 2)")
    b.add_argument("--requests", type=int, default=16, help="poisson: number of requests (default 16)")
    b.add_argument("--durations", default="5,30", help="poisson: LO,HI seconds of audio, drawn uniformly (default 5,30)")
    b.add_argument("--max-batch", type=int, default=8, help="poisson: engine slots (default 8)")

    d = sub.add_parser("demo", help="write a WAV from the default model (a built-in random one when none is available)")
    _model_args(d, model_default=None)
    d.add_argument("--duration", type=float, default=2.0, help="seconds of audio (default 2)")
    d.add_argument("--out", default="demo.wav", help="audio file, .wav | .flac | .ogg (default demo.wav)")

    from .render.command import add_parser as add_render_parser
    from .serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    add_render_parser(sub)

    k = sub.add_parser("cache", help="list or prune the converted copies of Hugging Face directories")
    k.add_argument("action", choices=("list", "prune"),
                   help="list: every entry with its status; prune: remove stale, orphaned, damaged and incomplete ones")
    k.add_argument("--all", action="store_true", help="prune: remove every entry, current ones included")
    k.add_argument("--dry-run", action="store_true", help="prune: only print what would be removed")
    k.add_argument("--cache-dir", default=None, help="the cache (default $ENGINEPY_CACHE or ~/.cache/enginepy)")
    return p


def _model_args(p: argparse.ArgumentParser, model_default: str | None = DEFAULT_MODEL) -> None:
    p.add_argument("--model", default=os.environ.get("ENGINEPY_MODEL", model_default),
                   help="converted enginepy directory, Hugging Face directory or hub id (env ENGINEPY_MODEL)")
    p.add_argument("--backend", default=None, help="reference | fast (default: the engine's default for the device)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None,
                   help="decoder dtype: float32 | float16 | bfloat16 | int8 (int8: CPU reference backend only; "
                        "default: the engine's default for the device)")
    p.add_argument("--max-duration", type=float, default=30.0, help="longest duration the model is set up for (s)")
    p.add_argument("--max-text-len", type=int, default=256,
                   help="longest prompt in tokens, at most 512 (T5's training length; default 256)")


def _convert(args) -> int:
    from .convert import check_destination, convert_hf, parse_dtype

    parse_dtype(args.dtype, "--dtype")
    check_destination(args.dst)
    cfg = convert_hf(args.src, args.dst, args.dtype)
    print(f"converted {args.src} -> {args.dst} ({cfg.num_layers} layers, D={cfg.hidden_size}, "
          f"K={cfg.num_codebooks}, V={cfg.vocab_size}, {cfg.dtype})")
    return 0


def _load(args):
    from .api import MusicGen

    # Options left out take the API's defaults for the device. The fast backend sizes its static buffers for
    # this many prompts: exactly the ones given.
    given = {name: value for name, value in (("dtype", args.dtype), ("backend", args.backend)) if value is not None}
    max_batch = len(args.prompts) if hasattr(args, "prompts") else 1
    return MusicGen.from_pretrained(args.model, device=args.device, max_duration=args.max_duration,
                                    max_batch=max_batch, max_text_len=args.max_text_len, **given)


def check_decoder_dtype(dtype: str | None) -> None:
    """--dtype: None (the default for the device), a torch dtype name, or int8 (the packed CPU decoder, checked
    against the device when loading)."""
    from .convert import parse_dtype
    from .errors import InvalidParameter

    if dtype is not None and dtype != "int8":
        try:
            parse_dtype(dtype, "--dtype")
        except InvalidParameter:
            raise InvalidParameter(f"--dtype must be one of float32, float16, bfloat16, int8; got {dtype!r}") from None


def check_model_options(args) -> None:
    """--backend, --dtype, --max-duration, --duration and --max-text-len, as generate, demo and render take them."""
    from .api import BACKENDS
    from .conditioning import check_max_text_len
    from .errors import InvalidParameter

    if args.backend is not None and args.backend not in BACKENDS:
        raise InvalidParameter(f"--backend must be one of {', '.join(BACKENDS)}; got {args.backend!r}")
    check_decoder_dtype(args.dtype)
    if not args.max_duration > 0 or args.max_duration == float("inf"):
        raise InvalidParameter(f"--max-duration must be a positive number of seconds; got {args.max_duration}")
    stride = getattr(args, "extend_stride", None)
    if stride is not None:
        if not 0 < stride < args.max_duration:
            raise InvalidParameter(f"--extend-stride must be in (0, {args.max_duration:g}) seconds (below "
                                   f"--max-duration); got {stride}")
        if not 0 < args.duration < float("inf"):
            raise InvalidParameter(f"--duration must be a positive number of seconds; got {args.duration}")
    elif not 0 < args.duration <= args.max_duration:
        raise InvalidParameter(f"--duration must be in (0, {args.max_duration:g}] seconds; got {args.duration}"
                               + (" (--extend-stride S generates longer audio in windows)"
                                  if hasattr(args, "extend_stride") and args.duration > args.max_duration else ""))
    try:
        check_max_text_len(args.max_text_len)
    except InvalidParameter:
        raise InvalidParameter(f"--max-text-len must be an integer in [1, 512]; got {args.max_text_len}") from None


def _check_static(args) -> None:
    """Everything that can be refused without loading a model: parameters and output paths."""
    from .audio_io import check_audio_path, check_distinct, check_tokens_path, numbered_paths
    from .loading import parse_device
    from .params import check_prompts, check_sampling

    parse_device(args.device)
    check_model_options(args)
    count = 1
    if hasattr(args, "prompts"):
        count = len(check_prompts(args.prompts))
        check_sampling(not args.greedy, args.top_k if args.top_k is not None else 0, args.top_p,
                       args.temperature, args.cfg_coef, args.seed)
    check_audio_path(args.out, "--out")
    outputs = [("--out", path) for path in numbered_paths(args.out, count)]
    if getattr(args, "tokens_out", None) is not None:
        outputs.append(("--tokens-out", check_tokens_path(args.tokens_out, "--tokens-out")))
    check_distinct(outputs)
    if getattr(args, "continue_from", None) is not None:
        from .audio_prompt import read_audio

        args.continue_audio = read_audio(args.continue_from, "--continue")  # refused before the model loads
    if getattr(args, "melody", None) is not None:
        from .audio_prompt import read_audio

        args.melody_audio = read_audio(args.melody, "--melody")


def _settings_line(model: str, mg, seed: int | None) -> str:
    """The line that makes a run reproducible: model, device, dtype, backend and seed."""
    dtype = str(mg.decoder.dtype).replace("torch.", "")
    rng = "greedy" if seed is None else f"seed {seed} (row i uses seed + i)"
    return f"model {model} | device {mg.device} | dtype {dtype} | backend {mg.backend} | {rng}"


def _generate(args) -> int:
    from .audio_io import numbered_paths, write_audio, write_tokens

    _check_static(args)
    # A drawn seed is printed, so that a good result can be made again with --seed.
    seed = args.seed if args.seed is not None else secrets.randbits(62)
    mg = _load(args)
    mg.set_generation_params(duration=args.duration, use_sampling=not args.greedy, top_k=args.top_k,
                             top_p=args.top_p, temperature=args.temperature, cfg_coef=args.cfg_coef, seed=seed,
                             extend_stride=args.extend_stride)
    greedy = args.greedy or args.temperature == 0
    print(_settings_line(args.model, mg, None if greedy else seed), flush=True)
    start = time.perf_counter()
    melody = {}
    if getattr(args, "melody_audio", None) is not None:
        audio, rate = args.melody_audio
        melody = dict(melody_wavs=[audio] * len(args.prompts), melody_sample_rate=rate)
    if getattr(args, "continue_audio", None) is not None:
        audio, rate = args.continue_audio
        wav, codes = mg.generate_continuation(audio.expand(len(args.prompts), -1, -1), rate, args.prompts,
                                              progress=not args.quiet, return_tokens=True, **melody)
    elif melody:
        wav, codes = mg.generate_with_chroma(args.prompts, progress=not args.quiet, return_tokens=True, **melody)
    else:
        wav, codes = mg.generate(args.prompts, progress=not args.quiet, return_tokens=True)
    elapsed = time.perf_counter() - start
    if args.tokens_out:
        write_tokens(args.tokens_out, codes)
    paths = numbered_paths(args.out, wav.shape[0])
    for path, w in zip(paths, wav):
        write_audio(path, w, mg.sample_rate)
    seconds = codes.shape[-1] / mg.frame_rate
    print(f"wrote {', '.join(paths)} ({len(paths)} x {seconds:.2f} s at {mg.sample_rate} Hz) in {elapsed:.2f} s")
    return 0


def _demo(args) -> int:
    from .audio_io import write_audio
    from .demo import demo_model

    _check_static(args)
    model, note = demo_model(args.model)
    print(note)
    args.model = model
    mg = _load(args)
    mg.set_generation_params(duration=args.duration, seed=0)
    print(_settings_line(args.model, mg, 0), flush=True)
    start = time.perf_counter()
    wav = mg.generate(["lo-fi beat with warm piano"], progress=True)
    write_audio(args.out, wav[0], mg.sample_rate)
    print(f"wrote {args.out} ({args.duration:g} s at {mg.sample_rate} Hz) in {time.perf_counter() - start:.2f} s")
    return 0


def _int_list(name: str, text: str) -> tuple[int, ...]:
    from .errors import InvalidParameter

    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise InvalidParameter(f"{name} must be comma-separated positive integers; got {text!r}") from None
    if not values or min(values) < 1:
        raise InvalidParameter(f"{name} must be comma-separated positive integers; got {text!r}")
    return values


def _bench(args) -> int:
    from .api import BACKENDS
    from .audio_io import check_creatable
    from .bench import run_bench, write_results
    from .convert import parse_dtype
    from .errors import InvalidParameter
    from .loading import parse_device

    batches = _int_list("--batch", args.batch)
    backends = tuple(args.backends.split(","))
    for backend in backends:
        if backend not in BACKENDS:
            raise InvalidParameter(f"--backends must list names from {', '.join(BACKENDS)}; got {backend!r}")
    dev = parse_device(args.device)
    check_decoder_dtype(args.dtype)
    if args.hf_dtype is not None:
        parse_dtype(args.hf_dtype, "--hf-dtype")
    if not 0 < args.duration <= 30:
        raise InvalidParameter(f"--duration must be in (0, 30] seconds; got {args.duration}")
    if args.repeats < 1:
        raise InvalidParameter(f"--repeats must be >= 1; got {args.repeats}")
    name = os.path.basename(os.path.normpath(args.model))
    out = args.out if args.out is not None else os.path.join("benchmarks", "results", f"bench-{dev.type}-{name}.json")
    check_creatable(out, "--out")
    if not out.lower().endswith(".json"):
        raise InvalidParameter(f"--out must end in .json (results are written as JSON); got {out!r}")
    if args.scenario == "poisson":
        result = _poisson(args, dev, backends[0], out)
    else:
        result = run_bench(model=args.model, device=str(dev), dtype=args.dtype, backends=backends, batches=batches,
                           duration=args.duration, transformers=not args.no_transformers, hf_dtype=args.hf_dtype,
                           repeats=args.repeats)
    write_results(result, out)
    print(f"wrote {out}")
    return 0


def _poisson(args, dev, backend: str, out: str) -> dict:
    """`bench --scenario poisson`: validated here, run by bench_poisson; returns the JSON document."""
    from .api import MusicGen
    from .bench import bench_model_dir, environment
    from .bench_poisson import run_poisson
    from .errors import InvalidParameter

    if not 0 < args.rate < float("inf"):
        raise InvalidParameter(f"--rate must be a positive number of arrivals per second; got {args.rate}")
    if args.requests < 1 or args.max_batch < 1:
        raise InvalidParameter(f"--requests and --max-batch must be >= 1; got {args.requests}, {args.max_batch}")
    try:
        lo, hi = (float(x) for x in args.durations.split(","))
    except ValueError:
        raise InvalidParameter(f"--durations must be LO,HI seconds; got {args.durations!r}") from None
    if not 0 < lo <= hi <= 30:
        raise InvalidParameter(f"--durations must satisfy 0 < LO <= HI <= 30; got {args.durations!r}")
    mg = MusicGen.from_pretrained(bench_model_dir(args.model), device=dev, dtype=args.dtype, backend=backend,
                                  max_batch=args.max_batch, max_duration=max(hi, 1.0))
    result = run_poisson(mg, args.rate, args.requests, (lo, hi), args.max_batch)
    return dict(scenario="poisson", model=args.model, backend=backend, dtype=str(mg.decoder.dtype).replace("torch.", ""),
                environment=environment(dev), **result)


def _render(args) -> int:
    from .render.command import run

    return run(args)


def _serve(args) -> int:
    from .serve.cli import run

    return run(args)


def _cache(args) -> int:
    from .loading import default_cache_dir, format_cache_entry, list_cache, prune_cache

    cache_dir = args.cache_dir or default_cache_dir()
    if args.action == "list":
        entries = list_cache(cache_dir)
        for entry in entries:
            print(format_cache_entry(entry))
        total = sum(e.size_bytes for e in entries) / 2**20
        print(f"{len(entries)} entries, {total:,.1f} MB in {cache_dir}")
        return 0
    removed = prune_cache(cache_dir, everything=args.all, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for entry in removed:
        print(f"{verb} {format_cache_entry(entry)}")
    print(f"{verb} {len(removed)} entries, {sum(e.size_bytes for e in removed) / 2**20:,.1f} MB from {cache_dir}")
    return 0


def _terminated(signum, frame):
    from .convert import Terminated

    raise Terminated(128 + signum)


def run_command(prog: str, command, args) -> int:
    """command(args) -> exit status, with the command line's endings: an EnginepyError is one line
    `prog: error: ...` and status 2; Ctrl-C `prog: interrupted` (130); SIGTERM, which in the main thread unwinds
    like Ctrl-C so that temporary files and directories are removed on the way out, `prog: terminated` (143)."""
    from .convert import Terminated
    from .errors import EnginepyError

    handles_term = threading.current_thread() is threading.main_thread()
    if handles_term:
        previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return command(args)
    except EnginepyError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"{prog}: terminated", file=sys.stderr)
        return e.code
    finally:
        if handles_term:
            signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already reported in one line)
        return e.code if isinstance(e.code, int) else 2
    return run_command("enginepy", {"convert": _convert, "generate": _generate, "bench": _bench, "demo": _demo,
                                    "cache": _cache, "serve": _serve, "render": _render}[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
