"""Finding and loading a model: converted enginepy directory, Hugging Face directory, or hub id."""
from __future__ import annotations

import hashlib
import os

import torch

from . import config as cfgmod
from .codec import Codec
from .conditioning import TextConditioner
from .config import ModelConfig
from .convert import convert_hf
from .errors import InvalidParameter, ModelFileError
from .hf import quiet_transformers
from .model import MusicGenDecoder
from .weights import check_keys, packed_shapes

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
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameter(f"device {device!r} was requested but CUDA is not available on this machine; use device='cpu'")
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
    """bfloat16 on CUDA and on CPUs with native bf16 (measured >2x faster than fp32 there), else float32."""
    if device.type == "cuda" or cpu_has_native_bf16():
        return "bfloat16"
    return "float32"


def _fingerprint(directory: str, dtype: str) -> str:
    """Identifies a source directory's content cheaply (names, sizes, mtimes of its files) plus the dtype."""
    h = hashlib.sha256(os.path.abspath(directory).encode())
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            st = os.stat(path)
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(dtype.encode())
    return h.hexdigest()[:20]


def resolve_model_dir(path: str, dtype: str, cache_dir: str | None = None) -> str:
    """Return a converted enginepy directory for `path`, converting a Hugging Face directory once into the cache."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise InvalidParameter(f"model must be a directory path or a hub id; got {path!r}")
    path = str(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, cfgmod.CONFIG_NAME)):
            return path
        if os.path.isfile(os.path.join(path, "config.json")):
            target = os.path.join(cache_dir or default_cache_dir(), _fingerprint(path, dtype))
            if not os.path.isfile(os.path.join(target, cfgmod.CONFIG_NAME)):
                convert_hf(path, target, dtype)
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
    raise ModelFileError(f"model directory {path} does not exist")


def load_decoder(directory: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> MusicGenDecoder:
    """decoder.safetensors -> MusicGenDecoder on `device`, checking every key and shape."""
    from safetensors.torch import load_file

    path = os.path.join(directory, cfgmod.DECODER_WEIGHTS)
    if not os.path.isfile(path):
        raise ModelFileError(f"{directory}: {cfgmod.DECODER_WEIGHTS} is missing")
    weights = load_file(path)
    expected = packed_shapes(cfg.num_layers, cfg.hidden_size, cfg.ffn_dim, cfg.num_codebooks, cfg.vocab_size, cfg.text_hidden_size)
    check_keys(weights, expected, path)
    weights = {k: v.to(device=device, dtype=torch.float32 if k.startswith("text_proj") else dtype) for k, v in weights.items()}
    return MusicGenDecoder(cfg, weights)


def load_components(directory: str, dtype: torch.dtype, device: torch.device):
    """(config, decoder, text conditioner, codec) of a converted directory."""
    from transformers import AutoTokenizer, EncodecModel, T5EncoderModel

    cfg = ModelConfig.load(directory)
    for sub in (cfgmod.TEXT_ENCODER_DIR, cfgmod.CODEC_DIR, cfgmod.TOKENIZER_DIR):
        if not os.path.isdir(os.path.join(directory, sub)):
            raise ModelFileError(f"{directory}: the {sub}/ directory is missing; convert the model again")
    decoder = load_decoder(directory, cfg, dtype, device)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(directory, cfgmod.TOKENIZER_DIR))
        t5 = T5EncoderModel.from_pretrained(os.path.join(directory, cfgmod.TEXT_ENCODER_DIR), dtype=torch.float32)
        encodec = EncodecModel.from_pretrained(os.path.join(directory, cfgmod.CODEC_DIR), dtype=torch.float32)
    return cfg, decoder, TextConditioner(tokenizer, t5, device), Codec(encodec, cfg.audio_channels, device)
