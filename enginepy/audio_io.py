"""Output files: checked before any work starts, written atomically (a temporary name in the target directory,
then a rename), in the format their extension names."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from .errors import InvalidParameter

# extension -> (soundfile format, subtype). 16-bit PCM for the lossless ones; Vorbis is Ogg's usual codec.
AUDIO_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS")}
TOKENS_EXT = ".npy"


def _existing_ancestor(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(directory):
        directory = os.path.dirname(directory)
    return directory


def check_creatable(path, name: str, kind: str = "file") -> str:
    """Refuse, before any work, a `path` that cannot be created: empty, an existing directory (for a file) or
    file (for a directory), under a file, or in a directory where no file can be made (read-only, /proc).

    The directory test creates and removes a probe file: permission bits say nothing about read-only mounts,
    pseudo file systems or root. Missing parent directories are fine (they are made when writing).
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise InvalidParameter(f"{name} must be a {kind} path; got {str(path)!r}")
    path = str(path)
    if kind == "file" and os.path.isdir(path):
        raise InvalidParameter(f"{name} {path} is an existing directory; give a file path")
    if kind == "directory" and os.path.lexists(path) and not os.path.isdir(path):
        raise InvalidParameter(f"{name} {path} exists and is not a directory")
    ancestor = _existing_ancestor(path)
    if not os.path.isdir(ancestor):
        raise InvalidParameter(f"{name} {path}: {ancestor} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".enginepy-probe-", dir=ancestor)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise InvalidParameter(f"{name} {path}: cannot create files in {ancestor} ({e.strerror})") from None
    return path


def check_audio_path(path, name: str = "--out") -> str:
    """A creatable file whose extension names a format written here: .wav, .flac or .ogg."""
    path = check_creatable(path, name)
    if os.path.splitext(path)[1].lower() not in AUDIO_FORMATS:
        raise InvalidParameter(
            f"{name} must end in {', '.join(AUDIO_FORMATS)} (the extension picks the format); got {path!r}"
        )
    return path


def check_tokens_path(path, name: str = "--tokens-out") -> str:
    """A creatable .npy file (codes are written with numpy.save)."""
    path = check_creatable(path, name)
    if os.path.splitext(path)[1].lower() != TOKENS_EXT:
        raise InvalidParameter(f"{name} must end in {TOKENS_EXT} (codes are written as a NumPy array); got {path!r}")
    return path


def check_distinct(named_paths: list[tuple[str, str]]) -> None:
    """Refuse two outputs that name the same file (one would overwrite the other). named_paths: (option, path)."""
    seen: dict[str, str] = {}
    for name, path in named_paths:
        key = os.path.normcase(os.path.realpath(path))
        if key in seen:
            raise InvalidParameter(f"{seen[key]} and {name} both name {path}; give them different paths")
        seen[key] = name


def write_atomically(path: str, write) -> None:
    """Call write(tmp) on a temporary file beside `path`, then rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=".enginepy-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result should look like any other new file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_audio(path: str, wav: torch.Tensor, sample_rate: int) -> None:
    """wav float32 [C, samples] in [-1, 1] (clipped) -> `path` in the format its extension names (16-bit WAV or
    FLAC, Ogg Vorbis), written atomically."""
    import soundfile as sf

    ext = os.path.splitext(path)[1].lower()
    if ext not in AUDIO_FORMATS:
        raise InvalidParameter(f"audio path must end in {', '.join(AUDIO_FORMATS)}; got {path!r}")
    fmt, subtype = AUDIO_FORMATS[ext]
    data = wav.detach().float().clamp(-1.0, 1.0).cpu().numpy().T  # [samples, C]
    if subtype == "PCM_16":
        # Rounded here, once: libsndfile's own float -> int16 conversion differs by one step between WAV and FLAC.
        data = np.round(data * 32767.0).astype(np.int16)
    write_atomically(path, lambda tmp: sf.write(tmp, data, sample_rate, subtype=subtype, format=fmt))


def write_tokens(path: str, codes: torch.Tensor) -> None:
    """codes int64 [B, K, T] -> .npy at `path`, written atomically."""
    array = codes.detach().cpu().to(torch.int64).numpy()

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    write_atomically(path, save)


def numbered_paths(path: str, count: int) -> list[str]:
    """FILE.wav for one output; FILE-0.wav, FILE-1.wav, ... for several."""
    if count == 1:
        return [path]
    stem, ext = os.path.splitext(path)
    return [f"{stem}-{i}{ext}" for i in range(count)]
