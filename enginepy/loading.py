"""Finding and loading a model (converted enginepy directory, Hugging Face directory, or hub id), and the
cache of converted copies (`enginepy cache list | prune`)."""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass

import torch

from . import config as cfgmod
from .audio_io import check_creatable
from .codec import Codec
from .conditioning import DEFAULT_TEXT_TOKENS, TextConditioner, check_max_text_len
from .config import ModelConfig
from .convert import TOKENIZER_FILES, convert_hf, directory_lock, missing_model_directory, source_fingerprint
from .errors import EnginepyError, InvalidParameter, ModelFileError
from .hf import quiet_transformers
from .model import MusicGenDecoder
from .weights import FP32_KEYS, check_keys, load_safetensors, packed_shapes, reading

HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]


def default_cache_dir() -> str:
    """Where converted copies of Hugging Face directories go: $ENGINEPY_CACHE or ~/.cache/enginepy."""
    return os.environ.get("ENGINEPY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "enginepy")


def parse_device(device: str | torch.device | None) -> torch.device:
    """None -> cuda when available, else cpu. 'cpu', 'cuda' and 'cuda:N' are accepted."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidParameter(f"device must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise InvalidParameter(f"device must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise InvalidParameter(f"device {device!r}: the CPU is one device (its cores are used by threads); use 'cpu'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameter(f"device {device!r} was requested but CUDA is not available on this machine; use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise InvalidParameter(f"device {device!r}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    return dev


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 weights halve the memory
    traffic of a decode step without a slow emulated matmul."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def default_dtype(device: torch.device) -> str:
    """bfloat16 on CUDA. On CPU the dtype whose decode matmuls measured faster on this machine: bfloat16 through
    the packed CPU matmul (enginepy.cpu_linear) where it beats fp32, else float32 — never slower than fp32
    (measured once, about a second, remembered in $ENGINEPY_CACHE/cpu_dtype.json). Without the C++ extension,
    the CPU flag decides (bf16 where the CPU multiplies it natively)."""
    if device.type == "cuda":
        return "bfloat16"
    try:
        from .cpu_dtype import choose_cpu_dtype
    except ImportError:
        return "bfloat16" if cpu_has_native_bf16() else "float32"
    return choose_cpu_dtype()


def resolve_model_dir(path: str, dtype: str, cache_dir: str | None = None) -> str:
    """Return a converted enginepy directory for `path`, converting a Hugging Face directory once into the cache."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise InvalidParameter(f"model must be a directory path or a hub id; got {path!r}")
    path = str(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, cfgmod.CONFIG_NAME)):
            return path
        if os.path.isfile(os.path.join(path, "config.json")):
            target = os.path.join(cache_dir or default_cache_dir(), source_fingerprint(path, dtype))
            # A complete copy is never replaced: readers need no lock. Otherwise convert under the cache's
            # lock; a process that waited for another's conversion of the same source reuses it.
            if not os.path.isfile(os.path.join(target, cfgmod.CONFIG_NAME)):
                check_creatable(target, "the conversion cache ($ENGINEPY_CACHE or cache_dir)", kind="directory")
                convert_hf(path, target, dtype, reuse=True)
            return target
        if os.path.isfile(os.path.join(path, "state_dict.bin")):
            raise ModelFileError(
                f"{path} is an audiocraft directory (state_dict.bin); it is not supported yet: use the Hugging Face "
                "version of the checkpoint (config.json + model.safetensors)"
            )
        raise ModelFileError(
            f"{path} is not a model directory: expected {cfgmod.CONFIG_NAME} (converted) or config.json (Hugging Face)"
        )
    if path.count("/") == 1 and not path.startswith((".", "/")) and not os.path.exists(path):
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(path, allow_patterns=HUB_PATTERNS)
        except Exception as e:  # offline, unknown repo, auth: all mean the same to the user
            raise ModelFileError(f"{path} is not a local directory and could not be fetched from the hub ({type(e).__name__})") from None
        return resolve_model_dir(local, dtype, cache_dir)
    raise missing_model_directory(path)


REMEDY = "convert the model again (`enginepy cache prune` removes a damaged cached copy)"


def load_decoder(directory: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> MusicGenDecoder:
    """decoder.safetensors -> MusicGenDecoder on `device`, checking every key, shape and dtype."""
    path = os.path.join(directory, cfgmod.DECODER_WEIGHTS)
    if not os.path.isfile(path):
        raise ModelFileError(f"{directory}: {cfgmod.DECODER_WEIGHTS} is missing")
    weights = load_safetensors(path, REMEDY)
    expected = packed_shapes(cfg.num_layers, cfg.hidden_size, cfg.ffn_dim, cfg.num_codebooks, cfg.vocab_size,
                             cfg.text_hidden_size, cfg.num_chroma if cfg.prefix else 0)
    check_keys(weights, expected, path)
    not_float = sorted(k for k, v in weights.items() if not v.is_floating_point())
    if not_float:
        raise ModelFileError(f"{path}: tensors {', '.join(not_float)} are not floating point; {REMEDY}")
    weights = {k: v.to(device=device, dtype=torch.float32 if k.startswith(FP32_KEYS) else dtype) for k, v in weights.items()}
    return MusicGenDecoder(cfg, weights)


def _load_pretrained(model_class, path: str, what: str):
    """transformers' from_pretrained (fp32) with every failure, missing or unexpected key as a ModelFileError:
    from_pretrained would otherwise initialise missing weights at random with only a warning."""
    with reading(path, f"the {what} files are damaged or unreadable", REMEDY):
        model, info = model_class.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    problems = [f"{label}: {', '.join(sorted(map(str, info.get(key) or ())))}"
                for key, label in (("missing_keys", "missing keys"), ("unexpected_keys", "unexpected keys"),
                                   ("mismatched_keys", "shape mismatches")) if info.get(key)]
    if problems:
        raise ModelFileError(f"{path}: {' | '.join(problems)}; {REMEDY}")
    return model


def _check_agrees(directory: str, cfg: ModelConfig, t5_cfg, codec_cfg) -> None:
    """enginepy.json must describe the codec and text encoder it sits beside: a sample rate that disagrees
    would write a WAV whose header lies, a codebook size that disagrees would decode garbage."""
    pairs = [
        ("sample_rate", cfg.sample_rate, "codec", "sampling_rate", codec_cfg.sampling_rate),
        ("hop_length", cfg.hop_length, "codec", "hop_length", codec_cfg.hop_length),
        ("frame_rate", cfg.frame_rate, "codec", "frame_rate", codec_cfg.frame_rate),
        ("vocab_size", cfg.vocab_size, "codec", "codebook_size", codec_cfg.codebook_size),
        ("text_hidden_size", cfg.text_hidden_size, "text_encoder", "d_model", t5_cfg.d_model),
    ]
    for ours, value, sub, theirs, other in pairs:
        if value != other:
            raise ModelFileError(f"{directory}: {cfgmod.CONFIG_NAME} {ours} {value} disagrees with {sub}/config.json "
                                 f"{theirs} {other}; {REMEDY}")
    per_channel = cfg.num_codebooks // cfg.audio_channels
    if per_channel > codec_cfg.num_quantizers:
        raise ModelFileError(f"{directory}: num_codebooks {cfg.num_codebooks} needs {per_channel} quantizers per "
                             f"channel but codec/ has {codec_cfg.num_quantizers}; {REMEDY}")


def load_components(directory: str, dtype: torch.dtype, device: torch.device, max_text_len: int = DEFAULT_TEXT_TOKENS):
    """(config, decoder, text conditioner, codec) of a converted directory; every file checked, damage reported
    as ModelFileError naming the file. The conditioner refuses prompts longer than max_text_len tokens."""
    from transformers import AutoTokenizer, EncodecModel, T5EncoderModel

    check_max_text_len(max_text_len)
    cfg = ModelConfig.load(directory)
    for sub in (cfgmod.TEXT_ENCODER_DIR, cfgmod.CODEC_DIR, cfgmod.TOKENIZER_DIR):
        if not os.path.isdir(os.path.join(directory, sub)):
            raise ModelFileError(f"{directory}: the {sub}/ directory is missing; convert the model again")
    tok_dir = os.path.join(directory, cfgmod.TOKENIZER_DIR)
    if not any(os.path.isfile(os.path.join(tok_dir, n)) for n in TOKENIZER_FILES):
        raise ModelFileError(f"{tok_dir}: tokenizer files are missing (expected one of {', '.join(TOKENIZER_FILES)}); {REMEDY}")
    decoder = load_decoder(directory, cfg, dtype, device)
    with quiet_transformers():
        with reading(tok_dir, "the tokenizer files are damaged or unreadable", REMEDY):
            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        t5 = _load_pretrained(T5EncoderModel, os.path.join(directory, cfgmod.TEXT_ENCODER_DIR), "text encoder")
        encodec = _load_pretrained(EncodecModel, os.path.join(directory, cfgmod.CODEC_DIR), "codec")
    _check_agrees(directory, cfg, t5.config, encodec.config)
    conditioner = TextConditioner(tokenizer, t5, device, max_tokens=max_text_len)
    return cfg, decoder, conditioner, Codec(encodec, cfg.audio_channels, device, num_codebooks=cfg.num_codebooks)


# The cache of converted copies: one directory per (source content, dtype), named by source_fingerprint.
GENERATED_MODELS = ("bench-random-", "demo-random-model")  # Hugging Face directories bench / demo build
TEMP_PREFIX = ".enginepy-convert-"


@dataclass
class CacheEntry:
    """One directory in the cache. status: 'current' (its source is unchanged), 'stale' (the source changed
    since: a new copy will be made and this one is unused), 'source missing', 'damaged' (unreadable
    enginepy.json), 'incomplete' (left by a killed conversion) or 'generated' (a random model of bench/demo)."""

    path: str
    status: str
    source: str | None
    dtype: str | None
    size_bytes: int
    modified: float  # seconds since the epoch


def _tree_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _entry(path: str) -> CacheEntry | None:
    name = os.path.basename(path)
    size, modified = _tree_size(path), os.stat(path).st_mtime
    if name.startswith(TEMP_PREFIX):
        return CacheEntry(path, "incomplete", None, None, size, modified)
    if name.startswith(GENERATED_MODELS):
        return CacheEntry(path, "generated", None, None, size, modified)
    if not os.path.isfile(os.path.join(path, cfgmod.CONFIG_NAME)):
        return None  # not ours
    try:
        cfg = ModelConfig.load(path)
    except EnginepyError:
        return CacheEntry(path, "damaged", None, None, size, modified)
    source = cfg.source.get("path") if isinstance(cfg.source.get("path"), str) else None
    # Copies made before the fingerprint was recorded are named by it.
    recorded = cfg.source.get("fingerprint") or name
    if source is None or not os.path.isdir(source):
        status = "source missing"
    elif source_fingerprint(source, cfg.dtype) != recorded:
        status = "stale"
    else:
        status = "current"
    modified = os.stat(os.path.join(path, cfgmod.CONFIG_NAME)).st_mtime
    return CacheEntry(path, status, source, cfg.dtype, size, modified)


def list_cache(cache_dir: str | None = None) -> list[CacheEntry]:
    """Every directory enginepy made in the cache, oldest first."""
    cache_dir = cache_dir or default_cache_dir()
    if not os.path.isdir(cache_dir):
        return []
    entries = []
    for name in sorted(os.listdir(cache_dir)):
        path = os.path.join(cache_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            entry = _entry(path)
            if entry is not None:
                entries.append(entry)
    return sorted(entries, key=lambda e: e.modified)


def prune_cache(cache_dir: str | None = None, everything: bool = False, dry_run: bool = False) -> list[CacheEntry]:
    """Remove (and return) the cache entries nothing will use again: stale, source missing, damaged and
    incomplete ones; with everything=True all of them. Holds the cache's conversion lock, so no conversion
    is under way (an 'incomplete' directory is then certainly abandoned)."""
    cache_dir = cache_dir or default_cache_dir()
    if not os.path.isdir(cache_dir):
        return []
    with directory_lock(cache_dir):
        doomed = [e for e in list_cache(cache_dir)
                  if everything or e.status in ("stale", "source missing", "damaged", "incomplete")]
        if not dry_run:
            for entry in doomed:
                shutil.rmtree(entry.path, ignore_errors=True)
    return doomed


def format_cache_entry(entry: CacheEntry) -> str:
    """One line: status, dtype, size, date, source and path."""
    size = f"{entry.size_bytes / 2**20:,.1f} MB"
    date = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.modified))
    return f"{entry.status:<14} {entry.dtype or '-':<9} {size:>11}  {date}  {entry.source or '-'}  ->  {entry.path}"
