"""The engine's model configuration (enginepy.json in a converted directory)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields

from .errors import ModelFileError

CONFIG_NAME = "enginepy.json"
DECODER_WEIGHTS = "decoder.safetensors"
TEXT_ENCODER_DIR = "text_encoder"
CODEC_DIR = "codec"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
DTYPE_NAMES = ("float32", "float16", "bfloat16")
CONDITIONINGS = ("cross", "prefix")
CHROMA_KEYS = ("sampling_rate", "n_fft", "hop_length", "chunk_length")


def read_json_object(path: str) -> dict:
    """The JSON object in `path`; ModelFileError naming the file when it is unreadable, not JSON or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path} cannot be read ({e.__class__.__name__}: {e})") from None
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path} must hold a JSON object; got a {type(data).__name__}")
    return data


def require_int(section: dict, key: str, where: str, minimum: int = 1) -> int:
    """section[key] as an int >= minimum (bools refused), or ModelFileError naming where/key."""
    if key not in section:
        raise ModelFileError(f"{where}: the {key!r} entry is missing")
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelFileError(f"{where}: {key} must be an integer; got {value!r}")
    if value < minimum:
        raise ModelFileError(f"{where}: {key} must be >= {minimum}; got {value}")
    return value


@dataclass
class ModelConfig:
    """Everything the engine needs to know about a converted MusicGen model.

    hidden_size D, num_layers L, num_heads H (head dim D // H), ffn_dim, num_codebooks K,
    vocab_size V (heads output V; embeddings have V + 1 rows, the last one the special token),
    delays [K] (the delay pattern), text_hidden_size (T5 width), sample_rate (Hz), frame_rate (codes/s),
    hop_length (samples per frame), audio_channels, dtype of the decoder weights.
    conditioning: "cross" (text through cross-attention: MusicGen) or "prefix" (MusicGen-Melody: no
    cross-attention; [chroma_length frames of projected chroma ; projected text] are prepended to the tokens as a
    prefix of the self-attention sequence); num_chroma (chroma bins) and chroma (the chroma's STFT parameters:
    sampling_rate, n_fft, hop_length, chunk_length in seconds) for "prefix" models.
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
    conditioning: str = "cross"
    chroma_length: int = 0
    num_chroma: int = 0
    chroma: dict = field(default_factory=dict)
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
    def prefix(self) -> bool:
        """True for MusicGen-Melody: the conditioning is a prefix of the self-attention sequence."""
        return self.conditioning == "prefix"

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    def validate(self, where: str) -> "ModelConfig":
        """Check every field's type, range and the fields' mutual consistency; ModelFileError naming `where`."""
        d = vars(self)
        for key, minimum in (("hidden_size", 4), ("num_layers", 1), ("num_heads", 1), ("ffn_dim", 1),
                             ("num_codebooks", 1), ("vocab_size", 1), ("text_hidden_size", 1), ("sample_rate", 1),
                             ("frame_rate", 1), ("hop_length", 1), ("audio_channels", 1)):
            # hidden_size >= 4: the sinusoidal positions divide by half - 1.
            require_int(d, key, where, minimum)
        if self.hidden_size % self.num_heads:
            raise ModelFileError(f"{where}: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.audio_channels not in (1, 2) or self.num_codebooks % self.audio_channels:
            raise ModelFileError(f"{where}: audio_channels {self.audio_channels} with num_codebooks "
                                 f"{self.num_codebooks} is not a valid layout")
        delays = self.delays
        if (not isinstance(delays, list) or len(delays) != self.num_codebooks
                or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in delays)):
            raise ModelFileError(f"{where}: delays must be {self.num_codebooks} non-negative integers (one per "
                                 f"codebook); got {delays!r}")
        if self.frame_rate != math.ceil(self.sample_rate / self.hop_length):
            raise ModelFileError(f"{where}: frame_rate {self.frame_rate} disagrees with sample_rate "
                                 f"{self.sample_rate} / hop_length {self.hop_length}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ModelFileError(f"{where}: layer_norm_eps must be a number in (0, 1); got {eps!r}")
        if self.conditioning not in CONDITIONINGS:
            raise ModelFileError(f"{where}: conditioning must be one of {', '.join(CONDITIONINGS)}; "
                                 f"got {self.conditioning!r}")
        if self.prefix:
            require_int(d, "chroma_length", where)
            require_int(d, "num_chroma", where)
            if not isinstance(self.chroma, dict):
                raise ModelFileError(f"{where}: chroma must be a JSON object; got {self.chroma!r}")
            for key in CHROMA_KEYS:
                require_int(self.chroma, key, f"{where} chroma")
        if self.dtype not in DTYPE_NAMES:
            raise ModelFileError(f"{where}: dtype must be one of {', '.join(DTYPE_NAMES)}; got {self.dtype!r}")
        if not isinstance(self.source, dict):
            raise ModelFileError(f"{where}: source must be a JSON object; got {self.source!r}")
        return self

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(asdict(self), f, indent=2)

    @classmethod
    def load(cls, directory: str) -> "ModelConfig":
        """Read and validate `directory`/enginepy.json; ModelFileError naming the file and the bad entry."""
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise ModelFileError(f"{directory} is not a converted enginepy model: {CONFIG_NAME} is missing")
        data = read_json_object(path)
        if data.get("format") != "enginepy" or data.get("version") != FORMAT_VERSION:
            raise ModelFileError(
                f"{path}: unsupported format {data.get('format')!r} version {data.get('version')!r} "
                f"(expected 'enginepy' version {FORMAT_VERSION}); convert the model again"
            )
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ModelFileError(f"{path}: unknown entries {', '.join(unknown)}; convert the model again")
        missing = [f.name for f in fields(cls)
                   if f.name not in data and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise ModelFileError(f"{path}: missing entries {', '.join(missing)}; convert the model again")
        return cls(**data).validate(path)
