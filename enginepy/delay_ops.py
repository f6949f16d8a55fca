"""The delay-pattern ops of the C++/CUDA extension enginepy._C, as torch ops with shape stubs.

Importing this module loads the extension, which registers ``torch.ops.enginepy.delay_scatter``,
``delay_gather``, ``delay_step_input`` and ``delay_step_write`` (CPU, and CUDA where it was built with
CUDA), and registers their fake kernels so the ops trace under torch.compile and FakeTensor.
All tensors are int64. Layout (enginepy/pattern.py holds the plain-torch twins, the oracle):

  pattern[b, k, 0]                  = special
  pattern[b, k, 1 + t + delays[k]]  = codes[b, k, t]          for 0 <= t < T
  every other pattern entry          = special                 pattern: [B, K, S], S = T + max(delays) + 1

The per-step ops do no host synchronisation on CUDA, so they can run inside captured CUDA graphs; for
that reason the CUDA per-step ops do not check ``delays >= 0`` (the CPU ones and all whole-sequence ops do).
"""
from __future__ import annotations

import torch

try:
    from enginepy import _C  # noqa: F401  (importing it registers torch.ops.enginepy.*)
except ImportError as exc:
    raise ImportError(
        f"enginepy._C, the C++ extension with the delay-pattern ops, could not be imported ({exc}). "
        "Build it from the repository root with `make build` or "
        "`pip install --no-build-isolation --no-deps -e .`"
    ) from exc


def delay_scatter(codes: torch.Tensor, delays: torch.Tensor, special: int) -> torch.Tensor:
    """Natural layout -> pattern layout.

    codes int64 [B, K, T], delays int64 [K] (>= 0) -> pattern int64 [B, K, T + max(delays) + 1].
    Needs max(delays) on the host (one device sync on CUDA), so it is not for captured graphs.
    """
    return torch.ops.enginepy.delay_scatter(codes, delays, special)


def delay_gather(pattern: torch.Tensor, delays: torch.Tensor) -> torch.Tensor:
    """Pattern layout -> natural layout.

    pattern int64 [B, K, S], delays int64 [K] (>= 0) -> codes int64 [B, K, S - 1 - max(delays)],
    codes[b, k, t] = pattern[b, k, 1 + t + delays[k]]. Fails if S < max(delays) + 1.
    Needs max(delays) on the host (one device sync on CUDA), so it is not for captured graphs.
    """
    return torch.ops.enginepy.delay_gather(pattern, delays)


def delay_step_input(
    codes: torch.Tensor, step: torch.Tensor, lengths: torch.Tensor, delays: torch.Tensor, special: int
) -> torch.Tensor:
    """Input tokens of decode step s (pattern column s) of each row, read from the natural-layout codes.

    codes int64 [B, K, Tmax], step int64 [B], lengths int64 [B], delays int64 [K] -> tokens int64 [B, K]:
    tokens[b, k] = codes[b, k, t] with t = step[b] - 1 - delays[k] where 0 <= t < min(lengths[b], Tmax),
    else special. No host synchronisation: safe inside a CUDA graph.
    """
    return torch.ops.enginepy.delay_step_input(codes, step, lengths, delays, special)


def delay_step_write(
    codes: torch.Tensor,
    tokens: torch.Tensor,
    step: torch.Tensor,
    lengths: torch.Tensor,
    prompt_lengths: torch.Tensor,
    delays: torch.Tensor,
) -> None:
    """Writes the tokens predicted at decode step s into the natural-layout codes, in place.

    codes int64 [B, K, Tmax], tokens int64 [B, K], step/lengths/prompt_lengths int64 [B], delays int64 [K]:
    codes[b, k, t] = tokens[b, k] with t = step[b] - delays[k], only where
    max(prompt_lengths[b], 0) <= t < min(lengths[b], Tmax). No host synchronisation: safe inside a CUDA graph.
    """
    torch.ops.enginepy.delay_step_write(codes, tokens, step, lengths, prompt_lengths, delays)


# Fake kernels: output metadata only. The whole-sequence ops' output length depends on the values of
# delays (max(delays)), which a fake tensor does not have, so it is a new data-dependent size.


def _check_codes_and_delays(codes: torch.Tensor, name: str, delays: torch.Tensor) -> None:
    torch._check(codes.dtype == torch.int64, lambda: f"{name} must be int64, got {codes.dtype}")
    torch._check(codes.dim() == 3, lambda: f"{name} must be 3-D, got {codes.dim()}-D")
    torch._check(delays.dtype == torch.int64, lambda: f"delays must be int64, got {delays.dtype}")
    torch._check(delays.dim() == 1, lambda: f"delays must be 1-D [K], got {delays.dim()}-D")
    torch._check(
        delays.shape[0] == codes.shape[1],
        lambda: f"delays has {delays.shape[0]} entries but {name} has {codes.shape[1]} codebooks",
    )


@torch.library.register_fake("enginepy::delay_scatter")
def _delay_scatter_fake(codes: torch.Tensor, delays: torch.Tensor, special: int) -> torch.Tensor:
    _check_codes_and_delays(codes, "codes", delays)
    steps = torch.library.get_ctx().new_dynamic_size(min=1)  # S = T + max(delays) + 1 >= 1
    return codes.new_empty((codes.shape[0], codes.shape[1], steps))


@torch.library.register_fake("enginepy::delay_gather")
def _delay_gather_fake(pattern: torch.Tensor, delays: torch.Tensor) -> torch.Tensor:
    _check_codes_and_delays(pattern, "pattern", delays)
    frames = torch.library.get_ctx().new_dynamic_size(min=0)  # T = S - 1 - max(delays) >= 0
    return pattern.new_empty((pattern.shape[0], pattern.shape[1], frames))


@torch.library.register_fake("enginepy::delay_step_input")
def _delay_step_input_fake(
    codes: torch.Tensor, step: torch.Tensor, lengths: torch.Tensor, delays: torch.Tensor, special: int
) -> torch.Tensor:
    _check_codes_and_delays(codes, "codes", delays)
    return codes.new_empty((codes.shape[0], codes.shape[1]))


@torch.library.register_fake("enginepy::delay_step_write")
def _delay_step_write_fake(
    codes: torch.Tensor,
    tokens: torch.Tensor,
    step: torch.Tensor,
    lengths: torch.Tensor,
    prompt_lengths: torch.Tensor,
    delays: torch.Tensor,
) -> None:
    _check_codes_and_delays(codes, "codes", delays)
    return None
