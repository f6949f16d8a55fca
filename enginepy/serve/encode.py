"""Response bodies: float32 audio -> 16-bit PCM, WAV or FLAC bytes in memory, and the pieces of streamed bodies."""
from __future__ import annotations

import base64
import io
import json
import struct

import numpy as np
import torch

FORMATS = ("wav", "flac", "pcm")
STREAMABLE = ("wav", "pcm")
MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "pcm": "audio/pcm"}
# A WAV whose length is not known when its header is sent: RIFF and data sizes at their maximum, which
# readers of live streams (ffmpeg, browsers) take as "until the end of the stream".
UNKNOWN_SIZE = 0xFFFFFFFF


def to_pcm16(wav: torch.Tensor) -> np.ndarray:
    """float32 [C, n] -> int16 [n, C] (interleaved frames), rounded exactly as `audio_io.write_audio` rounds
    (clip to [-1, 1], times 32767, round half to even), so that a WAV from the server equals `enginepy generate`'s."""
    data = wav.detach().float().clamp(-1.0, 1.0).cpu().numpy().T
    return np.round(data * 32767.0).astype(np.int16)


def pcm_bytes(wav: torch.Tensor) -> bytes:
    """float32 [C, n] -> s16le bytes, channels interleaved."""
    return to_pcm16(wav).astype("<i2", copy=False).tobytes()


def encode(wav: torch.Tensor, sample_rate: int, response_format: str) -> bytes:
    """A whole response body: float32 [C, n] -> WAV (16-bit PCM), FLAC (16-bit) or raw s16le bytes."""
    if response_format == "pcm":
        return pcm_bytes(wav)
    import soundfile as sf

    out = io.BytesIO()
    sf.write(out, to_pcm16(wav), sample_rate, subtype="PCM_16", format=response_format.upper())
    return out.getvalue()


def streaming_wav_header(sample_rate: int, channels: int) -> bytes:
    """The 44-byte header of a 16-bit PCM WAV of unknown length (sizes UNKNOWN_SIZE), sent before its samples."""
    block = 2 * channels
    return (b"RIFF" + struct.pack("<I", UNKNOWN_SIZE) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, 16)
            + b"data" + struct.pack("<I", UNKNOWN_SIZE))


def sse_event(kind: str, payload: dict) -> bytes:
    """One server-sent event: `event: <kind>` and `data: {"type": <kind>, ...}` (OpenAI's speech-stream shape)."""
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload})}\n\n".encode()


def sse_audio_delta(pcm: bytes) -> bytes:
    return sse_event("audio.delta", {"audio": base64.b64encode(pcm).decode("ascii")})
