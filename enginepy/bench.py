"""`enginepy bench`: enginepy and transformers' MusicGen side by side, same weights, same frames, one process.

Models are random weights with the real musicgen-small / medium / large shapes (built with transformers'
config classes, cached on disk) or any local model directory. For each engine and batch size it reports:
ms per decode step (p50, p99; each step timed with a device sync), seconds to render the clip, time to first
audio (no streaming yet: the first audio arrives with the last), audio-seconds per wall-second, peak memory,
and achieved GB/s of weight + KV-cache reads per step against the device's measured copy bandwidth.
Render time is measured in a separate run without per-step syncs. A warm-up run precedes the measurements
(it includes Triton compilation and CUDA-graph capture for the fast backend).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass

import torch

from .loading import default_cache_dir
from .random_model import RELEASED_SHAPES, RandomModelSpec, build_random_hf_model, released_spec
from .weights import FP32_KEYS

PROMPT = "lo-fi beat with warm piano and soft drums"
TOP_K = 250  # audiocraft's default; a vocabulary smaller than this samples over all of it


@dataclass
class BenchRow:
    """One (engine, batch size) measurement."""

    engine: str
    backend: str
    dtype: str
    batch: int
    frames: int
    steps: int
    ms_step_p50: float
    ms_step_p99: float
    render_s: float
    time_to_first_audio_s: float
    audio_s_per_s: float
    peak_mem_mb: float
    achieved_gbps: float
    copy_gbps: float
    speedup_vs_transformers: float | None = None


def bench_model_dir(model: str, cache_dir: str | None = None) -> str:
    """'tiny' | 'small' | 'medium' | 'large' (random weights, real shapes) or a model directory."""
    if model not in RELEASED_SHAPES and model != "tiny":
        return model
    path = os.path.join(cache_dir or default_cache_dir(), f"bench-random-{model}")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        spec = RandomModelSpec() if model == "tiny" else released_spec(model)
        build_random_hf_model(path, spec)
    return path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = platform.processor()
    return f"CPU {model or platform.machine()} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    """Device, versions and commit, written into every result file."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def copy_bandwidth_gbps(device: torch.device, megabytes: int = 256) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), median of 5."""
    n = megabytes * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / statistics.median(times[1:]) / 1e9


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB on Linux)


def _median_seconds(run, device: torch.device, repeats: int) -> float:
    """Median wall time of run() over `repeats` synced calls; the CUDA peak-memory counter starts afresh."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _bytes_per_step(weight_bytes: int, layers: int, hidden: int, rows: int, steps: int, elem: int) -> float:
    """Weights once, plus the self-attention K and V read at the average cached length."""
    kv = 2 * layers * rows * hidden * elem * (steps + 1) / 2
    return weight_bytes + kv


def bench_enginepy(mg, batch: int, duration: float, copy_gbps: float, repeats: int = 1) -> BenchRow:
    """Time MusicGen.generate (T5 + decode + EnCodec) and its decode steps. Sampling is top-k 250, or the whole
    vocabulary when it is smaller (what the result's config records as top_k)."""
    device = mg.device
    prompts = [PROMPT] * batch
    mg.set_generation_params(duration=duration, top_k=min(TOP_K, mg.cfg.vocab_size), cfg_coef=3.0, seed=0)
    mg.generate(prompts)  # warm-up: kernels compiled, graphs captured
    stamps: list[float] = []

    def on_step(done: int, total: int) -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    mg.set_custom_progress_callback(on_step)
    try:
        _sync(device)
        stamps.append(time.perf_counter())
        mg.generate_tokens(prompts)
    finally:
        mg.set_custom_progress_callback(None)
    step_ms = [1e3 * (b - a) for a, b in zip(stamps, stamps[1:])]
    render = _median_seconds(lambda: mg.generate(prompts), device, repeats)
    cfg = mg.cfg
    elem = mg.decoder.w("emb").element_size()
    weight_bytes = sum(t.numel() * t.element_size() for n, t in mg.decoder.named_buffers() if not n.startswith(FP32_KEYS))
    p50 = statistics.median(step_ms)
    moved = _bytes_per_step(weight_bytes, cfg.num_layers, cfg.hidden_size, 2 * batch, len(step_ms), elem)
    return BenchRow(
        engine=f"enginepy-{mg.backend}", backend=mg.backend, dtype=_decoder_dtype(mg.decoder),
        batch=batch, frames=mg.frames, steps=len(step_ms), ms_step_p50=p50, ms_step_p99=_percentile(step_ms, 0.99),
        render_s=render, time_to_first_audio_s=render, audio_s_per_s=batch * mg.frames / cfg.frame_rate / render,
        peak_mem_mb=_peak_mem_mb(device), achieved_gbps=moved / (p50 / 1e3) / 1e9, copy_gbps=copy_gbps,
    )


def _decoder_dtype(decoder) -> str:
    """The decoder's weight dtype as run: 'int8' for packed int8 CPU weights, else the tensors' dtype."""
    impl = decoder.linear_impl
    if impl is not None and any(w.kind == "int8" for w in impl.weights.values()):
        return "int8"
    return str(decoder.dtype).replace("torch.", "")


def bench_transformers(hf_dir: str, device: torch.device, dtype: torch.dtype, batch: int, frames: int,
                       copy_gbps: float, repeats: int = 1) -> BenchRow:
    """transformers' MusicgenForConditionalGeneration.generate on the same weights and frames."""
    from transformers import AutoTokenizer, LogitsProcessor, LogitsProcessorList, MusicgenForConditionalGeneration

    from .hf import quiet_transformers

    with quiet_transformers():
        model = MusicgenForConditionalGeneration.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    dec = model.decoder.config
    frame_rate = model.config.audio_encoder.frame_rate
    max_delay = dec.num_codebooks // dec.audio_channels - 1
    inputs = tokenizer([PROMPT] * batch, return_tensors="pt").to(device)
    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            _sync(device)
            stamps.append(time.perf_counter())
            return scores

    kwargs = dict(do_sample=True, top_k=min(TOP_K, dec.vocab_size), guidance_scale=3.0, max_new_tokens=frames + max_delay)
    with torch.no_grad():
        model.generate(**inputs, **kwargs)  # warm-up
        model.generate(**inputs, logits_processor=LogitsProcessorList([Stamp()]), **kwargs)
        step_ms = [1e3 * (b - a) for a, b in zip(stamps, stamps[1:])]
        render = _median_seconds(lambda: model.generate(**inputs, **kwargs), device, repeats)
    p50 = statistics.median(step_ms)
    elem = torch.tensor([], dtype=dtype).element_size()
    weight_bytes = sum(p.numel() * elem for p in model.decoder.parameters())
    moved = _bytes_per_step(weight_bytes, dec.num_hidden_layers, dec.hidden_size, 2 * batch, frames + max_delay, elem)
    del model
    return BenchRow(
        engine="transformers", backend="generate", dtype=str(dtype).replace("torch.", ""), batch=batch,
        frames=frames, steps=frames + max_delay, ms_step_p50=p50, ms_step_p99=_percentile(step_ms, 0.99),
        render_s=render, time_to_first_audio_s=render, audio_s_per_s=batch * frames / frame_rate / render,
        peak_mem_mb=_peak_mem_mb(device), achieved_gbps=moved / (p50 / 1e3) / 1e9, copy_gbps=copy_gbps,
    )


def run_bench(model: str = "small", device: str | None = None, dtype: str | None = None,
              backends: tuple[str, ...] = ("reference",), batches: tuple[int, ...] = (1,), duration: float = 1.0,
              transformers: bool = True, hf_dtype: str | None = None, repeats: int = 1,
              cache_dir: str | None = None, log=print) -> dict:
    """Run the suite and return {'environment', 'config', 'rows'}; `log` gets one line per row."""
    from .api import MusicGen
    from .convert import parse_dtype
    from .loading import parse_device

    dev = parse_device(device)
    hf_dir = bench_model_dir(model, cache_dir)
    copy_gbps = copy_bandwidth_gbps(dev)
    env = environment(dev)
    rows: list[BenchRow] = []
    log(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | transformers {env['transformers']} "
        f"| copy {copy_gbps:.1f} GB/s | model {model} | {duration:g} s of audio")
    log(f"{'engine':<20} {'dtype':<9} {'batch':>5} {'ms/step p50':>11} {'p99':>8} {'render s':>9} {'audio s/s':>9} "
        f"{'peak MB':>8} {'GB/s':>7} {'vs hf':>6}")
    frames = top_k = None
    for backend in backends:
        mg = MusicGen.from_pretrained(hf_dir, device=dev, dtype=dtype, backend=backend, max_batch=max(batches),
                                      max_duration=max(duration, 1.0), cache_dir=cache_dir)
        for batch in batches:
            rows.append(bench_enginepy(mg, batch, duration, copy_gbps, repeats))
            frames, top_k = mg.frames, min(TOP_K, mg.cfg.vocab_size)
        del mg
    if transformers:
        hf_torch_dtype = parse_dtype(hf_dtype or ("float32" if dev.type == "cpu" else (dtype or "bfloat16")))
        for batch in batches:
            rows.append(bench_transformers(hf_dir, dev, hf_torch_dtype, batch, frames, copy_gbps, repeats))
    for row in rows:
        ref = next((r for r in rows if r.engine == "transformers" and r.batch == row.batch), None)
        if ref is not None and row.engine != "transformers":
            row.speedup_vs_transformers = ref.render_s / row.render_s
        vs = f"{row.speedup_vs_transformers:.2f}x" if row.speedup_vs_transformers else "-"
        log(f"{row.engine:<20} {row.dtype:<9} {row.batch:>5} {row.ms_step_p50:>11.2f} {row.ms_step_p99:>8.2f} "
            f"{row.render_s:>9.3f} {row.audio_s_per_s:>9.3f} {row.peak_mem_mb:>8.0f} {row.achieved_gbps:>7.1f} {vs:>6}")
    config = {"model": model, "duration_s": duration, "frames": frames, "batches": list(batches),
              "backends": list(backends), "cfg_coef": 3.0, "top_k": top_k, "repeats": repeats}
    return {"environment": env, "config": config, "rows": [asdict(r) for r in rows]}


def write_results(result: dict, path: str) -> None:
    from .audio_io import write_atomically

    def save(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)

    write_atomically(path, save)
