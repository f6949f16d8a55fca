"""`enginepy convert SRC DST`: a Hugging Face MusicGen directory -> an enginepy directory.

DST holds enginepy.json (ModelConfig), decoder.safetensors (packed, see weights.py, cast to --dtype),
text_encoder/ (T5 encoder, fp32), codec/ (EnCodec, fp32) and tokenizer/. The directory is built under
a temporary name and renamed into place, so a failed, interrupted (Ctrl-C, SIGTERM) or concurrent conversion
never leaves a half-written DST, and a complete DST is the only thing a reader can see.

Conversions into one parent directory are serialised by an exclusive lock (flock) on that directory, so
processes that convert the same model at once into a shared cache wait for each other instead of replacing
the directory under a reader.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import tempfile
import threading

import torch

from . import config as cfgmod
from .audio_io import check_creatable
from .config import ModelConfig, read_json_object, require_int
from .errors import InvalidParameter, ModelFileError
from .hf import quiet_transformers
from .pattern import mono_delays, stereo_delays
from .random_model import MELODY_FEATURES
from .weights import (
    FP32_KEYS,
    IGNORED_KEYS,
    check_keys,
    expected_decoder_shapes,
    load_submodule_state,
    pack_decoder,
    read_state_dict,
    reading,
)

# Without one of these, AutoTokenizer would quietly build an untrained default tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
MODEL_TYPES = ("musicgen", "musicgen_melody")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype, name: str = "dtype") -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' (or a torch dtype) -> torch dtype; anything else is refused."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise InvalidParameter(f"{name} must be one of {', '.join(DTYPES)}; got {dtype!r}")


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def missing_model_directory(path: str) -> ModelFileError:
    """The error for a model path that is not a directory: absent, or a file."""
    return ModelFileError(f"model directory {path} " + ("is a file, not a directory" if os.path.exists(path) else "does not exist"))


def read_hf_config(src: str) -> dict:
    """config.json of a Hugging Face MusicGen directory, with its three sections present as JSON objects."""
    path = os.path.join(src, "config.json")
    if not os.path.isdir(src):
        raise missing_model_directory(src)
    if not os.path.isfile(path):
        raise ModelFileError(f"{src}: config.json is missing (expected a Hugging Face MusicGen directory)")
    hf = read_json_object(path)
    if hf.get("model_type") not in MODEL_TYPES:
        raise ModelFileError(
            f"{path}: model_type is {hf.get('model_type')!r}; supported: 'musicgen' (MusicGen) and "
            "'musicgen_melody' (MusicGen-Melody)"
        )
    for part in ("text_encoder", "audio_encoder", "decoder"):
        if part not in hf:
            raise ModelFileError(f"{path}: the {part!r} section is missing")
        if not isinstance(hf[part], dict):
            raise ModelFileError(f"{path}: the {part!r} section must be a JSON object; got {type(hf[part]).__name__}")
    return hf


def _codec_config(hf: dict, where: str):
    """transformers' EncodecConfig of the audio_encoder section, with the fields the engine derives from checked."""
    from transformers import EncodecConfig

    ae = hf["audio_encoder"]
    with reading(where, "the audio_encoder section is not a valid EnCodec configuration", "fix or download config.json again"):
        codec_cfg = EncodecConfig(**ae)
    section = f"{where} audio_encoder"
    require_int(vars(codec_cfg), "sampling_rate", section)
    require_int(vars(codec_cfg), "codebook_size", section, minimum=2)
    for key in ("upsampling_ratios", "target_bandwidths"):
        values = getattr(codec_cfg, key)
        if (not isinstance(values, (list, tuple)) or not values
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 for v in values)):
            raise ModelFileError(f"{section}: {key} must be a non-empty list of positive numbers; got {values!r}")
    if any(not isinstance(v, int) for v in codec_cfg.upsampling_ratios):
        raise ModelFileError(f"{section}: upsampling_ratios must be integers; got {codec_cfg.upsampling_ratios!r}")
    if codec_cfg.num_quantizers < 1:
        raise ModelFileError(f"{section}: target_bandwidths {codec_cfg.target_bandwidths} give no quantizer at "
                             f"{codec_cfg.frame_rate} frames/s")
    return codec_cfg


def model_config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """Check that the decoder is one this engine computes exactly, and that it agrees with its codec."""
    codec_cfg = _codec_config(hf, where)
    require_int(hf["text_encoder"], "d_model", f"{where} text_encoder")
    dec = hf["decoder"]
    where = f"{where} decoder"
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "num_codebooks", "vocab_size"):
        require_int(dec, key, where)
    for key in ("audio_channels", "pad_token_id"):
        if key in dec:
            require_int(dec, key, where, minimum=0)
    if dec.get("activation_function", "gelu") != "gelu":
        raise ModelFileError(f"{where}: activation_function {dec['activation_function']!r} is not supported (only 'gelu')")
    if dec.get("scale_embedding", False):
        raise ModelFileError(f"{where}: scale_embedding=true is not supported")
    if dec.get("cross_attention_hidden_size") is not None:
        raise ModelFileError(f"{where}: cross_attention_hidden_size is not supported (text states are projected by enc_to_dec_proj)")
    if dec["hidden_size"] < 4:
        raise ModelFileError(f"{where}: hidden_size {dec['hidden_size']} is too small (the sinusoidal positions need >= 4)")
    if dec["hidden_size"] % dec["num_attention_heads"]:
        raise ModelFileError(f"{where}: hidden_size {dec['hidden_size']} is not divisible by num_attention_heads")
    channels = int(dec.get("audio_channels", 1))
    k = int(dec["num_codebooks"])
    if channels not in (1, 2) or k % channels:
        raise ModelFileError(f"{where}: audio_channels {channels} with num_codebooks {k} is not a valid layout")
    if dec["vocab_size"] != codec_cfg.codebook_size:
        raise ModelFileError(
            f"{where}: vocab_size {dec['vocab_size']} disagrees with the codec's codebook_size {codec_cfg.codebook_size}"
        )
    if k // channels > codec_cfg.num_quantizers:
        raise ModelFileError(
            f"{where}: num_codebooks {k} needs {k // channels} quantizers per channel but the codec has "
            f"{codec_cfg.num_quantizers}"
        )
    melody = {}
    if hf["model_type"] == "musicgen_melody":
        for key in ("num_chroma", "chroma_length"):
            melody[key] = require_int(hf, key, where.rsplit(" ", 1)[0])
        melody["conditioning"] = "prefix"
        melody["chroma"] = {k: MELODY_FEATURES[k] for k in cfgmod.CHROMA_KEYS}  # the directory's: chroma_settings
    special = dec.get("pad_token_id", dec["vocab_size"])
    if special != dec["vocab_size"]:
        raise ModelFileError(f"{where}: pad_token_id {special} must equal vocab_size {dec['vocab_size']}")
    cfg = ModelConfig(
        hidden_size=dec["hidden_size"],
        num_layers=dec["num_hidden_layers"],
        num_heads=dec["num_attention_heads"],
        ffn_dim=dec["ffn_dim"],
        num_codebooks=k,
        vocab_size=dec["vocab_size"],
        delays=stereo_delays(k) if channels == 2 else mono_delays(k),
        text_hidden_size=hf["text_encoder"]["d_model"],
        sample_rate=codec_cfg.sampling_rate,
        frame_rate=codec_cfg.frame_rate,
        hop_length=codec_cfg.hop_length,
        audio_channels=channels,
        **melody,
    )
    return cfg.validate(where)


def chroma_settings(src: str) -> dict:
    """A MusicGen-Melody directory's chroma parameters: its preprocessor_config.json (the feature extractor's),
    with MusicgenMelodyFeatureExtractor's defaults for what it does not set."""
    settings = {k: MELODY_FEATURES[k] for k in cfgmod.CHROMA_KEYS}
    path = os.path.join(src, "preprocessor_config.json")
    if os.path.isfile(path):
        data = read_json_object(path)
        for key in cfgmod.CHROMA_KEYS:
            if key in data:
                settings[key] = require_int(data, key, path)
        if data.get("num_chroma", 12) != 12 or data.get("feature_size", 12) != 12:
            raise ModelFileError(f"{path}: only 12 chroma bins are supported; got num_chroma "
                                 f"{data.get('num_chroma')!r}, feature_size {data.get('feature_size')!r}")
    return settings


def _split(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def source_fingerprint(directory: str, dtype: str) -> str:
    """Identifies a source directory's content cheaply (its path and the names, sizes, mtimes of its files)
    plus the dtype: the name of its converted copy in the cache, and how `enginepy cache` tells it is stale."""
    h = hashlib.sha256(os.path.abspath(directory).encode())
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            st = os.stat(path)
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(dtype.encode())
    return h.hexdigest()[:20]


@contextlib.contextmanager
def directory_lock(directory: str):
    """Exclusive flock on `directory` itself (no lock file to leave behind) for the duration of the block.
    Conversions into one directory and `enginepy cache prune` take it; readers of a complete model never do."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class Terminated(SystemExit):
    """SIGTERM arrived during a conversion: unwinds like Ctrl-C so that the temporary directory is removed."""


@contextlib.contextmanager
def _terminate_cleanly():
    """While converting in the main thread, turn SIGTERM (default action: die on the spot, leaving a temporary
    directory of the model's size behind) into an exception that runs the cleanup, then exit status 143."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame):
        raise Terminated(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def check_destination(dst: str) -> str:
    """A DST that convert may write: creatable, and if it exists an empty or enginepy model directory."""
    dst = check_creatable(dst, "destination", kind="directory")
    if os.path.isdir(dst) and os.listdir(dst) and not os.path.isfile(os.path.join(dst, cfgmod.CONFIG_NAME)):
        raise InvalidParameter(f"destination {dst} exists and is not an enginepy model directory; refusing to overwrite it")
    return dst


def convert_hf(src: str, dst: str, dtype: str | torch.dtype = "float32", reuse: bool = False) -> ModelConfig:
    """Convert the Hugging Face MusicGen directory `src` into an enginepy directory `dst`.

    An existing enginepy `dst` is replaced (the new one is renamed in, then the old one removed), unless
    `reuse` is true and it is complete: then it is kept and its config returned (the cache's case, where
    several processes may ask for the same conversion at once). Holds the lock of dst's parent throughout.
    """
    torch_dtype = parse_dtype(dtype)
    check_destination(dst)
    hf = read_hf_config(src)
    model_config_from_hf(hf, os.path.join(src, "config.json"))  # refuse a bad config before making directories
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    with directory_lock(parent), _terminate_cleanly():
        if reuse and os.path.isfile(os.path.join(dst, cfgmod.CONFIG_NAME)):
            return ModelConfig.load(dst)
        check_destination(dst)  # again: another process may have written it while this one waited
        return _convert_locked(src, dst, torch_dtype, parent)


def _convert_locked(src: str, dst: str, torch_dtype: torch.dtype, parent: str) -> ModelConfig:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, EncodecConfig, EncodecModel, T5Config, T5EncoderModel

    hf = read_hf_config(src)  # read again under the lock: what is converted is what the fingerprint describes
    where = os.path.join(src, "config.json")
    cfg = model_config_from_hf(hf, where)
    cfg.dtype = dtype_name(torch_dtype)
    if cfg.prefix:
        cfg.chroma = chroma_settings(src)
        cfg.validate(where)
    cfg.source = {"kind": "huggingface", "path": os.path.abspath(src),
                  "fingerprint": source_fingerprint(src, cfg.dtype)}

    state = read_state_dict(src)
    if cfg.text_hidden_size == cfg.hidden_size and "enc_to_dec_proj.weight" not in state:
        # transformers drops the projection when T5's width already equals the decoder's: it is the identity.
        state["enc_to_dec_proj.weight"] = torch.eye(cfg.hidden_size)
        state["enc_to_dec_proj.bias"] = torch.zeros(cfg.hidden_size)
    if cfg.prefix and cfg.num_chroma == cfg.hidden_size and "audio_enc_to_dec_proj.weight" not in state:
        state["audio_enc_to_dec_proj.weight"] = torch.eye(cfg.hidden_size)  # likewise for the chroma
        state["audio_enc_to_dec_proj.bias"] = torch.zeros(cfg.hidden_size)
    expected = expected_decoder_shapes(
        cfg.num_layers, cfg.hidden_size, cfg.ffn_dim, cfg.num_codebooks, cfg.vocab_size, cfg.text_hidden_size,
        cfg.num_chroma if cfg.prefix else 0,
    )
    other_parts = ("text_encoder.", "audio_encoder.")
    check_keys(state, expected, f"{src} decoder weights",
               extra_ok=lambda k: k in IGNORED_KEYS or k.startswith(other_parts))

    packed = pack_decoder(state, cfg.num_layers, cfg.num_codebooks, prefix=cfg.prefix)
    packed = {k: v.to(torch.float32 if k.startswith(FP32_KEYS) else torch_dtype) for k, v in packed.items()}

    remedy = "fix or download config.json again"
    tmp = tempfile.mkdtemp(prefix=".enginepy-convert-", dir=parent)
    try:
        with quiet_transformers():
            with reading(where, "the text_encoder section is not a valid T5 configuration", remedy):
                text = T5EncoderModel(T5Config(**hf["text_encoder"]))
            load_submodule_state(text, _split(state, "text_encoder."), f"{src} text encoder weights")
            text.save_pretrained(os.path.join(tmp, cfgmod.TEXT_ENCODER_DIR))
            with reading(where, "the audio_encoder section is not a valid EnCodec configuration", remedy):
                codec = EncodecModel(EncodecConfig(**hf["audio_encoder"]))
            load_submodule_state(codec, _split(state, "audio_encoder."), f"{src} codec weights")
            codec.save_pretrained(os.path.join(tmp, cfgmod.CODEC_DIR))
            if not any(os.path.isfile(os.path.join(src, n)) for n in TOKENIZER_FILES):
                raise ModelFileError(f"{src}: tokenizer files are missing (expected one of {', '.join(TOKENIZER_FILES)})")
            with reading(src, "the tokenizer files are damaged or unreadable", "download the checkpoint again"):
                tokenizer = AutoTokenizer.from_pretrained(src)
            tokenizer.save_pretrained(os.path.join(tmp, cfgmod.TOKENIZER_DIR))
        save_file(packed, os.path.join(tmp, cfgmod.DECODER_WEIGHTS), metadata={"format": "pt"})
        cfg.save(tmp)  # last: a directory with enginepy.json is complete
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any other new directory
        _replace_directory(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cfg


def _replace_directory(new: str, dst: str) -> None:
    """Rename `new` to `dst`. An existing dst is first renamed aside and removed only once `new` is in place,
    so dst is never a half-deleted directory (a reader that opened its files keeps reading them)."""
    if not os.path.lexists(dst):
        os.replace(new, dst)
        return
    old = new + ".old"
    os.replace(dst, old)
    try:
        os.replace(new, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)
