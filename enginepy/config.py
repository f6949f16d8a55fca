"""The engine's model configuration (enginepy.json in a converted directory)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from .errors import ModelFileError

CONFIG_NAME = "enginepy.json"
DECODER_WEIGHTS = "decoder.safetensors"
TEXT_ENCODER_DIR = "text_encoder"
CODEC_DIR = "codec"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1


@dataclass
class ModelConfig:
    """Everything the engine needs to know about a converted MusicGen model.

    hidden_size D, num_layers L, num_heads H (head dim D // H), ffn_dim, num_codebooks K,
    vocab_size V (heads output V; embeddings have V + 1 rows, the last one the special token),
    delays [K] (the delay pattern), text_hidden_size (T5 width), sample_rate (Hz), frame_rate (codes/s),
    hop_length (samples per frame), audio_channels, dtype of the decoder weights.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    num_codebooks: int
    vocab_size: int
    delays: list[int]
    text_hidden_size: int
    sample_rate: int
    frame_rate: int
    hop_length: int
    audio_channels: int = 1
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"
    format: str = "enginepy"
    version: int = FORMAT_VERSION
    source: dict = field(default_factory=dict)

    @property
    def special_token(self) -> int:
        return self.vocab_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(asdict(self), f, indent=2)

    @classmethod
    def load(cls, directory: str) -> "ModelConfig":
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise ModelFileError(f"{directory} is not a converted enginepy model: {CONFIG_NAME} is missing")
        with open(path) as f:
            data = json.load(f)
        if data.get("format") != "enginepy" or data.get("version") != FORMAT_VERSION:
            raise ModelFileError(
                f"{path}: unsupported format {data.get('format')!r} version {data.get('version')!r} "
                f"(expected 'enginepy' version {FORMAT_VERSION}); convert the model again"
            )
        try:
            return cls(**data)
        except TypeError as e:
            raise ModelFileError(f"{path}: {e}") from None
