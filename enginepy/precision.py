"""fp32 means fp32: matmuls of an fp32 decoder run at full precision whatever the host process chose.

`F.linear` follows torch's global float32 matmul precision; a host that set it to "high" or "medium" (TF32 on
CUDA, bf16 passes on some CPUs) would silently break the fp32 path's token-exact parity with transformers.
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def fp32_matmul_exact(dtype: torch.dtype):
    """Within the block, float32 matmuls use full fp32 precision when `dtype` is float32 (restored after).
    The setting is process-wide; calls on one MusicGen are serialised, so the restore is not racy there."""
    if dtype != torch.float32:
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
