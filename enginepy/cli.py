"""Command line: `enginepy convert | generate | bench | demo` (also `python -m enginepy ...`).

Bad input is refused with one line naming the parameter and exit code 2, before any model is loaded
where that is possible.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

DEFAULT_MODEL = "facebook/musicgen-small"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="enginepy", description="Fast, faithful MusicGen inference.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a Hugging Face MusicGen directory to the enginepy format")
    c.add_argument("src", help="Hugging Face MusicGen directory (config.json, model.safetensors, tokenizer files)")
    c.add_argument("dst", help="output directory")
    c.add_argument("--dtype", default="float32", help="decoder dtype: float32 | float16 | bfloat16 (default float32)")

    g = sub.add_parser("generate", help="generate music from text prompts")
    g.add_argument("prompts", nargs="+", metavar="PROMPT")
    _model_args(g)
    g.add_argument("--duration", type=float, default=8.0, help="seconds of audio (default 8)")
    g.add_argument("--seed", type=int, default=None, help="seed of row 0; row i uses seed + i (default: random)")
    g.add_argument("--greedy", action="store_true", help="argmax decoding (no sampling)")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default 250; 0 = off)")
    g.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling mass; > 0 overrides top-k (default 0)")
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1; 0 = greedy)")
    g.add_argument("--cfg-coef", type=float, default=3.0, help="classifier-free guidance coefficient (default 3)")
    g.add_argument("--out", default="out.wav", help="WAV path; several prompts write FILE-0.wav, FILE-1.wav, ...")
    g.add_argument("--tokens-out", default=None, help="also write the codes, int64 [B, K, frames], to this .npy")
    g.add_argument("--quiet", action="store_true", help="no progress bar")

    b = sub.add_parser("bench", help="enginepy vs transformers on the same weights: step latency, render time, throughput")
    b.add_argument("--model", default="small",
                   help="tiny | small | medium | large (random weights, real shapes) or a model directory (default small)")
    b.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    b.add_argument("--dtype", default=None, help="enginepy decoder dtype (default: the engine's default for the device)")
    b.add_argument("--hf-dtype", default=None, help="transformers dtype (default float32 on CPU, --dtype on CUDA)")
    b.add_argument("--backends", default="reference", help="comma-separated: reference,fast (default reference)")
    b.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    b.add_argument("--duration", type=float, default=1.0, help="seconds of audio per prompt (default 1)")
    b.add_argument("--repeats", type=int, default=1, help="render-time repeats, median reported (default 1)")
    b.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    b.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench-<device>-<model>.json)")

    d = sub.add_parser("demo", help="write a WAV from the default model (a built-in random one when none is available)")
    _model_args(d, model_default=None)
    d.add_argument("--duration", type=float, default=2.0, help="seconds of audio (default 2)")
    d.add_argument("--out", default="demo.wav", help="WAV path (default demo.wav)")
    return p


def _model_args(p: argparse.ArgumentParser, model_default: str | None = DEFAULT_MODEL) -> None:
    p.add_argument("--model", default=os.environ.get("ENGINEPY_MODEL", model_default),
                   help="converted enginepy directory, Hugging Face directory or hub id (env ENGINEPY_MODEL)")
    p.add_argument("--backend", default="reference", help="reference (default)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--max-duration", type=float, default=30.0, help="longest duration the model is set up for (s)")


def _convert(args) -> int:
    from .convert import convert_hf, parse_dtype

    parse_dtype(args.dtype, "--dtype")
    cfg = convert_hf(args.src, args.dst, args.dtype)
    print(f"converted {args.src} -> {args.dst} ({cfg.num_layers} layers, D={cfg.hidden_size}, "
          f"K={cfg.num_codebooks}, V={cfg.vocab_size}, {cfg.dtype})")
    return 0


def _load(args):
    from .api import MusicGen

    # The fast backend sizes its static buffers for this many prompts: exactly the ones given.
    max_batch = len(args.prompts) if hasattr(args, "prompts") else 1
    return MusicGen.from_pretrained(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                                    max_duration=args.max_duration, max_batch=max_batch)


def _check_static(args) -> None:
    """Everything that can be refused without loading a model."""
    from .api import BACKENDS
    from .convert import parse_dtype
    from .errors import InvalidParameter
    from .loading import parse_device
    from .params import check_prompts, check_sampling

    if args.backend not in BACKENDS:
        raise InvalidParameter(f"--backend must be one of {', '.join(BACKENDS)}; got {args.backend!r}")
    parse_device(args.device)
    if args.dtype is not None:
        parse_dtype(args.dtype, "--dtype")
    if not args.max_duration > 0 or args.max_duration == float("inf"):
        raise InvalidParameter(f"--max-duration must be a positive number of seconds; got {args.max_duration}")
    if not 0 < args.duration <= args.max_duration:
        raise InvalidParameter(f"--duration must be in (0, {args.max_duration:g}] seconds; got {args.duration}")
    if hasattr(args, "prompts"):
        check_prompts(args.prompts)
        check_sampling(not args.greedy, args.top_k if args.top_k is not None else 0, args.top_p,
                       args.temperature, args.cfg_coef, args.seed)


def _generate(args) -> int:
    from .audio_io import numbered_paths, write_tokens, write_wav

    _check_static(args)
    mg = _load(args)
    mg.set_generation_params(duration=args.duration, use_sampling=not args.greedy, top_k=args.top_k,
                             top_p=args.top_p, temperature=args.temperature, cfg_coef=args.cfg_coef, seed=args.seed)
    start = time.perf_counter()
    wav, codes = mg.generate(args.prompts, progress=not args.quiet, return_tokens=True)
    elapsed = time.perf_counter() - start
    paths = numbered_paths(args.out, wav.shape[0])
    for path, w in zip(paths, wav):
        write_wav(path, w, mg.sample_rate)
    if args.tokens_out:
        write_tokens(args.tokens_out, codes)
    seconds = codes.shape[-1] / mg.frame_rate
    print(f"wrote {', '.join(paths)} ({len(paths)} x {seconds:.2f} s at {mg.sample_rate} Hz) in {elapsed:.2f} s")
    return 0


def _demo(args) -> int:
    from .audio_io import write_wav
    from .demo import demo_model

    _check_static(args)
    model, note = demo_model(args.model)
    print(note)
    args.model = model
    mg = _load(args)
    mg.set_generation_params(duration=args.duration, seed=0)
    start = time.perf_counter()
    wav = mg.generate(["lo-fi beat with warm piano"], progress=True)
    write_wav(args.out, wav[0], mg.sample_rate)
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
    for name, value in (("--dtype", args.dtype), ("--hf-dtype", args.hf_dtype)):
        if value is not None:
            parse_dtype(value, name)
    if not 0 < args.duration <= 30:
        raise InvalidParameter(f"--duration must be in (0, 30] seconds; got {args.duration}")
    if args.repeats < 1:
        raise InvalidParameter(f"--repeats must be >= 1; got {args.repeats}")
    result = run_bench(model=args.model, device=str(dev), dtype=args.dtype, backends=backends, batches=batches,
                       duration=args.duration, transformers=not args.no_transformers, hf_dtype=args.hf_dtype,
                       repeats=args.repeats)
    name = os.path.basename(os.path.normpath(args.model))
    out = args.out or os.path.join("benchmarks", "results", f"bench-{dev.type}-{name}.json")
    write_results(result, out)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .errors import EnginepyError

    args = _parser().parse_args(argv)
    try:
        return {"convert": _convert, "generate": _generate, "bench": _bench, "demo": _demo}[args.command](args)
    except EnginepyError as e:
        print(f"enginepy: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("enginepy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
