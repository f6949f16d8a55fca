"""`enginepy convert SRC DST`: a Hugging Face MusicGen directory -> an enginepy directory.

DST holds enginepy.json (ModelConfig), decoder.safetensors (packed, see weights.py, cast to --dtype),
text_encoder/ (T5 encoder, fp32), codec/ (EnCodec, fp32) and tokenizer/. The directory is built under
a temporary name and renamed into place, so a failed conversion leaves nothing half-written.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from . import config as cfgmod
from .config import ModelConfig
from .errors import InvalidParameter, ModelFileError
from .hf import quiet_transformers
from .pattern import mono_delays, stereo_delays
from .weights import (
    IGNORED_KEYS,
    check_keys,
    expected_decoder_shapes,
    load_submodule_state,
    pack_decoder,
    read_state_dict,
)

# Without one of these, AutoTokenizer would quietly build an untrained default tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
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


def read_hf_config(src: str) -> dict:
    path = os.path.join(src, "config.json")
    if not os.path.isdir(src):
        raise ModelFileError(f"model directory {src} does not exist")
    if not os.path.isfile(path):
        raise ModelFileError(f"{src}: config.json is missing (expected a Hugging Face MusicGen directory)")
    with open(path) as f:
        hf = json.load(f)
    if hf.get("model_type") != "musicgen":
        raise ModelFileError(
            f"{path}: model_type is {hf.get('model_type')!r}; only 'musicgen' (text-conditioned MusicGen) is supported"
        )
    for part in ("text_encoder", "audio_encoder", "decoder"):
        if part not in hf:
            raise ModelFileError(f"{path}: the {part!r} section is missing")
    return hf


def model_config_from_hf(hf: dict) -> ModelConfig:
    """Check that the decoder is one this engine computes exactly, and that it agrees with its codec."""
    from transformers import EncodecConfig

    dec, codec_cfg = hf["decoder"], EncodecConfig(**hf["audio_encoder"])
    where = "config.json decoder"
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
    special = dec.get("pad_token_id", dec["vocab_size"])
    if special != dec["vocab_size"]:
        raise ModelFileError(f"{where}: pad_token_id {special} must equal vocab_size {dec['vocab_size']}")
    return ModelConfig(
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
    )


def _split(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def convert_hf(src: str, dst: str, dtype: str | torch.dtype = "float32") -> ModelConfig:
    """Convert the Hugging Face MusicGen directory `src` into an enginepy directory `dst`."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, EncodecConfig, EncodecModel, T5Config, T5EncoderModel
    torch_dtype = parse_dtype(dtype)
    hf = read_hf_config(src)
    cfg = model_config_from_hf(hf)
    cfg.dtype = dtype_name(torch_dtype)
    cfg.source = {"kind": "huggingface", "path": os.path.abspath(src)}
    if os.path.exists(dst) and os.listdir(dst) and not os.path.isfile(os.path.join(dst, cfgmod.CONFIG_NAME)):
        raise ModelFileError(f"destination {dst} exists and is not an enginepy model directory; refusing to overwrite it")

    state = read_state_dict(src)
    if cfg.text_hidden_size == cfg.hidden_size and "enc_to_dec_proj.weight" not in state:
        # transformers drops the projection when T5's width already equals the decoder's: it is the identity.
        state["enc_to_dec_proj.weight"] = torch.eye(cfg.hidden_size)
        state["enc_to_dec_proj.bias"] = torch.zeros(cfg.hidden_size)
    expected = expected_decoder_shapes(
        cfg.num_layers, cfg.hidden_size, cfg.ffn_dim, cfg.num_codebooks, cfg.vocab_size, cfg.text_hidden_size
    )
    other_parts = ("text_encoder.", "audio_encoder.")
    check_keys(state, expected, f"{src} decoder weights",
               extra_ok=lambda k: k in IGNORED_KEYS or k.startswith(other_parts))

    packed = pack_decoder(state, cfg.num_layers, cfg.num_codebooks)
    packed = {k: v.to(torch.float32 if k.startswith("text_proj") else torch_dtype) for k, v in packed.items()}

    parent = os.path.dirname(os.path.abspath(dst)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".enginepy-convert-", dir=parent)
    try:
        with quiet_transformers():
            text = T5EncoderModel(T5Config(**hf["text_encoder"]))
            load_submodule_state(text, _split(state, "text_encoder."), f"{src} text encoder weights")
            text.save_pretrained(os.path.join(tmp, cfgmod.TEXT_ENCODER_DIR))
            codec = EncodecModel(EncodecConfig(**hf["audio_encoder"]))
            load_submodule_state(codec, _split(state, "audio_encoder."), f"{src} codec weights")
            codec.save_pretrained(os.path.join(tmp, cfgmod.CODEC_DIR))
            if not any(os.path.isfile(os.path.join(src, n)) for n in TOKENIZER_FILES):
                raise ModelFileError(f"{src}: tokenizer files are missing (expected one of {', '.join(TOKENIZER_FILES)})")
            try:
                tokenizer = AutoTokenizer.from_pretrained(src)
            except (OSError, ValueError) as e:
                raise ModelFileError(f"{src}: tokenizer files are missing or unreadable ({e})") from None
            tokenizer.save_pretrained(os.path.join(tmp, cfgmod.TOKENIZER_DIR))
            save_file(packed, os.path.join(tmp, cfgmod.DECODER_WEIGHTS), metadata={"format": "pt"})
            cfg.save(tmp)
            if os.path.exists(dst):
                shutil.rmtree(dst)
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cfg
