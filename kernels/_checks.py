"""Input checks shared by the launchers: every failure is a ValueError that names the argument."""
from __future__ import annotations

import os

import torch

# The interpreter is chosen when triton is imported; reading the variable here mirrors that choice.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(
    name: str,
    x: object,
    *,
    dtypes: tuple[torch.dtype, ...] | None = None,
    ndim: int | tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Raise ValueError unless `x` is a tensor with one of `dtypes` and `ndim` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({allowed}), got {str(x.dtype).replace('torch.', '')}")
    if ndim is not None:
        allowed_ndim = (ndim,) if isinstance(ndim, int) else ndim
        if x.dim() not in allowed_ndim:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed_ndim))} dimensions, got shape {tuple(x.shape)}")
    return x


def check_shape(name: str, x: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Raise ValueError unless x.shape == shape."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def check_devices(**tensors: torch.Tensor | None) -> torch.device:
    """All tensors on one device, CUDA unless the interpreter runs. Returns that device."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
    if first.device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"{first_name} is on {first.device}: Triton kernels need CUDA tensors, "
            "or TRITON_INTERPRET=1 exported before import to run on CPU"
        )
    return first.device


def check_out(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Validate a caller-supplied `out` (any strides) or allocate a fresh contiguous one."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    check_tensor("out", out, dtypes=(dtype,))
    check_shape("out", out, shape)
    if out.device != device:
        raise ValueError(f"out is on {out.device}, expected {device}")
    return out


def check_paged_cache(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    batch: int,
    heads: int,
    head_dim: int,
    like: str,
    like_dtype: torch.dtype,
) -> None:
    """The paged pools [num_blocks, block_size, H, Dh] in the dtype of `like`, and int32 block tables [B, max_blocks]."""
    check_tensor("k_cache", k_cache, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor("v_cache", v_cache, dtypes=FLOAT_DTYPES, ndim=4)
    if tuple(k_cache.shape[2:]) != (heads, head_dim):
        raise ValueError(f"k_cache must have shape [num_blocks, block_size, {heads}, {head_dim}], got {tuple(k_cache.shape)}")
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype != like_dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but {like} has {like_dtype}")
    check_tensor("block_tables", block_tables, dtypes=(torch.int32,), ndim=2)
    if block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must have {batch} rows, got {block_tables.shape[0]}")
