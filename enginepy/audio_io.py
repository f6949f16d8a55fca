"""Writing results atomically: a temporary name in the target directory, then a rename."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import torch


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


def write_wav(path: str, wav: torch.Tensor, sample_rate: int) -> None:
    """wav float32 [C, samples] in [-1, 1] (clipped) -> 16-bit PCM WAV at `path`, written atomically."""
    import soundfile as sf

    data = wav.detach().float().clamp(-1.0, 1.0).cpu().numpy().T  # [samples, C]
    write_atomically(path, lambda tmp: sf.write(tmp, data, sample_rate, subtype="PCM_16", format="WAV"))


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
