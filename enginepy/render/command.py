"""`enginepy render JOBS --out DIR`: bulk rendering of a job file on the step engine, resumable.

    enginepy render jobs.jsonl --out renders/ [--model M] [--format wav|flac] [--max-batch N] [--ray [ADDRESS]]

`add_parser(subparsers)` adds the command to a parser, `run(args)` runs it (0: every job rendered or already
there; 1: some jobs failed, each reported with its line; refusals raise EnginepyError before any work).
`python -m enginepy.render JOBS --out DIR ...` runs it alone.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from ..errors import InvalidParameter

FORMATS = ("wav", "flac")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `render` to an argparse subparsers object; returns its parser."""
    from ..cli import _model_args

    r = subparsers.add_parser(
        "render", help="render every job of a JSONL / CSV / text file into a directory (resumable)",
        description="Render a job file into DIR/<id>.wav and DIR/manifest.jsonl. JOBS: .jsonl (one object per "
                    "line: id, prompt, duration, seed, use_sampling, top_k, top_p, temperature, cfg_coef, "
                    "cfg_coef_beta, two_step_cfg, melody, continue; melody and continue are audio files, relative "
                    "to the job file's directory), .csv (the same columns) or .txt (one prompt per line). A rerun "
                    "renders only what is missing, changed (audio inputs included) or damaged.")
    r.add_argument("jobs", metavar="JOBS", help="job file: .jsonl, .csv or .txt")
    r.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    _model_args(r)
    r.add_argument("--format", default="wav", help="audio format of the files: wav | flac (16-bit; default wav)")
    r.add_argument("--duration", type=float, default=8.0, help="seconds of audio of jobs that give none (default 8)")
    r.add_argument("--seed", type=int, default=0,
                   help="a job on line i (1-based) that gives no seed uses seed + i - 1 (default 0)")
    r.add_argument("--greedy", action="store_true", help="argmax decoding for jobs that do not set use_sampling")
    r.add_argument("--top-k", type=int, default=None, help="top_k of jobs that give none (default 250; 0 = off)")
    r.add_argument("--top-p", type=float, default=0.0, help="top_p of jobs that give none (default 0)")
    r.add_argument("--temperature", type=float, default=1.0, help="temperature of jobs that give none (default 1)")
    r.add_argument("--cfg-coef", type=float, default=3.0, help="cfg_coef of jobs that give none (default 3)")
    r.add_argument("--max-batch", type=int, default=8, help="requests decoded together by an engine (default 8)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="render on a Ray Data actor pool: one engine per GPU (or per --actor-cpus cores); "
                        "ADDRESS of a Ray cluster, or none for RAY_ADDRESS or a new local instance "
                        '(needs pip install "enginepy[ray]"; give it after JOBS, or as --ray=ADDRESS)')
    r.add_argument("--actors", type=int, default=None,
                   help="with --ray: number of engines (default: one per GPU of the cluster, 1 on CPU)")
    r.add_argument("--actor-cpus", type=int, default=None,
                   help="with --ray: CPU cores per engine (default: 1 with CUDA; on CPU the cluster's cores / "
                        "--actors, at most one machine's)")
    return r


def _check_device(args):
    """The device: parse_device checks this machine; with --ray the actors' machines have the device, so only
    the name is checked here."""
    import torch

    from ..loading import parse_device

    if args.ray is None or args.device is None:
        return parse_device(args.device)
    try:
        dev = torch.device(args.device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or dev.index not in (None, 0):
        raise InvalidParameter(f"--device with --ray must be 'cpu' or 'cuda' (Ray gives each actor its GPU); "
                               f"got {args.device!r}")
    return dev


def _check_static(args):
    """Everything that can be refused before reading the model: options, the job file's kind, the output
    directory. Returns the device."""
    from ..audio_io import check_creatable
    from ..cli import check_model_options
    from ..params import check_sampling
    from .jobs import job_format

    check_model_options(args)
    if args.format not in FORMATS:
        raise InvalidParameter(f"--format must be one of {', '.join(FORMATS)}; got {args.format!r}")
    check_sampling(not args.greedy, args.top_k if args.top_k is not None else 0, args.top_p, args.temperature,
                   args.cfg_coef, args.seed)
    for name, value in (("--max-batch", args.max_batch), ("--actors", args.actors), ("--actor-cpus", args.actor_cpus)):
        if value is not None and value < 1:
            raise InvalidParameter(f"{name} must be a positive integer; got {value}")
    if args.ray is None and (args.actors is not None or args.actor_cpus is not None):
        raise InvalidParameter("--actors and --actor-cpus apply to --ray only")
    dev = _check_device(args)
    if args.ray is not None:
        from .ray_pool import check_ray_installed

        check_ray_installed()
    job_format(args.jobs)
    if not os.path.isfile(args.jobs):
        raise InvalidParameter(f"JOBS {args.jobs} does not exist" if not os.path.exists(args.jobs)
                               else f"JOBS {args.jobs} is not a file")
    check_creatable(args.out, "--out", kind="directory")
    return dev


def _model_identity(model: str) -> str:
    """A local model path made absolute (the same model from another working directory is the same model);
    a hub id as given."""
    return os.path.realpath(model) if os.path.exists(model) else model


class _Progress:
    """A bar of jobs with the audio seconds written, on stderr when it is a terminal (and not --quiet)."""

    def __init__(self, total_jobs: int, frame_rate: int, enabled: bool):
        self.frame_rate = frame_rate
        self.audio_s = 0.0
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_jobs, unit="job", desc="rendering", leave=False, postfix="0.0 audio-s")

    def update(self, entry: dict) -> None:
        if entry["status"] == "done":
            self.audio_s += entry["frames"] / self.frame_rate
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{self.audio_s:.1f} audio-s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _local_renderer(args, device, dtype, directory, key, out_dir):
    from ..api import MusicGen
    from .worker import Renderer

    start = time.perf_counter()
    given = {"backend": args.backend} if args.backend is not None else {}
    mg = MusicGen.from_pretrained(directory, device=device, dtype=dtype, max_duration=args.max_duration,
                                  max_batch=args.max_batch, max_text_len=args.max_text_len, **given)
    print(f"loaded the model in {time.perf_counter() - start:.2f} s", flush=True)
    return Renderer(mg, out_dir, key, args.max_batch)


def run(args) -> int:
    """Run `enginepy render` with parsed arguments. Returns 0 when every job is rendered (now or before), 1 when
    some failed (each reported on stderr as JOBS:LINE: reason, and in the manifest)."""
    from ..api import default_backend
    from ..config import ModelConfig
    from ..loading import default_dtype, resolve_model_dir
    from .jobs import JobDefaults, parse_jobs
    from .outdir import OutputDir, OutputKey, bad_line_entry, ordered
    from .worker import longest_first

    device = _check_static(args)
    dtype = args.dtype if args.dtype is not None else default_dtype(device)
    # int8 packs the fp32 weights when loading: its converted copy is the float32 one.
    directory = resolve_model_dir(args.model, "float32" if dtype == "int8" else dtype)
    cfg = ModelConfig.load(directory)  # the vocabulary and frame rate the jobs are checked against; no weights yet
    defaults = JobDefaults(duration=args.duration, seed=args.seed, use_sampling=not args.greedy, top_k=args.top_k,
                           top_p=args.top_p, temperature=args.temperature, cfg_coef=args.cfg_coef)
    jobs, bad = parse_jobs(args.jobs, defaults, cfg.vocab_size, cfg.frame_rate, args.max_duration,
                           melody_model=cfg.prefix)
    for b in bad:
        print(f"{args.jobs}:{b.line}: {b.error}", file=sys.stderr)
    key = OutputKey(_model_identity(args.model), dtype, args.format)
    out_dir = os.path.abspath(args.out)
    with OutputDir(out_dir) as out:
        out.remove_temporaries()
        done = out.verified(jobs, key)
        out.rewrite([done[job.id] for job in jobs if job.id in done])  # drop stale and damaged entries first
        todo = [job for job in jobs if job.id not in done]
        backend = args.backend or default_backend(device)
        print(f"model {args.model} | device {device} | dtype {dtype} | backend {backend} | {len(jobs) + len(bad)} "
              f"jobs: {len(done)} already rendered, {len(todo)} to render, {len(bad)} invalid", flush=True)
        rendered: list[dict] = []
        failed = [bad_line_entry(b) for b in bad]
        start = time.perf_counter()
        if todo:
            if args.ray is None:
                entries = _local_renderer(args, device, dtype, directory, key, out_dir).render(longest_first(todo))
                start = time.perf_counter()  # throughput without the model load (Ray's includes its actors')
            else:
                from .ray_pool import render_with_ray

                entries = render_with_ray(
                    longest_first(todo), address=args.ray, actors=args.actors, actor_cpus=args.actor_cpus, model=key.model,
                    device=device.type, dtype=dtype, backend=args.backend, max_duration=args.max_duration,
                    max_text_len=args.max_text_len, max_batch=args.max_batch, out_dir=out_dir, key=key)
            progress = _Progress(len(todo), cfg.frame_rate, not args.quiet)
            try:
                for entry in entries:
                    out.append(entry)
                    progress.update(entry)
                    if entry["status"] == "done":
                        rendered.append(entry)
                    else:
                        failed.append(entry)
                        print(f"{args.jobs}:{entry['line']}: {entry['error']}", file=sys.stderr)
            finally:
                progress.close()
        elapsed = time.perf_counter() - start
        out.rewrite(ordered(list(done.values()) + rendered + failed))
    audio_s = sum(e["frames"] for e in rendered) / cfg.frame_rate
    rate = f" = {audio_s / elapsed:.2f} audio-s/s" if rendered else ""
    print(f"done {len(rendered)} ({audio_s:.2f} audio-s in {elapsed:.2f} s{rate}), skipped {len(done)} already "
          f"rendered, failed {len(failed)} | {os.path.join(args.out, 'manifest.jsonl')}", flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m enginepy.render ARGS`, the same as `enginepy render ARGS`: refusals in one line, exit code 2.
    (A SIGTERM or SIGKILL may leave a temporary file in DIR: the next run removes it.)"""
    from ..cli import _Parser, run_command

    parser = _Parser(prog="enginepy")
    add_parser(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(["render", *(sys.argv[1:] if argv is None else argv)])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    return run_command("enginepy", run, args)
